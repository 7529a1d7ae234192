"""``telemetry export --format mcap``: read back with the mcap reader: one JSON-schema channel
per kind, every record once, device time as log time, the time range honoured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcap.reader import make_reader
from test_collector_backends import _ingest, _script

from devices.telemetry.collector_db import CollectorStore
from runtime.cli import main as cli_main


def _read(path: Path) -> tuple[dict, list[tuple[str, int, dict]]]:
    with open(path, "rb") as f:
        reader = make_reader(f, validate_crcs=True)
        summary = reader.get_summary()
        channels = {c.topic: summary.schemas[c.schema_id] for c in summary.channels.values()}
        messages = [(ch.topic, m.log_time, json.loads(m.data))
                    for _, ch, m in reader.iter_messages(log_time_order=True)]  # fmt: skip
    return channels, messages


def test_export_reads_back_with_the_mcap_reader(tmp_path: Path, capsys) -> None:
    db = tmp_path / "c.sqlite"
    store = CollectorStore.open(db)
    _ingest(store, _script())
    store.close()
    out = tmp_path / "d1.mcap"
    assert cli_main(["telemetry", "export", "--format", "mcap", "--db", str(db), "--device",
                     "d1", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["messages"] == {
        "tele": 13, "event": 2, "ack": 0, "birth": 1}  # fmt: skip
    channels, messages = _read(out)
    prefix = "/edgeadapt/f/d1/"
    assert set(channels) == {prefix + k for k in ("tele", "event", "ack", "birth")}
    for schema in channels.values():
        assert schema.encoding == "jsonschema" and json.loads(schema.data)["type"] == "object"
    tele = [(t, m) for topic, t, m in messages if topic == prefix + "tele"]
    assert [m["seq"] for _, m in tele] == [*range(1, 11), 17, 18, 19]
    assert tele[0][0] == 1001 * 10**9  # device time (s) as log time (ns)
    assert tele[0][1]["summary"] == [0.0, 1.0] and tele[0][1]["entropy"] == 1.5
    events = [m for topic, _, m in messages if topic == prefix + "event"]
    assert [e["type"] for e in events] == ["ood_alarm", "outbox_dropped"]

    ranged = tmp_path / "range.mcap"
    assert cli_main(["telemetry", "export", "--db", str(db), "--device", "d1", "--out",
                     str(ranged), "--start", "1005", "--end", "1011"]) == 0  # fmt: skip
    capsys.readouterr()
    _, messages = _read(ranged)
    assert [m["seq"] for _, _, m in messages] == [5, 6, 7, 8, 9, 10, 11]

    # a family without a belief exports empty vectors and a null entropy
    other = tmp_path / "d2.mcap"
    assert cli_main(["telemetry", "export", "--db", str(db), "--device", "d2", "--out",
                     str(other)]) == 0  # fmt: skip
    capsys.readouterr()
    _, messages = _read(other)
    tele = [m for topic, _, m in messages if topic.endswith("/tele")]
    assert len(tele) == 5 and all(m["summary"] == [] and m["entropy"] is None for m in tele)


@pytest.mark.parametrize("device", ["ghost"])
def test_export_of_an_unknown_device_is_a_clear_error(tmp_path: Path, capsys, device: str) -> None:
    db = tmp_path / "c.sqlite"
    CollectorStore.open(db).close()
    args = ["telemetry", "export", "--db", str(db), "--device", device, "--out", "x.mcap"]
    assert cli_main(args) == 2
    assert f"no device '{device}'" in capsys.readouterr().err
