"""The backend collector: subscribe, store (SQLite or PostgreSQL), acknowledge after the commit.

The collector uses a persistent MQTT session (fixed client id, clean start off, a session expiry)
and paho's manual acknowledgements: a message is PUBACKed only after the transaction holding its
records committed. If the collector dies in between, the broker redelivers the message and the
primary key drops the copy. With ``share_group`` the record channels are subscribed as MQTT 5
shared subscriptions, so several collectors (same database or not) split the load; on a shared
database the primary key stores each record once whichever collector got it. A collector that
dies keeps its unacknowledged messages in its broker session: restarted with the same client id
(a supervisor does that), it gets them again. Every collector of a group needs its own client id.

Threads: paho's network thread only appends received messages to a deque; the writer thread
ingests them in one transaction per wake-up, commits, then acknowledges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from devices.telemetry.collector_db import MAX_PAYLOAD_BYTES, CollectorStore
from devices.telemetry.database import describe, is_url
from devices.telemetry.topics import collector_filters
from devices.telemetry.transport import BrokerOptions, connect_kwargs, guarded, make_client

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "edgeadapt-collector"
DEFAULT_SESSION_EXPIRY_S = 86_400


class Received(NamedTuple):
    """A message waiting for the writer."""

    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float


@dataclass
class CollectorCounters:
    """Totals since the collector started."""

    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    commits: int = 0


class Collector:
    """Subscribes to a fleet's topics and writes every record once into ``db_path``.

    ``db_path`` is an SQLite file or a ``postgresql://`` URL. Messages larger than
    ``max_payload_bytes`` are counted as malformed and dropped without being parsed.
    """

    def __init__(
        self,
        broker: BrokerOptions,
        db_path: str | Path,
        *,
        fleet: str = "+",
        share_group: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ):
        self.broker = broker
        self.db_path: Path | str = db_path if is_url(db_path) else Path(db_path)
        self.filters = collector_filters(fleet, share_group)
        self.session_expiry_s = session_expiry_s
        self.counters = CollectorCounters()
        self._store = CollectorStore.open(self.db_path, max_payload_bytes)
        self._mqtt = make_client(
            broker, client_id, persistent=session_expiry_s > 0, manual_ack=True
        )
        self._inbox: deque[Received] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)
        self._generation = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()

    def start(self) -> Collector:
        """Connect in the background (retrying forever) and start the writer."""
        m = self._mqtt
        m.on_connect = guarded(self._on_connect, "connect")
        m.on_disconnect = guarded(self._on_disconnect, "disconnect")
        m.on_message = guarded(self._on_message, "message")
        m.on_subscribe = guarded(self._on_subscribe, "subscribe")
        m.reconnect_delay_set(0.1, 5)  # type: ignore[arg-type]
        m.connect_async(**connect_kwargs(self.broker, session_expiry_s=self.session_expiry_s))  # type: ignore[arg-type]
        m.loop_start()
        self._thread.start()
        log.info(
            "collecting %s from %s into %s", self.filters, self.broker.url, describe(self.db_path)
        )
        return self

    def stop(self) -> None:
        """Disconnect, store what was received, close the database."""
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._store.close()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_subscribed(self, timeout_s: float = 10.0) -> bool:
        """Block until the subscriptions of the current connection were granted."""
        return self.subscribed.wait(timeout_s)

    # --- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("collector: broker refused the connection: %s", reason)
            return
        self._generation += 1
        self.subscribed.clear()
        client.subscribe([(f, 1) for f in self.filters])
        self.connected.set()

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("collector: subscriptions refused: %s", failed)
        self.subscribed.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.info("collector: disconnected (%s)", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        item = Received(
            self._generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload), time.time()
        )
        self._inbox.append(item)
        self._wake.set()

    # --- writer -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._write_batch()
            except Exception:
                log.exception("collector write failed; messages stay unacknowledged")
                time.sleep(0.5)
            if stopping and not self._inbox:
                return
            self._wake.wait(0.05)
            self._wake.clear()

    def _write_batch(self) -> None:
        items: list[Received] = []
        while self._inbox and len(items) < 5000:
            items.append(self._inbox.popleft())
        if not items:
            return
        # one device's messages keep their order; a fixed device order across collectors keeps
        # concurrent transactions on a shared PostgreSQL from locking rows in opposite orders
        items.sort(key=lambda it: it.topic.rsplit("/", 1)[0])
        c = self.counters
        self._store.begin()
        try:
            for it in items:
                res = self._store.ingest(it.topic, it.payload, it.received)
                c.stored += res.stored
                c.duplicates += res.duplicates
                c.malformed += int(res.malformed)
            self._store.commit()
        except BaseException:
            self._store.rollback()
            self._inbox.extendleft(reversed(items))
            raise
        c.messages += len(items)
        c.commits += 1
        self._acknowledge(items)

    def _acknowledge(self, items: list[Received]) -> None:
        generation = self._generation
        for it in items:
            # a mid of an older connection means nothing now: the broker redelivers that message
            if it.qos > 0 and it.generation == generation:
                self._mqtt.ack(it.mid, it.qos)
