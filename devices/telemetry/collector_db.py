"""The collector's database: ingest (with deduplication and validation) and per-device stats.

Tables (``database.SCHEMA_TEMPLATE``; ``docs/telemetry.md`` explains each column)::

    messages     every stored batch message once (its payload as received)
    records      (device, boot, seq) primary key; kind, t, received, hist, and where the record's
                 JSON is: message id + index in the batch's ``recs`` (:func:`record_bodies`)
    devices      one row per device: fleet, online, boot, boot_n, birth, counters
    boots        one row per (device, boot) seen in a birth message
    event_counts per device and event type: how many, and the device time of the last one
    malformed    every dropped payload: time, topic, reason, first bytes
    meta         schema_version, malformed_total

The store is an SQLite file or a PostgreSQL database (:mod:`devices.telemetry.database`); the
queries are the same. Deduplication is the primary key: ``INSERT ... ON CONFLICT DO NOTHING``
drops a record whose (device, boot, seq) is already stored, also when another collector of a
shared subscription stored it, and the ignored rows are counted in ``devices.duplicates_dropped``;
a message whose records were all duplicates is not kept. Payloads are stored as received, not
re-encoded per record.

Hostile input: a payload that is too large, nested too deeply, of the wrong types or out of
range is counted in ``malformed`` and dropped; it never stops the collector (each message is
ingested under its own savepoint, so one bad message cannot abort the others of a transaction).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.telemetry.database import Database, connect
from devices.telemetry.records import (
    EventType,
    MalformedPayload,
    RecordKind,
    decode_batch,
    decode_object,
)
from devices.telemetry.topics import BATCH_CHANNELS, Channel, parse_topic

log = logging.getLogger(__name__)

__all__ = [
    "CollectorStore",
    "connect",
    "device_birth",
    "device_stats",
    "malformed_total",
    "record_bodies",
]

SCHEMA_VERSION = 1
MALFORMED_KEEP_BYTES = 256
#: Largest payload the collector parses (bytes); a device batch of 100 records is ~25 kB.
MAX_PAYLOAD_BYTES = 1 << 20
#: Most records in one batch message.
MAX_RECORDS_PER_MESSAGE = 10_000
MAX_INT = (1 << 63) - 1  # seq, boot_n and counters must fit a signed 64-bit column
BOOT_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
EVENT_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

#: Anything a payload's values can raise in validation code is the payload's fault.
_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)

INSERT_RECORD = "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"


@dataclass
class IngestResult:
    """What one message did to the database."""

    stored: int = 0
    duplicates: int = 0
    malformed: bool = False
    first_seq: int = 0
    last_seq: int = 0


class CollectorStore:
    """Owner of the collector database connection (one thread at a time)."""

    def __init__(self, db: Database, max_payload_bytes: int = MAX_PAYLOAD_BYTES):
        self._db = db
        self._last_seq: dict[str, int] = {}
        self._data_errors = db.data_errors()
        self.max_payload_bytes = max_payload_bytes

    @classmethod
    def open(cls, target: str | Path, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> CollectorStore:
        """Open or create the database: an SQLite path or a ``postgresql://`` URL."""
        db = connect(target)
        try:
            db.create_schema()
            db.execute(
                "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"{db.label}: collector schema {row[0]}, want {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return cls(db, max_payload_bytes)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def begin(self) -> None:
        """Start a transaction (one per batch of messages)."""
        self._db.begin()

    def commit(self) -> None:
        """Commit: everything ingested since :meth:`begin` is durable."""
        self._db.commit()

    def rollback(self) -> None:
        """Abandon the current transaction (if any)."""
        self._db.rollback()

    def ingest(self, topic_name: str, payload: bytes, received: float) -> IngestResult:
        """Store one message; a malformed one is recorded in ``malformed`` and otherwise dropped.

        Inside a transaction (:meth:`begin`) the message gets its own savepoint: a value the
        database refuses drops this message only. Connection and server errors propagate.
        """
        addr = parse_topic(topic_name)
        device = addr.device if addr else None
        savepoint = self._db.in_transaction
        if savepoint:
            self._db.execute("SAVEPOINT msg")
        try:
            result = self._ingest(topic_name, payload, received)
        except (MalformedPayload, RecursionError, *_VALUE_ERRORS, *self._data_errors) as exc:
            if savepoint:
                self._db.execute("ROLLBACK TO SAVEPOINT msg")
            self._malformed(topic_name, device, _reason(exc), payload, received)
            result = IngestResult(malformed=True)
        if savepoint:
            self._db.execute("RELEASE SAVEPOINT msg")
        return result

    def _ingest(self, topic_name: str, payload: bytes, received: float) -> IngestResult:
        addr = parse_topic(topic_name)
        if addr is None:
            raise MalformedPayload("topic outside the edgeadapt/v1 namespace")
        if len(payload) > self.max_payload_bytes:
            raise MalformedPayload(
                f"payload of {len(payload)} bytes exceeds {self.max_payload_bytes}"
            )
        if addr.channel in BATCH_CHANNELS:
            return self._ingest_batch(addr.fleet, addr.device, payload, received)
        if addr.channel == Channel.BIRTH:
            self._ingest_birth(addr.fleet, addr.device, payload, received)
        elif addr.channel == Channel.STATE:
            self._ingest_state(addr.fleet, addr.device, payload, received)
        else:
            raise MalformedPayload(f"collector does not take channel {addr.channel.value!r}")
        return IngestResult()

    # --- batches -----------------------------------------------------------------------------
    def _ingest_batch(
        self, fleet: str, device: str, payload: bytes, received: float
    ) -> IngestResult:
        batch = decode_batch(payload)
        if batch.fleet != fleet or batch.device != device:
            raise MalformedPayload(f"payload says {batch.fleet}/{batch.device}, topic differs")
        _check_batch(batch.boot, batch.kind, batch.records)
        hist, kind, boot = int(batch.hist), int(batch.kind), batch.boot
        msg = self._db.execute(
            "INSERT INTO messages (device, received, payload) VALUES (?,?,?) RETURNING id",
            (device, received, payload),
        ).fetchone()[0]
        rows = [
            (device, boot, r["seq"], kind, float(r["t"]), received, hist, msg, i)
            for i, r in enumerate(batch.records)
        ]
        if batch.kind == RecordKind.EVENT:
            stored = self._insert_events(fleet, device, batch.records, rows)
        else:
            stored = self._db.executemany(INSERT_RECORD, rows)
        if stored == 0:
            self._db.execute("DELETE FROM messages WHERE id = ?", (msg,))
        dups = len(rows) - stored
        self._db.execute(
            "INSERT INTO devices (device, fleet, last_seen, duplicates_dropped) VALUES (?,?,?,?) "
            "ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, "
            "duplicates_dropped = devices.duplicates_dropped + excluded.duplicates_dropped",
            (device, fleet, received, dups),
        )
        first, last = rows[0][2], rows[-1][2]
        self._note_gap(device, first, last)
        return IngestResult(stored=stored, duplicates=dups, first_seq=first, last_seq=last)

    def _insert_events(
        self, fleet: str, device: str, records: list[dict[str, Any]], rows: list[tuple]
    ) -> int:
        """Insert one by one: newly stored events update ``event_counts`` and drop counters."""
        stored = 0
        for rec, row in zip(records, rows, strict=True):
            if self._db.execute(INSERT_RECORD, row).rowcount != 1:
                continue
            stored += 1
            etype = rec["type"]
            self._db.execute(
                "INSERT INTO event_counts VALUES (?,?,1,?) ON CONFLICT (device, type) DO UPDATE "
                "SET n = event_counts.n + 1, last_t = excluded.last_t",
                (device, etype, row[4]),
            )
            if etype == EventType.OUTBOX_DROPPED:
                self._db.execute(
                    "INSERT INTO devices (device, fleet, dropped_at_source) VALUES (?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET dropped_at_source = "
                    "devices.dropped_at_source + excluded.dropped_at_source",
                    (device, fleet, _count(rec.get("data"))),
                )
        return stored

    def _note_gap(self, device: str, first: int, last: int) -> None:
        prev = self._last_seq.get(device)
        if prev is not None and first > prev + 1:
            # informational: another collector of a shared group may hold them, or they were
            # dropped at the source; `telemetry stats` computes gaps from what is stored
            log.debug("%s: seq jumps from %d to %d", device, prev, first)
        if prev is None or last > prev:
            self._last_seq[device] = last

    # --- birth and state -------------------------------------------------------------------
    def _ingest_birth(self, fleet: str, device: str, payload: bytes, received: float) -> None:
        obj = decode_object(payload)
        boot, boot_n = _boot(obj), _int(obj.get("boot_n"))
        text = _dumps(obj)
        self._db.execute(
            "INSERT INTO boots VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
            (device, boot, boot_n, received, text),
        )
        self._db.execute(
            "INSERT INTO devices (device, fleet, online, boot, boot_n, birth, state_t, last_seen) "
            "VALUES (?,?,1,?,?,?,?,?) ON CONFLICT (device) DO UPDATE SET "
            "fleet = excluded.fleet, online = 1, boot = excluded.boot, boot_n = excluded.boot_n, "
            "birth = excluded.birth, state_t = excluded.state_t, last_seen = excluded.last_seen "
            "WHERE excluded.boot_n >= devices.boot_n",
            (device, fleet, boot, boot_n, text, received, received),
        )

    def _ingest_state(self, fleet: str, device: str, payload: bytes, received: float) -> None:
        obj = decode_object(payload)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise MalformedPayload(f"unknown state {state!r}")
        self._db.execute(
            "INSERT INTO devices (device, fleet, online, boot, boot_n, state_t) "
            "VALUES (?,?,?,?,?,?) "
            "ON CONFLICT (device) DO UPDATE SET online = excluded.online, boot = excluded.boot, "
            "boot_n = excluded.boot_n, state_t = excluded.state_t "
            "WHERE excluded.boot_n >= devices.boot_n",
            (device, fleet, int(state == "online"), _boot(obj), _int(obj.get("boot_n")), received),
        )

    # --- malformed -----------------------------------------------------------------------------
    def _malformed(
        self, topic_name: str, device: str | None, reason: str, payload: bytes, received: float
    ) -> None:
        log.warning("dropped malformed message on %.200s: %s", topic_name, reason)
        self._db.execute(
            "INSERT INTO malformed (received, topic, reason, payload) VALUES (?,?,?,?)",
            (received, _text(topic_name), _text(reason), bytes(payload[:MALFORMED_KEEP_BYTES])),
        )
        self._db.execute(
            "INSERT INTO meta VALUES ('malformed_total', '1') ON CONFLICT (key) DO UPDATE SET "
            "value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)"
        )
        if device is not None:
            self._db.execute(
                "UPDATE devices SET malformed = malformed + 1 WHERE device = ?", (device,)
            )


def device_stats(conn: Database) -> dict[str, dict[str, Any]]:
    """Per-device figures: received, min/max seq, gaps, duplicates, online, birth facts, events.

    ``gaps`` counts sequence numbers missing between the lowest and the highest stored one;
    ``gap_ranges`` counts the holes. ``duplicate_seqs_stored`` counts sequence numbers stored
    under more than one boot (0 unless a device lost its outbox). ``alg`` is the algorithm the
    device announced in its birth (``pearl`` for births that predate the field), ``events`` the
    count of each event type.
    """
    out: dict[str, dict[str, Any]] = {}
    for (
        device,
        fleet,
        online,
        boot,
        boot_n,
        dups,
        malformed,
        dropped,
        last_seen,
        birth,
    ) in conn.execute(
        "SELECT device, fleet, online, boot, boot_n, duplicates_dropped, malformed, "
        "dropped_at_source, last_seen, birth FROM devices ORDER BY device"
    ):
        out[device] = {
            "fleet": fleet, "online": bool(online), "boot": boot, "boot_n": boot_n,
            "received": 0, "min_seq": None, "max_seq": None, "gaps": 0, "gap_ranges": 0,
            "duplicates_dropped": dups, "duplicate_seqs_stored": 0, "historical": 0,
            "boots": 0, "dropped_at_source": dropped, "malformed": malformed,
            "last_seen": last_seen, **birth_facts(birth), "events": {},
        }  # fmt: skip
    for device, n, lo, hi, distinct, hist, boots in conn.execute(
        "SELECT device, COUNT(*), MIN(seq), MAX(seq), COUNT(DISTINCT seq), SUM(hist), "
        "COUNT(DISTINCT boot) FROM records GROUP BY device"
    ):
        d = out.setdefault(device, {"fleet": "", "online": False, "events": {}})
        d.update(received=n, min_seq=lo, max_seq=hi, duplicate_seqs_stored=n - distinct,
                 historical=int(hist or 0), boots=boots,
                 gaps=(hi - lo + 1) - distinct)  # fmt: skip
    for device, holes in conn.execute(
        "SELECT device, COUNT(*) FROM (SELECT device, "
        "seq - LAG(seq) OVER (PARTITION BY device ORDER BY seq) AS step "
        "FROM (SELECT DISTINCT device, seq FROM records) AS s) AS d WHERE step > 1 "
        "GROUP BY device"
    ):
        if device in out:  # a device first stored between the two queries (live ingest)
            out[device]["gap_ranges"] = holes
    for device, etype, n in conn.execute("SELECT device, type, n FROM event_counts"):
        if device in out:
            out[device]["events"][etype] = n
    return out


def birth_facts(birth: str | None) -> dict[str, Any]:
    """What the fleet views show of a device's last birth: algorithm, bundle, profile, ..."""
    try:
        obj = json.loads(birth) if birth else {}
    except ValueError:
        obj = {}
    if not isinstance(obj, dict):
        obj = {}

    def text(key: str) -> str | None:
        value = obj.get(key)
        return value if isinstance(value, str) else None

    alg = text("alg") or ("pearl" if obj else None)  # births before "alg" came from PEARL
    return {"alg": alg, "bundle_id": text("bundle_id"), "bundle_version": text("bundle_version"),
            "profile": text("profile"), "runtime_version": text("runtime_version")}  # fmt: skip


def record_bodies(
    conn: Database, device: str, kind: int | None = None, *, after_seq: int = 0,
    limit: int | None = None, newest: bool = False,
) -> list[tuple[str, int, int, float, dict[str, Any]]]:  # fmt: skip
    """(boot, seq, hist, received, record) of a device's stored records, in seq order.

    ``after_seq`` skips records up to that seq; ``limit`` keeps the first ``limit`` records, or
    the last ``limit`` ones with ``newest``.
    """
    where, params = "r.device = ? AND r.seq > ?", [device, after_seq]
    if kind is not None:
        where += " AND r.kind = ?"
        params.append(int(kind))
    order = "DESC" if newest else "ASC"
    tail = f" LIMIT {int(limit)}" if limit is not None else ""
    rows = conn.execute(
        "SELECT r.boot, r.seq, r.hist, r.received, r.msg, r.idx FROM records r "
        f"WHERE {where} ORDER BY r.seq {order}{tail}",
        params,
    ).fetchall()
    if newest:
        rows.reverse()
    cache: dict[int, list[Any]] = {}
    out = []
    for boot, seq, hist, rec_t, msg, idx in rows:
        if msg not in cache:
            (payload,) = conn.execute(
                "SELECT payload FROM messages WHERE id = ?", (msg,)
            ).fetchone()
            cache[msg] = json.loads(bytes(payload))["recs"]
        out.append((boot, seq, hist, rec_t, cache[msg][idx]))
    return out


def malformed_total(conn: Database) -> int:
    """Malformed messages dropped since the database was created."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'malformed_total'").fetchone()
    return int(row[0]) if row else 0


# --- validation of what decode_batch accepts but a database column would refuse ---------------
def _check_batch(boot: str, kind: RecordKind, records: list[dict[str, Any]]) -> None:
    if not BOOT_PATTERN.match(boot):
        raise MalformedPayload("boot id must be 1-64 characters from [A-Za-z0-9_.:-]")
    if len(records) > MAX_RECORDS_PER_MESSAGE:
        raise MalformedPayload(f"{len(records)} records in one message")
    for rec in records:
        if rec["seq"] > MAX_INT:
            raise MalformedPayload("seq beyond 2^63-1")
        t = rec["t"]
        if (isinstance(t, int) and abs(t) > MAX_INT) or not math.isfinite(t):
            raise MalformedPayload(f"record time {t!r} is not a finite number")
        if kind == RecordKind.EVENT and not EVENT_TYPE_PATTERN.match(rec["type"]):
            raise MalformedPayload("event type must be 1-64 characters from [A-Za-z0-9_.:-]")


def _boot(obj: dict[str, Any]) -> str:
    boot = obj["boot"]
    if not BOOT_PATTERN.match(boot):
        raise MalformedPayload("boot id must be 1-64 characters from [A-Za-z0-9_.:-]")
    return boot


def _count(data: Any) -> int:
    """``data.n`` of a drop report as a bounded non-negative count (0 when absent or wrong)."""
    n = data.get("n") if isinstance(data, dict) else None
    return min(n, MAX_INT) if type(n) is int and n > 0 else 0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MalformedPayload):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return f"refused by the database ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"


def _text(value: str) -> str:
    """At most 256 characters, without NUL (which PostgreSQL text refuses)."""
    return value[:256].replace("\x00", "\\0")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _int(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= MAX_INT else 0


def device_birth(conn: Database, device: str) -> dict[str, Any] | None:
    """The device's last birth message as an object; None for an unknown device."""
    row = conn.execute("SELECT birth FROM devices WHERE device = ?", (device,)).fetchone()
    if row is None:
        return None
    try:
        obj = json.loads(row[0]) if row[0] else {}
    except ValueError:
        obj = {}
    return obj if isinstance(obj, dict) else {}
