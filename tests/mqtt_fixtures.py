"""Real-broker fixtures for the telemetry tests: Mosquitto, a collector, simulated devices.

Nothing is mocked: the broker is a ``mosquitto`` process on a free loopback port (killable with
SIGKILL and restartable on the same port), devices are ``python -m devices.telemetry.simdevice``
processes, databases are real SQLite files. If mosquitto is not installed the tests FAIL with
the install command; they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.telemetry import collector_db
from devices.telemetry.collector import Collector
from devices.telemetry.mosquitto import Mosquitto, MosquittoMissing, find_mosquitto
from devices.telemetry.transport import parse_broker_url

ROOT = Path(__file__).resolve().parent.parent


def require_mosquitto() -> str:
    """The mosquitto binary, or fail the test with how to install it."""
    try:
        return find_mosquitto()
    except MosquittoMissing as exc:
        pytest.fail(f"{exc}; the telemetry tests need a real broker", pytrace=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private anonymous Mosquitto with persistence; ``kill()``/``restart()`` for faults."""
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def collector(broker: Mosquitto, tmp_path: Path) -> Iterator[Collector]:
    """A collector subscribed to every fleet, writing ``tmp_path/collector.sqlite``."""
    c = Collector(parse_broker_url(broker.url), tmp_path / "collector.sqlite")
    c.start()
    assert c.wait_subscribed(10), "collector did not subscribe"
    yield c
    c.stop()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``cond`` every 20 ms; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def stats(db: Path) -> dict[str, dict[str, Any]]:
    """``telemetry stats`` of a collector database."""
    conn = collector_db.connect(db, readonly=True)
    try:
        return collector_db.device_stats(conn)
    finally:
        conn.close()


def stored(db: Path, device: str, kind: int | None = None) -> list[tuple[str, int, int, dict]]:
    """(boot, seq, hist, record) of a device's stored records in seq order."""
    conn = collector_db.connect(db, readonly=True)
    try:
        return [
            (b, s, h, rec) for b, s, h, _, rec in collector_db.record_bodies(conn, device, kind)
        ]
    finally:
        conn.close()


def received(db: Path, device: str) -> int:
    """How many records of ``device`` are stored (0 before the first)."""
    return stats(db).get(device, {}).get("received", 0)


class SimDevice:
    """A ``devices.telemetry.simdevice`` process; its JSON status lines are parsed."""

    def __init__(self, broker_url: str, device: str, outbox: Path, *extra: str, **opts: object):
        args = [sys.executable, "-m", "devices.telemetry.simdevice", "--broker", broker_url,
                "--device", device, "--outbox", str(outbox)]  # fmt: skip
        for key, value in opts.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(
            [*args, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.ready = self._line()
        assert self.ready.get("ready"), self.ready

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"simdevice exited early: {err[-2000:]}")
        return json.loads(line)

    def finish(self, timeout_s: float = 60) -> dict[str, Any]:
        """Wait for the exit; return the final status line."""
        out, err = self.proc.communicate(timeout=timeout_s)
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        assert lines and lines[-1].get("done"), f"no final line; stderr:\n{err[-2000:]}"
        return lines[-1]

    def sigkill(self) -> None:
        """``kill -9`` the device process."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc.poll() is None:
            self.sigkill()
