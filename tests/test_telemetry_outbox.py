"""Outbox, payload format and topic invariants (no broker needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devices.telemetry.outbox import OutboxRow, OutboxStore, RecordQueue
from devices.telemetry.records import (
    MalformedPayload,
    RecordKind,
    Sample,
    batch_payload,
    decode_batch,
    encode_event,
    encode_telemetry,
)
from devices.telemetry.topics import Channel, collector_filters, parse_topic, topic

TEL, EVT = RecordKind.TELEMETRY, RecordKind.EVENT


def _rows(
    store: OutboxStore, kinds: list[RecordKind], first: int = 1, t: float = 100.0
) -> list[int]:
    rows = [OutboxRow(first + i, int(k), "boot", t, "{}") for i, k in enumerate(kinds)]
    store.begin()
    store.insert(rows)
    store.commit()
    return [r.seq for r in rows]


def test_sequence_continues_across_reopen_even_when_the_outbox_is_empty(tmp_path: Path) -> None:
    store = OutboxStore.open(tmp_path / "o.sqlite")
    assert store.next_seq() == 1 and store.new_boot() == 1
    _rows(store, [TEL] * 10)
    store.begin()
    store.delete_range(1, 10)  # everything acknowledged
    store.commit()
    store.close()
    store = OutboxStore.open(tmp_path / "o.sqlite")
    assert store.count == 0 and store.next_seq() == 11 and store.new_boot() == 2


def test_bound_drops_oldest_telemetry_never_events(tmp_path: Path) -> None:
    store = OutboxStore.open(tmp_path / "o.sqlite")
    kinds = [TEL, EVT, TEL, TEL, EVT, TEL, TEL]  # seqs 1..7; telemetry = 1,3,4,6,7
    _rows(store, kinds)
    store.begin()
    dropped = store.enforce_bound(max_records=2, protect_upto=0)
    store.commit()
    assert dropped == [1, 3, 4]
    assert [r.seq for r in store.fetch_after(0, 100)] == [2, 5, 6, 7]
    assert store.telemetry_count == 2 and store.count == 4


def test_bound_keeps_rows_already_handed_to_the_network(tmp_path: Path) -> None:
    store = OutboxStore.open(tmp_path / "o.sqlite")
    _rows(store, [TEL] * 6)
    store.begin()
    assert store.enforce_bound(max_records=2, protect_upto=3) == [4, 5, 6]
    store.commit()
    assert [r.seq for r in store.fetch_after(0, 100)] == [1, 2, 3]  # over the bound, in flight


def test_ttl_expires_by_kind(tmp_path: Path) -> None:
    store = OutboxStore.open(tmp_path / "o.sqlite")
    _rows(store, [TEL, EVT], first=1, t=10.0)
    _rows(store, [TEL, EVT], first=3, t=50.0)
    store.begin()
    dropped = store.expire({TEL: 20.0, EVT: 5.0}, protect_upto=0)  # events live longer
    store.commit()
    assert dropped == [1]
    assert [r.seq for r in store.fetch_after(0, 10)] == [2, 3, 4]


def test_drop_reports_accumulate_and_survive_reopen(tmp_path: Path) -> None:
    store = OutboxStore.open(tmp_path / "o.sqlite")
    store.add_dropped("full", [5, 6, 7])
    store.add_dropped("full", [2, 9])
    store.close()
    store = OutboxStore.open(tmp_path / "o.sqlite")
    rep = store.dropped()["full"]
    assert (rep.n, rep.first, rep.last) == (5, 2, 9)
    store.clear_dropped()
    assert store.dropped() == {}


def test_committed_rows_survive_kill_minus_9(tmp_path: Path) -> None:
    """A writer process commits, then SIGKILLs itself: every committed row is in the file."""
    code = textwrap.dedent(f"""
        import os, signal
        from devices.telemetry.outbox import OutboxRow, OutboxStore
        s = OutboxStore.open({str(tmp_path / "o.sqlite")!r})
        s.begin()
        s.insert([OutboxRow(i, 0, "b", 1.0, "{{}}") for i in range(1, 501)])
        s.commit()
        s.begin()
        s.insert([OutboxRow(501, 0, "b", 1.0, "{{}}")])  # never committed
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    store = OutboxStore.open(tmp_path / "o.sqlite")
    assert store.count == 500 and store.next_seq() == 501


def test_queue_assigns_consecutive_seqs_and_put_back_keeps_order() -> None:
    q = RecordQueue(first_seq=7)
    assert [q.put(TEL, 0.0, i) for i in range(3)] == [7, 8, 9]
    items = q.take()
    q.put(EVT, 0.0, "late")
    q.put_back(items)
    assert [it.seq for it in q.take()] == [7, 8, 9, 10]
    assert q.last_assigned == 10


def test_batch_round_trip_and_non_finite_floats_become_null() -> None:
    s = Sample(3, math.nan, [0.5, math.inf], [0.1], [0.2], 1.5, 4, 0.7, 12.0)
    bodies = [encode_telemetry(10, 1.25, s), encode_telemetry(11, 1.5, s._replace(reward=-1.0))]
    batch = decode_batch(batch_payload("f", "d", "b0", TEL, True, bodies))
    assert (batch.fleet, batch.device, batch.boot, batch.kind, batch.hist) == (
        "f",
        "d",
        "b0",
        TEL,
        True,
    )
    first = batch.records[0]
    assert first == {"seq": 10, "t": 1.25, "step": 3, "r": None, "a": [0.5, None], "bm": [0.1],
                     "bv": [0.2], "bh": 1.5, "bn": 4, "ood": 0.7, "lat": 12.0}  # fmt: skip
    assert batch.records[1]["r"] == -1.0
    json.loads(batch_payload("f", "d", "b0", EVT, False, [encode_event(1, 0.0, "x", {})]))


def _bad(kind: str, recs: str, boot: str = "b") -> str:
    head = f'"v":1,"fleet":"f","dev":"d","boot":"{boot}","hist":false,"k":"{kind}"'
    return "{" + head + ',"recs":' + recs + "}"


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "[]",
        '{"v":2}',
        _bad("zzz", "[{}]"),
        _bad("tel", "[]"),
        _bad("tel", '[{"seq":"1","t":0,"step":0}]'),
        _bad("tel", '[{"seq":0,"t":0,"step":0}]'),
        _bad("tel", '[{"seq":1,"t":0}]'),
        _bad("evt", '[{"seq":1,"t":0}]'),
        _bad("tel", '[{"seq":1,"t":0,"step":0}]', boot=""),
    ],
)
def test_malformed_batches_are_rejected(payload: str) -> None:
    with pytest.raises(MalformedPayload):
        decode_batch(payload.encode())


def test_the_malformed_cases_differ_from_a_valid_batch_only_in_the_broken_field() -> None:
    batch = decode_batch(_bad("tel", '[{"seq":1,"t":0,"step":0}]').encode())
    assert batch.records == [{"seq": 1, "t": 0, "step": 0}]


def test_topics_round_trip_and_reject_foreign_names() -> None:
    name = topic("fleet-1", "dev.7", Channel.TELEMETRY)
    assert name == "edgeadapt/v1/fleet-1/dev.7/tele"
    addr = parse_topic(name)
    assert addr is not None and (addr.fleet, addr.device, addr.channel) == (
        "fleet-1",
        "dev.7",
        Channel.TELEMETRY,
    )
    for bad in ("edgeadapt/v2/f/d/tele", "edgeadapt/v1/f/d/nope", "edgeadapt/v1/f/d/tele/x", "x"):
        assert parse_topic(bad) is None
    shared = collector_filters("f", "g")
    assert shared[0] == "$share/g/edgeadapt/v1/f/+/tele"
    assert "edgeadapt/v1/f/+/state" in shared  # retained: never through a shared subscription


def test_decimation_keeps_every_nth_step_and_copies_arrays(tmp_path: Path) -> None:
    import numpy as np

    from devices.telemetry.client import TelemetryClient
    from devices.telemetry.config import TelemetryConfig

    cfg = TelemetryConfig(broker="mqtt://127.0.0.1:1", device="d", decimate=3,
                          outbox=str(tmp_path / "o.sqlite"))  # fmt: skip
    client = TelemetryClient(cfg)  # never started: enqueueing needs no broker
    action = np.zeros(2)
    seqs = []
    for step in range(10):
        action[0] = step
        seqs.append(client.record_step(step, 0.0, action, [0.0], [1.0], 0.0, step, 0.0, 1.0))
    assert seqs == [1, None, None, 2, None, None, 3, None, None, 4]
    kept = [item.data for item in client._queue.take()]
    assert [s.step for s in kept] == [0, 3, 6, 9]
    assert [s.action[0] for s in kept] == [0.0, 3.0, 6.0, 9.0]  # copied, not aliased
