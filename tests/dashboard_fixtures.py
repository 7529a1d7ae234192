"""Fixtures for the dashboard tests: a real ``edgeadapt dashboard`` process, a real headless
Chromium (Debian's ``chromium`` + ``chromedriver``, driven by selenium; no browser download),
and a hand-written device of another meta-RL family publishing over a real broker."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.telemetry.mosquitto import free_port
from devices.telemetry.records import birth_payload, state_payload

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")  # fmt: skip


class Dashboard:
    """An ``edgeadapt dashboard`` process on a free port."""

    def __init__(self, db: Path | str, *extra: str, host: str = "127.0.0.1"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "runtime.cli", "dashboard", "--db", str(db), "--host", host,
               "--port", str(self.port), "--poll", "0.1", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self._wait_ready(20)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
        """(status, body, response headers) of a GET."""
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), e.headers

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dashboard exited: {self.proc.communicate()[1][-2000:]}")
            try:
                urllib.request.urlopen(self.base + "/static/dashboard.css", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (a 401 with a token)
            except OSError:
                time.sleep(0.1)
        pytest.fail("dashboard did not answer")

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate(timeout=10)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium via selenium + the system chromedriver (fresh profile)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium/chromedriver missing: run `make system-deps`", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edgeadapt-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class OtherFamilyDevice:
    """A device of a non-PEARL family (``alg``), publishing raw records at ``rate_hz`` through
    the broker: empty ``bm``/``bv``, null ``bh``, OOD thresholds announced in its birth."""

    def __init__(self, port: int, device: str, alg: str = "rl2", rate_hz: float = 20.0):
        import paho.mqtt.client as mqtt

        self.device, self.alg, self.period = device, alg, 1.0 / rate_hz
        self.prefix = f"edgeadapt/v1/f/{device}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0
        self._stop = threading.Event()
        birth = {"fleet": "f", "dev": device, "boot": "boot-1", "boot_n": 1, "t": time.time(),
                 "alg": alg, "bundle_id": f"{alg}-nav", "bundle_version": "3",
                 "profile": "x86-cpu", "ood": {"warn": 1.5, "alarm": 2.5}}  # fmt: skip
        self._publish("birth", birth_payload(birth), retain=True)
        self._publish("state", state_payload("online", "boot-1", 1, time.time(), "connected"))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _publish(self, channel: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"{self.prefix}/{channel}", payload, qos=1, retain=retain)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.seq += 1
            s = self.seq
            rec = {"seq": s, "t": time.time(), "step": s, "r": math.sin(s / 9), "bn": s,
                   "a": [math.cos(s / 7), 0.5 * math.sin(s / 5)], "bm": [], "bv": [],
                   "bh": None, "ood": 1.0 + math.sin(s / 15) ** 2 * 1.8,
                   "lat": 35 + s % 9}  # fmt: skip
            batch = {"v": 1, "fleet": "f", "dev": self.device, "boot": "boot-1", "k": "tel",
                     "hist": False, "recs": [rec]}  # fmt: skip
            self._publish("tele", json.dumps(batch).encode())

    def close(self) -> None:
        """Stop publishing and disconnect."""
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()
