"""Bad bundles are refused with a clear reason and the active slot is left untouched.

Every case starts from a device (x86-cpu, public key configured) with the ``old`` bundle active
in slot A and checks, after the refusal: the pointer still names A, slot A holds exactly the
``old`` bundle and verifies, ``device status`` records the failure with the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import (
    DeviceBundles,
    build_device_bundles,
    bundle_files,
    copy_tree,
    edit_manifest,
    rehash,
    tree_files,
)

from devices.flash import FlashResult, flash
from devices.health import StartMethod as HealthStart
from devices.slots import active_bundle, device_status, init_device, read_active, slot_dir

X86_TIGHT = """
name: x86-tight
description: an x86 board with budgets no bundle meets
architecture: x86_64
memory_budget_mb: 5
execution_providers: [CPUExecutionProvider]
precision: fp32
control_rate_hz: 100
step_budget_us: 0.5
max_opset: 21
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


@pytest.fixture
def device(tmp_path: Path, bundles: DeviceBundles) -> Path:
    return copy_tree(bundles.template_root, tmp_path / "dev")


@pytest.fixture
def new_copy(tmp_path: Path, bundles: DeviceBundles) -> Path:
    return copy_tree(bundles.new, tmp_path / "candidate")


def assert_refused_untouched(
    result: FlashResult, root: Path, bundles: DeviceBundles, stage: str, pattern: str
) -> None:
    """The refusal names ``stage`` and matches ``pattern``; slot A is what it was."""
    import re

    assert not result.ok, "the bundle was accepted"
    assert result.stage == stage, result.reason
    assert re.search(pattern, result.reason or ""), result.reason
    assert result.active_slot == "A"
    assert read_active(root) == "A"
    assert tree_files(slot_dir(root, "A")) == bundle_files(bundles.old)
    assert active_bundle(root) == slot_dir(root, "A")
    status = device_status(root)
    assert status["active_slot"] == "A"
    assert status["slots"]["A"]["status"] == "good" and status["slots"]["A"]["verified"]
    assert status["last_failure"]["stage"] == stage
    assert status["last_failure"]["reason"] == result.reason


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped byte": (lambda b: _flip_byte(b / "step.onnx"), r"hash mismatch for step\.onnx"),
    "truncated graph": (
        lambda b: (b / "encoder.onnx").write_bytes((b / "encoder.onnx").read_bytes()[:100]),
        r"hash mismatch for encoder\.onnx",
    ),
    "missing graph": (lambda b: (b / "act.onnx").unlink(), r"missing file act\.onnx"),
    "truncated manifest": (
        lambda b: (b / "manifest.json").write_bytes((b / "manifest.json").read_bytes()[:50]),
        r"not valid JSON",
    ),
    "unsigned": (lambda b: (b / "manifest.sig").unlink(), r"signature missing"),
    "edited manifest": (
        lambda b: edit_manifest(b, None, obs_margin=0.5),
        r"signature invalid",
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_bundles_are_refused_at_verify(
    name: str, device: Path, new_copy: Path, bundles: DeviceBundles
) -> None:
    tamper, pattern = TAMPERINGS[name]
    tamper(new_copy)
    result = flash(new_copy, device)
    assert_refused_untouched(result, device, bundles, "verify", pattern)
    assert device_status(device)["slots"]["B"]["status"] == "empty"  # never staged


def test_bundle_signed_by_another_key_is_refused(
    device: Path, new_copy: Path, bundles: DeviceBundles
) -> None:
    edit_manifest(new_copy, bundles.other_key)  # valid signature, wrong signer
    result = flash(new_copy, device)
    assert_refused_untouched(result, device, bundles, "verify", "signature invalid")


def test_pubkey_other_than_the_provisioned_one_is_refused(
    device: Path, bundles: DeviceBundles
) -> None:
    result = flash(bundles.new, device, pubkey=bundles.other_pub)
    assert_refused_untouched(
        result, device, bundles, "verify", "not the key the device was provisioned with"
    )


def test_keyless_device_with_flash_pubkey_requires_a_signature(
    tmp_path: Path, new_copy: Path, bundles: DeviceBundles
) -> None:
    root = tmp_path / "keyless"
    init_device(root, "x86-cpu")
    (new_copy / "manifest.sig").unlink()
    result = flash(new_copy, root, pubkey=bundles.pub)
    assert not result.ok and result.stage == "verify"
    assert "signature missing" in (result.reason or "")
    assert read_active(root) is None


def test_bundle_for_another_architecture_is_refused(device: Path, bundles: DeviceBundles) -> None:
    result = flash(bundles.arm, device)
    assert_refused_untouched(
        result, device, bundles, "compat", r"built for jetson-orin-nano-8gb \(aarch64\).*x86_64"
    )


def test_bundle_for_another_profile_is_refused(tmp_path: Path, bundles: DeviceBundles) -> None:
    profile = tmp_path / "x86-tight.yaml"
    profile.write_text(X86_TIGHT)
    root = tmp_path / "dev"
    init_device(root, profile, bundles.pub)
    result = flash(bundles.new, root)
    assert not result.ok and result.stage == "compat"
    assert "built for profile x86-cpu, device is x86-tight" in (result.reason or "")
    assert "re-export with --profile x86-tight" in (result.reason or "")


@pytest.mark.parametrize(
    ("fields", "stage", "pattern"),
    [
        ({"opset": 99}, "compat", r"opset 99, x86-cpu runs opset <= 21"),
        ({"min_runtime_version": "99.0.0"}, "compat", r"needs runtime >= 99\.0\.0"),
        ({"schema_version": 3}, "verify", r"unknown manifest schema_version 3"),
        ({"schema_version": 1}, "verify", r"schema 1 predates the adaptation contract"),
    ],
)
def test_incompatible_signed_bundles_are_refused(
    fields: dict[str, object],
    stage: str,
    pattern: str,
    device: Path,
    new_copy: Path,
    bundles: DeviceBundles,
) -> None:
    edit_manifest(new_copy, bundles.key, **fields)  # validly signed: only compat is wrong
    result = flash(new_copy, device)
    assert_refused_untouched(result, device, bundles, stage, pattern)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_wrong_test_vectors_fail_the_health_gate(
    start_method: HealthStart, device: Path, new_copy: Path, bundles: DeviceBundles
) -> None:
    vectors = new_copy / "test_vectors.npz"
    with np.load(vectors) as data:
        arrays = {k: data[k] for k in data.files}
    outputs = [k for k in arrays if k.startswith("out/step/") and arrays[k].dtype != np.bool_]
    for name in outputs:
        arrays[name] = arrays[name] + 0.5  # the graph no longer does what the bundle claims
    with vectors.open("wb") as f:
        np.savez(f, **arrays)
    rehash(new_copy, "test_vectors.npz", bundles.key)  # signature and hashes are valid
    result = flash(new_copy, device, health_start=start_method)
    assert_refused_untouched(result, device, bundles, "health", r"test vectors: max error")
    slot_b = device_status(device)["slots"]["B"]
    assert slot_b["status"] == "failed" and slot_b["reason"] == result.reason
    assert slot_b["health"]["passed"] is False


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_latency_and_memory_budgets_fail_the_health_gate(
    start_method: HealthStart, tmp_path: Path, bundles: DeviceBundles
) -> None:
    profile = tmp_path / "x86-tight.yaml"
    profile.write_text(X86_TIGHT)
    root = tmp_path / "dev"
    init_device(root, profile, bundles.pub)
    bundle = copy_tree(bundles.new, tmp_path / "candidate")
    edit_manifest(bundle, bundles.key, profile="x86-tight")
    result = flash(bundle, root, health_start=start_method)
    assert not result.ok and result.stage == "health"
    assert "exceeds the x86-tight budget of 0.5 µs" in (result.reason or "")
    health = device_status(root)["slots"]["A"]["health"]
    if start_method == "spawn":
        assert "exceeds the x86-tight budget of 5 MB" in (result.reason or "")
        assert health["rss_mb"] > 5
    else:  # a forked gate shares its parent's pages: memory is not measured
        assert "MB" not in (result.reason or "") and health["rss_mb"] is None
    assert read_active(root) is None
    assert device_status(root)["slots"]["A"]["status"] == "failed"


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_health_gate_timeout_fails_the_flash(
    start_method: HealthStart, device: Path, bundles: DeviceBundles
) -> None:
    # No gate can load a bundle, run its vectors and time 200 steps in 1 ms.
    result = flash(bundles.new, device, health_timeout_s=0.001, health_start=start_method)
    assert_refused_untouched(result, device, bundles, "health", r"timed out after 0\.001 s")


def test_after_a_refusal_a_good_bundle_still_flashes(
    device: Path, new_copy: Path, bundles: DeviceBundles
) -> None:
    _flip_byte(new_copy / "step.onnx")
    assert not flash(new_copy, device).ok
    result = flash(bundles.new, device)
    assert result.ok, result.reason
    assert read_active(device) == "B"
    status = device_status(device)
    assert status["last_failure"] is not None  # history is kept, not overwritten by success
