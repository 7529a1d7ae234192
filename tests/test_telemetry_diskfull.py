"""A full disk under the outbox (issue #17, part 2), on a real 2 MB tmpfs.

The simulated device runs in its own mount namespace (``unshare -m``, or ``unshare -rm`` as a
normal user) with its outbox on a tmpfs the kernel fills for real (ENOSPC). Boot 1 runs with
the broker down until the disk is full and exits with records it could not store; boot 2 starts
on the still-full disk with the broker back. Expected: a bounded RAM queue whose drops are counted
and reported, stored rows that keep draining, sequence numbers never reused, and a collector that
accounts for every sequence number as received or reported dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_fixtures import ROOT, stats, stored, wait_for

from devices.telemetry.collector import Collector
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import RecordKind

DEVICE = "full-1"
FS_SIZE = "2m"


def _namespace_prefix(probe_dir: Path) -> list[str]:
    """``unshare`` arguments that let this process mount a tmpfs, or skip the test."""
    candidates = [["unshare", "-m"]] if os.geteuid() == 0 else []
    candidates.append(["unshare", "-rm"])  # an unprivileged user namespace
    probe_dir.mkdir(exist_ok=True)
    for prefix in candidates:
        cmd = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe_dir}"]
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    pytest.skip("cannot mount a tmpfs: not root and no unprivileged user namespaces (unshare -rm)")


def _device_args(broker_url: str, outbox: Path, **opts: object) -> str:
    args = [sys.executable, "-m", "devices.telemetry.simdevice", "--broker", broker_url,
            "--device", DEVICE, "--outbox", str(outbox), "--min-free-mb", "0.5",
            "--max-queued", "2000", "--batch-size", "200"]  # fmt: skip
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(args)


@pytest.mark.timeout(180)
def test_full_disk_bounded_ram_reported_drops_no_reused_seqs(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    prefix = _namespace_prefix(tmp_path / "probe")
    fs, go = tmp_path / "fs", tmp_path / "go"
    fs.mkdir()
    outbox = fs / "outbox.sqlite"
    broker.kill()  # boot 1 fills the disk with nothing draining it
    boot1 = _device_args(broker.url, outbox, records=12_000, rate=3000, drain_timeout=0.5)
    boot2 = _device_args(broker.url, outbox, records=3000, rate=1000, drain_timeout=40)
    script = (
        f"mount -t tmpfs -o size={FS_SIZE} tmpfs {fs} || exit 3; {boot1}; "
        f"i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; {boot2}"
    )
    err = (tmp_path / "device.err").open("w")
    proc = subprocess.Popen([*prefix, "sh", "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=err, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        assert proc.stdout is not None
        log = tmp_path / "device.err"
        ready1, done1 = _line(proc, log), _line(proc, log)
        broker.restart()
        go.touch()
        ready2, done2 = _line(proc, log), _line(proc, log)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    # boot 1: the disk filled, RAM stayed bounded, the overflow was counted
    assert done1["store_failures"] > 0 and done1["ram_dropped"] > 0, done1
    assert done1["stored"] < 12_000 and done1["worker_errors"] == 0, done1
    assert done1["unstored"] <= 2000, "the RAM queue is bounded"
    # boot 2: no sequence number of boot 1 reused, even those that were never stored
    assert ready2["first_seq"] == done1["last_seq"] + 1 == 12_001
    # boot 2 started on a full disk and still drained everything (old rows deleted, new stored)
    assert done2["drained"] and done2["stored"] == 0 and done2["unstored"] == 0, (done1, done2)
    assert done2["published_records"] >= done1["stored"] + 3000, "boot 1's rows, then its own"
    last = done2["last_seq"]
    db = collector.db_path
    wait_for(lambda: stats(db).get(DEVICE, {}).get("max_seq") == last, 20, "every record")
    s = stats(db)[DEVICE]
    reports = [r["data"] for *_, r in stored(db, DEVICE, RecordKind.EVENT)
               if r["type"] == "outbox_dropped"]  # fmt: skip
    reasons = {r["reason"] for r in reports}
    assert {"ram", "unstored"} <= reasons and "full" not in reasons, reports
    dropped = sum(r["n"] for r in reports)
    assert dropped == done1["ram_dropped"] + done1["unstored_at_close"]
    # every sequence number is accounted for: received, or reported dropped at the source
    assert s["gaps"] == dropped == s["dropped_at_source"], s
    assert s["received"] + dropped == last and s["duplicate_seqs_stored"] == 0, s
    assert (ready1["first_seq"], done2["worker_errors"]) == (1, 0)


def _line(proc: subprocess.Popen[str], log: Path) -> dict:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"device exited early: {log.read_text()[-3000:]}")
    return json.loads(line)
