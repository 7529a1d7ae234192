"""The device-side telemetry publisher: outbox -> batches -> MQTT (QoS 1), commands in.

Threads:

- the caller's control loop: :meth:`TelemetryClient.record_step` and :meth:`~TelemetryClient.event`
  only take a lock and append to a deque (no I/O, no network);
- paho's network thread (``loop_start``): its callbacks only append to deques and set flags,
  inside :func:`~devices.telemetry.transport.guarded` wrappers, so nothing raised there can stop
  the network loop;
- the worker thread (:meth:`TelemetryClient._run`): per cycle, one SQLite transaction for the
  commands that arrived, one that deletes acknowledged rows and applies the size bound and TTL,
  one that stores the queued records; then it publishes due batches. Only this thread touches
  the SQLite outbox.

Faults: nothing an incoming payload contains can raise out of a cycle (every payload is a
verified command or a ``malformed`` rejection); a failed transaction is rolled back together with
the client's own bookkeeping, and acknowledgements are kept until their rows are deleted. When
the disk is full the records wait in RAM, encoded once, bounded by ``max_queued_records`` (the
oldest telemetry goes first, counted and reported with reason ``ram``), while stored rows keep
being published and deleted; sequence numbers are never reused (see ``devices.telemetry.outbox``).

Messages are published at QoS 1; a record leaves the outbox only when the PUBACK of its batch
arrived. paho keeps unacknowledged messages and resends them after a reconnect in the same
process; after a restart the outbox is published again from its oldest row. Either way the
collector may see a batch twice and deduplicates on (device, boot, seq).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from devices.telemetry.commands_proto import (
    Command,
    CommandRejected,
    Reason,
    load_public_keys,
    verify_command,
)
from devices.telemetry.config import TelemetryConfig
from devices.telemetry.outbox import DropReport, OutboxRow, OutboxStore, QueuedRecord, RecordQueue
from devices.telemetry.records import (
    AckStatus,
    EventType,
    RecordKind,
    Sample,
    batch_payload,
    birth_payload,
    encode_ack,
    encode_event,
    encode_telemetry,
    state_payload,
)
from devices.telemetry.topics import Channel, topic
from devices.telemetry.transport import connect_kwargs, guarded, make_client, parse_broker_url
from runtime import RUNTIME_VERSION

log = logging.getLogger(__name__)

#: Runs a verified command (not ``rebirth``, which the client handles); returns ack details.
#: Called in the worker thread: hand the work to the control loop and return quickly.
CommandHandler = Callable[[Command], "dict[str, Any] | None"]

KIND_CHANNEL = {
    RecordKind.TELEMETRY: Channel.TELEMETRY,
    RecordKind.EVENT: Channel.EVENT,
    RecordKind.ACK: Channel.ACK,
}
MAX_COMMAND_BYTES = 16_384
POLICY_PERIOD_S = 1.0
#: Rows per insert or delete transaction: bounds the WAL growth of one commit.
INSERT_CHUNK = 500


@dataclass(frozen=True)
class BirthInfo:
    """What the device announces in its birth message."""

    bundle_id: str = ""
    bundle_version: str = ""
    profile: str = ""
    runtime_version: str = RUNTIME_VERSION
    #: The bundle's meta-RL family ("pearl", "rl2", ...): how to read the adaptation summary.
    algorithm: str = ""
    #: Names of the adaptation summary's entries (telemetry fields ``bm``/``bv``).
    summary_names: tuple[str, ...] = ()
    #: The bundle's calibrated OOD thresholds (the dashboard draws them); None: unknown.
    ood_warn: float | None = None
    ood_alarm: float | None = None


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of the client's counters."""

    connected: bool
    boot: str
    boot_n: int
    last_seq: int
    queued: int
    stored: int
    inflight_messages: int
    published_records: int
    acked_records: int
    rejected_by_broker: int
    dropped_records: int
    commands_accepted: int
    commands_rejected: int
    worker_errors: int
    unstored: int = 0  # records encoded but waiting for disk space (RAM)
    ram_dropped: int = 0  # records dropped from RAM while the disk was full
    store_failures: int = 0  # insert attempts refused (no headroom) or failed (disk full)
    unstored_at_close: int = 0  # records still without disk space at close (reported dropped)
    store_commits: int = 0  # outbox write transactions committed (an idle client makes none)


class TelemetryClient:
    """Publishes a device's records through a persisted outbox; verifies incoming commands."""

    def __init__(
        self,
        config: TelemetryConfig,
        birth: BirthInfo | None = None,
        command_handler: CommandHandler | None = None,
    ):
        self.config = config
        self.birth = birth or BirthInfo()
        self.command_handler = command_handler
        self._broker = parse_broker_url(
            config.broker,
            username=config.username,
            password=config.password,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            protocol=config.protocol,
            keepalive_s=config.keepalive_s,
        )
        self._keys = load_public_keys(config.command_keys)
        self._store = OutboxStore.open(
            config.outbox, config.sync, int(config.min_free_mb * 1024 * 1024)
        )
        self.boot = secrets.token_hex(8)
        self.boot_n = self._store.new_boot()
        self._queue = RecordQueue(self._store.next_seq())
        self.first_seq = self._queue.last_assigned + 1  # of this boot
        self._topics = {ch: topic(config.fleet, config.device, ch) for ch in Channel}
        self._mqtt = make_client(self._broker, client_id=config.device)
        self._acks: deque[tuple[int, bool]] = deque()
        self._inbox: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"telemetry-{config.device}", daemon=True
        )
        self._tick_s = min(max(config.batch_period_s / 4, 0.002), 0.05)
        self._connected = False
        self._generation = 0  # incremented by each successful connect (network thread)
        self._seen_generation = 0
        self._rebirth = False
        self._idle = False  # the worker sleeps until woken (nothing to do); see _busy
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (first seq, last seq)
        self._sent_hi = 0  # highest seq handed to paho
        self._hist_upto = self._queue.last_assigned  # records up to here were offline-buffered
        self._committed_upto = self._queue.last_assigned
        self._last_policy = 0.0
        self._last_report = 0.0
        self._drops_pending = bool(self._store.dropped())  # worker-owned after start
        self._unstored: deque[OutboxRow] = deque()  # encoded, waiting for disk space (worker)
        self._unacked_deletes: list[tuple[int, int]] = []  # acked spans not yet deleted
        self._ram_drops = DropReport()  # not yet written to the store's drop reports
        self._store_retry_at = 0.0  # monotonic time of the next insert attempt after a failure
        self._counters = dict.fromkeys(
            ("published", "acked", "rejected", "dropped", "cmd_ok", "cmd_rejected", "errors",
             "ram_dropped", "store_failures", "unstored_at_close"),
            0,
        )  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> TelemetryClient:
        """Connect in the background (retrying forever) and start the worker."""
        cfg = self.config
        m = self._mqtt
        m.on_connect = guarded(self._on_connect, "connect")
        m.on_disconnect = guarded(self._on_disconnect, "disconnect")
        m.on_publish = guarded(self._on_publish, "publish")
        m.on_message = guarded(self._on_message, "message")
        will = state_payload("offline", self.boot, self.boot_n, time.time(), "lost")
        m.will_set(self._topics[Channel.STATE], will, qos=1, retain=True)
        m.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        m.max_inflight_messages_set(cfg.max_inflight + 16)
        m.max_queued_messages_set(0)
        m.connect_async(**connect_kwargs(self._broker))  # type: ignore[arg-type]
        m.loop_start()
        self._thread.start()
        log.info(
            "telemetry %s/%s boot %s (#%d) from seq %d via %s",
            cfg.fleet,
            cfg.device,
            self.boot,
            self.boot_n,
            self._queue.last_assigned + 1,
            self._broker.url,
        )
        return self

    def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop: optionally wait for the outbox to drain, persist what is queued, say offline."""
        if drain_timeout_s > 0:
            self.wait_drained(drain_timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._abandon_unstored()
        if self._connected:
            offline = state_payload("offline", self.boot, self.boot_n, time.time(), "shutdown")
            info = self._mqtt.publish(self._topics[Channel.STATE], offline, qos=1, retain=True)
            _wait_quietly(info, 2.0)
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._store.close()

    def __enter__(self) -> TelemetryClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- control-loop API (never blocks on I/O) ----------------------------------------------
    def record_step(
        self,
        step: int,
        reward: float,
        action: Sequence[float],
        belief_mean: Sequence[float],
        belief_var: Sequence[float],
        belief_entropy: float,
        belief_count: int,
        ood_score: float,
        latency_us: float,
    ) -> int | None:
        """Queue one control step's telemetry; returns its seq, or None when decimated away.

        Arrays (numpy or sequences) are copied, so the caller may reuse its buffers.
        """
        if step % self.config.decimate:
            return None
        sample = Sample(
            step,
            reward,
            _copy(action),
            _copy(belief_mean),
            _copy(belief_var),
            belief_entropy,
            belief_count,
            ood_score,
            latency_us,
        )
        return self.record(sample)

    def record(self, sample: Sample) -> int:
        """Queue a ready :class:`Sample` (its sequences must not be mutated afterwards)."""
        seq = self._queue.put(RecordKind.TELEMETRY, time.time(), sample)
        if self._idle or len(self._queue) >= self.config.batch_size:
            self._wake.set()
        return seq

    def event(self, event_type: str, data: dict[str, Any] | None = None) -> int:
        """Queue an event (see ``records.EventType``); events are never dropped by the bound."""
        seq = self._queue.put(RecordKind.EVENT, time.time(), (event_type, data or {}))
        self._wake.set()
        return seq

    # --- status ------------------------------------------------------------------------------
    def stats(self) -> ClientStats:
        """Counters (read without locks: a consistent-enough snapshot for monitoring)."""
        c = self._counters
        return ClientStats(
            connected=self._connected, boot=self.boot, boot_n=self.boot_n,
            last_seq=self._queue.last_assigned, queued=len(self._queue) + len(self._unstored),
            stored=self._store.count,
            inflight_messages=len(self._inflight), published_records=c["published"],
            acked_records=c["acked"], rejected_by_broker=c["rejected"],
            dropped_records=c["dropped"],
            commands_accepted=c["cmd_ok"], commands_rejected=c["cmd_rejected"],
            worker_errors=c["errors"], unstored=len(self._unstored),
            ram_dropped=c["ram_dropped"], store_failures=c["store_failures"],
            unstored_at_close=c["unstored_at_close"], store_commits=self._store.commits,
        )  # fmt: skip

    @property
    def connected(self) -> bool:
        """True while an MQTT connection is up."""
        return self._connected

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is committed to the outbox (not for the loop)."""
        target = self._queue.last_assigned
        self._wake.set()
        return _wait_until(lambda: self._committed_upto >= target, timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until every record was acknowledged by the broker; False on timeout."""
        self._wake.set()
        return _wait_until(
            lambda: (
                not self._queue
                and not self._unstored
                and self._store.count == 0
                and not self._inflight
                and not self._drops_pending
                and self._committed_upto >= self._queue.last_assigned
            ),
            timeout_s,
        )

    # --- paho callbacks (network thread; only flags and deques) --------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("telemetry: broker refused the connection: %s", reason)
            return
        self._connected = True
        self._generation += 1
        self._wake.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._connected:
            log.info("telemetry: disconnected (%s); records stay in the outbox", reason)
        self._connected = False

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._acks.append((mid, not reason.is_failure))
        self._wake.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._inbox.append(bytes(message.payload))
        self._wake.set()

    # --- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        last_error = 0.0
        while True:
            stopping = self._stop.is_set()
            try:
                self._cycle(publish=not stopping)
            except Exception:
                self._counters["errors"] += 1
                if time.monotonic() - last_error > 10:
                    last_error = time.monotonic()
                    log.exception("telemetry worker cycle failed (will retry)")
            if stopping:
                return
            self._wake.wait(self._tick_s if self._busy() else POLICY_PERIOD_S)
            self._wake.clear()
            self._idle = False

    def _busy(self) -> bool:
        """Whether the next tick has work; if not, the worker sleeps until woken (or 1 s).

        ``_idle`` is raised *before* the checks: a record queued after the queue check sees it
        and wakes the worker (see :meth:`record`), so nothing waits a whole idle period.
        """
        self._idle = True
        busy = bool(
            len(self._queue) or self._unstored or self._inflight or self._unacked_deletes
            or self._acks or self._inbox or self._ram_drops.n or self._drops_pending
            or self._store.count or self._rebirth or self._generation != self._seen_generation
        )  # fmt: skip
        self._idle = not busy
        return busy

    def _cycle(self, publish: bool) -> None:
        now = time.time()
        if publish and self._connected and self._generation != self._seen_generation:
            self._on_new_connection()
        if self._rebirth and self._connected:
            self._rebirth = False
            self._publish_birth(now)
        self._handle_commands(_drain(self._inbox), now)
        stored_upto = self._store_queued(force=not publish)
        try:
            self._housekeeping(_drain(self._acks), now)  # the bound sees the rows just stored
        finally:  # stored rows keep flowing even while deletes fail
            upto = self._committed_upto if stored_upto is None else stored_upto
            if publish and self._connected and self._sent_hi < upto:
                self._publish_due(now)
            self._committed_upto = upto

    def _housekeeping(self, acks: list[tuple[int, bool]], now: float) -> None:
        """One transaction: delete acknowledged rows, size bound, TTL, drop reports.

        Needs no new disk space beyond the WAL headroom, so it keeps running on a full disk. On
        failure everything it changed in memory is restored: acknowledged spans stay queued
        for deletion (nothing acknowledged is ever forgotten) and the cycle is retried.
        """
        self._apply_acks(acks)  # in memory: frees in-flight slots even if the delete fails
        if not self._housekeeping_due(now):
            return
        saved = (dict(self._counters), self._drops_pending, self._last_policy, self._last_report)
        events: list[tuple[str, dict[str, Any]]] = []
        self._store.begin()
        try:
            self._store.merge_dropped("ram", self._ram_drops)
            settled = self._delete_acked()
            self._apply_policy(now)
            if self._connected:
                events = self._report_drops(now)
            self._store.commit()
        except BaseException:
            self._store.rollback()
            self._counters, self._drops_pending, self._last_policy, self._last_report = saved
            raise
        self._ram_drops = DropReport()
        del self._unacked_deletes[:settled]
        for event in events:
            self._queue.put(RecordKind.EVENT, now, event)

    def _housekeeping_due(self, now: float) -> bool:
        """Whether :meth:`_housekeeping` has anything to write.

        An idle client (nothing acknowledged, under its bound, nothing to expire or report)
        opens no write transaction: a tick is then a few reads, not a commit.
        """
        if self._unacked_deletes or self._ram_drops.n:
            return True
        if self._store.telemetry_count > self.config.max_records:
            return True
        if self._drops_pending and self._connected and now - self._last_report >= POLICY_PERIOD_S:
            return True
        if now - self._last_policy < POLICY_PERIOD_S:
            return False
        if self._store.count or self._store.has_nonces():
            return True
        self._last_policy = now  # an empty outbox and no nonces: nothing can expire
        return False

    def _store_queued(self, force: bool = False) -> int | None:
        """Encode what the control loop queued (once) and insert it, in chunks, if there is room.

        Rows that cannot be stored (no headroom, disk full) wait in ``_unstored``, bounded by
        ``max_queued_records``; inserts are retried every ``store_retry_s``. ``force`` skips the
        wait (the last cycle before closing). Returns the highest sequence number stored.
        """
        self._unstored.extend(self._encode(item) for item in self._queue.take())
        if not self._unstored:
            return None
        if not force and time.monotonic() < self._store_retry_at:
            self._bound_unstored()  # bounded only while they cannot be stored, never for lag
            return None
        stored_upto = None
        while self._unstored:
            chunk = [self._unstored[i] for i in range(min(INSERT_CHUNK, len(self._unstored)))]
            if not self._insert(chunk):
                if not self._counters["store_failures"] or self._store_retry_at == 0:
                    log.warning("outbox %s: disk full; records wait in RAM", self._store.path)
                self._counters["store_failures"] += 1
                self._store_retry_at = time.monotonic() + self.config.store_retry_s
                self._reserve_unstored()
                self._bound_unstored()
                return stored_upto
            for _ in chunk:
                self._unstored.popleft()
            stored_upto = chunk[-1].seq
        if self._store_retry_at:
            log.info("outbox %s: storing again", self._store.path)
            self._store_retry_at = 0.0
        return stored_upto

    def _insert(self, rows: list[OutboxRow]) -> bool:
        """Insert rows in one transaction; False (rolled back) when the disk has no room."""
        if not self._store.has_room(rows):
            return False
        self._store.begin()
        try:
            self._store.insert(rows)
            self._store.commit()
        except sqlite3.OperationalError as exc:  # SQLITE_FULL, I/O errors
            self._store.rollback()
            log.debug("outbox insert failed (%s)", exc)
            return False
        except BaseException:
            self._store.rollback()
            raise
        return True

    def _reserve_unstored(self) -> None:
        """Persist that the unstored rows' sequence numbers are used (a one-row update)."""
        with contextlib.suppress(sqlite3.OperationalError):
            self._store.begin()
            self._store.reserve_seq(self._unstored[-1].seq + 1)
            self._store.commit()
        self._store.rollback()  # no-op after a commit

    def _bound_unstored(self) -> None:
        """Drop the oldest unstored records beyond ``max_queued_records`` (telemetry first).

        Trims to 90 % of the bound, so the O(n) pass runs once per tenth of the bound.
        """
        bound = self.config.max_queued_records
        if len(self._unstored) <= bound:
            return
        excess = len(self._unstored) - bound * 9 // 10
        kept: deque[OutboxRow] = deque()
        dropped: list[int] = []
        for row in self._unstored:  # oldest telemetry first
            if len(dropped) < excess and row.kind == RecordKind.TELEMETRY:
                dropped.append(row.seq)
            else:
                kept.append(row)
        while len(dropped) < excess:  # only events and acks left: the oldest of those
            dropped.append(kept.popleft().seq)
        self._unstored = kept
        self._ram_drops.add(dropped)
        self._drops_pending = True
        self._counters["dropped"] += len(dropped)
        self._counters["ram_dropped"] += len(dropped)
        log.warning("disk full: dropped %d queued records from RAM", len(dropped))

    def _abandon_unstored(self) -> None:
        """At close: records that never found disk space are reported as dropped ('unstored')."""
        if not self._unstored:
            return
        seqs = [row.seq for row in self._unstored]
        self._counters["unstored_at_close"] += len(seqs)
        self._counters["dropped"] += len(seqs)
        log.error("closing with %d records that could not be stored (disk full)", len(seqs))
        with contextlib.suppress(sqlite3.OperationalError):
            self._store.begin()
            self._store.reserve_seq(seqs[-1] + 1)
            self._store.merge_dropped("ram", self._ram_drops)
            self._store.add_dropped("unstored", seqs)
            self._store.commit()
        self._store.rollback()
        self._unstored.clear()

    def _on_new_connection(self) -> None:
        self._seen_generation = self._generation
        self._hist_upto = self._queue.last_assigned
        self._mqtt.subscribe(self._topics[Channel.COMMAND], qos=1)
        self._publish_birth(time.time())

    def _publish_birth(self, now: float) -> None:
        cfg, b = self.config, self.birth
        info = {
            "fleet": cfg.fleet, "dev": cfg.device, "boot": self.boot, "boot_n": self.boot_n,
            "t": now, "bundle_id": b.bundle_id, "bundle_version": b.bundle_version,
            "runtime_version": b.runtime_version, "profile": b.profile,
            "first_seq": self.first_seq, "proto": cfg.protocol,
            "alg": b.algorithm, "summary": list(b.summary_names),
            "ood": {"warn": b.ood_warn, "alarm": b.ood_alarm},
        }  # fmt: skip
        self._mqtt.publish(self._topics[Channel.BIRTH], birth_payload(info), qos=1, retain=True)
        online = state_payload("online", self.boot, self.boot_n, now, "connected")
        self._mqtt.publish(self._topics[Channel.STATE], online, qos=1, retain=True)

    def _encode(self, item: QueuedRecord) -> OutboxRow:
        try:
            if item.kind == RecordKind.TELEMETRY:
                body = encode_telemetry(item.seq, item.t, item.data)
            elif item.kind == RecordKind.EVENT:
                body = encode_event(item.seq, item.t, *item.data)
            else:
                body = encode_ack(item.seq, item.t, item.data)
            return OutboxRow(item.seq, int(item.kind), self.boot, item.t, body)
        except (TypeError, ValueError) as exc:
            # keep the sequence gap-free: the bad record becomes an event saying why
            body = encode_event(item.seq, item.t, "record_error", {"error": str(exc)[:200]})
            return OutboxRow(item.seq, int(RecordKind.EVENT), self.boot, item.t, body)

    def _apply_acks(self, acks: list[tuple[int, bool]]) -> None:
        """Settle PUBACKs in memory; their rows are deleted by :meth:`_delete_acked`."""
        for mid, ok in acks:
            span = self._inflight.pop(mid, None)
            if span is None:
                continue
            if not ok:
                self._counters["rejected"] += span[1] - span[0] + 1
                log.error("broker refused seq %d..%d (not authorized?); dropped", *span)
            self._unacked_deletes.append(span)

    def _delete_acked(self) -> int:
        """Delete acknowledged spans, about ``INSERT_CHUNK`` rows per transaction (each
        deleted row costs WAL space, which is scarce on a full disk); returns spans done."""
        rows = 0
        for i, (first, last) in enumerate(self._unacked_deletes):
            if rows >= INSERT_CHUNK:
                return i
            self._counters["acked"] += self._store.delete_range(first, last)
            rows += last - first + 1
        return len(self._unacked_deletes)

    def _apply_policy(self, now: float) -> None:
        cfg = self.config
        dropped = self._store.enforce_bound(cfg.max_records, self._sent_hi)
        self._store.add_dropped("full", dropped)
        if now - self._last_policy >= POLICY_PERIOD_S:
            self._last_policy = now
            cutoffs = {
                RecordKind.TELEMETRY: now - cfg.telemetry_ttl_s,
                RecordKind.EVENT: now - cfg.event_ttl_s,
                RecordKind.ACK: now - cfg.event_ttl_s,
            }
            expired = self._store.expire(cutoffs, self._sent_hi)
            self._store.add_dropped("ttl", expired)
            self._store.nonce_prune(now)
            dropped = dropped + expired
        if dropped:
            self._drops_pending = True
            self._counters["dropped"] += len(dropped)
            log.warning(
                "outbox policy dropped %d records (seq %d..%d)",
                len(dropped),
                dropped[0],
                dropped[-1],
            )

    def _report_drops(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """``outbox_dropped`` events for the accumulated drops, at most once a second.

        The reports are cleared in the caller's transaction; the events are queued after it
        committed, so a failed transaction neither loses nor repeats a report.
        """
        if not self._drops_pending or now - self._last_report < POLICY_PERIOD_S:
            return []
        events = []
        for reason, rep in self._store.dropped().items():
            data = {"reason": reason, "n": rep.n, "first": rep.first, "last": rep.last}
            events.append((EventType.OUTBOX_DROPPED, data))
        self._store.clear_dropped()
        self._drops_pending = False
        self._last_report = now
        return events

    def _publish_due(self, now: float) -> None:
        cfg = self.config
        while len(self._inflight) < cfg.max_inflight:
            rows = self._store.fetch_after(self._sent_hi, cfg.batch_size)
            if not rows or not self._due(rows, now):
                return
            for run in _runs(rows, self._hist_upto):
                if not self._publish_run(run):
                    return

    def _due(self, rows: list[OutboxRow], now: float) -> bool:
        if len(rows) >= self.config.batch_size or rows[0].seq <= self._hist_upto:
            return True
        if any(r.kind != RecordKind.TELEMETRY for r in rows):
            return True
        return now - rows[0].t >= self.config.batch_period_s

    def _publish_run(self, run: list[OutboxRow]) -> bool:
        import paho.mqtt.client as mqtt

        cfg = self.config
        kind = RecordKind(run[0].kind)
        hist = run[0].seq <= self._hist_upto
        payload = batch_payload(
            cfg.fleet, cfg.device, run[0].boot, kind, hist, (r.body for r in run)
        )
        info = self._mqtt.publish(self._topics[KIND_CHANNEL[kind]], payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish failed (%s); will retry", mqtt.error_string(info.rc))
            return False
        # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting
        self._inflight[info.mid] = (run[0].seq, run[-1].seq)
        self._sent_hi = run[-1].seq
        self._counters["published"] += len(run)
        return True

    # --- commands ----------------------------------------------------------------------------
    def _handle_commands(self, inbox: list[bytes], now: float) -> None:
        """Verify the payloads, record accepted nonces in one transaction, then execute.

        Never raises: a payload is a verified command or a rejection, answered in arrival
        order. When the nonces cannot be recorded (disk failure) the commands are not executed
        and answered ``failed``: the sender may send them again, and replay protection is never
        weakened.
        """
        if not inbox:
            return
        outcomes: list[Command | CommandRejected] = []
        try:
            self._store.begin()
            for payload in inbox:
                outcome = self._verified(payload, now)
                if isinstance(outcome, Command):
                    self._store.nonce_add(outcome.nonce, outcome.expires + self.config.clock_skew_s)
                outcomes.append(outcome)
            self._store.commit()
        except sqlite3.Error as exc:
            self._store.rollback()
            log.error("could not record command nonces (%s); commands not executed", exc)
            error = {"error": f"could not record the nonce: {exc}"[:200]}
            outcomes = [o if isinstance(o, CommandRejected) else (o, error) for o in outcomes]
        for outcome in outcomes:
            self._answer(outcome, now)

    def _answer(
        self, outcome: Command | CommandRejected | tuple[Command, dict[str, Any]], now: float
    ) -> None:
        if isinstance(outcome, CommandRejected):
            self._reject(outcome, now)
        elif isinstance(outcome, tuple):  # accepted, but its nonce could not be recorded
            cmd, error = outcome
            self._ack(cmd.nonce, cmd.name, AckStatus.FAILED, error, now)
        else:
            self._counters["cmd_ok"] += 1
            status, detail = self._execute(outcome)
            self._ack(outcome.nonce, outcome.name, status, detail, now)

    def _verified(self, payload: bytes, now: float) -> Command | CommandRejected:
        """The verified command in ``payload``, or why it was rejected."""
        cfg = self.config
        try:
            if len(payload) > MAX_COMMAND_BYTES:
                raise CommandRejected(Reason.MALFORMED, f"{len(payload)} bytes")
            return verify_command(
                payload, self._keys, cfg.fleet, cfg.device, now=now,
                max_ttl_s=cfg.command_max_ttl_s, skew_s=cfg.clock_skew_s,
                seen=self._store.nonce_seen,
            )  # fmt: skip
        except CommandRejected as exc:
            return exc
        except sqlite3.Error:
            raise  # the store, not the payload: handled by the caller's transaction
        except Exception as exc:  # a parser bug must not stop the worker: still a rejection
            log.exception("command verification raised")
            return CommandRejected(Reason.MALFORMED, type(exc).__name__)

    def _reject(self, exc: CommandRejected, now: float) -> None:
        self._counters["cmd_rejected"] += 1
        log.warning("rejected command: %s", exc)
        data = {
            "reason": exc.reason,
            "detail": exc.detail[:200],
            "nonce": exc.nonce,
            "cmd": exc.name,
        }
        self._queue.put(RecordKind.EVENT, now, (EventType.COMMAND_REJECTED, data))
        if exc.nonce is not None:
            self._ack(exc.nonce, exc.name, AckStatus.REJECTED, {"reason": exc.reason}, now)

    def _execute(self, cmd: Command) -> tuple[str, dict[str, Any]]:
        if cmd.name == "rebirth":
            self._rebirth = True
            return AckStatus.OK, {}
        if self.command_handler is None:
            return AckStatus.UNSUPPORTED, {"reason": "no command handler on this device"}
        try:
            return AckStatus.OK, dict(self.command_handler(cmd) or {})
        except Exception as exc:
            log.exception("command %s failed", cmd.name)
            error = {"cmd": cmd.name, "nonce": cmd.nonce, "error": repr(exc)[:200]}
            self._queue.put(RecordKind.EVENT, time.time(), (EventType.COMMAND_FAILED, error))
            return AckStatus.FAILED, {"error": repr(exc)[:200]}

    def _ack(
        self, nonce: str, name: str | None, status: str, detail: dict[str, Any], now: float
    ) -> None:
        ack = {"nonce": nonce, "cmd": name, "status": status, "detail": detail}
        self._queue.put(RecordKind.ACK, now, ack)


def _runs(rows: list[OutboxRow], hist_upto: int) -> list[list[OutboxRow]]:
    """Split rows into maximal runs with the same kind, boot and historical flag."""
    runs: list[list[OutboxRow]] = []
    key = None
    for row in rows:
        k = (row.kind, row.boot, row.seq <= hist_upto)
        if k != key:
            runs.append([])
            key = k
        runs[-1].append(row)
    return runs


def _copy(values: Sequence[float]) -> list[float]:
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)


def _drain(items: deque[Any]) -> list[Any]:
    out = []
    while items:
        out.append(items.popleft())
    return out


def _wait_until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _wait_quietly(info: Any, timeout_s: float) -> None:
    with contextlib.suppress(RuntimeError, ValueError):
        info.wait_for_publish(timeout_s)
