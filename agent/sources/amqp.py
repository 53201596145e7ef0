"""RabbitMQ work source: one queue's consumer on the agent's connection (agent.sources.amqp_connection).

pika is imported here and in amqp_connection only; its exceptions stop here: what leaves is
SourceLost/SourceUnavailable (agent.sources.base) or BrokerError (the status channel a
message-file job may open, see open_status_channel).

Each queue has its own channel on the shared connection: prefetch-limited deliveries, their
acks/nacks, status replies, registration and reports. Publishes that must be durable before a
delivery is settled (retry copies, error-queue copies, journal recovery) go through the
connection's confirm channel. Long work is secured through the journal (agent.journal explains
why and how). Retries wait in retry.<queue>.<seconds> queues, not in the agent
(hpc_common.retry_queues). The consumer only takes and settles: the connection runs the loop,
reconnects, and attaches the consumer again on a fresh channel.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import pika
import pika.exceptions
import pika.frame
import pika.spec

from hpc_common import reports, retry_queues
from hpc_common.messages import RECOVERED, dead_letter_headers, retry_headers
from hpc_common.redact import redact_uri

from ..errors import BrokerError
from ..journal import Journal, JournalEntry, recover
from ..messages import Delivery
from .amqp_connection import PIKA_ERRORS as _PIKA_ERRORS
from .amqp_connection import AmqpConnection
from .base import SourceLost, WorkSource

log = logging.getLogger("agent.amqp")

def _send_later(channel: Any) -> Any:
    """The channel under a BlockingChannel: its publishes and acks are queued, not flushed.

    BlockingChannel.basic_ack/basic_publish each run the I/O loop until their frame is on the
    wire (a poll and a send per call, three times per file). Queued on the underlying channel,
    every status and ack of one turn of the agent's loop leaves in one send when poll() next runs
    the connection, in the order they were made; errors surface there, or here when the channel
    is already closed.
    """
    return channel._impl  # pika 1.x: the asynchronous Channel a BlockingChannel wraps


class _StatusFrames:
    """Status replies marshalled once per shape: a few of them per file, all alike.

    pika marshals a publish's method frame (exchange, routing key) and header frame (properties,
    body size) in Python on every call, most of a status reply's cost. Here both come from
    pika's own frame classes and are kept by (reply_to) and (correlation id, body size); only the
    body frame is new each time. The frames are queued on the channel's connection like any
    publish (see _send_later). Large bodies take pika's ordinary path.
    """

    LIMIT = 16 * 1024  # one body frame (and never more than the connection's frame_max allows)

    def __init__(self) -> None:
        self._methods: dict[str, bytes] = {}
        self._headers: dict[tuple[Optional[str], int], bytes] = {}

    def publish(self, channel: Any, reply_to: str, correlation_id: Optional[str], body: bytes,
                props: pika.BasicProperties) -> None:
        impl = _send_later(channel)
        if len(body) > min(self.LIMIT, impl.connection._body_max_length) or impl.connection.is_closed:
            impl.basic_publish("", reply_to, body, props)
            return
        impl._raise_if_not_open()
        number = impl.channel_number
        method = self._methods.get(reply_to)
        if method is None:
            if len(self._methods) >= 256:
                self._methods.clear()
            method = self._methods[reply_to] = pika.frame.Method(
                number, pika.spec.Basic.Publish(exchange="", routing_key=reply_to)).marshal()
        key = (correlation_id, len(body))
        header = self._headers.get(key)
        if header is None:
            if len(self._headers) >= 1024:
                self._headers.clear()
            header = self._headers[key] = pika.frame.Header(number, len(body), props).marshal()
        # one buffer for the three frames: one write into the connection's queue, not three
        impl.connection._output_marshaled_frames([method + header + pika.frame.Body(number, body).marshal()])

    def forget(self) -> None:
        """Frames name a channel number: drop them with their connection."""
        self._methods.clear()
        self._headers.clear()


def open_status_channel(uri: str) -> tuple[Any, Any]:
    """A connection and channel for status replies only (one attempt, 5 s); BrokerError otherwise."""
    try:
        params = pika.URLParameters(uri)
        params.connection_attempts, params.socket_timeout = 1, 5
        conn = pika.BlockingConnection(params)
        return conn, conn.channel()
    except (*_PIKA_ERRORS, ValueError) as exc:
        raise BrokerError(f"no broker at {redact_uri(uri)}: {exc.__class__.__name__}") from None


def publish_reply(channel: Any, reply_to: str, correlation_id: Optional[str], payload: dict[str, Any]) -> None:
    """Publish a status reply as pyclowder does (persistent JSON); BrokerError when it fails."""
    try:
        channel.basic_publish("", reply_to, json.dumps(payload),
                              pika.BasicProperties(delivery_mode=2, correlation_id=correlation_id,
                                                   content_type="application/json"))
    except _PIKA_ERRORS as exc:
        raise BrokerError(f"status reply failed: {exc.__class__.__name__}") from None


def pump(conn: Any, timeout: float) -> None:
    """Let a status connection do its I/O for up to timeout seconds; BrokerError when it broke."""
    try:
        conn.process_data_events(time_limit=timeout)
    except _PIKA_ERRORS as exc:
        raise BrokerError(f"status connection lost: {exc.__class__.__name__}") from None


class AmqpConsumer(WorkSource):
    """Consume one queue on the agent's connection; settle deliveries exactly as the agent decides."""

    delayed_retry = True

    def __init__(self, connection: AmqpConnection, queue: str, prefetch: int, journal: Journal,
                 clock: Callable[[], float] = time.monotonic, retry_buckets: Sequence[int] = ()) -> None:
        self.connection = connection
        self.queue = queue
        self.error_queue = "error." + queue
        self.prefetch = prefetch
        self.journal = journal
        self.agent_id = connection.agent_id
        self.internals = connection.internals
        self._clock = clock
        self._ch: Any = None        # this queue's channel (None while the connection is lost)
        self._decl: Any = None      # channel for retry-queue declarations (a 406 closes only it)
        self._consumer_tag: Optional[str] = None
        self._received: list[Delivery] = []
        self._on_lost: Optional[Callable[[], None]] = None
        self._intake = True
        self.generation = 0
        self._retries_due: list[float] = []
        self.retry_buckets = tuple(retry_buckets)  # delays (s) of the retry queues other agents may fill
        self._status_props: dict[Optional[str], pika.BasicProperties] = {}  # by correlation id
        self._status_frames = _StatusFrames()

    # -- the connection's side (agent.sources.amqp_connection.Attached) ----------------------------
    def open(self, wake: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Ride on the connection (connecting it first, within connect_timeout) and consume."""
        self._on_lost = on_lost
        self.connection.add(self)
        self.connection.open()

    def attach(self, conn: Any) -> None:
        """Declare the queue and its error queue on a fresh channel of conn and consume it."""
        ch = conn.channel()
        self._declare(conn, ch)
        ch = conn.channel() if not ch.is_open else ch
        ch.basic_qos(prefetch_count=self.prefetch)
        self._ch, self._decl = ch, None
        self._status_frames.forget()
        self.generation += 1  # deliveries of an earlier channel can no longer be settled
        self._consumer_tag = ch.basic_consume(self.queue, self._on_message, auto_ack=False) if self._intake else None
        log.info("connected to %s, consuming %s (prefetch %d)", redact_uri(self.connection.uri), self.queue,
                 self.prefetch)

    def detach(self) -> None:
        """The connection is gone: so are this queue's waiting deliveries (back in the broker)."""
        self._ch = self._decl = None
        self._received.clear()
        if self._on_lost:
            self._on_lost()

    def channel_open(self) -> bool:
        ch = self._ch
        if ch is None or ch.is_open:
            return True
        reason = getattr(ch, "_closing_reason", None)
        if reason is not None and "PRECONDITION_FAILED" in str(reason):
            log.error("the broker closed the channel of %s: %s. RabbitMQ's consumer_timeout is shorter than "
                      "journal_after; lower AGENT_JOURNAL_AFTER below it.", self.queue, reason)
        return False

    def _declare(self, conn: Any, ch: Any) -> None:
        """Declare queue and error queue as pyclowder does; accept a site's existing queue as it is."""
        for name in (self.queue, self.error_queue):
            try:
                ch.queue_declare(name, durable=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                # Exists with other arguments (a quorum queue, a dead-letter policy): use it as is.
                ch = conn.channel()
                ch.queue_declare(name, passive=True)

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self._received.append(Delivery(
            body=body, routing_key=method.routing_key or self.queue, reply_to=props.reply_to,
            correlation_id=props.correlation_id, headers=dict(props.headers or {}),
            content_type=props.content_type, redelivered=bool(method.redelivered),
            token=(self.generation, method.delivery_tag), received_at=self._clock()))

    # -- taking ----------------------------------------------------------------------------------
    def take(self) -> list[Delivery]:
        if not self._received:
            return []
        got, self._received = self._received, []
        return got

    @property
    def connected(self) -> bool:
        return self.connection.connected and self._ch is not None

    def _lose(self, exc: Optional[BaseException], what: str) -> None:
        self.connection.lose(exc, what)

    def stop_intake(self) -> None:
        self._intake = False
        if self._consumer_tag and self.connected:
            try:
                self._ch.basic_cancel(self._consumer_tag)
            except _PIKA_ERRORS as exc:
                self._lose(exc, "cancel")
        self._consumer_tag = None

    # -- settling --------------------------------------------------------------------------------
    def _tag(self, delivery: Delivery) -> Optional[int]:
        """The delivery tag, or None when the delivery belongs to a lost channel."""
        generation, tag = delivery.token if isinstance(delivery.token, tuple) else (None, None)
        if generation != self.generation or not self.connected:
            return None
        return tag

    def _ack(self, delivery: Delivery) -> None:
        tag = self._tag(delivery)
        if tag is None:
            raise SourceLost("delivery from a lost connection")
        try:
            (_send_later(self._ch) if self.internals else self._ch).basic_ack(tag)
        except _PIKA_ERRORS as exc:
            self._lose(exc, "ack")

    def _props(self, delivery: Delivery, headers: dict[str, Any]) -> pika.BasicProperties:
        return pika.BasicProperties(delivery_mode=2, reply_to=delivery.reply_to,
                                    correlation_id=delivery.correlation_id, headers=headers,
                                    content_type=delivery.content_type or "application/json")

    def _republish(self, queue: str, delivery: Delivery, headers: dict[str, Any]) -> None:
        """A durable copy of the delivery to queue (confirmed), then the original settled."""
        if not delivery.secured and self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        self.connection.publish_durable(queue, delivery.body, self._props(delivery, headers))
        self.complete(delivery)

    def complete(self, delivery: Delivery) -> None:
        if delivery.secured:
            self.journal.remove(delivery.token)
        else:
            self._ack(delivery)

    def release(self, delivery: Delivery) -> None:
        if delivery.secured:
            self._republish(self.queue, delivery, dict(delivery.headers))
            return
        tag = self._tag(delivery)
        if tag is None:
            return  # its channel is gone, so the broker has already requeued it
        try:
            self._ch.basic_nack(tag, requeue=True)
        except _PIKA_ERRORS as exc:
            self._lose(exc, "release")

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        self._republish(self.queue, delivery, retry_headers(delivery.headers, attempts, reason))

    def retry_later(self, delivery: Delivery, attempts: int, reason: str, delay: float) -> None:
        """Publish the retry copy to its delay bucket's retry queue (confirmed), then settle the original."""
        if not delivery.secured and self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        seconds = retry_queues.bucket(delay)
        self._republish(self._retry_queue(seconds), delivery, retry_headers(delivery.headers, attempts, reason))
        self._retries_due.append(self._clock() + seconds)

    def _declaring_channel(self) -> Any:
        if self._decl is None or not self._decl.is_open:
            self._decl = self.connection.conn.channel()  # a refused declaration closes only this channel
        return self._decl

    def _retry_queue(self, seconds: int) -> str:
        """Declare the retry queue for this delay (before every publish: see hpc_common.retry_queues) and return its name."""
        name = retry_queues.retry_queue(self.queue, seconds)
        if not self.connected:
            raise SourceLost("not connected")
        try:
            try:
                self._declaring_channel().queue_declare(
                    name, durable=True, arguments=retry_queues.retry_queue_arguments(self.queue, seconds))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                # Declared before with other arguments (a site policy): use it as it is.
                log.warning("retry queue %s exists with other arguments; using it as is", name)
                self._decl = None
                self._declaring_channel().queue_declare(name, passive=True)
        except _PIKA_ERRORS as exc:
            self._lose(exc, "declaring a retry queue")
        return name

    def work_soon(self) -> Optional[float]:
        """Retries parked in retry queues come back at their due time: stay for them. This agent's
        own are timed; those of agents that stopped (kill -9 during a backoff) are found by asking
        the depth of each retry queue these settings can fill (at most one bucket's delay away)."""
        now = self._clock()
        self._retries_due = [t for t in self._retries_due if t > now - 2.0]
        if self._retries_due:
            return max(0.0, min(self._retries_due) - now)
        waiting = [s for s, depth in self.parked_retries().items() if depth]
        return float(min(waiting)) if waiting else None

    def parked_retries(self) -> dict[int, int]:
        """Messages waiting in this queue's retry queues, by delay bucket (a bucket not declared: 0)."""
        out: dict[int, int] = {}
        if not self.connected:
            return out
        for seconds in self.retry_buckets:
            try:
                ok = self._declaring_channel().queue_declare(retry_queues.retry_queue(self.queue, seconds),
                                                             passive=True)
                out[seconds] = ok.method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                out[seconds] = 0  # 404: never declared, or expired unused (so empty)
                self._decl = None
            except _PIKA_ERRORS as exc:
                try:
                    self._lose(exc, "asking the depth of a retry queue")
                except SourceLost:
                    pass
                break
        return out

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        self._republish(self.error_queue, delivery, dead_letter_headers(
            delivery.headers, reason, traceback, attempts, delivery.routing_key, self.agent_id))

    def secure(self, delivery: Delivery) -> Any:
        """Journal the message, then ack it: from now on it is settled through its journal entry."""
        if delivery.secured:
            return delivery.token
        if self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        entry = JournalEntry(queue=self.queue, body=delivery.body, routing_key=delivery.routing_key,
                             reply_to=delivery.reply_to, correlation_id=delivery.correlation_id,
                             headers=dict(delivery.headers), content_type=delivery.content_type)
        path = self.journal.add(entry)
        try:
            self._ack(delivery)
        except SourceLost:
            self.journal.remove(path)  # the broker requeues it: the journal must not also hold it
            raise
        return path

    # -- replies and registration ---------------------------------------------------------------
    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        if not delivery.reply_to or not self.connected:
            return
        props = self._status_props.get(delivery.correlation_id)
        if props is None:
            if len(self._status_props) >= 256:
                self._status_props.clear()
            props = self._status_props[delivery.correlation_id] = pika.BasicProperties(
                delivery_mode=2, correlation_id=delivery.correlation_id, content_type="application/json")
        body = json.dumps(payload).encode("utf-8")
        try:
            if self.internals:
                self._status_frames.publish(self._ch, delivery.reply_to, delivery.correlation_id, body, props)
            else:
                self._ch.basic_publish("", delivery.reply_to, body, props)
        except _PIKA_ERRORS as exc:
            try:
                self._lose(exc, "status")
            except SourceLost:
                pass

    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        message = {"id": self.agent_id, "queue": self.queue, "owner": owner or "",
                   "extractor_info": extractor_info}
        self._announce("extractors", "fanout", "", message)

    def publish_report(self, report: dict[str, Any]) -> None:
        # The launcher's window queue is declared here too: reports sent before the launcher first
        # looked (e.g. after a plain `launcher submit`) would otherwise be unroutable and lost.
        self._announce(reports.EXCHANGE, "direct", self.queue, report, bind=reports.window_queue(self.queue))

    def _announce(self, exchange: str, kind: str, routing_key: str, message: dict[str, Any],
                  bind: Optional[str] = None) -> None:
        """Best-effort publish to an exchange declared on the way (registration, reports)."""
        if not self.connected:
            return
        try:
            self._ch.exchange_declare(exchange, exchange_type=kind, durable=True)
            if bind:
                self._ch.queue_declare(bind, durable=True, arguments=reports.WINDOW_QUEUE_ARGUMENTS)
                self._ch.queue_bind(bind, exchange, routing_key=routing_key)
            self._ch.basic_publish(exchange, routing_key, json.dumps(message))
        except _PIKA_ERRORS as exc:
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
                log.warning("publishing to exchange %r refused: %s", exchange, exc)
            try:
                self._lose(exc, f"publishing to {exchange}")
            except SourceLost:
                pass

    def recover_orphans(self) -> int:
        if not self.connected:
            return 0

        def republish(entry: JournalEntry) -> None:
            headers = dict(entry.headers)
            headers[RECOVERED] = int(headers.get(RECOVERED, 0)) + 1
            props = pika.BasicProperties(delivery_mode=2, reply_to=entry.reply_to,
                                         correlation_id=entry.correlation_id, headers=headers,
                                         content_type=entry.content_type or "application/json")
            self.connection.publish_durable(entry.queue, entry.body, props)

        try:
            count = recover(self.journal.root, self.journal.dir, republish)
        except SourceLost:
            return 0
        if count:
            log.warning("put back %d message(s) journaled by agents that died", count)
        return count

    def close(self) -> None:
        """Nothing of its own to close: the agent closes the connection (its loop) last."""
        self._intake = False


def new_agent_id(identity: str = "") -> str:
    """A unique, human-readable id for this agent process (host, scheduler task, pid)."""
    import os
    import socket
    host = socket.gethostname().split(".")[0]
    suffix = uuid.uuid4().hex[:6]
    return "-".join(p for p in (host, identity, str(os.getpid()), suffix) if p)
