"""The telemetry CLI against a real broker: ``collect`` (a real process), ``telemetry stats``,
``telemetry plot``; shared subscriptions; MQTT 3.1.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_fixtures import ROOT, SimDevice, received, stats, wait_for

from devices.telemetry.client import TelemetryClient
from devices.telemetry.collector import Collector
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import Sample
from devices.telemetry.transport import parse_broker_url
from runtime.cli import main as cli_main


def test_collect_process_then_stats_and_plot(broker: Mosquitto, tmp_path: Path, capsys) -> None:
    db = tmp_path / "fleet.sqlite"
    collect = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "collect", "--broker", broker.url, "--db", str(db)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: db.exists(), 10, "the collector database")
        dev = SimDevice(broker.url, "cli-dev", tmp_path / "o.sqlite", records=150, rate=300,
                        event_every=50)  # fmt: skip
        final = dev.finish(30)
        wait_for(lambda: received(db, "cli-dev") >= final["last_seq"], 10, "all records")
    finally:
        collect.send_signal(signal.SIGTERM)
        out, err = collect.communicate(timeout=20)
    assert collect.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stored"] == final["last_seq"]

    assert cli_main(["telemetry", "stats", "--db", str(db), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    dev_stats = doc["devices"]["cli-dev"]
    assert {k: dev_stats[k] for k in ("received", "max_seq", "gaps", "duplicates_dropped")} == {
        "received": 153, "max_seq": 153, "gaps": 0, "duplicates_dropped": 0}  # fmt: skip
    assert dev_stats["online"] is False  # it said offline when it shut down
    assert doc["malformed"] == 0

    assert cli_main(["telemetry", "stats", "--db", str(db)]) == 0
    assert "cli-dev" in capsys.readouterr().out

    png = tmp_path / "plot.png"
    args = ["telemetry", "plot", "--db", str(db), "--device", "cli-dev", "--out", str(png)]
    assert cli_main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_stats_and_plot_user_errors(tmp_path: Path, capsys) -> None:
    assert cli_main(["telemetry", "stats", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no collector database" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert cli_main(["telemetry", "stats", "--db", str(junk)]) == 2
    assert "not a collector database" in capsys.readouterr().err


def test_plot_without_telemetry_is_a_clear_error(broker: Mosquitto, tmp_path: Path, capsys) -> None:
    db = tmp_path / "c.sqlite"
    Collector(parse_broker_url(broker.url), db).start().stop()  # creates an empty database
    args = [
        "telemetry",
        "plot",
        "--db",
        str(db),
        "--device",
        "ghost",
        "--out",
        str(tmp_path / "p.png"),
    ]
    assert cli_main(args) == 2
    assert "no telemetry stored for device 'ghost'" in capsys.readouterr().err


def test_shared_subscription_splits_the_load_and_stores_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = tmp_path / "shared.sqlite"
    opts = parse_broker_url(broker.url)
    collectors = [
        Collector(opts, db, share_group="g", client_id=f"collector-{i}").start() for i in range(2)
    ]
    try:
        assert all(c.wait_subscribed(10) for c in collectors)
        dev = SimDevice(broker.url, "shared-dev", tmp_path / "o.sqlite", records=400, rate=400,
                        batch_size=10)  # fmt: skip
        final = dev.finish(30)
        wait_for(lambda: received(db, "shared-dev") >= final["last_seq"], 10, "all records")
    finally:
        for c in collectors:
            c.stop()
    s = stats(db)["shared-dev"]
    assert s["received"] == 400 and s["gaps"] == 0 and s["duplicate_seqs_stored"] == 0
    batches = [c.counters.messages for c in collectors]
    assert all(n > 5 for n in batches), f"both collectors took a share: {batches}"


@pytest.mark.parametrize("protocol", ["3.1.1"])
def test_mqtt_311_device_and_collector(broker: Mosquitto, tmp_path: Path, protocol: str) -> None:
    db = tmp_path / "c.sqlite"
    collector = Collector(parse_broker_url(broker.url, protocol=protocol), db, client_id="c311")
    collector.start()
    try:
        assert collector.wait_subscribed(10)
        cfg = TelemetryConfig(broker=broker.url, device="old-dev", protocol=protocol,
                              outbox=str(tmp_path / "o.sqlite"))  # fmt: skip
        with TelemetryClient(cfg) as client:
            for i in range(50):
                client.record(Sample(i, 0.0, [0.0], [0.0], [1.0], 0.0, i, 0.0, 1.0))
            assert client.wait_drained(10)
        wait_for(lambda: received(db, "old-dev") == 50, 10, "records over MQTT 3.1.1")
    finally:
        collector.stop()
    assert stats(db)["old-dev"]["gaps"] == 0
