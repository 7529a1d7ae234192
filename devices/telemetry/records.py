"""Versioned payload format of every message (compact JSON, UTF-8).

A record batch (channels ``tele``, ``event``, ``ack``)::

    {"v": 1, "fleet": "f", "dev": "d1", "boot": "9f2c...", "k": "tel", "hist": false,
     "recs": [{"seq": 41, "t": 1717000000.125, "step": 7, "r": -0.31, ...}, ...]}

``seq`` increases by one per record of a device, across restarts; ``(dev, boot, seq)`` is unique.
``hist`` is true when the records were enqueued while the device had no broker connection.
Fields of one record, by kind ``k``:

- ``tel``: ``step`` (int), ``r`` reward, ``a`` action list, ``bm``/``bv`` belief mean/variance
  lists, ``bh`` belief entropy (nats), ``bn`` belief count (transitions), ``ood`` score,
  ``lat`` step latency (µs). Floats carry 7 significant digits (float32 precision); ``t`` is
  in microseconds; non-finite floats are encoded as ``null``.
- ``evt``: ``type`` (see :class:`EventType`) and ``data`` (object).
- ``ack``: ``nonce``, ``cmd``, ``status`` (see :class:`AckStatus`), ``detail`` (object).

Births and states are single JSON objects (:func:`birth_payload`, :func:`state_payload`).
Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

PAYLOAD_VERSION = 1


class RecordKind(IntEnum):
    """Kind of an outbox record; decides its channel and its drop policy."""

    TELEMETRY = 0
    EVENT = 1
    ACK = 2


#: Short name of each kind in payloads (the batch field ``k``).
KIND_NAMES = {RecordKind.TELEMETRY: "tel", RecordKind.EVENT: "evt", RecordKind.ACK: "ack"}
KIND_BY_NAME = {v: k for k, v in KIND_NAMES.items()}


class EventType:
    """Event names a device reports (``evt`` records, field ``type``)."""

    OOD_ALARM = "ood_alarm"
    FALLBACK_USED = "fallback_used"
    TASK_CHANGE = "task_change"
    BUNDLE_SWITCHED = "bundle_switched"
    COMMAND_REJECTED = "command_rejected"
    COMMAND_FAILED = "command_failed"
    OUTBOX_DROPPED = "outbox_dropped"


class AckStatus:
    """Status of a command acknowledgement."""

    OK = "ok"
    REJECTED = "rejected"
    FAILED = "failed"
    UNSUPPORTED = "unsupported"


class Sample(NamedTuple):
    """One control step as the runtime reports it (plain values; arrays as float sequences).

    A ``NamedTuple`` so that building one in the control loop costs well under a microsecond.
    """

    step: int
    reward: float
    action: Sequence[float]
    belief_mean: Sequence[float]
    belief_var: Sequence[float]
    belief_entropy: float
    belief_count: int
    ood_score: float
    latency_us: float


class MalformedPayload(ValueError):
    """A payload that does not follow this format (the collector counts and drops it)."""


@dataclass(frozen=True)
class Batch:
    """A decoded record batch."""

    fleet: str
    device: str
    boot: str
    kind: RecordKind
    hist: bool
    records: list[dict[str, Any]]


def encode_telemetry(seq: int, t: float, s: Sample) -> str:
    """JSON text of one telemetry record.

    This runs for every record, so the common case (all floats finite) is one ``%`` formatting
    with a template cached per array shape; any NaN/inf takes the per-value path.
    """
    a, m, v = s.action, s.belief_mean, s.belief_var
    floats = (s.reward, *a, *m, *v, s.belief_entropy, s.ood_score, s.latency_us)
    total = sum(floats)
    if total - total != 0.0:  # some value is NaN or infinite
        return _encode_telemetry_slow(seq, t, s)
    template = _TEMPLATES.get((len(a), len(m), len(v))) or _template(len(a), len(m), len(v))
    return template % (seq, t, s.step, s.reward, *a, *m, *v, s.belief_entropy,
                       s.belief_count, s.ood_score, s.latency_us)  # fmt: skip


_TEMPLATES: dict[tuple[int, int, int], str] = {}


def _template(n_action: int, n_mean: int, n_var: int) -> str:
    def floats(n: int) -> str:
        return "[" + ",".join(["%.7g"] * n) + "]"

    text = (
        '{"seq":%d,"t":%.6f,"step":%d,"r":%.7g,"a":' + floats(n_action) + ',"bm":'
        + floats(n_mean) + ',"bv":' + floats(n_var) + ',"bh":%.7g,"bn":%d,"ood":%.7g,"lat":%.7g}'
    )  # fmt: skip
    _TEMPLATES[(n_action, n_mean, n_var)] = text
    return text


def _encode_telemetry_slow(seq: int, t: float, s: Sample) -> str:
    return (
        f'{{"seq":{int(seq)},"t":{float(t):.6f},"step":{int(s.step)},"r":{_num(s.reward)},'
        f'"a":{_nums(s.action)},"bm":{_nums(s.belief_mean)},"bv":{_nums(s.belief_var)},'
        f'"bh":{_num(s.belief_entropy)},"bn":{int(s.belief_count)},"ood":{_num(s.ood_score)},'
        f'"lat":{_num(s.latency_us)}}}'
    )


def encode_event(seq: int, t: float, event_type: str, data: dict[str, Any]) -> str:
    """JSON text of one event record."""
    return _dumps({"seq": seq, "t": t, "type": event_type, "data": data})


def encode_ack(seq: int, t: float, ack: dict[str, Any]) -> str:
    """JSON text of one ack record; ``ack`` has ``nonce``, ``cmd``, ``status``, ``detail``."""
    return _dumps({"seq": seq, "t": t, **ack})


def batch_payload(
    fleet: str, device: str, boot: str, kind: RecordKind, hist: bool, bodies: Iterable[str]
) -> bytes:
    """One message: the batch header around already-encoded record bodies (in seq order)."""
    head = _dumps(
        {
            "v": PAYLOAD_VERSION,
            "fleet": fleet,
            "dev": device,
            "boot": boot,
            "k": KIND_NAMES[kind],
            "hist": hist,
        }
    )
    return (head[:-1] + ',"recs":[' + ",".join(bodies) + "]}").encode()


def decode_batch(payload: bytes) -> Batch:
    """Parse and validate a batch; raise :class:`MalformedPayload` with the reason."""
    obj = _loads_object(payload)
    if obj.get("v") != PAYLOAD_VERSION:
        raise MalformedPayload(f"unsupported payload version {obj.get('v')!r}")
    fleet, device, boot = obj.get("fleet"), obj.get("dev"), obj.get("boot")
    if not all(isinstance(x, str) and x for x in (fleet, device, boot)):
        raise MalformedPayload("fleet, dev and boot must be non-empty strings")
    kind = KIND_BY_NAME.get(obj.get("k"))  # type: ignore[arg-type]
    if kind is None:
        raise MalformedPayload(f"unknown record kind {obj.get('k')!r}")
    hist, records = obj.get("hist"), obj.get("recs")
    if not isinstance(hist, bool) or not isinstance(records, list) or not records:
        raise MalformedPayload("hist must be a boolean and recs a non-empty list")
    for rec in records:
        _check_record(rec, kind)
    return Batch(fleet, device, boot, kind, hist, records)


def birth_payload(info: dict[str, Any]) -> bytes:
    """Birth message: ``info`` plus the payload version (see ``TelemetryClient``)."""
    return _dumps({"v": PAYLOAD_VERSION, **info}).encode()


def state_payload(state: str, boot: str, boot_n: int, t: float, reason: str) -> bytes:
    """Retained state message (``online``/``offline``); the Last Will is the offline one.

    ``boot_n`` (the device's boot counter) lets a collector ignore a late Last Will of an older
    boot that arrives after the new boot said ``online``.
    """
    obj = {"v": PAYLOAD_VERSION, "state": state, "boot": boot, "boot_n": boot_n, "t": t}
    return _dumps({**obj, "reason": reason}).encode()


def decode_object(payload: bytes) -> dict[str, Any]:
    """Parse a birth/state payload (a JSON object with ``v`` and ``boot``)."""
    obj = _loads_object(payload)
    if obj.get("v") != PAYLOAD_VERSION or not isinstance(obj.get("boot"), str):
        raise MalformedPayload("expected version 1 and a string boot id")
    return obj


def _check_record(rec: Any, kind: RecordKind) -> None:
    if not isinstance(rec, dict):
        raise MalformedPayload("a record is not an object")
    seq, t = rec.get("seq"), rec.get("t")
    if type(seq) is not int or seq < 1:
        raise MalformedPayload(f"bad seq {seq!r}")
    if type(t) not in (int, float):
        raise MalformedPayload(f"bad t {t!r} in seq {seq}")
    if kind == RecordKind.TELEMETRY and type(rec.get("step")) is not int:
        raise MalformedPayload(f"telemetry seq {seq} has no integer step")
    if kind == RecordKind.EVENT and not isinstance(rec.get("type"), str):
        raise MalformedPayload(f"event seq {seq} has no type")
    if kind == RecordKind.ACK and not isinstance(rec.get("status"), str):
        raise MalformedPayload(f"ack seq {seq} has no status")


def _loads_object(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPayload(f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise MalformedPayload("not a JSON object")
    return obj


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _dumps(obj: dict[str, Any]) -> str:
    return _ENCODE(obj)


def _num(x: float) -> str:
    """A float as JSON text with 7 significant digits (float32 precision); null if not finite."""
    x = float(x)
    return format(x, ".7g") if x - x == 0.0 else "null"


def _nums(xs: Sequence[float]) -> str:
    return "[" + ",".join(map(_num, xs)) + "]"
