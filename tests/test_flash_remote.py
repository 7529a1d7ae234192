"""Remote update: fetch over HTTP (a real local server) or from a path, check sha256, flash."""

from __future__ import annotations

import functools
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from device_fixtures import DeviceBundles, build_device_bundles, bundle_files, copy_tree, tree_files

from devices.flash import FlashResult, boot
from devices.remote import INCOMING_DIR, pack_bundle, remote_update, sha256_of
from devices.slots import DeviceError, device_status, read_active, slot_dir
from runtime import cli


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


@pytest.fixture
def device(tmp_path: Path, bundles: DeviceBundles) -> Path:
    return copy_tree(bundles.template_root, tmp_path / "dev")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, bundles: DeviceBundles) -> Iterator[dict]:
    """A real HTTP server on 127.0.0.1 serving the ``new`` bundle as a transport archive."""
    www = tmp_path_factory.mktemp("www")
    digest = pack_bundle(bundles.new, www / "new.tar.gz")
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"www": www, "url": f"{base}/new.tar.gz", "base": base, "sha256": digest}
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def assert_failed_untouched(result: FlashResult, root: Path, stage: str, text: str) -> None:
    assert not result.ok and result.stage == stage, result.reason
    assert text in (result.reason or ""), result.reason
    assert read_active(root) == "A"
    status = device_status(root)
    assert status["slots"]["A"]["verified"]
    assert status["last_failure"]["stage"] == stage
    assert status["last_failure"]["reason"] == result.reason
    assert not (root / INCOMING_DIR).exists()
    event = result.to_event()
    assert event["type"] == "update_failed" and event["reason"] == result.reason


def test_update_over_http_flashes_and_reports(
    device: Path, served: dict, bundles: DeviceBundles
) -> None:
    result = remote_update(device, served["url"], served["sha256"])
    assert result.ok, result.reason
    assert result.slot == "B" and result.previous_slot == "A" and result.source == served["url"]
    assert read_active(device) == "B"
    assert tree_files(slot_dir(device, "B")) == bundle_files(bundles.new)
    assert not (device / INCOMING_DIR).exists()
    event = json.loads(json.dumps(result.to_event()))
    assert event["type"] == "update_ok" and event["health"]["passed"]


def test_digest_mismatch_is_refused_before_anything_is_written(device: Path, served: dict) -> None:
    wrong = "sha256:" + "0" * 64
    result = remote_update(device, served["url"], wrong)
    assert_failed_untouched(result, device, "fetch", "sha256 mismatch")
    assert device_status(device)["slots"]["B"]["status"] == "empty"


@pytest.mark.parametrize(
    ("source", "sha", "text"),
    [
        ("{base}/missing.tar.gz", "{sha256}", "HTTP 404"),
        ("http://127.0.0.1:9/new.tar.gz", "{sha256}", "download failed"),
        ("ftp://example.invalid/x.tar.gz", "{sha256}", "unsupported source 'ftp'"),
        ("{url}", "not-a-digest", "not a sha256 hex digest"),
    ],
)
def test_fetch_failures_name_the_reason(
    source: str, sha: str, text: str, device: Path, served: dict
) -> None:
    result = remote_update(device, source.format(**served), sha.format(**served), timeout_s=5)
    assert_failed_untouched(result, device, "fetch", text)


def _archive(path: Path, members: dict[str, bytes], link: str | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo("manifest.json")
            info.type = tarfile.SYMTYPE
            info.linkname = link
            tar.addfile(info)
    return sha256_of(path)


@pytest.mark.parametrize(
    ("members", "link", "text"),
    [
        ({"../escaped.txt": b"x"}, None, "escapes the bundle directory"),
        ({"/etc/evil": b"x"}, None, "escapes the bundle directory"),
        ({}, "/etc/passwd", "not a regular file or directory"),
        (None, None, "not a readable bundle archive"),
    ],
)
def test_unsafe_or_broken_archives_are_refused(
    members: dict[str, bytes] | None,
    link: str | None,
    text: str,
    tmp_path: Path,
    device: Path,
) -> None:
    archive = tmp_path / "evil.tar.gz"
    if members is None:
        archive.write_bytes(b"\x1f\x8b this is not gzip")
        digest = sha256_of(archive)
    else:
        digest = _archive(archive, members, link)
    result = remote_update(device, str(archive), digest)
    assert_failed_untouched(result, device, "fetch", text)
    assert not (device / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_archive_of_a_tampered_bundle_is_refused_at_verify(
    tmp_path: Path, device: Path, bundles: DeviceBundles
) -> None:
    bad = copy_tree(bundles.new, tmp_path / "bad")
    (bad / "act.onnx").write_bytes(b"swapped weights")
    digest = pack_bundle(bad, tmp_path / "bad.tar.gz")  # the digest matches the archive
    result = remote_update(device, (tmp_path / "bad.tar.gz").as_uri(), digest)
    assert_failed_untouched(result, device, "verify", "hash mismatch for act.onnx")


def test_directory_source_is_pinned_by_its_manifest_digest(
    tmp_path: Path, device: Path, bundles: DeviceBundles
) -> None:
    wrong = remote_update(device, str(bundles.new), sha256_of(bundles.old / "manifest.json"))
    assert_failed_untouched(wrong, device, "fetch", "sha256 mismatch")
    result = remote_update(device, str(bundles.new), sha256_of(bundles.new / "manifest.json"))
    assert result.ok and read_active(device) == "B", result.reason


def test_cli_pack_and_update(tmp_path: Path, device: Path, bundles: DeviceBundles, capsys) -> None:
    archive = tmp_path / "b.tar.gz"
    assert cli.main(["device", "pack", str(bundles.old), "--out", str(archive)]) == 0
    digest = capsys.readouterr().out.split()[0]
    assert digest == sha256_of(archive)
    # The old bundle is already active: the update is a no-op that still reports success.
    code = cli.main(
        ["device", "update", str(device), archive.as_uri(), "--sha256", digest, "--json"]
    )
    event = json.loads(capsys.readouterr().out)
    assert code == 0 and event["type"] == "update_ok" and event["stage"] == "unchanged"


# -- boot: what the field runner calls -------------------------------------------------------
def test_boot_returns_the_verified_active_slot(device: Path) -> None:
    assert boot(device) == slot_dir(device, "A")


def test_boot_falls_back_when_the_active_slot_rots(
    tmp_path: Path, device: Path, served: dict
) -> None:
    assert remote_update(device, served["url"], served["sha256"]).ok  # new in B, old in A
    (slot_dir(device, "B") / "step.onnx").write_bytes(b"bit rot")
    assert boot(device) == slot_dir(device, "A")
    status = device_status(device)
    assert status["active_slot"] == "A"
    assert status["slots"]["B"]["status"] == "failed"
    assert status["last_failure"]["stage"] == "boot"
    assert "fell back to slot A" in status["last_failure"]["reason"]


def test_boot_without_a_usable_slot_refuses(device: Path) -> None:
    (slot_dir(device, "A") / "step.onnx").write_bytes(b"bit rot")
    with pytest.raises(DeviceError, match=r"fails verification.*no fallback"):
        boot(device)
    assert read_active(device) == "A"  # nothing better to switch to
