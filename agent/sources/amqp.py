"""RabbitMQ work source: the only agent module that imports pika.

pika's exceptions stop here: what leaves is SourceLost/SourceUnavailable (agent.sources.base)
or BrokerError (the status channel a message-file job may open, see open_status_channel).

One BlockingConnection, used only from the agent's main thread (pika is not thread-safe);
other threads only wake it through add_callback_threadsafe. Two channels:
  - the consume channel: prefetch-limited deliveries, their acks/nacks, and status replies;
  - the confirm channel: publishes that must be durable before a delivery is settled (retry
    copies, error-queue copies, journal recovery), each waiting for the broker's confirm.
Long work is secured through the journal (agent.journal explains why and how).
Retries wait in retry.<queue>.<seconds> queues, not in the agent (hpc_common.retry_queues).
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

from hpc_common import reports
from hpc_common.messages import RECOVERED, dead_letter_headers, retry_headers
from hpc_common.redact import redact_uri

from ..errors import BrokerError
from ..journal import Journal, JournalEntry, recover
from ..messages import Delivery
from hpc_common import retry_queues
from .base import OnDelivery, SourceLost, SourceUnavailable, WorkSource
from .fd_wait import call_readable

log = logging.getLogger("agent.amqp")
logging.getLogger("pika").setLevel(logging.WARNING)  # its INFO lines are per connection event
_PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)


def _send_later(channel: Any) -> Any:
    """The channel under a BlockingChannel: its publishes and acks are queued, not flushed.

    BlockingChannel.basic_ack/basic_publish each run the I/O loop until their frame is on the
    wire (a poll and a send per call, three times per file). Queued on the underlying channel,
    every status and ack of one turn of the agent's loop leaves in one send when poll() next runs
    the connection, in the order they were made; errors surface there, or here when the channel
    is already closed.
    """
    return channel._impl  # pika 1.x: the asynchronous Channel a BlockingChannel wraps


def _coalesce_sends(conn: Any) -> None:
    """Make the connection send everything it has buffered in one socket send.

    pika buffers each frame apart (a publish is three: method, header, body) and sends each with
    its own send(): thirteen system calls per file for four statuses and an ack, each one also
    waking the broker. Joining the buffers first keeps the bytes and their order and leaves one
    send per turn of the loop. Without the private attributes (another pika) nothing changes.
    """
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    produce = getattr(transport, "_produce", None)
    if buffers is None or produce is None:
        return

    def produce_joined() -> None:
        if len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)
        produce()

    transport._produce = produce_joined


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


def _nothing() -> None:
    """A timer callback whose only effect is to end process_data_events."""


def _ioloop(conn: Any) -> Any:
    """The event loop under a BlockingConnection (pika 1.x: its SelectConnection's IOLoop), or None."""
    loop = getattr(getattr(conn, "_impl", None), "ioloop", None)
    return loop if loop is not None and hasattr(loop, "add_handler") else None


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError) or \
            isinstance(exc, pika.exceptions.AuthenticationError):
        return "the broker refused the credentials"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return "the broker denied access to the virtual host"
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


class AmqpSource(WorkSource):
    """Consume one queue; settle deliveries exactly as the agent decides."""

    delayed_retry = True
    watches_fds = True

    def __init__(self, uri: str, queue: str, prefetch: int, journal: Journal, agent_id: str,
                 connect_timeout: float = 60.0, reconnect_timeout: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, retry_buckets: Sequence[int] = (),
                 internals: bool = True) -> None:
        """internals: take pika's private fast paths (see _send_later, _coalesce_sends, _StatusFrames and
        watch); False keeps to pika's public API: acks and statuses through the BlockingChannel, and
        slots read their extractors' pipes on threads that wake this connection thread-safely."""
        self.uri = uri
        self.internals = internals
        self.watches_fds = internals
        self.queue = queue
        self.error_queue = "error." + queue
        self.prefetch = prefetch
        self.journal = journal
        self.agent_id = agent_id
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self._clock = clock
        self._conn: Optional[pika.BlockingConnection] = None
        self._ch: Any = None        # consume channel
        self._pub: Any = None       # confirm channel
        self._consumer_tag: Optional[str] = None
        self._on_delivery: Optional[OnDelivery] = None
        self._on_lost: Optional[Callable[[], None]] = None
        self._intake = True
        self._lost_since: Optional[float] = None
        self._next_attempt = 0.0
        self._backoff = 1.0
        self.generation = 0
        self._where = redact_uri(uri)
        self._decl: Any = None      # channel for retry-queue declarations (a 406 closes only it)
        self._retries_due: list[float] = []
        self.retry_buckets = tuple(retry_buckets)  # delays (s) of the retry queues other agents may fill
        self._status_props: dict[Optional[str], pika.BasicProperties] = {}  # by correlation id
        self._status_frames = _StatusFrames()
        self._watched: dict[int, Callable[[], None]] = {}  # fd -> callback (the extractors' pipes)
        self._loop_watches = False   # True while the connection's event loop has the watched fds
        self._tick_due: Optional[float] = None  # when the standing poll timer fires (see _pump)

    # -- connection lifecycle --------------------------------------------------------------------
    def start(self, on_delivery: OnDelivery, on_lost: Callable[[], None]) -> None:
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        deadline = self._clock() + self.connect_timeout
        delay = 1.0
        while True:
            try:
                self._connect()
                return
            except _PIKA_ERRORS as exc:
                reason = _describe(exc)
                if isinstance(exc, (pika.exceptions.ProbableAuthenticationError,
                                    pika.exceptions.AuthenticationError,
                                    pika.exceptions.ProbableAccessDeniedError)) or self._clock() >= deadline:
                    raise SourceUnavailable(f"cannot use the broker at {self._where}: {reason}") from None
                log.warning("broker at %s not reachable (%s); trying again in %.0fs", self._where, reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _connect(self) -> None:
        params = pika.URLParameters(self.uri)
        params.connection_attempts = 1
        params.socket_timeout = 10
        params.blocked_connection_timeout = 300
        if params.heartbeat is None:
            params.heartbeat = 60
        params.client_properties = {"connection_name": f"clowder-hpc-agent {self.agent_id}"}
        conn = pika.BlockingConnection(params)
        if self.internals:
            _coalesce_sends(conn)
        try:
            ch = conn.channel()
            self._declare(conn, ch)
            ch = conn.channel() if not ch.is_open else ch
            ch.basic_qos(prefetch_count=self.prefetch)
            pub = conn.channel()
            pub.confirm_delivery()
        except BaseException:
            try:
                conn.close()
            except _PIKA_ERRORS:
                pass
            raise
        self._conn, self._ch, self._pub, self._decl = conn, ch, pub, None
        self._loop_watches = self.internals and _ioloop(conn) is not None
        self._tick_due = None  # the old connection's timer died with it
        for fd, callback in self._watched.items():
            self._add_handler(fd, callback)
        self._status_frames.forget()
        self.generation += 1
        self._consumer_tag = None
        if self._intake:
            self._consumer_tag = ch.basic_consume(self.queue, self._on_message, auto_ack=False)
        self._lost_since = None
        self._backoff = 1.0
        log.info("connected to %s, consuming %s (prefetch %d)", self._where, self.queue, self.prefetch)

    def _declare(self, conn: pika.BlockingConnection, ch: Any) -> None:
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
        delivery = Delivery(
            body=body, routing_key=method.routing_key or self.queue, reply_to=props.reply_to,
            correlation_id=props.correlation_id, headers=dict(props.headers or {}),
            content_type=props.content_type, redelivered=bool(method.redelivered),
            token=(self.generation, method.delivery_tag), received_at=self._clock())
        assert self._on_delivery is not None
        self._on_delivery(delivery)

    def _lose(self, exc: Optional[BaseException], what: str) -> None:
        if self._lost_since is None:
            self._lost_since = self._clock()
            self._next_attempt = self._clock() + 1.0
            reason = _describe(exc) if exc else "closed"
            closing = getattr(self._ch, "_closing_reason", None) if self._ch is not None else None
            if closing is not None and "PRECONDITION_FAILED" in str(closing):
                log.error("the broker closed the channel: %s. RabbitMQ's consumer_timeout is shorter than "
                          "journal_after; lower AGENT_JOURNAL_AFTER below it.", closing)
            log.warning("lost the broker during %s (%s); reconnecting", what, reason)
            try:
                if self._conn is not None and self._conn.is_open:
                    self._conn.close()
            except _PIKA_ERRORS:
                pass
            self._conn = self._ch = self._pub = None
            if self._on_lost:
                self._on_lost()
        raise SourceLost(what)

    @property
    def connected(self) -> bool:
        return self._lost_since is None and self._conn is not None

    def poll(self, timeout: float) -> None:
        if self._lost_since is not None:
            self._try_reconnect(timeout)
            return
        if self._watched and not self._loop_watches:
            # a pika without the event loop we watch pipes in: look at them between short polls
            self._wait_watched(0.0)
            timeout = min(timeout, 0.005)
        try:
            self._pump(timeout)
            if not self._ch.is_open or not self._pub.is_open:
                self._lose(None, "polling")
        except SourceLost:
            pass
        except _PIKA_ERRORS as exc:
            try:
                self._lose(exc, "polling")
            except SourceLost:
                pass

    def _pump(self, timeout: float) -> None:
        """Run the connection's I/O until something happened or timeout seconds passed.

        pika's time_limit arms and cancels a timer on every call (twice per file); one standing
        tick timer, re-armed only when it fired, bounds the wait the same way at a few a second.
        """
        conn = self._conn
        if timeout <= 0:
            conn.process_data_events(time_limit=0)
            return
        due = self._clock() + timeout
        if self._tick_due is None or self._tick_due > due + 0.05:
            self._tick_due = due
            generation = self.generation
            conn.call_later(timeout, lambda: self._ticked(generation))
        conn.process_data_events(time_limit=None)

    def _ticked(self, generation: int) -> None:
        if generation == self.generation:
            self._tick_due = None

    def _try_reconnect(self, timeout: float) -> None:
        now = self._clock()
        assert self._lost_since is not None
        if now - self._lost_since > self.reconnect_timeout:
            raise SourceUnavailable(f"broker at {self._where} unreachable for {self.reconnect_timeout:.0f}s")
        if now < self._next_attempt:
            self._wait_watched(min(timeout, self._next_attempt - now))
            return
        lost_for = now - self._lost_since
        try:
            self._connect()
            log.info("reconnected after %.1fs", lost_for)
        except _PIKA_ERRORS as exc:
            self._backoff = min(self._backoff * 2, 15.0)
            self._next_attempt = self._clock() + self._backoff
            log.warning("reconnect failed (%s); next try in %.0fs", _describe(exc), self._backoff)

    def wake(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)
            except _PIKA_ERRORS:
                pass

    # -- the extractors' pipes, read in this connection's event loop (agent.slots, loop mode) --------
    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """on_readable runs inside poll(), which returns after it: what it posts quietly runs next."""
        self._watched[fd] = on_readable
        if self.connected:
            self._add_handler(fd, on_readable)

    def unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is None or not self.connected or not self._loop_watches:
            return
        try:
            _ioloop(self._conn).remove_handler(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _add_handler(self, fd: int, callback: Callable[[], None]) -> None:
        conn = self._conn
        loop = _ioloop(conn) if self._loop_watches else None
        if loop is None:
            return

        def on_event(_fd: int, _events: int) -> None:
            callback()
            # End this poll after the loop's turn (a zero timer, not a thread-safe wake-up: no
            # pipe write and read), so what the callback posted runs at the runner's next step.
            conn.call_later(0, _nothing)

        loop.add_handler(fd, on_event, loop.READ)

    def _wait_watched(self, seconds: float) -> None:
        """Sleep up to seconds, calling back for watched fds that become readable (no connection)."""
        if not self._watched:
            time.sleep(seconds)
            return
        call_readable(self._watched, seconds)

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
        """The delivery tag, or None when the delivery belongs to a lost connection."""
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

    def _publish_durable(self, queue: str, body: bytes, props: pika.BasicProperties) -> None:
        if not self.connected:
            raise SourceLost("not connected")
        try:
            self._pub.basic_publish("", queue, body, props, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise SourceLost(f"broker did not take the message for {queue}: {exc.__class__.__name__}") from None
        except _PIKA_ERRORS as exc:
            self._lose(exc, "publish")

    def _props(self, delivery: Delivery, headers: dict[str, Any]) -> pika.BasicProperties:
        return pika.BasicProperties(delivery_mode=2, reply_to=delivery.reply_to,
                                    correlation_id=delivery.correlation_id, headers=headers,
                                    content_type=delivery.content_type or "application/json")

    def _forget_secured(self, delivery: Delivery) -> None:
        self.journal.remove(delivery.token)

    def complete(self, delivery: Delivery) -> None:
        if delivery.secured:
            self._forget_secured(delivery)
        else:
            self._ack(delivery)

    def release(self, delivery: Delivery) -> None:
        if delivery.secured:
            self._publish_durable(self.queue, delivery.body, self._props(delivery, dict(delivery.headers)))
            self._forget_secured(delivery)
            return
        tag = self._tag(delivery)
        if tag is None:
            return  # its channel is gone, so the broker has already requeued it
        try:
            self._ch.basic_nack(tag, requeue=True)
        except _PIKA_ERRORS as exc:
            self._lose(exc, "release")

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        headers = retry_headers(delivery.headers, attempts, reason)
        if not delivery.secured and self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        self._publish_durable(self.queue, delivery.body, self._props(delivery, headers))
        self.complete(delivery)

    def retry_later(self, delivery: Delivery, attempts: int, reason: str, delay: float) -> None:
        """Publish the retry copy to its delay bucket's retry queue (confirmed), then settle the original."""
        headers = retry_headers(delivery.headers, attempts, reason)
        if not delivery.secured and self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        seconds = retry_queues.bucket(delay)
        name = self._retry_queue(seconds)
        self._publish_durable(name, delivery.body, self._props(delivery, headers))
        self.complete(delivery)
        self._retries_due.append(self._clock() + seconds)

    def _retry_queue(self, seconds: int) -> str:
        """Declare the retry queue for this delay (before every publish: see hpc_common.retry_queues) and return its name."""
        name = retry_queues.retry_queue(self.queue, seconds)
        if not self.connected:
            raise SourceLost("not connected")
        try:
            if self._decl is None or not self._decl.is_open:
                self._decl = self._conn.channel()  # a refused declaration closes only this channel
            try:
                self._decl.queue_declare(name, durable=True,
                                         arguments=retry_queues.retry_queue_arguments(self.queue, seconds))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                # Declared before with other arguments (a site policy): use it as it is.
                log.warning("retry queue %s exists with other arguments; using it as is", name)
                self._decl = self._conn.channel()
                self._decl.queue_declare(name, passive=True)
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
                if self._decl is None or not self._decl.is_open:
                    self._decl = self._conn.channel()
                ok = self._decl.queue_declare(retry_queues.retry_queue(self.queue, seconds), passive=True)
                out[seconds] = ok.method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                out[seconds] = 0  # 404: never declared, or expired unused (so empty)
                self._decl = None
            except _PIKA_ERRORS as exc:
                self._lose(exc, "asking the depth of a retry queue")
                break
        return out

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        headers = dead_letter_headers(delivery.headers, reason, traceback, attempts, delivery.routing_key,
                                      self.agent_id)
        if not delivery.secured and self._tag(delivery) is None:
            raise SourceLost("delivery from a lost connection")
        self._publish_durable(self.error_queue, delivery.body, self._props(delivery, headers))
        self.complete(delivery)

    def secure(self, delivery: Delivery) -> None:
        if delivery.secured:
            return
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
        delivery.token = path
        delivery.secured = True

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
            self._publish_durable(entry.queue, entry.body, props)

        try:
            count = recover(self.journal.root, self.journal.dir, republish)
        except SourceLost:
            return 0
        if count:
            log.warning("put back %d message(s) journaled by agents that died", count)
        return count

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except _PIKA_ERRORS:
                pass


def new_agent_id(identity: str = "") -> str:
    """A unique, human-readable id for this agent process (host, scheduler task, pid)."""
    import os
    import socket
    host = socket.gethostname().split(".")[0]
    suffix = uuid.uuid4().hex[:6]
    return "-".join(p for p in (host, identity, str(os.getpid()), suffix) if p)
