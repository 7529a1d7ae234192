"""A simulated device process: a paced control loop that reports through the telemetry client.

Used by the fault tests (which SIGKILL and restart it) and the benchmark::

    python -m devices.telemetry.simdevice --broker mqtt://127.0.0.1:1883 --device d1 \\
        --outbox /tmp/d1.sqlite --records 1000 --rate 200

It prints one JSON line when the client is up (``{"ready": true, "boot": ..., "first_seq": ...}``)
and one when the stream is done (``{"done": true, "drained": ..., "last_seq": ...}``). Records
are deterministic functions of the step, so a test can check their content.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from devices.telemetry.client import BirthInfo, TelemetryClient
from devices.telemetry.commands_proto import Command
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.records import EventType

LATENT = 5


class SimDevice:
    """State changed by commands (the real runtime would reset its posterior here)."""

    def __init__(self) -> None:
        self.mode = "adaptive"
        self.resets = 0
        self.lock = threading.Lock()

    def handle(self, cmd: Command) -> dict[str, Any]:
        """Command handler: record the change, return the ack details."""
        with self.lock:
            if cmd.name == "set-mode":
                self.mode = cmd.args["mode"]
            elif cmd.name in ("reset-state", "reset-belief"):
                self.resets += 1
            return {"mode": self.mode, "resets": self.resets}


PERIOD = 1000  # the simulated signals repeat every PERIOD steps


def sample_values(step: int) -> dict[str, Any]:
    """The deterministic record of control step ``step`` (its values repeat every PERIOD)."""
    values = dict(_periodic_values(step % PERIOD))
    values["step"] = step
    return values


@functools.cache
def _periodic_values(phase: int) -> tuple[tuple[str, Any], ...]:
    # cached: a flat-out benchmark device should spend its time in telemetry, not in math
    count = phase % 200
    var = 1.0 / (1.0 + count)
    values = {
        "reward": -1.0 + (phase % 100) / 100.0,
        "action": [math.sin(phase / 10.0), math.cos(phase / 10.0)],
        "belief_mean": [0.01 * phase % 1.0] * LATENT,
        "belief_var": [var] * LATENT,
        "belief_entropy": 0.5 * LATENT * math.log(2 * math.pi * math.e * var),
        "belief_count": count,
        "ood_score": 0.1 + 0.05 * (phase % 7),
        "latency_us": 40.0 + phase % 13,
    }
    return tuple(values.items())


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m devices.telemetry.simdevice")
    p.add_argument("--broker", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--fleet", default="default")
    p.add_argument("--outbox", required=True)
    p.add_argument("--records", type=int, default=1000, help="control steps to run")
    p.add_argument("--rate", type=float, default=100.0, help="control loop rate (Hz); 0: flat out")
    p.add_argument("--event-every", type=int, default=0, help="a task_change event every N steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--batch-period", type=float, default=0.02, help="seconds")
    p.add_argument("--max-records", type=int, default=100_000, help="outbox bound")
    p.add_argument("--max-queued", type=int, default=20_000, help="RAM bound (disk full)")
    p.add_argument("--min-free-mb", type=float, default=8.0, help="outbox disk headroom (MB)")
    p.add_argument("--command-key", action="append", default=[], help="fleet public key (PEM)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--hold", type=float, default=0.0, help="stay connected N s after the stream")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--ca-file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the simulated device; exit 0 when the outbox drained, 1 otherwise."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = TelemetryConfig(
        broker=args.broker, fleet=args.fleet, device=args.device, outbox=args.outbox,
        batch_size=args.batch_size, batch_period_s=args.batch_period,
        max_records=args.max_records, command_keys=args.command_key, protocol=args.protocol,
        max_queued_records=args.max_queued, min_free_mb=args.min_free_mb,
        username=args.username, password=args.password, ca_file=args.ca_file,
    )  # fmt: skip
    sim = SimDevice()
    birth = BirthInfo(bundle_id="sim", bundle_version="0", profile="simulated")
    client = TelemetryClient(cfg, birth, command_handler=sim.handle).start()
    first = client.first_seq  # before the worker queues anything (drop reports)
    _emit({"ready": True, "boot": client.boot, "boot_n": client.boot_n, "first_seq": first})
    timing = run_loop(client, args.records, args.rate, args.event_every)
    drained = client.wait_drained(args.drain_timeout)
    time.sleep(args.hold)
    client.close()
    stats = client.stats()  # after close: includes what could not be stored at exit
    _emit({"done": True, "drained": drained, "mode": sim.mode, "resets": sim.resets,
           **timing, **asdict(stats)})  # fmt: skip
    return 0 if drained else 1


def run_loop(
    client: TelemetryClient, steps: int, rate_hz: float, event_every: int
) -> dict[str, float]:
    """The paced control loop: one telemetry record per step, an event every ``event_every``.

    Returns the loop's timing: ``record_us_p50``/``record_us_p99``/``record_us_max`` (time
    spent in ``record_step``, µs) and ``late_steps`` (steps started more than a period late).
    """
    period = 1.0 / rate_hz if rate_hz > 0 else 0.0
    start = time.perf_counter()
    spent, late = [], 0
    for step in range(steps):
        if period:
            delay = start + step * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            late += delay < -period
        t0 = time.perf_counter_ns()
        client.record_step(**sample_values(step))
        spent.append(time.perf_counter_ns() - t0)
        if event_every and step % event_every == event_every - 1:
            client.event(EventType.TASK_CHANGE, {"step": step})
    spent.sort()

    def pick(q: float) -> float:
        return spent[min(len(spent) - 1, int(q * len(spent)))] / 1e3 if spent else 0.0

    return {"record_us_p50": pick(0.5), "record_us_p99": pick(0.99),
            "record_us_max": pick(1.0), "late_steps": late}  # fmt: skip


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
