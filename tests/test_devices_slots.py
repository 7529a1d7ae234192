"""The device root: provisioning, the atomic pointer, the lock, status and active_bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_fixtures import DeviceBundles, build_device_bundles, copy_tree

from devices.slots import (
    POINTER_FILE,
    PROFILE_FILE,
    STATE_FILE,
    DeviceError,
    active_bundle,
    atomic_write_bytes,
    device_lock,
    device_status,
    init_device,
    read_active,
    read_device_info,
    read_state,
    remove_stale_tmp,
    slot_dir,
)
from runtime.errors import BundleError, UnknownNameError

HOLD_LOCK = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from devices.slots import device_lock\n"
    "with device_lock(Path(sys.argv[1])):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(60)\n"
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


def test_init_records_profile_and_key(tmp_path: Path, bundles: DeviceBundles) -> None:
    info = init_device(tmp_path / "dev", "x86-cpu", bundles.pub)
    assert info.profile == "x86-cpu" and info.has_pubkey
    assert read_device_info(tmp_path / "dev") == info
    assert (tmp_path / "dev" / "device.pub").read_bytes() == bundles.pub.read_bytes()
    assert "name: x86-cpu" in (tmp_path / "dev" / PROFILE_FILE).read_text()
    status = device_status(tmp_path / "dev")
    assert status["active_slot"] is None
    assert {s["status"] for s in status["slots"].values()} == {"empty"}


def test_init_refuses_twice_without_force_and_force_drops_the_key(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = tmp_path / "dev"
    init_device(root, "x86-cpu", bundles.pub)
    with pytest.raises(DeviceError, match="already provisioned"):
        init_device(root, "x86-cpu")
    assert not init_device(root, "rpi-arm-cpu", force=True).has_pubkey
    assert not (root / "device.pub").exists()
    assert read_device_info(root).profile == "rpi-arm-cpu"


def test_init_refuses_a_non_key_and_an_unknown_profile(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    with pytest.raises(BundleError, match="not a PEM public key"):
        init_device(tmp_path / "a", "x86-cpu", junk)
    with pytest.raises(UnknownNameError, match="unknown device profile"):
        init_device(tmp_path / "b", "no-such-board")


def test_a_plain_directory_is_not_a_device_root(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"not a device root.*device init"):
        active_bundle(tmp_path)
    with pytest.raises(DeviceError, match="not a device root"):
        device_status(tmp_path)


def test_active_bundle_before_any_flash_says_so(tmp_path: Path) -> None:
    init_device(tmp_path, "x86-cpu")
    with pytest.raises(DeviceError, match="nothing flashed yet"):
        active_bundle(tmp_path)


def test_active_bundle_is_the_verified_active_slot(tmp_path: Path, bundles: DeviceBundles) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    assert read_active(root) == "A"
    assert active_bundle(root) == slot_dir(root, "A")


def test_active_bundle_refuses_a_slot_that_no_longer_verifies(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    step = slot_dir(root, "A") / "step.onnx"
    step.write_bytes(step.read_bytes()[:-7])  # bit rot / truncation on the device
    with pytest.raises(DeviceError, match="active slot A fails verification: hash mismatch"):
        active_bundle(root)
    assert active_bundle(root, verify=False) == slot_dir(root, "A")
    status = device_status(root)
    assert status["slots"]["A"]["verified"] is False
    assert "step.onnx" in status["slots"]["A"]["verify_reason"]


def test_active_bundle_refuses_a_slot_whose_signature_was_replaced(
    tmp_path: Path, bundles: DeviceBundles
) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    (root / "device.pub").write_bytes(bundles.other_pub.read_bytes())
    with pytest.raises(DeviceError, match="signature invalid"):
        active_bundle(root)


def test_corrupt_pointer_is_reported_not_guessed(tmp_path: Path, bundles: DeviceBundles) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    (root / POINTER_FILE).write_text('{"slot": "C"}')
    with pytest.raises(DeviceError, match="unknown slot 'C'"):
        active_bundle(root)
    (root / POINTER_FILE).write_text("{")
    with pytest.raises(DeviceError, match="corrupt active-slot pointer"):
        read_active(root)


def test_corrupt_state_file_is_reported_with_its_path(tmp_path: Path) -> None:
    init_device(tmp_path, "x86-cpu")
    (tmp_path / STATE_FILE).write_text('{"slots": {"A": {"status": "sparkly"}}}')
    with pytest.raises(DeviceError, match=r"state\.json: corrupt \(slots\.A\.status"):
        read_state(tmp_path)


def test_atomic_write_replaces_whole_content_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    (tmp_path / "y.json.tmp").write_bytes(b"torn")  # what a killed writer leaves
    remove_stale_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_the_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    init_device(tmp_path, "x86-cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(DeviceError, match="busy"), device_lock(tmp_path, wait_s=0.2):
            pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases the flock
        holder.wait()
    with device_lock(tmp_path, wait_s=5.0):
        pass


def test_status_json_names_the_active_slot(tmp_path: Path, bundles: DeviceBundles) -> None:
    root = copy_tree(bundles.template_root, tmp_path / "dev")
    status = json.loads(json.dumps(device_status(root)))  # JSON-able as is
    assert status["active_slot"] == "A"
    slot_a = status["slots"]["A"]
    assert slot_a["active"] and slot_a["status"] == "good" and slot_a["verified"]
    assert slot_a["health"]["passed"]
    assert slot_a["on_disk"]["manifest_sha256"] == slot_a["manifest_sha256"]
    assert status["slots"]["B"]["status"] == "empty"


def test_device_modules_do_not_import_torch() -> None:
    probe = (
        "import sys\n"
        "import devices.commands, devices.flash, devices.health, devices.profiles\n"
        "import devices.remote, devices.slots\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
