"""Collectors that scale out: two ``edgeadapt collect`` processes share a fleet through an MQTT 5
shared subscription into one PostgreSQL database; one is SIGKILLed mid-stream and restarted by
its supervisor (same client id, so its broker session hands back what it had not acknowledged).
Nothing is lost and nothing is stored twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mqtt_fixtures import ROOT, SimDevice, wait_for

from devices.telemetry import database
from devices.telemetry.collector_db import CollectorStore, device_stats
from devices.telemetry.mosquitto import Mosquitto

DEVICES = ("fleet-a", "fleet-b", "fleet-c")
RECORDS = 1500


def _stats(url: str) -> dict:
    with database.connect(url, readonly=True) as conn:
        return device_stats(conn)


def _total(url: str) -> int:
    return sum(d["received"] for d in _stats(url).values())


def test_shared_collectors_one_killed_mid_stream_lose_and_duplicate_nothing(
    broker: Mosquitto, pg_url: str, tmp_path: Path
) -> None:
    CollectorStore.open(pg_url).close()  # schema first: the readers below need the tables

    def collect(i: int) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "runtime.cli", "collect", "--broker", broker.url, "--db",
               pg_url, "--share", "g", "--client-id", f"scale-{i}"]  # fmt: skip
        before = broker.log_tail(1_000_000).count(f"as scale-{i}")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        wait_for(lambda: broker.log_tail(1_000_000).count(f"as scale-{i}") > before, 15,
                 f"collector {i} connected")  # fmt: skip
        time.sleep(0.3)  # its SUBSCRIBE follows the CONNACK
        return proc

    procs = [collect(0), collect(1)]
    devs = [SimDevice(broker.url, d, tmp_path / f"{d}.sqlite", records=RECORDS, rate=300,
                      batch_size=20) for d in DEVICES]  # fmt: skip
    try:
        wait_for(lambda: _total(pg_url) >= 600, 30, "the first records")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        time.sleep(1.0)  # the fleet keeps publishing; the broker keeps the dead one's share
        procs.append(collect(0))  # the supervisor restarts it
        finals = [d.finish(60) for d in devs]
        wait_for(lambda: _total(pg_url) >= RECORDS * len(DEVICES), 30, "every record stored")
        time.sleep(0.5)  # late redeliveries would show up as duplicates now
    finally:
        for d in devs:
            d.close()
        outs = []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                outs.append(proc.communicate(timeout=20)[0])
    assert all(f["drained"] and f["last_seq"] == RECORDS for f in finals)
    stats = _stats(pg_url)
    for dev in DEVICES:
        s = stats[dev]
        assert (s["received"], s["min_seq"], s["max_seq"]) == (RECORDS, 1, RECORDS), s
        assert s["gaps"] == 0 and s["duplicate_seqs_stored"] == 0, s
    counters = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert all(c["stored"] > 0 for c in counters), f"both live collectors took a share: {counters}"
