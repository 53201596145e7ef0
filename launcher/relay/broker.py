"""The relay's only RabbitMQ connection: intake into the lease table, and everything it publishes.

One thread owns the broker connection (a launcher.broker.Link, which holds every channel operation;
it is not thread-safe). Its loop:

- intake: when fewer than half of `buffer` rows are ready in the lease table (or none, and an
  agent is waiting), `basic_get` a batch to fill it
  (never a consumer: a message is unacknowledged only for the milliseconds between get and ack,
  so RabbitMQ's consumer_timeout never applies), record the batch with one fsync'd commit, then
  acknowledge it (`multiple=True`). A crash between commit and ack leaves the message in both
  places: it runs twice (at-least-once), never zero times.
- dead rows: publish each to `error.<queue>` with the original body and properties plus
  `x-error-reason`/`x-error-traceback` headers, wait for the broker's confirm, then delete it.
- best-effort publishes handed over by HTTP threads through a bounded queue: status messages to
  a lease's reply_to (with its correlation_id) and registrations on the `extractors` exchange.
- at shutdown (`hand_back`): ready rows are published back to the queue (confirmed) and deleted.

When the broker is away the loop reconnects with backoff; the relay keeps leasing what it
already holds, and completions, releases and failures keep working (they only touch SQLite).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Optional

from hpc_common.messages import ATTEMPTS, Message, dead_letter_headers
from hpc_common.redact import redact_uri
from launcher.broker import BrokerError, Link

from .store import DeadRow, LeaseStore

log = logging.getLogger("launcher.relay.broker")
BATCH = 50
_ERRORS = (BrokerError, OSError)


class BrokerLink(threading.Thread):
    """Moves messages between RabbitMQ and the lease table (see the module docstring)."""

    def __init__(self, uri: str, queue_name: str, store: LeaseStore, buffer: int = 20,
                 relay_id: str = "relay", internals: bool = True) -> None:
        """internals: status replies and registrations leave in one socket send per batch
        (launcher.broker.Link's private pika path; False: pika's public API only)."""
        super().__init__(name="relay-broker", daemon=True)
        self.uri = uri
        self.queue = queue_name
        self.error_queue = "error." + queue_name
        self.store = store
        self.buffer = max(1, buffer)
        self.relay_id = relay_id
        self.internals = internals
        self.connected = threading.Event()
        self.intake = True
        self._halt = threading.Event()
        self._outbox: "queue.Queue[tuple[str, str, bytes, Optional[dict[str, Any]]]]" = queue.Queue(maxsize=10000)
        self._link: Optional[Link] = None
        self._where = redact_uri(uri)
        self.fetched = 0

    # -- called from other threads -------------------------------------------------------------------
    def publish_status(self, reply_to: str, correlation_id: Optional[str], payload: dict[str, Any]) -> bool:
        """Queue a status message for reply_to (best effort: False when the queue is full)."""
        props = {"delivery_mode": 2, "correlation_id": correlation_id, "content_type": "application/json"}
        return self._offer(("", reply_to, json.dumps(payload).encode(), props))

    def publish_registration(self, message: dict[str, Any]) -> bool:
        """Queue an extractor registration for the `extractors` fanout exchange."""
        return self._offer(("extractors", "", json.dumps(message).encode(), None))

    def _offer(self, item: tuple[str, str, bytes, Optional[dict[str, Any]]]) -> bool:
        try:
            self._outbox.put_nowait(item)
            return True
        except queue.Full:
            return False

    def stop(self) -> None:
        self._halt.set()

    # -- the connection thread -----------------------------------------------------------------------
    def run(self) -> None:
        delay = 1.0
        while not self._halt.is_set():
            try:
                self._connect()
                delay = 1.0
                self._loop()
            except Exception as exc:  # noqa: BLE001 - broker or disk trouble must not end the link
                if self._halt.is_set():
                    break
                log.warning("broker at %s: %s; reconnecting in %.0fs", self._where, _describe(exc), delay)
            finally:
                self._close()
            if self._halt.wait(delay):
                break
            delay = min(delay * 2, 15.0)

    def _connect(self) -> None:
        # plain channel: basic_get/ack, status messages and registrations (no confirms);
        # confirmed channel: error-queue copies and hand-backs, each waiting for its confirm
        link = Link(self.uri, f"clowder-relay {self.relay_id}", internals=self.internals)
        try:
            link.declare_queues((self.queue, self.error_queue), keep_existing=True)
        except BrokerError:
            link.close()
            raise
        self._link = link
        self.connected.set()
        log.info("connected to %s, taking messages from %s", self._where, self.queue)

    def _close(self) -> None:
        self.connected.clear()
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _loop(self) -> None:
        idle_until = 0.0
        while not self._halt.is_set():
            self._drain_outbox()
            if self.store.dead_waiting.is_set():
                self._publish_dead()
            now = time.monotonic()
            got = 0
            if self.intake and (now >= idle_until or self.store.demand.is_set()):
                self.store.demand.clear()
                got = self._fetch()
                # an empty queue is asked again soon, or at once when a lessee finds nothing
                idle_until = now + (0.0 if got > 0 else 0.02 if got < 0 else 0.25)
            self._require().pump(time_limit=0 if got > 0 else 0.02)

    def _require(self) -> Link:
        if self._link is None:
            raise BrokerError("not connected")
        return self._link

    def _fetch(self) -> int:
        """Fill the buffer from the queue; return how many were taken (-1: buffer full enough)."""
        ready = self.store.ready_count()
        room = self.buffer - ready
        if room <= 0 or (ready > 0 and room < max(1, self.buffer // 2)):
            return -1  # refill in batches: one fsync'd commit for many messages
        link = self._require()
        batch: list[Message] = []
        last_tag = 0
        for _ in range(min(room, BATCH)):
            taken = link.get(self.queue)
            if taken is None:
                break
            props = taken.properties
            batch.append(Message(body=taken.body, routing_key=taken.routing_key or self.queue,
                                 reply_to=props["reply_to"], correlation_id=props["correlation_id"],
                                 headers=props["headers"], content_type=props["content_type"]))
            last_tag = taken.tag
        if not batch:
            return 0
        try:
            self.store.add(batch)
        except Exception:
            # Not recorded: hand the batch back rather than acknowledge what we do not hold.
            link.nack(last_tag, multiple=True, requeue=True)
            raise
        link.ack(last_tag, multiple=True)
        self.fetched += len(batch)
        return len(batch)

    def _drain_outbox(self) -> None:
        link = self._require()
        batch: list[tuple[str, str, bytes, Optional[dict[str, Any]]]] = []
        for _ in range(500):
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "extractors":
                link.declare_exchange("extractors", "fanout")
            batch.append(item)
        if batch:
            link.publish_many(batch)

    def _publish_confirmed(self, queue_name: str, row: DeadRow, headers: dict[str, Any]) -> None:
        props = {"delivery_mode": 2, "reply_to": row.reply_to, "correlation_id": row.correlation_id,
                 "headers": headers, "content_type": row.content_type or "application/json"}
        self._require().publish_confirmed(queue_name, row.body, props)

    def _publish_dead(self) -> None:
        for row in self.store.dead_rows():
            headers = dead_letter_headers(row.headers, row.reason, row.traceback, row.attempts, row.routing_key,
                                          row.agent or self.relay_id)
            self._publish_confirmed(self.error_queue, row, headers)
            self.store.delete(row.row, only_state="dead")
            log.warning("message (row %d) dead-lettered to %s: %s", row.row, self.error_queue, row.reason[:300])

    def hand_back(self, timeout: float = 30.0) -> int:
        """At shutdown, from the connection thread's caller after stop(): return ready rows to RabbitMQ."""
        deadline = time.monotonic() + timeout
        done = 0
        try:
            if self._link is None or not self._link.is_open:
                self._close()
                self._connect()
            self._drain_outbox()
            self._publish_dead()
            while time.monotonic() < deadline:
                rows = self.store.ready_rows()
                if not rows:
                    break
                for row in rows:
                    headers = dict(row.headers)
                    headers[ATTEMPTS] = row.attempts
                    self._publish_confirmed(self.queue, row, headers)
                    self.store.delete(row.row, only_state="ready")
                    done += 1
        except _ERRORS as exc:
            log.warning("could not hand every waiting message back to %s (%s); they stay in the lease table "
                        "for the relay's next start", self.queue, _describe(exc))
        finally:
            self._close()
        return done


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"
