"""Flashing a device root: stage, health gate, switch, rollback; and the CLI around it."""

from __future__ import annotations

import json
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
    tree_files,
)

from devices.flash import flash, rollback
from devices.slots import DeviceError, active_bundle, device_status, read_active, slot_dir


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def flashed_twice(tmp_path_factory: pytest.TempPathFactory, bundles: DeviceBundles) -> Path:
    """A device root with ``old`` in A and ``new`` flashed into B and active (one health gate)."""
    root = copy_tree(bundles.template_root, tmp_path_factory.mktemp("twice") / "dev")
    result = flash(bundles.new, root)
    assert result.ok, result.reason
    return root


def test_flash_stages_into_the_inactive_slot_and_switches(
    flashed_twice: Path, bundles: DeviceBundles
) -> None:
    root = flashed_twice
    assert read_active(root) == "B"
    assert active_bundle(root) == slot_dir(root, "B")
    # The slot holds exactly the bundle's covered files, byte for byte, and nothing else.
    assert tree_files(slot_dir(root, "B")) == bundle_files(bundles.new)
    assert tree_files(slot_dir(root, "A")) == bundle_files(bundles.old)


def test_status_after_flash_reports_both_slots_and_the_health(flashed_twice: Path) -> None:
    status = device_status(flashed_twice)
    assert status["active_slot"] == "B"
    for name in ("A", "B"):
        slot = status["slots"][name]
        assert slot["status"] == "good" and slot["verified"]
        assert slot["on_disk"]["bundle_id"] == slot["bundle_id"]
        assert slot["health"]["passed"] and slot["health"]["step_us_median"] > 0
        assert slot["health"]["max_abs_err"] <= 1e-4
    assert status["slots"]["B"]["active"] and not status["slots"]["A"]["active"]
    assert status["last_failure"] is None
    assert [e["kind"] for e in status["history"]][-1] == "flash"


def test_flash_result_is_a_reportable_event(tmp_path: Path, bundles: DeviceBundles) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    result = flash(bundles.old, root)  # the bundle that is already active
    assert result.ok and result.stage == "unchanged" and result.active_slot == "A"
    event = json.loads(json.dumps(result.to_event()))
    assert event["type"] == "update_ok" and event["bundle_id"] == result.bundle_id
    assert device_status(root)["slots"]["B"]["status"] == "empty"  # nothing was written


def test_rollback_switches_back_and_forth(tmp_path: Path, flashed_twice: Path) -> None:
    root = copy_tree(flashed_twice, tmp_path / "dev")
    ids = {s: device_status(root)["slots"][s]["bundle_id"] for s in ("A", "B")}
    back = rollback(root)
    assert back.ok and back.active_slot == "A" and back.previous_slot == "B"
    assert back.bundle_id == ids["A"]
    assert read_active(root) == "A" and active_bundle(root) == slot_dir(root, "A")
    assert rollback(root).active_slot == "B"
    kinds = [e["kind"] for e in device_status(root)["history"]]
    assert kinds[-2:] == ["rollback", "rollback"]


def test_rollback_refuses_when_the_other_slot_is_not_good(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    with pytest.raises(DeviceError, match="slot B holds no good bundle"):
        rollback(root)
    assert read_active(root) == "A"
    assert device_status(root)["last_failure"]["stage"] == "rollback"


def test_rollback_refuses_a_good_slot_that_no_longer_verifies(
    tmp_path: Path, flashed_twice: Path
) -> None:
    root = copy_tree(flashed_twice, tmp_path / "dev")
    (slot_dir(root, "A") / "act.onnx").write_bytes(b"rotten")
    with pytest.raises(DeviceError, match="slot A no longer verifies: hash mismatch"):
        rollback(root)
    assert read_active(root) == "B"


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_flash_provisions_a_new_root_then_status_json(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = tmp_path / "dev"
    out = _cli("flash", bundles.old, "--device-root", root, "--pubkey", bundles.pub)
    assert out.returncode == 0, out.stderr
    assert "slot A active" in out.stdout
    status = _cli("device", "status", root, "--json")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert parsed["active_slot"] == "A" and parsed["pubkey"] is True
    assert parsed["profile"] == "x86-cpu"  # taken from the bundle's manifest
    human = _cli("device", "status", root)
    assert "* A: good" in human.stdout


def test_cli_refusal_is_one_error_line_without_traceback(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    tampered = copy_tree(bundles.new, tmp_path / "tampered")
    (tampered / "step.onnx").write_bytes(b"\0" + (tampered / "step.onnx").read_bytes()[1:])
    out = _cli("flash", tampered, "--device-root", root)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "error: flash refused at stage 'verify'" in out.stderr
    assert "hash mismatch for step.onnx" in out.stderr
    as_json = _cli("flash", tampered, "--device-root", root, "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["type"] == "update_failed"
    rb = _cli("device", "rollback", root)
    assert rb.returncode != 0 and "error: rollback refused" in rb.stderr


def test_bundle_without_a_profile_is_accepted_by_any_device(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    generic = copy_tree(bundles.new, tmp_path / "generic")
    edit_manifest(generic, bundles.key, profile=None)
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    result = flash(generic, root, health_start="fork")
    assert result.ok and read_active(root) == "B", result.reason
