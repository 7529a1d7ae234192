"""The collector's stores and hostile input: SQLite and a real PostgreSQL server hold the same
data and answer the same queries; malformed and hostile payloads are counted and dropped, never
a crash; stored records of any family (empty vectors, null entropy, wrong types) read back as
clean values."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_fixtures import received, wait_for

from devices.telemetry import database
from devices.telemetry.collector import Collector
from devices.telemetry.collector_db import CollectorStore, device_stats, record_bodies
from devices.telemetry.dashboard import queries
from devices.telemetry.mosquitto import Mosquitto
from devices.telemetry.records import (
    RecordKind,
    batch_payload,
    birth_payload,
    encode_event,
    state_payload,
)
from devices.telemetry.series import telemetry_point
from devices.telemetry.transport import parse_broker_url

TOPIC = "edgeadapt/v1/f/{}/{}"


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh collector database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "c.sqlite")
    return request.getfixturevalue("pg_url")


def _tele(device: str, boot: str, seqs: range, **fields: object) -> bytes:
    bodies = []
    for s in seqs:
        rec = {"seq": s, "t": 1000.0 + s, "step": s, "r": -0.5, "a": [0.1], "bm": [0.0, 1.0],
               "bv": [1.0, 1.0], "bh": 1.5, "bn": s, "ood": 0.2, "lat": 40.0, **fields}  # fmt: skip
        bodies.append(json.dumps(rec))
    return batch_payload("f", device, boot, RecordKind.TELEMETRY, False, bodies)


def _script() -> list[tuple[str, bytes]]:
    """One fleet's messages: births, states, telemetry with a duplicate and a gap, events."""
    birth = {"fleet": "f", "dev": "d1", "boot": "b1", "boot_n": 1, "bundle_id": "nav",
             "bundle_version": "2", "profile": "x86-cpu"}  # fmt: skip
    rl2 = {"fleet": "f", "dev": "d2", "boot": "b9", "boot_n": 1, "alg": "rl2"}
    events = [encode_event(11, 1011.0, "ood_alarm", {"value": 9.0}),
              encode_event(12, 1012.0, "outbox_dropped", {"n": 4})]  # fmt: skip
    return [
        (TOPIC.format("d1", "birth"), birth_payload(birth)),
        (TOPIC.format("d2", "birth"), birth_payload(rl2)),
        (TOPIC.format("d1", "tele"), _tele("d1", "b1", range(1, 11))),
        (TOPIC.format("d1", "tele"), _tele("d1", "b1", range(5, 11))),  # redelivered copy
        (TOPIC.format("d1", "event"),
         batch_payload("f", "d1", "b1", RecordKind.EVENT, False, events)),
        (TOPIC.format("d1", "tele"), _tele("d1", "b1", range(17, 20))),  # 13..16 dropped
        (TOPIC.format("d2", "tele"), _tele("d2", "b9", range(1, 6), bm=[], bv=[], bh=None)),
        (TOPIC.format("d1", "state"), state_payload("offline", "b1", 1, 1100.0, "lwt")),
    ]  # fmt: skip


def _ingest(store: CollectorStore, messages: list[tuple[str, bytes]]) -> list[object]:
    store.begin()
    results = [store.ingest(topic, payload, 2000.0) for topic, payload in messages]
    store.commit()
    return results


def test_sqlite_and_postgresql_store_and_answer_the_same(tmp_path: Path, pg_url: str) -> None:
    answers = []
    for target in (str(tmp_path / "c.sqlite"), pg_url):
        store = CollectorStore.open(target)
        _ingest(store, _script())
        store.close()
        with database.connect(target, readonly=True) as conn:
            answers.append({
                "stats": device_stats(conn),
                "bodies": record_bodies(conn, "d1"),
                "fleet": queries.fleet(conn),
                "meta": queries.device_meta(conn, "d2"),
                "series": queries.series(conn, "d2"),
                "events": queries.events(conn, "d1"),
            })  # fmt: skip
    sqlite, pg = answers
    assert sqlite == pg
    d1 = sqlite["stats"]["d1"]
    assert (d1["received"], d1["gaps"], d1["gap_ranges"]) == (15, 4, 1)
    assert (d1["duplicates_dropped"], d1["dropped_at_source"], d1["online"]) == (6, 4, False)
    assert d1["alg"] == "pearl" and d1["events"] == {"ood_alarm": 1, "outbox_dropped": 1}
    assert sqlite["stats"]["d2"]["alg"] == "rl2"
    assert sqlite["meta"]["labels"]["summary"] == "adaptation state"
    assert sqlite["series"]["summary"] == [] and sqlite["series"]["entropy"] == [None] * 5


def _hostile() -> list[tuple[str, bytes, str]]:
    """(topic, payload, part of the reason) of messages the collector must drop."""
    head = b'{"v":1,"fleet":"f","dev":"d1","boot":"b1","k":"tel","hist":false,"recs":'
    tele = TOPIC.format("d1", "tele")
    return [
        (tele, b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (tele, head + b"[" + b'{"x":' * 50_000 + b"1" + b"}" * 50_000 + b"]}", "nested too"),
        (tele, b" " * (1 << 20) + _tele("d1", "b1", range(1, 2)), "exceeds"),
        (tele, head + b'[{"seq":1,"t":NaN,"step":1}]}', "not a finite"),
        (tele, head + b'[{"seq":1,"t":1e999,"step":1}]}', "not a finite"),
        (tele, head + b'[{"seq":99999999999999999999999,"t":1,"step":1}]}', "2^63"),
        (tele, head + b'[{"seq":"1","t":1,"step":1}]}', "bad seq"),
        (tele, head + b'[{"seq":1,"t":"now","step":1}]}', "bad t"),
        (tele, head + b'"not a list"}', "recs"),
        (tele, head.replace(b'"b1"', b'"b\\u0000"') + b'[{"seq":1,"t":1,"step":1}]}', "boot"),
        (tele, head.replace(b'"b1"', b'"' + b"x" * 500 + b'"') + b'[{"seq":1,"t":1,"step":1}]}',
         "boot"),
        (TOPIC.format("d1", "event"), head.replace(b'"tel"', b'"evt"')
         + b'[{"seq":1,"t":1,"type":"\\u0000bad"}]}', "event type"),
        (TOPIC.format("d1", "birth"), b'{"v":1,"boot":"b1","boot_n":"NaN"}', ""),
        (TOPIC.format("d1", "birth"), b'{"v":1,"boot":["b1"]}', "boot"),
        (TOPIC.format("d1", "state"), b'{"v":1,"boot":"b1","state":"online","boot_n":1e400}', ""),
        (TOPIC.format("d1", "state"), b'{"v":1,"boot":"b1","state":{"x":1}}', "state"),
        ("edgeadapt/v1/f/d1/cmd", b"{}", "channel"),
        ("edgeadapt/v1/f/d\x00/tele", b"{}", "namespace"),
        (tele, b"\xff\xfe\x00", "not JSON"),
    ]  # fmt: skip


def test_hostile_payloads_are_counted_and_dropped_never_a_crash(target: str) -> None:
    store = CollectorStore.open(target)
    hostile = _hostile()
    # a birth with an odd but harmless boot_n and a state with an absurd one are not errors:
    # the counter is read as 0; everything else is dropped
    expected_malformed = [h for h in hostile if h[2]]
    good = _tele("d1", "b1", range(1, 4), bm="not a vector", bv={"x": 1}, bh="high",
                 a=[[1, 2], None, True, 1e308], r=None)  # fmt: skip
    results = _ingest(store, [(t, p) for t, p, _ in hostile] + [(TOPIC.format("d1", "tele"), good)])
    store.close()
    assert [r.malformed for r in results[:-1]] == [bool(h[2]) for h in hostile]
    assert results[-1].stored == 3 and not results[-1].malformed
    with database.connect(target, readonly=True) as conn:
        reasons = [r[0] for r in conn.execute("SELECT reason FROM malformed ORDER BY id")]
        assert len(reasons) == len(expected_malformed)
        for reason, (_, _, part) in zip(reasons, expected_malformed, strict=True):
            assert part in reason, (part, reason)
        assert device_stats(conn)["d1"]["received"] == 3
        (_, seq, _, _, rec), *_ = record_bodies(conn, "d1")
        point = telemetry_point(seq, rec)  # wrong types read back as "nothing usable"
        assert point.summary == [] and point.spread == [] and point.entropy is None
        assert point.action == [None, None, None, 1e308] and point.reward is None
        assert queries.series(conn, "d1")["summary"] == []


def test_collector_keeps_going_after_hostile_messages(broker: Mosquitto, tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    collector = Collector(parse_broker_url(broker.url), db, max_payload_bytes=64 * 1024).start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        assert collector.wait_subscribed(10)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        hostile = [(t, p) for t, p, part in _hostile()[:12] if part]
        good = (TOPIC.format("d1", "tele"), _tele("d1", "b1", range(1, 3)))
        for topic, payload in [*hostile, good]:
            pub.publish(topic, payload, qos=1).wait_for_publish(5)
        wait_for(lambda: received(db, "d1") == 2, 10, "the good batch after the hostile ones")
        wait_for(lambda: collector.counters.malformed == len(hostile), 5, "all counted")
        assert collector._thread.is_alive() and collector.connected.is_set()
    finally:
        pub.disconnect()
        pub.loop_stop()
        collector.stop()


def test_plot_of_a_family_without_a_belief(tmp_path: Path) -> None:
    from devices.telemetry.plot import plot_device

    db = tmp_path / "c.sqlite"
    store = CollectorStore.open(db)
    _ingest(store, _script())
    store.close()
    with database.connect(db, readonly=True) as conn:
        assert plot_device(conn, "d2", tmp_path / "d2.png") == 5
    assert (tmp_path / "d2.png").stat().st_size > 10_000
