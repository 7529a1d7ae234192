"""Fault tests against a real Mosquitto: zero records lost, zero duplicates stored.

- the broker is SIGKILLed and restarted in the middle of a stream;
- the device process is SIGKILLed and restarted (its sequence continues);
- the broker is down while the outbox fills past its bound (the documented policy, exactly);
- malformed payloads reach the collector (counted, dropped, the collector keeps going);
- an exception in an MQTT callback never stops the network loop.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_fixtures import ROOT, SimDevice, received, stats, stored, wait_for

from devices.telemetry.client import TelemetryClient
from devices.telemetry.collector import Collector
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import Sample
from devices.telemetry.transport import guarded

DEVICE = "dev-1"


def assert_complete(db: Path, device: str, last_seq: int) -> dict:
    """Every seq 1..last_seq stored exactly once; returns the device's stats."""
    s = stats(db)[device]
    assert s["min_seq"] == 1 and s["max_seq"] == last_seq
    assert s["gaps"] == 0, s
    assert s["duplicate_seqs_stored"] == 0, s
    assert s["received"] == last_seq, s
    return s


def test_broker_sigkill_mid_stream_loses_and_duplicates_nothing(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    db = collector.db_path
    dev = SimDevice(broker.url, DEVICE, tmp_path / "outbox.sqlite", records=1200, rate=300)
    try:
        wait_for(lambda: received(db, DEVICE) >= 200, 20, "the first records")
        broker.kill()
        time.sleep(1.0)  # the device keeps producing into its outbox meanwhile
        broker.restart()
        final = dev.finish(60)
    finally:
        dev.close()
    assert final["drained"] and final["last_seq"] == 1200
    wait_for(lambda: received(db, DEVICE) >= 1200, 20, "all records at the collector")
    time.sleep(0.3)  # let any late duplicate arrive before counting
    s = assert_complete(db, DEVICE, 1200)
    assert s["historical"] > 0, "records buffered during the outage are marked historical"
    rows = stored(db, DEVICE)
    assert all(rec["step"] == seq - 1 for _, seq, _, rec in rows)


def test_device_sigkill_and_restart_continues_the_sequence(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    db, outbox = collector.db_path, tmp_path / "outbox.sqlite"
    first = SimDevice(broker.url, DEVICE, outbox, records=100_000, rate=400)
    try:
        wait_for(lambda: received(db, DEVICE) >= 300, 20, "the first records")
        wait_for(lambda: stats(db)[DEVICE]["online"], 5, "the device online")
        first.sigkill()
    finally:
        first.close()
    with sqlite3.connect(outbox) as conn:  # the real file the killed process left behind
        pending = [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        next_seq = int(conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
    wait_for(lambda: not stats(db)[DEVICE]["online"], 10, "the Last Will (offline)")

    second = SimDevice(broker.url, DEVICE, outbox, records=300, rate=500)
    try:
        assert second.ready["first_seq"] == next_seq, "sequence continues after the last commit"
        assert second.ready["boot_n"] == 2 and second.ready["boot"] != first.ready["boot"]
        wait_for(lambda: stats(db)[DEVICE]["online"], 10, "the restarted device online")
        final = second.finish(60)
    finally:
        second.close()
    last = next_seq + 300 - 1
    assert final["drained"] and final["last_seq"] == last
    wait_for(lambda: received(db, DEVICE) >= last, 20, "all records")
    time.sleep(0.3)
    s = assert_complete(db, DEVICE, last)
    assert s["boots"] == 2
    rows = {seq: boot for boot, seq, _, _ in stored(db, DEVICE)}
    assert all(rows[seq] == first.ready["boot"] for seq in pending), (
        "outbox rows of the killed boot"
    )
    assert all(rows[seq] == second.ready["boot"] for seq in range(next_seq, last + 1))
    with sqlite3.connect(db) as conn:  # one birth per boot, with what the device announced
        births = [json.loads(b) for (b,) in conn.execute("SELECT birth FROM boots ORDER BY boot_n")]
    assert [b["boot"] for b in births] == [first.ready["boot"], second.ready["boot"]]
    assert births[1]["first_seq"] == next_seq and births[1]["boot_n"] == 2
    assert {k: births[1][k] for k in ("bundle_id", "bundle_version", "profile")} == {
        "bundle_id": "sim", "bundle_version": "0", "profile": "simulated"}  # fmt: skip
    assert births[1]["runtime_version"]


def test_outage_past_the_bound_drops_oldest_telemetry_keeps_events(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    db = collector.db_path
    cfg = TelemetryConfig(broker=broker.url, device=DEVICE, outbox=str(tmp_path / "ob.sqlite"),
                          max_records=200, batch_size=50)  # fmt: skip
    client = TelemetryClient(cfg).start()
    try:
        before = [client.record(_sample(i)) for i in range(50)]
        assert client.wait_drained(10)
        broker.kill()
        wait_for(lambda: not client.connected, 10, "the client to notice the outage")
        tele, events = [], []
        for i in range(500):
            tele.append(client.record(_sample(50 + i)))
            if i % 100 == 99:
                events.append(client.event("task_change", {"i": i}))
        assert client.flush(10)
        assert client.stats().stored == 200 + len(events), "bounded while offline"
        broker.restart()
        assert client.wait_drained(20)
    finally:
        client.close()
    kept = tele[-200:]
    dropped = sorted(set(tele) - set(kept))
    expected = set(before) | set(events) | set(kept)
    wait_for(
        lambda: received(db, DEVICE) >= len(expected) + 1, 20, f"the drained outbox {stats(db)}"
    )
    time.sleep(0.3)
    rows = stored(db, DEVICE)
    seqs = {seq for _, seq, _, _ in rows}
    report_seq = max(seqs)  # the drop report is queued at reconnect, after everything else
    assert seqs - {report_seq} == expected
    report = next(rec for _, seq, _, rec in rows if seq == report_seq)
    assert report["type"] == "outbox_dropped"
    assert report["data"] == {"reason": "full", "n": len(dropped), "first": dropped[0],
                              "last": dropped[-1]}  # fmt: skip
    s = stats(db)[DEVICE]
    assert s["gaps"] == len(dropped) == s["dropped_at_source"] == 300
    assert s["duplicate_seqs_stored"] == 0


def test_malformed_payloads_are_counted_and_dropped(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    db = collector.db_path
    bad = [
        ("edgeadapt/v1/f/dev-x/tele", b"\xff\xfe not json"),
        ("edgeadapt/v1/f/dev-x/tele", b'{"v": 99, "recs": []}'),
        ("edgeadapt/v1/f/dev-x/tele", b'{"v":1,"fleet":"f","dev":"other","boot":"b","k":"tel",'
                                      b'"hist":false,"recs":[{"seq":1,"t":0,"step":0}]}'),
        ("edgeadapt/v1/f/dev-x/event", b'{"v":1,"fleet":"f","dev":"dev-x","boot":"b","k":"evt",'
                                       b'"hist":false,"recs":[{"seq":0,"t":0,"type":"x"}]}'),
        ("edgeadapt/v1/f/dev-x/state", b'{"v":1,"state":"sleepy","boot":"b"}'),
        ("edgeadapt/v1/f/dev-x/birth", b"[]"),
    ]  # fmt: skip
    good = (b'{"v":1,"fleet":"f","dev":"dev-x","boot":"b","k":"tel","hist":false,'
            b'"recs":[{"seq":1,"t":1.0,"step":0,"r":0.5}]}')  # fmt: skip
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        for topic, payload in [*bad, ("edgeadapt/v1/f/dev-x/tele", good)]:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()
    wait_for(lambda: received(db, "dev-x") == 1, 10, "the valid batch after the bad ones")
    wait_for(lambda: collector.counters.malformed == len(bad), 5, "all malformed counted")
    conn = sqlite3.connect(db)
    total = int(conn.execute("SELECT value FROM meta WHERE key='malformed_total'").fetchone()[0])
    reasons = [r[0] for r in conn.execute("SELECT reason FROM malformed ORDER BY id")]
    conn.close()
    assert total == len(bad) and len(reasons) == len(bad)
    assert "unsupported payload version 99" in reasons[1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_exception_in_a_callback_does_not_stop_the_network_loop(broker: Mosquitto) -> None:
    calls: list[str] = []

    def explode(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        calls.append(msg.topic)
        raise RuntimeError("user bug in a callback")

    def run(on_message: object, suppress: bool) -> tuple[int, bool]:
        calls.clear()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.suppress_exceptions = suppress
        sub.on_message = on_message
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("t/#", qos=1)
        sub.loop_start()
        time.sleep(0.3)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for i in range(3):
            pub.publish(f"t/{i}", b"x", qos=1).wait_for_publish(5)
            time.sleep(0.1)
        pub.disconnect()
        pub.loop_stop()
        alive = sub._thread is not None and sub._thread.is_alive()
        sub.disconnect()
        if alive:
            sub.loop_stop()
        return len(calls), alive

    # the pitfall is real: unguarded, the first exception ends paho's network thread
    assert run(explode, suppress=False) == (1, False)
    # guarded, every message reaches the callback and the loop keeps running
    assert run(guarded(explode, "test"), suppress=False) == (3, True)


def _sample(step: int) -> Sample:
    return Sample(step, -0.5, [0.1, 0.2], [0.0] * 5, [1.0] * 5, 1.0, step, 0.2, 50.0)


def test_collector_sigkill_and_restart_loses_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    """The collector acknowledges a message only after committing it: a SIGKILL between the two
    makes the broker redeliver (persistent session) and the primary key drops the copies."""
    db = tmp_path / "c.sqlite"
    cmd = [sys.executable, "-m", "runtime.cli", "collect", "--broker", broker.url, "--db", str(db),
           "--client-id", "killable-collector"]  # fmt: skip

    def start() -> subprocess.Popen[str]:
        before = _connections(broker)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        wait_for(lambda: _connections(broker) > before, 10, "the collector connected")
        time.sleep(0.2)  # its SUBSCRIBE follows the CONNACK (needed on the first start only)
        return proc

    procs = [start()]
    dev = SimDevice(broker.url, DEVICE, tmp_path / "o.sqlite", records=1500, rate=500)
    try:
        wait_for(lambda: db.exists() and received(db, DEVICE) >= 200, 20, "the first records")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        time.sleep(0.5)  # the device keeps publishing; the broker queues for the session
        procs.append(start())
        final = dev.finish(60)
        wait_for(lambda: received(db, DEVICE) >= 1500, 20, "all records after the restart")
    finally:
        dev.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=20)
    assert final["drained"]
    assert_complete(db, DEVICE, 1500)


def _connections(broker: Mosquitto) -> int:
    return broker.log_tail(1_000_000).count("as killable-collector")


def test_an_idle_client_writes_nothing_and_still_sends_the_next_record_at_once(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    """Between records the worker sleeps: no outbox transaction, no polling every tick.

    A record queued after more than one idle period (1 s) must still reach the collector in
    well under that period, so sleeping never delays telemetry.
    """
    db = tmp_path / "collector.sqlite"
    cfg = TelemetryConfig(broker=broker.url, device="idle-dev", outbox=str(tmp_path / "o.sqlite"))
    client = TelemetryClient(cfg).start()
    try:
        wait_for(lambda: client.connected, 10, "the connection")
        client.record(Sample(0, 0.0, [0.0], [0.0], [1.0], 0.0, 0, 0.0, 1.0))
        wait_for(lambda: received(db, "idle-dev") == 1, 10, "the first record")
        wait_for(lambda: client.stats().stored == 0, 10, "the acknowledged row deleted")
        time.sleep(0.2)
        commits = client.stats().store_commits
        time.sleep(2.5)  # idle: more than two idle periods
        assert client.stats().store_commits == commits
        t0 = time.monotonic()
        client.record(Sample(1, 0.0, [0.0], [0.0], [1.0], 0.0, 1, 0.0, 1.0))
        wait_for(lambda: received(db, "idle-dev") == 2, 10, "the record after the idle spell")
        assert time.monotonic() - t0 < 0.5
        assert client.stats().store_commits > commits  # the record was persisted first
    finally:
        client.close()


def test_a_burst_beyond_the_ram_bound_is_stored_whole_when_the_disk_has_room(
    broker: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    """``max_queued_records`` bounds records that *cannot* be stored (disk full), not a burst
    the worker has simply not reached yet: 1000 records queued before the worker's first
    cycle, with a bound of 100, all arrive."""
    db = tmp_path / "collector.sqlite"
    cfg = TelemetryConfig(
        broker=broker.url, device="burst", outbox=str(tmp_path / "o.sqlite"), max_queued_records=100
    )
    client = TelemetryClient(cfg)
    for step in range(1000):  # queued before the worker runs: one cycle takes them all
        client.record(Sample(step, 0.0, [0.0], [0.0], [1.0], 0.0, step, 0.0, 1.0))
    client.start()
    try:
        assert client.wait_drained(30)
        wait_for(lambda: received(db, "burst") == 1000, 10, "every record of the burst")
        assert client.stats().dropped_records == 0 and client.stats().ram_dropped == 0
    finally:
        client.close()
