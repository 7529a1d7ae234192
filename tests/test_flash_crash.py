"""Crash safety: SIGKILL the flashing process anywhere; the device still runs old or new.

Two ways to kill a real flashing process:

- ``edgeadapt flash`` (a fresh interpreter) at every named step boundary and after every file
  written (``EDGEADAPT_FLASH_CRASH_AT`` makes the process SIGKILL itself there), with the outcome
  each point must give;
- a forked process running ``devices.flash.flash``, SIGKILLed after a random delay drawn
  uniformly over the measured duration of a flash (>= 50 trials, fixed seed). Forking skips
  the interpreter start and imports, so the kills land inside the flash itself; the health gate
  is still a real child process (forked too: it loads the bundle, runs the test vectors and
  checks the budgets, without a fresh interpreter's start-up).

Every trial starts from a device with the old bundle active in slot A and a third bundle, good,
in slot B (the rollback target that the flash of the new bundle overwrites).
After every kill: the pointer names a slot whose files are byte for byte the old or the new
bundle (never a mix), that slot verifies (hashes and signature), ``edgeadapt device status
--json`` reports that slot as active and verified, and as good (or staged with a passed health
gate, when killed between the switch and the commit), and every slot whose status claims
content does verify; after recovery no slot is left half-flashed, and a new flash works.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import DeviceBundles, build_device_bundles, bundle_files, copy_tree, tree_files

from devices.flash import CRASH_ENV, CRASH_POINTS, flash, recover
from devices.slots import SLOTS, active_bundle, device_lock, read_active, read_state
from runtime import cli

SEED = 20240611
RANDOM_TRIALS = 50
#: Points at or after which the new bundle is active.
NEW_FROM = ("switched", "committed")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> DeviceBundles:
    return build_device_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def contents(bundles: DeviceBundles) -> dict[str, dict[str, bytes]]:
    return {"old": bundle_files(bundles.old), "new": bundle_files(bundles.new)}


def cli_flash_crashing_at(bundle: Path, root: Path, point: str) -> subprocess.CompletedProcess:
    """`edgeadapt flash` told to SIGKILL itself at ``point``."""
    env = {**os.environ, CRASH_ENV: point}
    cmd = [sys.executable, "-m", "runtime.cli", "flash", str(bundle), "--device-root", str(root)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def fork_flash(bundle: Path, root: Path, crash_at: str | None = None) -> int:
    """Start flashing in a forked child; returns its pid (the child never returns here)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            if crash_at is not None:
                os.environ[CRASH_ENV] = crash_at
            code = 0 if flash(bundle, root, health_start="fork").ok else 1
        finally:
            os._exit(code)
    return pid


def wait_status(pid: int) -> int:
    """Exit code of ``pid``, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def cli_status(root: Path) -> dict:
    """What `edgeadapt device status DIR --json` prints (the real CLI entry, in process)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["device", "status", str(root), "--json"]) == 0
    return json.loads(out.getvalue())


def check_truth(root: Path, contents: dict[str, dict[str, bytes]]) -> str:
    """Assert the device invariants after a kill; returns which bundle is active."""
    slot = read_active(root)
    path = active_bundle(root)  # raises unless the active slot verifies (hashes + signature)
    files = tree_files(path)
    outcome = next((name for name, want in contents.items() if files == want), None)
    assert outcome is not None, f"slot {slot} holds a mix: {sorted(files)}"
    status = cli_status(root)
    assert status["active_slot"] == slot
    active = status["slots"][slot]
    assert active["active"] and active["verified"]
    committed = active["status"] == "good"
    switched_not_committed = active["status"] == "staged" and active["health"]["passed"]
    assert committed or switched_not_committed, active
    assert active["on_disk"]["manifest_sha256"] == active["manifest_sha256"]
    for name in SLOTS:
        record = status["slots"][name]
        if record["status"] in ("good", "staged"):  # a claim about content must be true
            assert record["verified"], (name, record)
            assert record["on_disk"]["manifest_sha256"] == record["manifest_sha256"]
    return outcome


def check_recovery(root: Path, contents: dict[str, dict[str, bytes]]) -> None:
    """After the next lock holder's clean-up nothing is left half-flashed."""
    with device_lock(root):
        recover(root)
    state = read_state(root)
    assert all(r.status not in ("staging", "staged") for r in state.slots.values())
    assert state.slots[read_active(root)].status == "good"
    assert not list(root.glob("*.tmp"))
    check_truth(root, contents)


def crash_points(bundles: DeviceBundles) -> list[str]:
    copies = [f"copy-{i}" for i in range(1, len(bundle_files(bundles.new)) + 1)]
    return [*CRASH_POINTS, *copies]


def test_kill_at_every_step_boundary(
    tmp_path: Path, bundles: DeviceBundles, contents: dict[str, dict[str, bytes]]
) -> None:
    for point in crash_points(bundles):
        root = copy_tree(bundles.dual_root, tmp_path / point)
        status = wait_status(fork_flash(bundles.new, root, crash_at=point))
        assert status == -signal.SIGKILL, f"crash point {point} never reached (exit {status})"
        expected = "new" if point in NEW_FROM else "old"
        assert check_truth(root, contents) == expected, point
        check_recovery(root, contents)
        if expected == "old" and point != "verified":
            failure = read_state(root).last_failure
            assert failure is not None and failure.stage == "interrupted", point
    # The last crashed root (killed after commit) takes the next flash normally.
    result = flash(bundles.old, root)
    assert result.ok and result.slot == "A" and read_active(root) == "A", result.reason


@pytest.mark.parametrize(("point", "expected"), [("health-running", "old"), ("switched", "new")])
def test_cli_flash_killed_then_status_tells_the_truth(
    point: str,
    expected: str,
    tmp_path: Path,
    bundles: DeviceBundles,
    contents: dict[str, dict[str, bytes]],
) -> None:
    """The real `edgeadapt flash` (fresh interpreter, spawned health gate) killed mid-way."""
    root = copy_tree(bundles.dual_root, tmp_path / "dev")
    proc = cli_flash_crashing_at(bundles.new, root, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert check_truth(root, contents) == expected
    check_recovery(root, contents)


def test_kill_at_random_instants(
    tmp_path: Path, bundles: DeviceBundles, contents: dict[str, dict[str, bytes]]
) -> None:
    durations = []
    for i in range(3):  # the median of three uncrashed flashes sets the range of the delays
        reference = copy_tree(bundles.dual_root, tmp_path / f"reference-{i}")
        start = time.perf_counter()
        assert wait_status(fork_flash(bundles.new, reference)) == 0
        durations.append(time.perf_counter() - start)
        assert check_truth(reference, contents) == "new"
    duration = float(np.median(durations))

    rng = np.random.default_rng(SEED)
    tally = {"old": 0, "new": 0, "killed": 0}
    for trial in range(RANDOM_TRIALS):
        root = copy_tree(bundles.dual_root, tmp_path / f"trial-{trial}")
        delay = float(rng.uniform(0.0, duration))
        pid = fork_flash(bundles.new, root)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        tally["killed"] += wait_status(pid) == -signal.SIGKILL
        tally[check_truth(root, contents)] += 1
        check_recovery(root, contents)
    print(f"random kills over a {duration:.2f} s flash: {tally}")
    assert tally["old"] + tally["new"] == RANDOM_TRIALS
    assert tally["killed"] >= RANDOM_TRIALS // 3  # kills landed while flashing
    # The last root takes a flash after its crash.
    result = flash(bundles.new, root)
    assert result.ok, result.reason
    assert check_truth(root, contents) == "new"
