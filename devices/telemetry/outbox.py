"""The persisted outbox: records wait in SQLite (WAL) until the broker acknowledged them.

Two halves:

- :class:`RecordQueue`, the control loop's side. ``put`` assigns the next sequence number and
  appends to an in-memory deque under a lock: no I/O, about a microsecond.
- :class:`OutboxStore`, the SQLite file, used by exactly one thread (the publisher worker of
  ``TelemetryClient``). The worker moves queued records into it in one transaction per cycle
  (every few milliseconds), publishes from it, and deletes rows once their PUBACK arrived.

"Persisted" means committed to the SQLite WAL. A committed record survives a ``kill -9`` of the
device process (the WAL is in the OS page cache; ``sync="full"`` also makes it survive a power
cut). Records still in the deque, i.e. enqueued during the last worker cycle, are lost by a
``kill -9``; their sequence numbers were never committed, so the next boot reuses them and the
stream the collector sees stays gap-free. See ``docs/telemetry.md`` for the size and TTL policy.

A full disk: the store refuses inserts while its filesystem has less than ``min_free_bytes``
free (:meth:`OutboxStore.has_room`), so the space SQLite needs to delete acknowledged rows and
checkpoint its WAL is never taken by new rows; records then wait in the client's bounded RAM
queue. Sequence numbers of records that were taken from the queue but never stored are still
reserved in ``meta.next_seq`` (:meth:`OutboxStore.reserve_seq`): the next boot never reuses
them, and the collector sees their gap next to an ``outbox_dropped`` report.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from devices.telemetry.records import RecordKind

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PAGE_BYTES = 4096  # SQLite's default page size
ROW_OVERHEAD_BYTES = 48  # seq, kind, boot id, time and cell header of one row, about
#: Largest WAL (pages) between automatic checkpoints, SQLite's default.
MAX_WAL_PAGES = 1000

# No secondary index: every insert would pay for it, and the queries that filter by kind (size
# bound, TTL) run rarely and walk the primary key.
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq  INTEGER PRIMARY KEY,      -- per-device sequence number, increasing across restarts
    kind INTEGER NOT NULL,         -- RecordKind: 0 telemetry, 1 event, 2 ack
    boot TEXT    NOT NULL,         -- boot id of the process that produced the record
    t    REAL    NOT NULL,         -- unix time of the record (s)
    body TEXT    NOT NULL          -- the record's JSON text (records.encode_*)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
"""

Sync = Literal["normal", "full"]


class QueuedRecord(NamedTuple):
    """A record waiting in memory: ``data`` is a ``Sample``, an event or an ack tuple."""

    seq: int
    kind: RecordKind
    t: float
    data: Any


class OutboxRow(NamedTuple):
    """A persisted record."""

    seq: int
    kind: int
    boot: str
    t: float
    body: str


@dataclass
class DropReport:
    """Records removed by the size bound or the TTL, not yet reported to the backend."""

    n: int = 0
    first: int = 0
    last: int = 0

    def add(self, seqs: list[int]) -> None:
        """Account for the dropped sequence numbers ``seqs``."""
        if seqs:
            self.merge(DropReport(len(seqs), min(seqs), max(seqs)))

    def merge(self, other: DropReport) -> None:
        """Account for the drops of another report."""
        if other.n == 0:
            return
        self.first = other.first if self.n == 0 else min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.n += other.n


class RecordQueue:
    """Thread-safe in-memory front of the outbox; assigns sequence numbers."""

    def __init__(self, first_seq: int):
        self._lock = threading.Lock()
        self._next = first_seq
        self._items: deque[QueuedRecord] = deque()

    def put(self, kind: RecordKind, t: float, data: Any) -> int:
        """Queue one record; return its sequence number. Never blocks on I/O."""
        with self._lock:
            seq = self._next
            self._next = seq + 1
            self._items.append(QueuedRecord(seq, kind, t, data))
        return seq

    def take(self) -> list[QueuedRecord]:
        """Remove and return everything queued, in sequence order."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def put_back(self, items: list[QueuedRecord]) -> None:
        """Return records from a failed :meth:`take` to the front, keeping sequence order."""
        with self._lock:
            self._items.extendleft(reversed(items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last_assigned(self) -> int:
        """The highest sequence number handed out so far."""
        return self._next - 1


class OutboxStore:
    """The SQLite side of the outbox. Not thread-safe: one owner thread after :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, min_free_bytes: int = 0):
        self._db = conn
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.count = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.telemetry_count = int(
            conn.execute("SELECT COUNT(*) FROM outbox WHERE kind = 0").fetchone()[0]
        )
        self._saved_counts = (self.count, self.telemetry_count)
        self.commits = 0  # write transactions committed through this handle

    @classmethod
    def open(cls, path: str | Path, sync: Sync = "normal", min_free_bytes: int = 0) -> OutboxStore:
        """Open or create the outbox file (WAL mode, schema checked).

        ``min_free_bytes``: inserts are refused while the filesystem has less free space (see
        :meth:`has_room`); the WAL is checkpointed before it takes a quarter of that headroom.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={sync.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        wal_pages = MAX_WAL_PAGES
        if min_free_bytes:
            wal_pages = max(8, min(MAX_WAL_PAGES, min_free_bytes // 4 // PAGE_BYTES))
        conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        # Debian builds zero deleted content, rewriting every freed page into the WAL; FAST
        # only zeroes what is written anyway, so deleting needs little space on a full disk.
        conn.execute("PRAGMA secure_delete=FAST")
        conn.executescript(SCHEMA)
        store = cls(conn, path, min_free_bytes)
        version = store.get_meta("schema_version")
        if version is None:
            store.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: outbox schema {version}, expected {SCHEMA_VERSION}")
        return store

    def close(self) -> None:
        """Close the database (commits nothing: call :meth:`commit` first)."""
        self._db.close()

    # --- transactions -------------------------------------------------------------------
    def begin(self) -> None:
        """Start a write transaction; :meth:`rollback` restores the row counters to here."""
        self._saved_counts = (self.count, self.telemetry_count)
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit the current transaction: from here on its records survive ``kill -9``."""
        self._db.execute("COMMIT")
        self.commits += 1

    def rollback(self) -> None:
        """Abandon the current transaction (if any) and the counter changes made in it."""
        self.count, self.telemetry_count = self._saved_counts
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def has_room(self, rows: list[OutboxRow]) -> bool:
        """Whether ``rows`` may be inserted and still leave ``min_free_bytes`` free.

        Pages freed by deleted rows (SQLite's freelist) are reused before the file grows, so
        only the growth beyond them counts. The headroom keeps the space SQLite needs to delete
        rows and checkpoint its WAL, so acknowledged rows can still be deleted when the disk is
        full, and the space they free is used again. Rows that fit in freed pages only need
        twice their size free (WAL frames now, room for a delete later).
        """
        if not self.min_free_bytes:
            return True
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return True  # unknown: let SQLite report a real failure
        free_pages = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        need = sum(len(r.body) + ROW_OVERHEAD_BYTES for r in rows) * 5 // 4  # B-tree slack
        growth = max(0, need - free_pages * PAGE_BYTES)
        free = st.f_bavail * st.f_frsize
        if growth == 0:  # only the WAL may grow, by about the rows' size
            return free >= min(self.min_free_bytes, 2 * need)
        return free - growth >= self.min_free_bytes

    # --- sequence numbers and boots ------------------------------------------------------
    def next_seq(self) -> int:
        """First sequence number for a new process: above everything ever used or committed."""
        stored = int(self.get_meta("next_seq") or 1)
        top = self._db.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
        return max(stored, (top or 0) + 1)

    def new_boot(self) -> int:
        """Increment and return the persisted boot counter (1 on the first boot).

        On a full disk the counter cannot be written: the boot still gets the next number
        (logged), so telemetry starts anyway.
        """
        n = int(self.get_meta("boot_n") or 0) + 1
        try:
            self.set_meta("boot_n", str(n))
        except sqlite3.OperationalError as exc:
            log.warning("outbox %s: boot counter not persisted (%s)", self.path, exc)
        return n

    def reserve_seq(self, next_seq: int) -> None:
        """Persist that sequence numbers below ``next_seq`` are used, stored or not."""
        if next_seq > int(self.get_meta("next_seq") or 1):
            self.set_meta("next_seq", str(next_seq))

    # --- rows ------------------------------------------------------------------------------
    def insert(self, rows: list[OutboxRow]) -> None:
        """Append rows (ascending seq) and move the persisted ``next_seq`` past them."""
        if not rows:
            return
        self._db.executemany(
            "INSERT INTO outbox (seq, kind, boot, t, body) VALUES (?,?,?,?,?)", rows
        )
        self.count += len(rows)
        self.telemetry_count += sum(1 for r in rows if r.kind == RecordKind.TELEMETRY)
        self.set_meta("next_seq", str(rows[-1].seq + 1))

    def fetch_after(self, seq: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` rows with sequence number above ``seq``, oldest first."""
        cur = self._db.execute(
            "SELECT seq, kind, boot, t, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [OutboxRow(*r) for r in cur]

    def delete_range(self, first: int, last: int) -> int:
        """Delete rows ``first..last`` (acknowledged by the broker); return how many."""
        kinds = self._db.execute(
            "DELETE FROM outbox WHERE seq BETWEEN ? AND ? RETURNING kind", (first, last)
        ).fetchall()
        self.count -= len(kinds)
        self.telemetry_count -= sum(1 for (k,) in kinds if k == RecordKind.TELEMETRY)
        return len(kinds)

    def enforce_bound(self, max_records: int, protect_upto: int) -> list[int]:
        """Drop the oldest telemetry rows until at most ``max_records`` telemetry rows remain.

        Events and acks do not count towards the bound and are never dropped by it (only by
        their TTL). Rows with ``seq <= protect_upto`` were already handed to the network layer
        and are kept. Returns the dropped sequence numbers.
        """
        excess = self.telemetry_count - max_records
        if excess <= 0:
            return []
        cur = self._db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE kind = ? AND seq > ? "
            "ORDER BY seq LIMIT ?) RETURNING seq",
            (int(RecordKind.TELEMETRY), protect_upto, excess),
        )
        dropped = sorted(r[0] for r in cur)
        self.count -= len(dropped)
        self.telemetry_count -= len(dropped)
        return dropped

    def expire(self, kind_cutoffs: dict[RecordKind, float], protect_upto: int) -> list[int]:
        """Drop rows older than their kind's cutoff time (unix s); returns dropped seqs."""
        dropped: list[int] = []
        for kind, cutoff in kind_cutoffs.items():
            cur = self._db.execute(
                "DELETE FROM outbox WHERE kind = ? AND t < ? AND seq > ? RETURNING seq",
                (int(kind), cutoff, protect_upto),
            )
            seqs = [r[0] for r in cur]
            self.count -= len(seqs)
            if kind == RecordKind.TELEMETRY:
                self.telemetry_count -= len(seqs)
            dropped += seqs
        return sorted(dropped)

    def pending_counts(self) -> dict[str, int]:
        """Rows per kind name (for status and tests)."""
        rows = self._db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall()
        return {RecordKind(k).name.lower(): n for k, n in rows}

    # --- drop reports --------------------------------------------------------------------
    def add_dropped(self, reason: str, seqs: list[int]) -> None:
        """Accumulate dropped seqs under ``reason`` in ``meta`` (same transaction)."""
        if seqs:
            self.merge_dropped(reason, DropReport(len(seqs), min(seqs), max(seqs)))

    def merge_dropped(self, reason: str, report: DropReport) -> None:
        """Accumulate a drop report under ``reason`` in ``meta`` (same transaction)."""
        if report.n == 0:
            return
        reports = self.dropped()
        reports.setdefault(reason, DropReport()).merge(report)
        self.set_meta("dropped", json.dumps({k: vars(v) for k, v in reports.items()}))

    def dropped(self) -> dict[str, DropReport]:
        """Unreported drops by reason (``full``, ``ttl``)."""
        raw = self.get_meta("dropped")
        return {k: DropReport(**v) for k, v in json.loads(raw).items()} if raw else {}

    def clear_dropped(self) -> None:
        """Forget the drop reports (after they became an event record)."""
        self._db.execute("DELETE FROM meta WHERE key = 'dropped'")

    # --- command nonces ------------------------------------------------------------------
    def nonce_seen(self, nonce: str) -> bool:
        """True if a command with this nonce was accepted before (and has not expired)."""
        return (
            self._db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
            is not None
        )

    def has_nonces(self) -> bool:
        """Whether any command nonce is recorded (the TTL policy then has work)."""
        return self._db.execute("SELECT 1 FROM nonces LIMIT 1").fetchone() is not None

    def nonce_add(self, nonce: str, expires: float) -> None:
        """Remember an accepted nonce until its command's expiry (unix s)."""
        self._db.execute("INSERT OR REPLACE INTO nonces VALUES (?, ?)", (nonce, expires))

    def nonce_prune(self, now: float) -> None:
        """Forget nonces of expired commands (they are rejected as expired anyway)."""
        self._db.execute("DELETE FROM nonces WHERE expires < ?", (now,))

    # --- meta --------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the ``meta`` table."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
