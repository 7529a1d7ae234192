"""Bundles that are wrong but validly signed (issue #17, part 3).

A manifest whose dimensions contradict its graphs, an empty or truncated test-vector file, a
deeply nested manifest: ``verify`` names the problem, ``selftest`` and ``flash`` refuse with one
line (no traceback), and the device's active slot is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import (
    DeviceBundles,
    build_device_bundles,
    bundle_files,
    copy_tree,
    edit_manifest,
    rehash,
)

from devices.slots import read_active, slot_dir
from export.verify import verify
from runtime.bundle import MANIFEST_FILE, SIGNATURE_FILE, sign_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


def edgeadapt(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ))  # fmt: skip


def assert_one_line_refusal(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def _wrong_dims(bundles: DeviceBundles, dst: Path, field: str) -> Path:
    bundle = copy_tree(bundles.new, dst)
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    box = data[field]
    dim = box["dim"] + 1
    box.update(dim=dim, low=[*box["low"], box["low"][-1]], high=[*box["high"], box["high"][-1]])
    edit_manifest(bundle, bundles.key, **{field: box})
    return bundle


def _flash(bundle: Path, root: Path, bundles: DeviceBundles) -> subprocess.CompletedProcess[str]:
    return edgeadapt("flash", str(bundle), "--device-root", str(root), "--pubkey", str(bundles.pub))


def _assert_untouched(root: Path, bundles: DeviceBundles) -> None:
    assert read_active(root) == "A"
    assert {k: (slot_dir(root, "A") / k).read_bytes() for k in bundle_files(bundles.old)} == (
        bundle_files(bundles.old)
    )


@pytest.mark.parametrize("field", ["obs", "act"])
def test_dimensions_that_contradict_the_graphs_are_named_and_refused(
    bundles: DeviceBundles, tmp_path: Path, field: str
) -> None:
    bundle = _wrong_dims(bundles, tmp_path / "wrong", field)
    res = verify(bundle, bundles.pub)
    assert res.signature == "ok" and res.hashes == "ok"  # signed and intact, yet wrong
    assert not res.ok
    assert any("manifest" in r and f"{field}.dim" in r for r in res.reasons), res.reasons
    cli = edgeadapt("verify", str(bundle), "--pubkey", str(bundles.pub))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert f"{field}.dim" in cli.stderr and "FAILED" in cli.stdout
    st = edgeadapt("selftest", str(bundle), "--pubkey", str(bundles.pub))
    assert_one_line_refusal(st, 2, f"{field}.dim")
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    assert_one_line_refusal(_flash(bundle, root, bundles), 2, "stage 'verify'")
    _assert_untouched(root, bundles)


def test_a_declared_tensor_shape_that_contradicts_its_graph_is_named(
    bundles: DeviceBundles, tmp_path: Path
) -> None:
    bundle = copy_tree(bundles.new, tmp_path / "wrong")
    graphs = json.loads((bundle / MANIFEST_FILE).read_text())["graphs"]
    name, spec = next(iter(sorted(graphs.items())))
    out = spec["outputs"][0]
    out["shape"] = [*out["shape"][:-1], 999]
    edit_manifest(bundle, bundles.key, graphs=graphs)
    res = verify(bundle, bundles.pub)
    assert not res.ok
    assert any(f"graph {name} output {out['name']!r}" in r and "999" in r for r in res.reasons)


@pytest.mark.parametrize("content", [b"", "half"], ids=["empty", "truncated"])
def test_unreadable_test_vectors_are_one_line_exit_2(
    bundles: DeviceBundles, tmp_path: Path, content: bytes | str
) -> None:
    bundle = copy_tree(bundles.new, tmp_path / "b")
    rel = json.loads((bundle / MANIFEST_FILE).read_text())["test_vectors"]
    raw = (bundle / rel).read_bytes()
    (bundle / rel).write_bytes(raw[: len(raw) // 2] if content == "half" else content)
    rehash(bundle, rel, bundles.key)
    res = edgeadapt("verify", str(bundle), "--pubkey", str(bundles.pub))
    assert_one_line_refusal(res, 2, "unreadable test vectors")
    st = edgeadapt("selftest", str(bundle), "--pubkey", str(bundles.pub))
    assert_one_line_refusal(st, 2, "unreadable test vectors")


def test_a_deeply_nested_manifest_is_one_line_and_the_slot_untouched(
    bundles: DeviceBundles, tmp_path: Path
) -> None:
    bundle = copy_tree(bundles.new, tmp_path / "deep")
    raw = b"[" * 15_000 + b"]" * 15_000
    (bundle / MANIFEST_FILE).write_bytes(raw)
    (bundle / SIGNATURE_FILE).write_bytes(sign_bytes(raw, bundles.key.read_bytes()))
    res = edgeadapt("verify", str(bundle), "--pubkey", str(bundles.pub))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "nested too deeply" in res.stderr
    st = edgeadapt("selftest", str(bundle), "--pubkey", str(bundles.pub))
    assert_one_line_refusal(st, 2, "nested too deeply")
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    assert_one_line_refusal(_flash(bundle, root, bundles), 2, "nested too deeply")
    _assert_untouched(root, bundles)
