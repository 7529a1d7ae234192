"""``telemetry export --format mcap``: one device's records as an MCAP file (Foxglove opens it).

Channels (JSON messages, each with a JSON schema)::

    /edgeadapt/<fleet>/<device>/birth   one message per boot (the birth as received)
    /edgeadapt/<fleet>/<device>/tele    telemetry, cleaned (:mod:`devices.telemetry.series`)
    /edgeadapt/<fleet>/<device>/event   events: type, data
    /edgeadapt/<fleet>/<device>/ack     command acknowledgements

``log_time`` and ``publish_time`` are the device time of the record (ns); ``sequence`` is the
record's seq. The ``mcap`` library is the ``mcap`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from devices.telemetry.collector_db import record_bodies
from devices.telemetry.database import Database
from devices.telemetry.series import number, telemetry_point
from runtime.errors import EdgeadaptError

_NUM = {"type": ["number", "null"]}
_NUMS = {"type": "array", "items": _NUM}

SCHEMAS: dict[str, dict[str, Any]] = {
    "tele": {
        "title": "edgeadapt.Telemetry", "type": "object",
        "properties": {
            "seq": {"type": "integer"}, "boot": {"type": "string"}, "hist": {"type": "boolean"},
            "step": {"type": ["integer", "null"]}, "reward": _NUM, "action": _NUMS,
            "summary": {**_NUMS, "description": "adaptation summary (PEARL: belief mean)"},
            "spread": {**_NUMS, "description": "its spread (PEARL: belief variance)"},
            "entropy": {**_NUM, "description": "PEARL: belief entropy (nats)"},
            "count": {"type": ["integer", "null"], "description": "transitions absorbed"},
            "ood": _NUM, "latency_us": {**_NUM, "description": "control step latency (µs)"},
        },
    },
    "event": {
        "title": "edgeadapt.Event", "type": "object",
        "properties": {"seq": {"type": "integer"}, "boot": {"type": "string"},
                       "type": {"type": "string"}, "data": {}},
    },
    "ack": {
        "title": "edgeadapt.Ack", "type": "object",
        "properties": {"seq": {"type": "integer"}, "boot": {"type": "string"},
                       "nonce": {}, "cmd": {}, "status": {"type": "string"}, "detail": {}},
    },
    "birth": {"title": "edgeadapt.Birth", "type": "object"},
}  # fmt: skip
KIND_CHANNELS = {0: "tele", 1: "event", 2: "ack"}


def export_mcap(
    conn: Database, device: str, out: str | Path, *, start: float | None = None,
    end: float | None = None,
) -> dict[str, int]:  # fmt: skip
    """Write ``device``'s records with device time in [start, end] to ``out``; counts per channel.

    Raises :class:`EdgeadaptError` for an unknown device or a missing ``mcap`` package.
    """
    writer_cls = _writer_class()
    row = conn.execute("SELECT fleet FROM devices WHERE device = ?", (device,)).fetchone()
    if row is None:
        raise EdgeadaptError(f"no device {device!r} in {conn.label}")
    messages = _births(conn, device, start, end)
    for kind_id, kind in KIND_CHANNELS.items():
        for boot, seq, hist, _, rec in record_bodies(conn, device, kind_id):
            t = number(rec.get("t")) if isinstance(rec, dict) else None
            if t is None or (start is not None and t < start) or (end is not None and t > end):
                continue
            messages.append((t, seq, kind, _message(kind, boot, seq, bool(hist), rec)))
    messages.sort(key=lambda m: (m[0], m[1]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SCHEMAS, 0)
    with open(out, "wb") as f:
        writer = writer_cls(f)
        writer.start(profile="", library="edgeadapt")
        channels = _register(writer, f"/edgeadapt/{row[0]}/{device}")
        for t, seq, kind, body in messages:
            ns = int(t * 1e9)
            writer.add_message(channel_id=channels[kind], log_time=ns, publish_time=ns,
                               sequence=seq & 0xFFFFFFFF, data=body)  # fmt: skip
            counts[kind] += 1
        writer.finish()
    return counts


def _writer_class() -> Any:
    try:
        from mcap.writer import Writer
    except ImportError:
        raise EdgeadaptError("MCAP export needs mcap: pip install 'edgeadapt[mcap]'") from None
    return Writer


def _register(writer: Any, prefix: str) -> dict[str, int]:
    channels = {}
    for name, schema in SCHEMAS.items():
        schema_id = writer.register_schema(
            name=schema["title"], encoding="jsonschema", data=json.dumps(schema).encode()
        )
        channels[name] = writer.register_channel(
            topic=f"{prefix}/{name}", message_encoding="json", schema_id=schema_id
        )
    return channels


def _births(
    conn: Database, device: str, start: float | None, end: float | None
) -> list[tuple[float, int, str, bytes]]:
    out = []
    for first_seen, birth in conn.execute(
        "SELECT first_seen, birth FROM boots WHERE device = ? ORDER BY first_seen",
        (device,),
    ):
        if (start is None or first_seen >= start) and (end is None or first_seen <= end):
            out.append((float(first_seen), -1, "birth", str(birth).encode()))
    return out


def _message(kind: str, boot: str, seq: int, hist: bool, rec: dict[str, Any]) -> bytes:
    if kind == "tele":
        p = telemetry_point(seq, rec)
        body: dict[str, Any] = {
            "seq": seq, "boot": boot, "hist": hist, "step": p.step, "reward": p.reward,
            "action": p.action, "summary": p.summary, "spread": p.spread, "entropy": p.entropy,
            "count": p.count, "ood": p.ood, "latency_us": p.latency_us,
        }  # fmt: skip
    elif kind == "event":
        body = {"seq": seq, "boot": boot, "type": str(rec.get("type")), "data": rec.get("data")}
    else:
        body = {"seq": seq, "boot": boot, **{k: rec.get(k) for k in ("nonce", "cmd", "detail")},
                "status": str(rec.get("status"))}  # fmt: skip
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False, default=str).encode()
    except (ValueError, RecursionError):  # NaN or absurd nesting inside a device's free-form data
        for key in ("data", "detail", "nonce", "cmd"):
            if key in body:
                body[key] = repr(body[key])[:1000]
        return json.dumps(body, separators=(",", ":"), default=str).encode()
