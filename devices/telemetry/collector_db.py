"""The collector's SQLite database: schema, ingest (with deduplication) and per-device stats.

Schema (``docs/telemetry.md`` explains each column)::

    messages  every stored batch message once (its payload as received)
    records   (device, boot, seq) primary key; kind, t, received, hist, and where the record's
              JSON is: message id + index in the batch's ``recs`` (:func:`record_bodies`)
    devices   one row per device: fleet, online, boot, boot_n, birth, counters
    boots     one row per (device, boot) seen in a birth message
    malformed every dropped payload: time, topic, reason, first bytes
    meta      schema_version, malformed_total

Deduplication is the primary key: ``INSERT OR IGNORE`` drops a record whose (device, boot, seq)
is already stored and the ignored rows are counted in ``devices.duplicates_dropped``; a message
whose records were all duplicates is not kept. Payloads are stored as received, not re-encoded
per record: the ingest path parses each message once and writes one row per record.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.telemetry.records import (
    EventType,
    MalformedPayload,
    RecordKind,
    decode_batch,
    decode_object,
)
from devices.telemetry.topics import BATCH_CHANNELS, Channel, parse_topic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MALFORMED_KEEP_BYTES = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id       INTEGER PRIMARY KEY,
    device   TEXT    NOT NULL,
    received REAL    NOT NULL,   -- collector time the message arrived (unix s)
    payload  BLOB    NOT NULL    -- the batch as received (records.py format)
);
CREATE TABLE IF NOT EXISTS records (
    device   TEXT    NOT NULL,
    boot     TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    kind     INTEGER NOT NULL,   -- 0 telemetry, 1 event, 2 ack
    t        REAL    NOT NULL,   -- device time of the record (unix s)
    received REAL    NOT NULL,   -- collector time the message arrived (unix s)
    hist     INTEGER NOT NULL,   -- 1 if the device had buffered it while offline
    msg      INTEGER NOT NULL,   -- messages.id of the batch that delivered it first
    idx      INTEGER NOT NULL,   -- its index in that batch's "recs" list
    PRIMARY KEY (device, boot, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device             TEXT PRIMARY KEY,
    fleet              TEXT    NOT NULL,
    online             INTEGER NOT NULL DEFAULT 0,
    boot               TEXT,
    boot_n             INTEGER NOT NULL DEFAULT 0,
    birth              TEXT,
    state_t            REAL,
    last_seen          REAL,
    duplicates_dropped INTEGER NOT NULL DEFAULT 0,
    malformed          INTEGER NOT NULL DEFAULT 0,
    dropped_at_source  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS boots (
    device     TEXT NOT NULL,
    boot       TEXT NOT NULL,
    boot_n     INTEGER,
    first_seen REAL NOT NULL,
    birth      TEXT NOT NULL,
    PRIMARY KEY (device, boot)
);
CREATE TABLE IF NOT EXISTS malformed (
    id       INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    topic    TEXT NOT NULL,
    reason   TEXT NOT NULL,
    payload  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

INSERT_RECORD = "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?)"


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

    def __init__(self, conn: sqlite3.Connection):
        self._db = conn
        self._last_seq: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | Path) -> CollectorStore:
        """Open or create the database (WAL: readers such as ``telemetry stats`` never block)."""
        conn = connect(path)
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: collector schema {row[0]}, expected {SCHEMA_VERSION}")
        return cls(conn)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def begin(self) -> None:
        """Start a transaction (one per batch of messages)."""
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit: everything ingested since :meth:`begin` is durable."""
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        """Abandon the current transaction (if any)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def ingest(self, topic_name: str, payload: bytes, received: float) -> IngestResult:
        """Store one message; a malformed one is recorded in ``malformed`` and otherwise dropped."""
        addr = parse_topic(topic_name)
        try:
            if addr is None:
                raise MalformedPayload("topic outside the edgeadapt/v1 namespace")
            if addr.channel in BATCH_CHANNELS:
                return self._ingest_batch(addr.fleet, addr.device, payload, received)
            if addr.channel == Channel.BIRTH:
                self._ingest_birth(addr.fleet, addr.device, payload, received)
            elif addr.channel == Channel.STATE:
                self._ingest_state(addr.fleet, addr.device, payload, received)
            else:
                raise MalformedPayload(f"collector does not take channel {addr.channel.value!r}")
            return IngestResult()
        except MalformedPayload as exc:
            self._malformed(topic_name, addr.device if addr else None, str(exc), payload, received)
            return IngestResult(malformed=True)

    # --- batches -----------------------------------------------------------------------------
    def _ingest_batch(
        self, fleet: str, device: str, payload: bytes, received: float
    ) -> IngestResult:
        batch = decode_batch(payload)
        if batch.fleet != fleet or batch.device != device:
            raise MalformedPayload(f"payload says {batch.fleet}/{batch.device}, topic differs")
        hist, kind, boot = int(batch.hist), int(batch.kind), batch.boot
        msg = self._db.execute(
            "INSERT INTO messages (device, received, payload) VALUES (?,?,?)",
            (device, received, payload),
        ).lastrowid
        rows = [
            (device, boot, r["seq"], kind, r["t"], received, hist, msg, i)
            for i, r in enumerate(batch.records)
        ]
        if batch.kind == RecordKind.TELEMETRY:
            stored = self._db.executemany(INSERT_RECORD, rows).rowcount
        else:
            stored = self._insert_events(fleet, device, batch.records, rows)
        if stored == 0:
            self._db.execute("DELETE FROM messages WHERE id = ?", (msg,))
        dups = len(rows) - stored
        self._db.execute(
            "INSERT INTO devices (device, fleet, last_seen, duplicates_dropped) VALUES (?,?,?,?) "
            "ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, "
            "duplicates_dropped = duplicates_dropped + excluded.duplicates_dropped",
            (device, fleet, received, dups),
        )
        first, last = rows[0][2], rows[-1][2]
        self._note_gap(device, first, last)
        return IngestResult(stored=stored, duplicates=dups, first_seq=first, last_seq=last)

    def _insert_events(
        self, fleet: str, device: str, records: list[dict[str, Any]], rows: list[tuple]
    ) -> int:
        """Insert one by one so that newly stored drop reports update ``dropped_at_source``."""
        stored = 0
        for rec, row in zip(records, rows, strict=True):
            if self._db.execute(INSERT_RECORD, row).rowcount != 1:
                continue
            stored += 1
            if rec.get("type") == EventType.OUTBOX_DROPPED:
                n = int((rec.get("data") or {}).get("n", 0))
                self._db.execute(
                    "INSERT INTO devices (device, fleet, dropped_at_source) VALUES (?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET "
                    "dropped_at_source = dropped_at_source + excluded.dropped_at_source",
                    (device, fleet, n),
                )
        return stored

    def _note_gap(self, device: str, first: int, last: int) -> None:
        prev = self._last_seq.get(device)
        if prev is not None and first > prev + 1:
            # informational: another collector of a shared group may hold them, or they were
            # dropped at the source; `telemetry stats` computes gaps from what is stored
            log.info("%s: seq jumps from %d to %d", device, prev, first)
        if prev is None or last > prev:
            self._last_seq[device] = last

    # --- birth and state -------------------------------------------------------------------
    def _ingest_birth(self, fleet: str, device: str, payload: bytes, received: float) -> None:
        obj = decode_object(payload)
        boot, boot_n = obj["boot"], _int(obj.get("boot_n"))
        text = _dumps(obj)
        self._db.execute(
            "INSERT OR IGNORE INTO boots VALUES (?,?,?,?,?)", (device, boot, boot_n, received, text)
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
            (device, fleet, int(state == "online"), obj["boot"], _int(obj.get("boot_n")), received),
        )

    # --- malformed -----------------------------------------------------------------------------
    def _malformed(
        self, topic_name: str, device: str | None, reason: str, payload: bytes, received: float
    ) -> None:
        log.warning("dropped malformed message on %s: %s", topic_name, reason)
        self._db.execute(
            "INSERT INTO malformed (received, topic, reason, payload) VALUES (?,?,?,?)",
            (received, topic_name[:256], reason[:256], bytes(payload[:MALFORMED_KEEP_BYTES])),
        )
        self._db.execute(
            "INSERT INTO meta VALUES ('malformed_total', '1') ON CONFLICT (key) DO UPDATE SET "
            "value = CAST(value AS INTEGER) + 1"
        )
        if device is not None:
            self._db.execute(
                "UPDATE devices SET malformed = malformed + 1 WHERE device = ?", (device,)
            )


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL and a busy timeout."""
    if readonly:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, isolation_level=None)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def device_stats(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Per-device figures: received, min/max seq, gaps, duplicates, online, ...

    ``gaps`` counts sequence numbers missing between the lowest and the highest stored one;
    ``gap_ranges`` counts the holes. ``duplicate_seqs_stored`` counts sequence numbers stored
    under more than one boot (0 unless a device lost its outbox).
    """
    out: dict[str, dict[str, Any]] = {}
    for device, fleet, online, boot, boot_n, dups, malformed, dropped, last_seen in conn.execute(
        "SELECT device, fleet, online, boot, boot_n, duplicates_dropped, malformed, "
        "dropped_at_source, last_seen FROM devices ORDER BY device"
    ):
        out[device] = {
            "fleet": fleet, "online": bool(online), "boot": boot, "boot_n": boot_n,
            "received": 0, "min_seq": None, "max_seq": None, "gaps": 0, "gap_ranges": 0,
            "duplicates_dropped": dups, "duplicate_seqs_stored": 0, "historical": 0,
            "boots": 0, "dropped_at_source": dropped, "malformed": malformed,
            "last_seen": last_seen,
        }  # fmt: skip
    for device, n, lo, hi, distinct, hist, boots in conn.execute(
        "SELECT device, COUNT(*), MIN(seq), MAX(seq), COUNT(DISTINCT seq), SUM(hist), "
        "COUNT(DISTINCT boot) FROM records GROUP BY device"
    ):
        d = out.setdefault(device, {"fleet": "", "online": False})
        d.update(received=n, min_seq=lo, max_seq=hi, duplicate_seqs_stored=n - distinct,
                 historical=hist, boots=boots, gaps=(hi - lo + 1) - distinct)  # fmt: skip
    for device, holes in conn.execute(
        "SELECT device, COUNT(*) FROM (SELECT device, "
        "seq - LAG(seq) OVER (PARTITION BY device ORDER BY seq) AS step "
        "FROM (SELECT DISTINCT device, seq FROM records)) WHERE step > 1 GROUP BY device"
    ):
        out[device]["gap_ranges"] = holes
    return out


def record_bodies(
    conn: sqlite3.Connection, device: str, kind: int | None = None
) -> list[tuple[str, int, int, float, dict[str, Any]]]:
    """(boot, seq, hist, received, record) of a device's stored records, in seq order."""
    where = "" if kind is None else " AND r.kind = ?"
    params: tuple[Any, ...] = (device,) if kind is None else (device, int(kind))
    rows = conn.execute(
        "SELECT r.boot, r.seq, r.hist, r.received, r.msg, r.idx FROM records r "
        f"WHERE r.device = ?{where} ORDER BY r.seq",
        params,
    ).fetchall()
    cache: dict[int, list[dict[str, Any]]] = {}
    out = []
    for boot, seq, hist, rec_t, msg, idx in rows:
        if msg not in cache:
            (payload,) = conn.execute(
                "SELECT payload FROM messages WHERE id = ?", (msg,)
            ).fetchone()
            cache[msg] = json.loads(payload)["recs"]
        out.append((boot, seq, hist, rec_t, cache[msg][idx]))
    return out


def malformed_total(conn: sqlite3.Connection) -> int:
    """Malformed messages dropped since the database was created."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'malformed_total'").fetchone()
    return int(row[0]) if row else 0


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _int(value: Any) -> int:
    return value if type(value) is int else 0
