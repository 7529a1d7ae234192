"""Bundles and device roots for the device tests, built once per test process.

Three genuinely different signed bundles (``old``, ``new``, ``third``: different network widths,
so every graph file differs), one exported for another architecture (``arm``), a second key
pair, and device roots that tests copy instead of flashing again: ``old`` active in slot A with
slot B empty (``template_root``) or holding ``third``, good (``dual_root``).
Bundles come from the real exporter on untrained networks (``tests/bundle_fixtures.py``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.bundle import MANIFEST_FILE, SIGNATURE_FILE, sha256_file, sign_bytes

OLD_NETS = ("model.encoder_hidden=[32, 32]", "model.hidden=[32, 32]")
NEW_NETS = ("model.encoder_hidden=[24, 24]", "model.hidden=[40, 40]")
THIRD_NETS = ("model.encoder_hidden=[16, 16]", "model.hidden=[24, 24]")


@dataclass(frozen=True)
class DeviceBundles:
    """Signed bundles and keys shared by the device tests (never modify them: copy first)."""

    key: Path  # private signing key
    pub: Path
    other_key: Path
    other_pub: Path
    old: Path  # profile x86-cpu
    new: Path  # profile x86-cpu, different networks
    arm: Path  # profile jetson-orin-nano-8gb (aarch64)
    third: Path  # profile x86-cpu, yet other networks
    template_root: Path  # provisioned x86-cpu with pub; `old` active in slot A, B empty
    dual_root: Path  # like template_root, but B holds `third`, good (the rollback target)


_CACHE: dict[str, DeviceBundles] = {}


def build_device_bundles(tmp_factory: pytest.TempPathFactory) -> DeviceBundles:
    """Export (once per process) everything the device tests need."""
    if "bundles" not in _CACHE:
        _CACHE["bundles"] = _build(tmp_factory)
    return _CACHE["bundles"]


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a bundle or device root that a test may modify."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_manifest(bundle: Path, key: Path | None, **fields: object) -> None:
    """Change manifest fields, then re-sign with ``key`` (a signature valid for the new bytes)."""
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    data.update(fields)
    raw = json.dumps(data, indent=2, sort_keys=True).encode()
    (bundle / MANIFEST_FILE).write_bytes(raw)
    if key is not None:
        (bundle / SIGNATURE_FILE).write_bytes(sign_bytes(raw, key.read_bytes()))


def rehash(bundle: Path, rel: str, key: Path) -> None:
    """Record the current sha256 of ``rel`` in the manifest and re-sign: a *validly signed*
    bundle whose content is nonetheless wrong (what the health gate must catch)."""
    files = json.loads((bundle / MANIFEST_FILE).read_text())["files"]
    files[rel] = sha256_file(bundle / rel)
    edit_manifest(bundle, key, files=files)


def bundle_files(bundle: Path) -> dict[str, bytes]:
    """Every file a flash copies (manifest's files, manifest, signature) -> its bytes."""
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    names = [*manifest["files"], MANIFEST_FILE]
    if (bundle / SIGNATURE_FILE).is_file():
        names.append(SIGNATURE_FILE)
    return {name: (bundle / name).read_bytes() for name in names}


def tree_files(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` (relative POSIX path -> bytes)."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# -- building --------------------------------------------------------------------------------
def _build(tmp_factory: pytest.TempPathFactory) -> DeviceBundles:
    from bundle_fixtures import make_run

    from devices.flash import flash, rollback
    from devices.slots import init_device
    from export.bundle_writer import ExportOptions, export_bundle
    from export.signing import generate_keypair

    base = tmp_factory.mktemp("device-bundles")
    key, other_key = base / "signing", base / "other"
    generate_keypair(key)
    generate_keypair(other_key)
    run_old = make_run(base / "run-old", OLD_NETS, seed=0)
    run_new = make_run(base / "run-new", NEW_NETS, seed=1)
    run_third = make_run(base / "run-third", THIRD_NETS, seed=2)
    bundles = {}
    for name, run, profile in (
        ("old", run_old, "x86-cpu"),
        ("new", run_new, "x86-cpu"),
        ("arm", run_old, "jetson-orin-nano-8gb"),
        ("third", run_third, "x86-cpu"),
    ):
        bundles[name] = base / f"bundle-{name}"
        export_bundle(run, bundles[name], ExportOptions(key=key, profile=profile))
    pub = Path(f"{key}.pub")
    template = base / "device-template"
    init_device(template, "x86-cpu", pub)
    result = flash(bundles["old"], template)
    assert result.ok, result.reason
    dual = copy_tree(template, base / "device-dual")
    assert flash(bundles["third"], dual, health_start="fork").ok
    assert rollback(dual).active_slot == "A"
    return DeviceBundles(
        key=key,
        pub=pub,
        other_key=other_key,
        other_pub=Path(f"{other_key}.pub"),
        template_root=template,
        dual_root=dual,
        **bundles,
    )
