"""``edgeadapt bench telemetry``: a private Mosquitto, QoS 1, batched, real processes.

Runs, in order:

1. ``enqueue``: the control loop's cost of :meth:`TelemetryClient.record_step` (median, p99 µs)
   with the client connected and its worker running;
2. ``throughput``: one device process enqueues ``records`` records flat out; records/s from its
   first record until the last one is committed in the collector's database;
3. ``ingest``: the collector's storage path alone (parse + dedup insert + commit), rows/s;
4. ``latency``: one device process at a 100 Hz control loop; per record, collector arrival time
   minus the record's timestamp (same clock), p50/p99 ms;
5. ``worker_cpu``: one client in this process recording at 0 (idle), 20 and 100 Hz; the CPU
   its worker thread uses (ms per second of wall time) and its outbox commits per second;
6. ``fleet``: ``devices`` simulated devices (each its own MQTT connection and outbox) at
   ``fleet_rate_hz`` for ``fleet_seconds``, hosted by ``processes`` processes; counts lost and
   duplicated records.

The collector runs in this process; devices run in child processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

THROUGHPUT_BATCH = 500
FLEET_BATCH_PERIOD_S = 0.2


@dataclass(frozen=True)
class BenchOptions:
    """What to run and for how long."""

    records: int = 200_000
    latency_seconds: float = 10.0
    devices: int = 100
    fleet_rate_hz: float = 50.0
    fleet_seconds: float = 60.0
    processes: int = 4
    fleet: bool = True
    enqueue_calls: int = 20_000
    cpu_seconds: float = 5.0
    cpu_rates_hz: tuple[float, ...] = (0.0, 20.0, 100.0)


def run_bench(opts: BenchOptions, progress: bool = False) -> dict[str, Any]:
    """Run every part against a private broker; return the JSON-ready results."""
    from devices.telemetry.collector import Collector
    from devices.telemetry.mosquitto import Mosquitto, basic_config, free_port
    from devices.telemetry.transport import parse_broker_url

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        broker = Mosquitto(
            tmp / "broker", basic_config(port, tmp / "broker", save_on_every_change=False), port
        )
        broker.start()
        collector = Collector(parse_broker_url(broker.url), tmp / "collector.sqlite").start()
        try:
            if not collector.wait_subscribed(10):
                raise RuntimeError("collector did not subscribe")
            out: dict[str, Any] = {"options": asdict(opts)}
            say("enqueue cost ...")
            out["enqueue"] = bench_enqueue(broker.url, tmp, opts.enqueue_calls)
            say("throughput: one device, flat out ...")
            out["throughput"] = bench_throughput(broker.url, tmp, collector, opts.records)
            say("collector ingest ...")
            out["ingest"] = bench_ingest(tmp)
            say("worker CPU per client ...")
            out["worker_cpu"] = bench_worker_cpu(
                broker.url, tmp, opts.cpu_rates_hz, opts.cpu_seconds
            )
            say("latency at 100 Hz ...")
            out["latency"] = bench_latency(broker.url, tmp, collector, opts.latency_seconds)
            if opts.fleet:
                say(f"fleet: {opts.devices} devices at {opts.fleet_rate_hz} Hz ...")
                out["fleet"] = bench_fleet(broker.url, tmp, collector, opts)
        finally:
            collector.stop()
            broker.kill()
    return _summary(out)


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    parts = [p for p in ("throughput", "latency", "fleet") if p in out]
    return {
        "records_per_s": out["throughput"]["records_per_s"],
        "collector_ingest_rows_per_s": out["ingest"]["rows_per_s"],
        "latency_ms_p50": out["latency"]["latency_ms_p50"],
        "latency_ms_p99": out["latency"]["latency_ms_p99"],
        "enqueue_us_median": out["enqueue"]["us_median"],
        "worker_cpu_ms_per_s": {r["rate_hz"]: r["cpu_ms_per_s"] for r in out["worker_cpu"]},
        "lost": sum(out[p]["lost"] for p in parts),
        "duplicates": sum(out[p]["duplicates"] for p in parts),
        **out,
    }


# --- parts ---------------------------------------------------------------------------------------


def bench_enqueue(broker_url: str, tmp: Path, calls: int) -> dict[str, Any]:
    """Per-call cost of ``record_step`` with numpy inputs, worker and network running."""
    import numpy as np

    from devices.telemetry.client import TelemetryClient
    from devices.telemetry.config import TelemetryConfig

    cfg = TelemetryConfig(broker=broker_url, device="enqueue", outbox=str(tmp / "enqueue.sqlite"))
    client = TelemetryClient(cfg).start()
    action, mean, var = np.zeros(2), np.zeros(5), np.ones(5)
    costs = []
    try:
        wait_until(lambda: client.connected, 10)
        for step in range(calls):
            t0 = time.perf_counter_ns()
            client.record_step(step, -0.5, action, mean, var, 1.2, step, 0.3, 40.0)
            costs.append(time.perf_counter_ns() - t0)
            if step % 100 == 99:
                time.sleep(0.001)  # a control loop, not a flood: let the worker run
        client.wait_drained(30)
    finally:
        client.close()
    costs_us = sorted(c / 1000 for c in costs)
    return {"calls": calls, "us_median": round(statistics.median(costs_us), 2),
            "us_p99": round(costs_us[int(0.99 * len(costs_us))], 2)}  # fmt: skip


def bench_worker_cpu(
    broker_url: str, tmp: Path, rates_hz: tuple[float, ...], seconds: float
) -> list[dict[str, Any]]:
    """CPU of one client's worker thread per second of wall time, recording at each rate.

    The control loop is this thread sleeping between ``record_step`` calls; the worker's CPU
    clock (``pthread_getcpuclockid``) counts only the client's own work: encoding, outbox
    transactions, publishing, acknowledgements, and its idle ticks.
    """
    import numpy as np

    from devices.telemetry.client import TelemetryClient
    from devices.telemetry.config import TelemetryConfig

    action, mean, var = np.zeros(2), np.zeros(5), np.ones(5)
    out = []
    for rate in rates_hz:
        cfg = TelemetryConfig(
            broker=broker_url, device=f"cpu-{rate:g}", outbox=str(tmp / f"cpu-{rate:g}.sqlite")
        )
        client = TelemetryClient(cfg).start()
        try:
            wait_until(lambda c=client: c.connected, 10)
            time.sleep(0.5)  # the birth and state messages settle
            clock = time.pthread_getcpuclockid(client._thread.ident)  # type: ignore[arg-type]
            cpu0, commits0, step = time.clock_gettime(clock), client.stats().store_commits, 0
            t0 = time.monotonic()
            while (now := time.monotonic()) < t0 + seconds:
                if rate:
                    client.record_step(step, -0.5, action, mean, var, 1.2, step, 0.3, 40.0)
                    step += 1
                time.sleep(max(0.0, t0 + (step / rate if rate else 0.1) - now))
            wall = time.monotonic() - t0
            cpu, commits = time.clock_gettime(clock) - cpu0, client.stats().store_commits - commits0
            client.wait_drained(30)
        finally:
            client.close()
        out.append({"rate_hz": rate, "records": step, "cpu_ms_per_s": round(1000 * cpu / wall, 2),
                    "commits_per_s": round(commits / wall, 1)})  # fmt: skip
    return out


def bench_throughput(broker_url: str, tmp: Path, collector: Any, records: int) -> dict[str, Any]:
    """One device process enqueues ``records`` flat out; time until all are in the database."""
    # the outbox must hold the whole burst: a flat-out producer outruns any network
    proc = _simdevice(broker_url, tmp, "throughput", records=records, rate=0, max_records=records,
                      batch_size=THROUGHPUT_BATCH, drain_timeout=600)  # fmt: skip
    t0 = time.perf_counter()
    done = wait_until(lambda: _count(collector.db_path, "throughput") >= records, 600)
    elapsed = time.perf_counter() - t0
    proc.wait(timeout=120)
    res = _device_result(collector.db_path, "throughput", records)
    rate = records / elapsed if done else 0.0
    return {"records": records, "seconds": round(elapsed, 3), "records_per_s": round(rate),
            "batch_size": THROUGHPUT_BATCH, **res}  # fmt: skip


def bench_ingest(tmp: Path, messages: int = 2000, per_message: int = 100) -> dict[str, Any]:
    """Collector storage alone: decode, deduplicating insert, commit every 50 messages."""
    from devices.telemetry.collector_db import CollectorStore
    from devices.telemetry.records import RecordKind, Sample, batch_payload, encode_telemetry
    from devices.telemetry.simdevice import sample_values

    payloads = []
    for m in range(messages):
        bodies = [encode_telemetry(m * per_message + i + 1, 1.0, Sample(**sample_values(i)))
                  for i in range(per_message)]  # fmt: skip
        payloads.append(batch_payload("f", "ingest", "b", RecordKind.TELEMETRY, False, bodies))
    store = CollectorStore.open(tmp / "ingest.sqlite")
    t0 = time.perf_counter()
    for start in range(0, messages, 50):
        store.begin()
        for p in payloads[start : start + 50]:
            store.ingest("edgeadapt/v1/f/ingest/tele", p, 1.0)
        store.commit()
    elapsed = time.perf_counter() - t0
    store.close()
    rows = messages * per_message
    return {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": round(rows / elapsed)}


def bench_latency(broker_url: str, tmp: Path, collector: Any, seconds: float) -> dict[str, Any]:
    """A 100 Hz device process; latency = collector arrival - record time, per record."""
    from devices.telemetry import collector_db

    records = int(100 * seconds)
    proc = _simdevice(broker_url, tmp, "latency", records=records, rate=100, drain_timeout=60)
    proc.wait(timeout=seconds + 120)
    wait_until(lambda: _received(collector.db_path, "latency") >= records, 30)
    conn = collector_db.connect(collector.db_path, readonly=True)
    lat = sorted(1000 * (r - t) for r, t in conn.execute(
        "SELECT received, t FROM records WHERE device = 'latency' AND kind = 0"))  # fmt: skip
    conn.close()
    res = _device_result(collector.db_path, "latency", records)
    return {"records": records, "rate_hz": 100, "latency_ms_p50": round(percentile(lat, 50), 2),
            "latency_ms_p99": round(percentile(lat, 99), 2), "latency_ms_max": round(lat[-1], 2),
            **res}  # fmt: skip


def bench_fleet(broker_url: str, tmp: Path, collector: Any, opts: BenchOptions) -> dict[str, Any]:
    """``devices`` devices at ``fleet_rate_hz`` for ``fleet_seconds`` in ``processes`` hosts."""
    per = -(-opts.devices // opts.processes)
    hosts = []
    for first in range(0, opts.devices, per):
        count = min(per, opts.devices - first)
        hosts.append(subprocess.Popen(
            [sys.executable, "-m", "devices.telemetry.bench", "fleet-host", "--broker", broker_url,
             "--first", str(first), "--count", str(count), "--rate", str(opts.fleet_rate_hz),
             "--seconds", str(opts.fleet_seconds), "--outdir", str(tmp / "fleet")],
            stdout=subprocess.PIPE, text=True))  # fmt: skip
    reports = []
    for h in hosts:
        out, _ = h.communicate(timeout=opts.fleet_seconds + 600)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    expected = {d: n for r in reports for d, n in r["last_seq"].items()}
    total = sum(expected.values())
    wait_until(lambda: _received_total(collector.db_path, "fleet-") >= total, 120)
    stats = _device_stats(collector.db_path)
    lost = sum(n - stats.get(d, {}).get("received", 0) for d, n in expected.items())
    dups = sum(stats.get(d, {}).get("duplicate_seqs_stored", 0) for d in expected)
    fleet_stats = [v for d, v in stats.items() if d in expected]
    return {"devices": opts.devices, "rate_hz": opts.fleet_rate_hz, "seconds": opts.fleet_seconds,
            "processes": len(hosts), "batch_period_s": FLEET_BATCH_PERIOD_S,
            "records_expected": total, "records_per_s": round(total / opts.fleet_seconds),
            "lost": lost, "duplicates": dups,
            "duplicates_dropped": sum(v["duplicates_dropped"] for v in fleet_stats),
            "all_drained": all(r["drained"] for r in reports),
            "max_loop_lag_ms": max(r["max_loop_lag_ms"] for r in reports)}  # fmt: skip


# --- the fleet host (a child process) ------------------------------------------------------------


def fleet_host(
    broker: str, first: int, count: int, rate_hz: float, seconds: float, outdir: str
) -> dict[str, Any]:
    """Run ``count`` telemetry clients driven by one paced loop; return per-device last seqs."""
    from devices.telemetry.client import TelemetryClient
    from devices.telemetry.config import TelemetryConfig
    from devices.telemetry.simdevice import sample_values

    clients = []
    for i in range(first, first + count):
        name = f"fleet-{i:03d}"
        cfg = TelemetryConfig(broker=broker, device=name, outbox=f"{outdir}/{name}.sqlite",
                              batch_period_s=FLEET_BATCH_PERIOD_S)  # fmt: skip
        clients.append(TelemetryClient(cfg).start())
    wait_until(lambda: all(c.connected for c in clients), 30)
    period, steps = 1.0 / rate_hz, int(rate_hz * seconds)
    start, max_lag = time.perf_counter(), 0.0
    for step in range(steps):
        lag = time.perf_counter() - (start + step * period)
        if lag < 0:
            time.sleep(-lag)
        max_lag = max(max_lag, lag)
        values = sample_values(step)
        for c in clients:
            c.record_step(**values)
    drained = all(c.wait_drained(120) for c in clients)
    last = {c.config.device: c.stats().last_seq for c in clients}
    for c in clients:
        c.close()
    return {"drained": drained, "last_seq": last, "max_loop_lag_ms": round(1000 * max_lag, 2)}


# --- helpers -------------------------------------------------------------------------------------


def _simdevice(broker_url: str, tmp: Path, device: str, **opts: object) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "devices.telemetry.simdevice", "--broker", broker_url,
            "--device", device, "--outbox", str(tmp / f"{device}.sqlite")]  # fmt: skip
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline() or "{}")
    if not ready.get("ready"):
        proc.kill()
        raise RuntimeError(f"simulated device {device} did not start")
    return proc


def _device_stats(db: Path) -> dict[str, dict[str, Any]]:
    from devices.telemetry import collector_db

    conn = collector_db.connect(db, readonly=True)
    try:
        return collector_db.device_stats(conn)
    finally:
        conn.close()


def _device_result(db: Path, device: str, expected: int) -> dict[str, int]:
    s = _device_stats(db).get(device, {})
    return {
        "lost": expected - s.get("received", 0),
        "duplicates": s.get("duplicate_seqs_stored", 0),
        "duplicates_dropped": s.get("duplicates_dropped", 0),
    }


def _received(db: Path, device: str) -> int:
    return _device_stats(db).get(device, {}).get("received", 0)


def _count(db: Path, device: str) -> int:
    """Records of one device (an index range count: cheap enough to poll)."""
    from devices.telemetry import collector_db

    conn = collector_db.connect(db, readonly=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM records WHERE device = ?", (device,)).fetchone()[
            0
        ]
    finally:
        conn.close()


def _received_total(db: Path, prefix: str) -> int:
    from devices.telemetry import collector_db

    conn = collector_db.connect(db, readonly=True)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM records WHERE device LIKE ?", (prefix + "%",)
        ).fetchone()[0]
    finally:
        conn.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of sorted values; NaN if there are none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def wait_until(cond: Any, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``cond()`` every ``poll_s`` seconds until true (True) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m devices.telemetry.bench fleet-host ...`` (used by :func:`bench_fleet`)."""
    p = argparse.ArgumentParser(prog="python -m devices.telemetry.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("fleet-host")
    h.add_argument("--broker", required=True)
    h.add_argument("--first", type=int, required=True)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--rate", type=float, required=True)
    h.add_argument("--seconds", type=float, required=True)
    h.add_argument("--outdir", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    res = fleet_host(args.broker, args.first, args.count, args.rate, args.seconds, args.outdir)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "fleet-host"
    sys.exit(main())
