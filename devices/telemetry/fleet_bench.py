"""``edgeadapt bench fleet``: the fleet backend under load, JSON out.

Every part runs real processes on loopback: a private Mosquitto, a private PostgreSQL server
(``devices.telemetry.pgserver``), ``edgeadapt collect`` processes, ``edgeadapt dashboard`` and
Debian's headless chromium driven by selenium. Parts (``--parts``):

``pg``
    Records/s into PostgreSQL with 1 and then 2 collector processes sharing an MQTT 5 shared
    subscription, same run, same load: ``pg_messages`` batches of 100 telemetry records (the
    device client's largest batch) from ``pg_devices`` devices, published flat out at QoS 1 by
    one client. Time from the first publish to the last record committed.
``kill``
    A ``fleet-sim`` fleet (real field devices) through 2 shared collector processes into
    PostgreSQL; one collector is SIGKILLed mid-run and restarted by its "supervisor" (same client
    id) one second later. Lost and duplicated records are counted.
``sim``
    A ``fleet-sim`` fleet into one Mosquitto and one collector (SQLite).
``dashboard``
    ``dash_records`` records of ``dash_devices`` devices bulk-inserted through the collector's
    store (no MQTT), then: time to first paint of the fleet page (all device rows drawn) and of
    a device page (its charts drawn), cold browser then warm, and the latency from a record's
    arrival at the collector (its ``received`` time) to its point on the live device page.

The fleet parts need bundles (``--bundle``, any family; device ``k`` runs bundle ``k mod n``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devices.telemetry.bench import percentile, wait_until
from runtime.errors import ConfigError, EdgeadaptError

log = logging.getLogger(__name__)

PARTS = ("pg", "kill", "sim", "dashboard")
RECORDS_PER_MESSAGE = 100
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")  # fmt: skip


@dataclass(frozen=True)
class FleetBenchOptions:
    """What to run (rates in Hz, times in s)."""

    parts: tuple[str, ...] = PARTS
    bundles: tuple[str, ...] = ()
    pubkey: str | None = None
    ray: str | None = None  #: fleet hosts as Ray actors ("auto" or an address); else processes
    per_host: int = 100
    pg_devices: int = 50
    pg_messages: int = 2000
    kill_devices: int = 500
    kill_rate_hz: float = 10.0
    kill_seconds: float = 30.0
    sim_devices: int = 200
    sim_rate_hz: float = 20.0
    sim_seconds: float = 30.0
    dash_devices: int = 100
    dash_records: int = 1_000_000
    dash_stores: tuple[str, ...] = ("sqlite", "postgresql")
    dash_loads: int = 3
    latency_seconds: float = 10.0
    latency_rate_hz: float = 20.0


def run_fleet_bench(opts: FleetBenchOptions, progress: bool = False) -> dict[str, Any]:
    """Run the selected parts against private servers; return the JSON-ready results."""
    from devices.telemetry.mosquitto import Mosquitto, basic_config, free_port

    _check(opts)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    out: dict[str, Any] = {"options": asdict(opts), "load_before": _load()}
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-fleet-") as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        cfg = basic_config(port, tmp / "broker", save_on_every_change=False)
        broker = Mosquitto(tmp / "broker", cfg, port)
        broker.start()
        pg = _postgres() if {"pg", "kill"} & set(opts.parts) or _needs_pg(opts) else None
        try:
            if "pg" in opts.parts:
                say("records/s into PostgreSQL with 1 and 2 collectors ...")
                out["pg"] = bench_pg_collectors(broker, pg, opts)
            if "kill" in opts.parts:
                say(f"{opts.kill_devices} devices at {opts.kill_rate_hz} Hz, 2 collectors, "
                    "one killed ...")  # fmt: skip
                out["kill"] = bench_kill(broker, pg, tmp, opts)
            if "sim" in opts.parts:
                say(f"fleet-sim: {opts.sim_devices} devices at {opts.sim_rate_hz} Hz ...")
                out["sim"] = bench_sim(broker, tmp, opts)
            if "dashboard" in opts.parts:
                out["dashboard"] = {}
                for store in opts.dash_stores:
                    say(f"dashboard over {opts.dash_records:,} records in {store} ...")
                    out["dashboard"][store] = bench_dashboard(broker, pg, tmp, store, opts)
        finally:
            if pg is not None:
                pg.stop()
            broker.kill()
    out["load_after"] = _load()
    return out


# --- records/s into PostgreSQL -------------------------------------------------------------------
def bench_pg_collectors(broker: Any, pg: Any, opts: FleetBenchOptions) -> dict[str, Any]:
    """The same load into a fresh database with 1, then 2 collector processes."""
    out: dict[str, Any] = {"records_per_message": RECORDS_PER_MESSAGE}
    for n in (1, 2):
        fleet = f"pg{n}"
        messages = _telemetry_messages(fleet, opts.pg_devices, opts.pg_messages)
        total = len(messages) * RECORDS_PER_MESSAGE
        url = _fresh_db(pg, f"bench_pg_{n}")
        procs = [CollectorProcess(broker, url, f"{fleet}-c{i}", share=fleet, fleet=fleet,
                                  session_expiry=0) for i in range(n)]  # fmt: skip

        def all_stored(url: str = url, prefix: str = fleet + "-", total: int = total) -> bool:
            return _count(url, prefix) >= total

        try:
            t0 = time.perf_counter()
            publish_s = _publish_all(broker.port, messages)
            done = wait_until(all_stored, 600)
            elapsed = time.perf_counter() - t0
        finally:
            counters = [p.stop() for p in procs]
        stats = _stats(url, fleet + "-")
        out[f"collectors_{n}"] = {
            "records": total, "seconds": round(elapsed, 2),
            "records_per_s": round(total / elapsed) if done else 0,
            "publish_s": round(publish_s, 2),
            "stored_by_collector": [c.get("stored") for c in counters],
            "lost": total - stats["distinct"], "duplicates": stats["duplicates"],
        }  # fmt: skip
    one, two = out["collectors_1"]["records_per_s"], out["collectors_2"]["records_per_s"]
    out["speedup_2_over_1"] = round(two / one, 2) if one else None
    return out


def _telemetry_messages(fleet: str, devices: int, messages: int) -> list[tuple[str, bytes]]:
    """``messages`` batches of 100 records, round robin over ``devices`` devices."""
    from devices.telemetry.records import RecordKind, Sample, batch_payload, encode_telemetry
    from devices.telemetry.simdevice import sample_values
    from devices.telemetry.topics import Channel, topic

    seqs = [0] * devices
    out = []
    now = time.time()
    for m in range(messages):
        d = m % devices
        name = f"{fleet}-{d:04d}"
        first = seqs[d] + 1
        seqs[d] += RECORDS_PER_MESSAGE
        bodies = [encode_telemetry(s, now, Sample(**sample_values(s)))
                  for s in range(first, first + RECORDS_PER_MESSAGE)]  # fmt: skip
        payload = batch_payload(fleet, name, "bench", RecordKind.TELEMETRY, False, bodies)
        out.append((topic(fleet, name, Channel.TELEMETRY), payload))
    return out


def _publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 from one client as fast as the broker acknowledges; seconds taken."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.perf_counter()
    infos = [client.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return elapsed


# --- 2 collectors, one killed --------------------------------------------------------------------
def bench_kill(broker: Any, pg: Any, tmp: Path, opts: FleetBenchOptions) -> dict[str, Any]:
    """A simulated fleet through 2 shared collectors; collector 0 SIGKILLed and restarted."""
    from devices import fleet_sim

    url = _fresh_db(pg, "bench_kill")
    procs = [CollectorProcess(broker, url, f"kill-c{i}", share="kill", fleet="kill")
             for i in range(2)]  # fmt: skip
    fopts = _fleet_options(opts, broker.url, "kill", opts.kill_devices, opts.kill_rate_hz,
                           opts.kill_seconds)  # fmt: skip
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(fleet=fleet_sim.run_fleet(fopts)),
                              daemon=True)  # fmt: skip
    runner.start()
    kill: dict[str, Any] = {}
    try:
        # the fleet is running once records arrive; kill a third of the way into the run
        if not wait_until(lambda: _count(url, "kill-") > 0 or not runner.is_alive(), 900):
            raise EdgeadaptError("the simulated fleet sent nothing in 900 s")
        time.sleep(opts.kill_seconds / 3)
        kill["stored_at_kill"] = _count(url, "kill-")
        procs[0].kill()
        kill["killed_after_first_record_s"] = round(opts.kill_seconds / 3, 1)
        time.sleep(1.0)  # the fleet keeps publishing; the broker keeps the dead one's share
        procs.append(CollectorProcess(broker, url, "kill-c0", share="kill", fleet="kill"))
        kill["restarted_after_s"] = 1.0
        runner.join()
        if "fleet" not in result:
            raise EdgeadaptError("the simulated fleet failed (see the log)")
        fleet = result["fleet"]
        check = fleet_sim.collector_check(url, fleet.last_seq, 600)
    finally:
        counters = [p.stop() for p in procs]
    return {**_fleet_summary(fleet), "collector": check, **kill,
            "stored_by_collector": [c.get("stored") for c in counters]}  # fmt: skip


# --- fleet-sim into one Mosquitto ---------------------------------------------------------------
def bench_sim(broker: Any, tmp: Path, opts: FleetBenchOptions) -> dict[str, Any]:
    """A simulated fleet into one Mosquitto and one collector (SQLite, in this process)."""
    from devices import fleet_sim
    from devices.telemetry.collector import Collector
    from devices.telemetry.transport import parse_broker_url

    db = tmp / "sim.sqlite"
    collector = Collector(parse_broker_url(broker.url), db, fleet="sim",
                          client_id="bench-sim").start()  # fmt: skip
    try:
        if not collector.wait_subscribed(15):
            raise EdgeadaptError("the collector did not subscribe")
        fopts = _fleet_options(opts, broker.url, "sim", opts.sim_devices, opts.sim_rate_hz,
                               opts.sim_seconds)  # fmt: skip
        fleet = fleet_sim.run_fleet(fopts)
        check = fleet_sim.collector_check(db, fleet.last_seq, 600)
    finally:
        collector.stop()
    return {**_fleet_summary(fleet), "collector": check}


def _fleet_options(
    opts: FleetBenchOptions, broker: str, fleet: str, devices: int, rate: float, seconds: float
) -> Any:
    from devices.fleet_sim import FleetOptions

    return FleetOptions(devices=devices, bundles=opts.bundles, broker=broker, rate_hz=rate,
                        duration_s=seconds, pubkey=opts.pubkey, fleet=fleet, prefix=fleet,
                        per_host=opts.per_host, ray=opts.ray)  # fmt: skip


def _fleet_summary(fleet: Any) -> dict[str, Any]:
    d = asdict(fleet)
    d.pop("last_seq")
    return d


# --- dashboard -----------------------------------------------------------------------------------
#: Injected into every page before its own scripts: when the watched condition first holds, the
#: next animation frame's time is kept (``performance.now()``: ms since navigation start), and
#: every change of the reward chart's last seq is logged with the page's wall clock (unix s).
PAGE_PROBE = """
(() => {
  window.__bench = { fleetRows: null, chartPoints: null, seqTimes: [] };
  const want = () => window.__benchWant || 0;
  let lastSeq = -1;
  const check = () => {
    const b = window.__bench;
    if (b.fleetRows === null) {
      const rows = document.querySelectorAll('#fleet tbody tr').length;
      if (rows && rows >= want()) {
        requestAnimationFrame(() => {
          if (b.fleetRows === null) b.fleetRows = performance.now();
        });
      }
    }
    const chart = document.getElementById('chart-reward');
    if (chart && chart.dataset.points && Number(chart.dataset.points) > 0) {
      if (b.chartPoints === null) {
        requestAnimationFrame(() => {
          if (b.chartPoints === null) b.chartPoints = performance.now();
        });
      }
      const seq = Number(chart.dataset.lastSeq || 0);
      if (seq !== lastSeq) {
        lastSeq = seq;
        requestAnimationFrame(() => b.seqTimes.push([seq, Date.now() / 1000]));
      }
    }
  };
  new MutationObserver(check).observe(document, { subtree: true, childList: true,
                                                 attributes: true });
})();
"""


def bench_dashboard(
    broker: Any, pg: Any, tmp: Path, store: str, opts: FleetBenchOptions
) -> dict[str, Any]:
    """First paint over a big database, then arrival-to-page latency of a live device."""
    db: str | Path = tmp / "dash.sqlite" if store == "sqlite" else _fresh_db(pg, "bench_dash")
    if store == "sqlite" and Path(db).exists():
        Path(db).unlink()
    fill = bulk_fill(db, opts.dash_devices, opts.dash_records)
    dash = DashboardProcess(db)
    driver = _browser()
    try:
        fleet_ms, device_ms = [], []
        first_device = f"dash-{0:04d}"
        for _ in range(opts.dash_loads):
            fleet_ms.append(_page_time(driver, dash.base + "/", "fleetRows", opts.dash_devices))
            device_ms.append(_page_time(driver, f"{dash.base}/device/{first_device}",
                                        "chartPoints", 0))  # fmt: skip
        fcp = driver.execute_script(
            "const p = performance.getEntriesByName('first-contentful-paint')[0];"
            "return p ? p.startTime : null;"
        )
        latency = _arrival_to_page(broker, db, driver, dash, opts)
    finally:
        driver.quit()
        dash.close()
    return {
        "store": store, "devices": opts.dash_devices, "records": fill["records"],
        "fill_s": fill["seconds"], "fill_rows_per_s": fill["rows_per_s"],
        "fleet_first_paint_ms": [round(x) for x in fleet_ms],
        "fleet_first_paint_ms_cold": round(fleet_ms[0]),
        "fleet_first_paint_ms_warm_median": _median_ms(fleet_ms[1:]),
        "device_first_paint_ms": [round(x) for x in device_ms],
        "device_first_paint_ms_cold": round(device_ms[0]),
        "device_first_paint_ms_warm_median": _median_ms(device_ms[1:]),
        "device_page_fcp_ms": round(fcp) if fcp is not None else None,
        "latency": latency,
    }  # fmt: skip


def bulk_fill(db: str | Path, devices: int, records: int) -> dict[str, Any]:
    """``records`` telemetry records of ``devices`` devices (families mixed) via the store."""
    from devices.telemetry.collector_db import CollectorStore
    from devices.telemetry.records import (
        RecordKind,
        Sample,
        batch_payload,
        birth_payload,
        encode_telemetry,
    )
    from devices.telemetry.simdevice import sample_values
    from devices.telemetry.topics import Channel, topic

    per_device = records // devices
    families = ("pearl", "rl2", "maml")
    store = CollectorStore.open(db)
    t0 = time.perf_counter()
    now = time.time()
    start = now - per_device / 10.0  # as if every device had reported at 10 Hz until now
    try:
        store.begin()
        for d in range(devices):
            name, alg = f"dash-{d:04d}", families[d % 3]
            birth = {"fleet": "dash", "dev": name, "boot": "b1", "boot_n": 1, "t": now,
                     "alg": alg, "bundle_id": f"{alg}-nav", "bundle_version": "1",
                     "profile": "x86-cpu", "ood": {"warn": 1.5, "alarm": 2.5}}  # fmt: skip
            store.ingest(topic("dash", name, Channel.BIRTH), birth_payload(birth), now)
        store.commit()
        for first in range(1, per_device + 1, RECORDS_PER_MESSAGE):
            seqs = range(first, min(first + RECORDS_PER_MESSAGE, per_device + 1))
            bodies = [encode_telemetry(s, start + s / 10.0, Sample(**sample_values(s)))
                      for s in seqs]  # fmt: skip
            store.begin()
            for d in range(devices):
                name = f"dash-{d:04d}"
                payload = batch_payload("dash", name, "b1", RecordKind.TELEMETRY, False, bodies)
                store.ingest(topic("dash", name, Channel.TELEMETRY), payload, now)
            store.commit()
    finally:
        store.close()
    elapsed = time.perf_counter() - t0
    total = per_device * devices
    return {"records": total, "seconds": round(elapsed, 1), "rows_per_s": round(total / elapsed)}


def _page_time(driver: Any, url: str, key: str, want: int) -> float:
    """Navigate (a fresh document) and return ms from navigation start to the probe's mark."""
    driver.get("about:blank")
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                           {"source": f"window.__benchWant = {want};"})  # fmt: skip
    driver.get(url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return window.__bench && window.__bench.{key};")
        if value is not None:
            return float(value)
        time.sleep(0.02)
    raise EdgeadaptError(f"{url}: the page did not finish drawing in 60 s")


def _arrival_to_page(
    broker: Any, db: str | Path, driver: Any, dash: Any, opts: FleetBenchOptions
) -> dict[str, Any]:
    """A live device at ``latency_rate_hz`` through the broker and a collector into ``db``;
    per record, the page time its point was first drawn minus its collector arrival time."""
    from devices.telemetry.client import TelemetryClient
    from devices.telemetry.collector import Collector
    from devices.telemetry.config import TelemetryConfig
    from devices.telemetry.simdevice import sample_values
    from devices.telemetry.transport import parse_broker_url

    name = f"live-{int(time.time() * 1000) % 1_000_000:06d}"
    collector = Collector(parse_broker_url(broker.url), db, fleet="dash",
                          client_id=f"bench-{name}").start()  # fmt: skip
    outbox = Path(tempfile.mkdtemp(prefix="edgeadapt-live-")) / "outbox.sqlite"
    client = TelemetryClient(TelemetryConfig(broker=broker.url, fleet="dash", device=name,
                                             outbox=str(outbox))).start()  # fmt: skip
    try:
        if not collector.wait_subscribed(15):
            raise EdgeadaptError("the collector did not subscribe")
        period, step = 1.0 / opts.latency_rate_hz, 0
        client.record_step(**sample_values(step))  # the device exists before its page opens
        wait_until(lambda: _count(db, name) > 0, 20)
        driver.get(f"{dash.base}/device/{name}")
        t_end = time.perf_counter() + opts.latency_seconds
        while time.perf_counter() < t_end:
            step += 1
            client.record_step(**sample_values(step))
            time.sleep(period)
        client.wait_drained(20)
        time.sleep(1.5)  # the last points reach the page
        seq_times = driver.execute_script("return window.__bench.seqTimes;")
    finally:
        client.close()
        collector.stop()
    received = _received(db, name)
    lat = _per_record_latency(seq_times, received)
    return {"device_rate_hz": opts.latency_rate_hz, "records": len(received),
            "measured": len(lat), "ms_p50": _pct_ms(lat, 50), "ms_p90": _pct_ms(lat, 90),
            "ms_p99": _pct_ms(lat, 99), "ms_max": _pct_ms(lat, 100),
            "dashboard_poll_s": dash.poll_s}  # fmt: skip


def _per_record_latency(seq_times: list[list[float]], received: dict[int, float]) -> list[float]:
    """For each record: first page time at which the chart's last seq reached it, minus its
    arrival; records before the page opened (the first window) are not counted."""
    if not seq_times:
        return []
    seq_times = sorted(seq_times, key=lambda x: x[1])
    first_seq = seq_times[0][0]
    out = []
    for seq, arrived in received.items():
        if seq <= first_seq:
            continue
        shown = next((t for s, t in seq_times if s >= seq), None)
        if shown is not None:
            out.append(shown - arrived)
    return sorted(out)


# --- processes -----------------------------------------------------------------------------------
class CollectorProcess:
    """An ``edgeadapt collect`` process; ready once the broker logged its connection."""

    def __init__(self, broker: Any, db: str, client_id: str, *, share: str, fleet: str = "+",
                 session_expiry: int = 86_400) -> None:  # fmt: skip
        self.broker, self.client_id = broker, client_id
        cmd = [sys.executable, "-m", "runtime.cli", "collect", "--broker", broker.url, "--db", db,
               "--share", share, "--fleet", fleet, "--client-id", client_id,
               "--session-expiry", str(session_expiry)]  # fmt: skip
        before = self._connections()
        self.log = tempfile.NamedTemporaryFile(prefix=f"edgeadapt-{client_id}-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        if not wait_until(lambda: self._connections() > before or self.proc.poll() is not None, 30):
            raise EdgeadaptError(f"collector {client_id} did not connect")
        if self.proc.poll() is not None:
            tail = Path(self.log.name).read_text(errors="replace")[-500:]
            raise EdgeadaptError(f"collector {client_id} exited: {tail}")
        time.sleep(0.5)  # its SUBSCRIBE follows the CONNACK

    def _connections(self) -> int:
        return self.broker.log_tail(10_000_000).count(f" as {self.client_id} ")

    def kill(self) -> None:
        """SIGKILL (no chance to acknowledge or commit anything more)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; its final counters ({} if it was killed)."""
        if self.proc.poll() is not None:
            self.log.close()
            return {}
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        self.log.close()
        lines = [x for x in out.splitlines() if x.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


class DashboardProcess:
    """An ``edgeadapt dashboard`` process on a free loopback port (default live poll)."""

    def __init__(self, db: str | Path, poll_s: float = 0.2) -> None:
        import urllib.error
        import urllib.request

        from devices.telemetry.mosquitto import free_port

        self.poll_s = poll_s
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "runtime.cli", "dashboard", "--db", str(db), "--port",
               str(port), "--poll", str(poll_s)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EdgeadaptError("the dashboard exited at start")
            try:
                urllib.request.urlopen(self.base + "/static/dashboard.css", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.close()
        raise EdgeadaptError("the dashboard did not answer in 30 s")

    def close(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _browser() -> Any:
    """Headless Debian chromium through the system chromedriver (no browser download)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise EdgeadaptError("the dashboard part needs chromium and chromium-driver (Debian)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise EdgeadaptError("the dashboard part needs selenium: pip install selenium") from None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="edgeadapt-bench-chromium-")
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_PROBE})
    return driver


# --- databases -----------------------------------------------------------------------------------
def _postgres() -> Any:
    from devices.telemetry.pgserver import PostgresServer

    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise EdgeadaptError(
            "PostgreSQL parts need psycopg: pip install 'edgeadapt[postgres]'"
        ) from None
    return PostgresServer().start()


def _needs_pg(opts: FleetBenchOptions) -> bool:
    return "dashboard" in opts.parts and "postgresql" in opts.dash_stores


def _fresh_db(pg: Any, name: str) -> str:
    from devices.telemetry.collector_db import CollectorStore

    url = pg.create_database(name)
    CollectorStore.open(url).close()  # the schema before any reader polls it
    return url


def _count(db: str | Path, prefix: str) -> int:
    """Records of devices whose id starts with ``prefix``."""
    from devices.telemetry import database

    with database.connect(db, readonly=True) as conn:
        sql = "SELECT COUNT(*) FROM records WHERE device >= ? AND device < ?"
        return int(conn.execute(sql, (prefix, prefix + "\uffff")).fetchone()[0])


def _stats(db: str | Path, prefix: str) -> dict[str, int]:
    from devices.telemetry import database

    with database.connect(db, readonly=True) as conn:
        sql = ("SELECT COUNT(*), COUNT(DISTINCT device || ':' || boot || ':' || seq) FROM records "
               "WHERE device >= ? AND device < ?")  # fmt: skip
        n, distinct = conn.execute(sql, (prefix, prefix + "\uffff")).fetchone()
    return {"stored": int(n), "distinct": int(distinct), "duplicates": int(n) - int(distinct)}


def _received(db: str | Path, device: str) -> dict[int, float]:
    from devices.telemetry import database

    with database.connect(db, readonly=True) as conn:
        rows = conn.execute(
            "SELECT seq, received FROM records WHERE device = ? AND kind = 0", (device,)
        ).fetchall()
    return {int(s): float(r) for s, r in rows}


# --- small helpers -------------------------------------------------------------------------------
def _check(opts: FleetBenchOptions) -> None:
    unknown = set(opts.parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if {"kill", "sim"} & set(opts.parts) and not opts.bundles:
        raise ConfigError("the kill and sim parts run fleet-sim: give at least one --bundle")
    for b in opts.bundles:
        if not Path(b).is_dir():
            raise ConfigError(f"no bundle directory at {b}")
    bad = set(opts.dash_stores) - {"sqlite", "postgresql"}
    if bad:
        raise ConfigError(f"unknown dashboard stores {sorted(bad)}; choose sqlite, postgresql")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values)) if values else None


def _pct_ms(sorted_s: list[float], q: float) -> float | None:
    return round(1000 * percentile(sorted_s, q), 1) if sorted_s else None
