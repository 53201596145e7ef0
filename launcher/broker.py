"""The launcher's RabbitMQ client: the only launcher module that imports pika.

Every channel operation of the launcher is here, on pika's public API (one measured exception,
`Link(internals=True)`, below): queue depth and
consumers for `status` and scaling (queue_stats), `Link` (one connection, a plain and a confirmed
channel) for the relay's and the spool's long-running links, `QueueClient` (a Link) for `dispatch`,
and `announce` for `scale`'s registrations. translated() turns pika's exceptions into this module's
BrokerError family (messages redacted), so no other launcher module needs pika's names.

Depth and consumer count come from a passive ``queue.declare`` (works for any user allowed to
read the queue). Unacknowledged messages and the ack rate are not visible over AMQP; when a
management API URL is given they come from ``/api/queues/<vhost>/<queue>``, with the same user and
password as the AMQP URI (never put on a command line).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Optional, Sequence
from urllib.parse import quote, unquote, urlsplit

from hpc_common.joined_sends import join_sends
from hpc_common.retry_queues import retry_queue
from hpc_common.redact import redact_text, redact_uri
from hpc_common.reports import (EXCHANGE as REPORTS_EXCHANGE, MAX_REPORTS, WINDOW_QUEUE_ARGUMENTS, Activity,
                                summarize, window_queue)
from launcher.errors import BrokerError


class BrokerRefused(BrokerError):
    """The broker closed the channel over one operation (reply_code 404: no such queue, 406: mismatch)."""

    def __init__(self, text: str, reply_code: int) -> None:
        super().__init__(text)
        self.reply_code = reply_code


class BrokerUnroutable(BrokerError):
    """A confirmed publish was not taken (unroutable, or nacked by the broker)."""


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a block of broker calls, raising BrokerError (or a subclass) for pika's errors.

    Plain OSError passes through unchanged: callers already treat it as "try again".
    """
    import pika.exceptions

    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise BrokerRefused(f"{what}: broker refused: {exc.reply_code} {redact_text(exc.reply_text)}",
                            exc.reply_code) from None
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
        raise BrokerUnroutable(f"{what}: broker did not take the message ({exc.__class__.__name__})") from None
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"{what}: {redact_text(_describe(exc))}") from None


def connect(uri: str, connection_name: Optional[str] = None, socket_timeout: float = 10.0,
            heartbeat: Optional[int] = 60, blocked_timeout: Optional[float] = None) -> Any:
    """A blocking connection to uri (one attempt); BrokerError when it cannot be made.

    heartbeat applies only when the URI does not set one (None: the broker's proposal);
    blocked_timeout: give up on a connection the broker blocks (resource alarm) after that long.
    """
    import pika

    where = f"cannot connect to {redact_uri(uri)}"
    with translated(where):
        try:
            params = pika.URLParameters(uri)
        except ValueError as exc:
            raise BrokerError(f"bad broker URI {redact_uri(uri)}: {redact_text(str(exc))}") from None
        params.connection_attempts = 1
        params.socket_timeout = socket_timeout
        if blocked_timeout is not None:
            params.blocked_connection_timeout = blocked_timeout
        if params.heartbeat is None and heartbeat is not None:
            params.heartbeat = heartbeat
        if connection_name:
            params.client_properties = {"connection_name": connection_name}
        try:
            return pika.BlockingConnection(params)
        except OSError as exc:
            raise BrokerError(f"{where}: {redact_text(_describe(exc))}") from None


def closed(reason: str) -> BrokerError:
    """The error for a channel found closed between operations."""
    return BrokerError(f"channel closed by the broker: {reason}")


def _props(fields: Optional[dict[str, Any]]) -> Any:
    """pika's message properties from plain fields (delivery_mode, reply_to, correlation_id, headers...)."""
    import pika

    return pika.BasicProperties(**fields) if fields else None


class Link:
    """One connection for a long-running link (the relay's, the spool's): every channel operation they make.

    Two channels: ``plain`` for basic.get/ack/nack and best-effort publishes (status replies,
    registrations), ``confirmed`` (publisher confirms) for copies that must not be lost (error
    queue, hand-backs). Every method raises BrokerError (or a subclass) for pika's errors; the
    connection is not thread-safe, so one thread owns a Link.

    internals=True lets publish_many take pika's private path: BlockingChannel.basic_publish runs
    the I/O loop after every message and pika sends each of its three frames with its own send(),
    nine system calls (each waking the broker) for a file's three status replies through the
    relay. Queued on the channel BlockingChannel wraps, with the connection's buffers joined before
    each send, a batch leaves in one send. The relay's CPU per file with and without it:
    benchmarks/results/relay_throughput.md. Without those private attributes (another pika) the
    public path is taken.
    """

    def __init__(self, uri: str, connection_name: Optional[str] = None, heartbeat: Optional[int] = 60,
                 socket_timeout: float = 10.0, blocked_timeout: Optional[float] = None,
                 internals: bool = False) -> None:
        self._conn = connect(uri, connection_name, socket_timeout, heartbeat, blocked_timeout)
        self._queued: Any = None  # the plain channel's pika Channel when publishes are queued (internals)
        try:
            with translated("open channels"):
                self._plain = self._conn.channel()
                self._confirmed = self._conn.channel()
                self._confirmed.confirm_delivery()
        except BrokerError:
            self.close()
            raise
        self._exchanges: set[str] = set()
        if internals and join_sends(self._conn):
            self._queued = getattr(self._plain, "_impl", None)

    @property
    def is_open(self) -> bool:
        """The connection and both channels are open."""
        return bool(self._conn.is_open and self._plain.is_open and self._confirmed.is_open)

    def declare_queues(self, names: Sequence[str], keep_existing: bool = False) -> None:
        """Declare durable queues (no arguments), as pyclowder does for ``<queue>`` and ``error.<queue>``.

        keep_existing: a queue that exists with other arguments (406) is used as it is.
        """
        for name in names:
            try:
                with translated(f"declare {name}"):
                    self._plain.queue_declare(name, durable=True)
            except BrokerRefused as exc:
                if not keep_existing or exc.reply_code != 406:
                    raise
                with translated("reopen channel"):
                    self._plain = self._conn.channel()  # the refusal closed the channel it happened on

    def depth(self, queue: str) -> int:
        """Messages ready in queue (passive declare: BrokerRefused 404 when it does not exist)."""
        with translated(f"depth of {queue}"):
            return self._plain.queue_declare(queue, durable=True, passive=True).method.message_count

    def get(self, queue: str) -> Optional[Delivery]:
        """Take one message unacknowledged (basic.get), or None when the queue is empty."""
        with translated(f"basic.get on {queue}"):
            method, props, body = self._plain.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        return Delivery(method.delivery_tag, body, bool(method.redelivered), {
            "headers": dict(props.headers or {}), "content_type": props.content_type,
            "correlation_id": props.correlation_id, "reply_to": props.reply_to,
            "delivery_mode": props.delivery_mode}, routing_key=method.routing_key or "")

    def ack(self, tag: int, multiple: bool = False) -> None:
        """Acknowledge a message taken with get (with multiple: every one up to tag)."""
        with translated("ack"):
            self._plain.basic_ack(tag, multiple=multiple)

    def nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """Hand a message taken with get back (requeue) or drop it."""
        with translated("nack"):
            self._plain.basic_nack(tag, multiple=multiple, requeue=requeue)

    def declare_exchange(self, name: str, kind: str) -> None:
        """Declare a durable exchange once per link (the `extractors` fanout, as pyclowder declares it)."""
        if name in self._exchanges:
            return
        with translated(f"declare exchange {name}"):
            self._plain.exchange_declare(name, exchange_type=kind, durable=True)
        self._exchanges.add(name)

    def publish(self, exchange: str, key: str, body: bytes, props: Optional[dict[str, Any]] = None) -> None:
        """Best effort (no confirm): the message is written to the socket before this returns."""
        with translated(f"publish to {exchange or key}"):
            self._plain.basic_publish(exchange, key, body, _props(props))

    def publish_many(self, items: Iterable[tuple[str, str, bytes, Optional[dict[str, Any]]]]) -> None:
        """publish() each (exchange, routing key, body, properties) item; with internals, in one send."""
        with translated("publish"):
            queued = self._queued
            if queued is None or queued is not getattr(self._plain, "_impl", None):
                for exchange, key, body, props in items:
                    self._plain.basic_publish(exchange, key, body, _props(props))
                return
            for exchange, key, body, props in items:
                queued.basic_publish(exchange, key, body, _props(props))
            self._conn.process_data_events(0)  # written out before this returns, as publish() is

    def publish_confirmed(self, queue: str, body: bytes, props: dict[str, Any]) -> None:
        """Publish to queue (default exchange, mandatory) and wait for the broker's confirm.

        BrokerUnroutable when the queue does not exist or the broker nacks.
        """
        with translated(f"publish for {queue}"):
            self._confirmed.basic_publish("", queue, body, _props(props), mandatory=True)

    def pump(self, time_limit: float = 0) -> None:
        """Let the connection do its I/O (heartbeats, confirms) for up to time_limit seconds.

        A channel the broker closed without an error reaching us (consumer_timeout, FACTS.md) is
        raised here as BrokerError.
        """
        with translated("connection"):
            self._conn.process_data_events(time_limit=time_limit)
        if not self._plain.is_open or not self._confirmed.is_open:
            raise closed("consume or confirm channel")

    def close(self) -> None:
        """Close the connection; a broken one is only dropped."""
        try:
            with translated("close"):
                if self._conn.is_open:
                    self._conn.close()
        except (BrokerError, OSError):
            pass  # closing a broken connection: nothing left to release


def announce(uri: str, exchange: str, kind: str, messages: Sequence[bytes], connection_name: Optional[str] = None,
             timeout: float = 10.0) -> None:
    """Publish messages to a durable exchange it declares, on a short connection (registrations).

    Best effort as pyclowder's heartbeat is (no confirm); BrokerError when the broker cannot be reached.
    """
    conn = connect(uri, connection_name, socket_timeout=timeout)
    try:
        with translated(f"publish to {exchange}"):
            channel = conn.channel()
            channel.exchange_declare(exchange, exchange_type=kind, durable=True)
            for body in messages:
                channel.basic_publish(exchange, "", body)
    finally:
        try:
            with translated("close"):
                conn.close()
        except (BrokerError, OSError):
            pass


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """One look at a queue."""

    ready: int
    consumers: int
    unacked: Optional[int] = None  # None: unknown
    ack_rate: Optional[float] = None  # messages/s acknowledged recently, None: unknown
    activity: Optional[Activity] = None  # what the agents reported in the last window (hpc_common.reports)
    reports: tuple = ()  # those reports as read (dicts), for the ledger to keep
    per_queue: dict = dataclasses.field(default_factory=dict)  # several queues: {name: QueueStats}
    retrying: int = 0  # parked in the queue's retry queues (hpc_common.retry_queues), back after their delay


def queue_stats(uri: str, queue: str, management_url: Optional[str] = None,
                timeout: float = 10.0, retry_buckets: Sequence[int] = ()) -> QueueStats:
    """Depth and consumers of ``queue`` and what its retry queues of ``retry_buckets`` (seconds,
    hpc_common.retry_queues.buckets) hold; raises BrokerError (redacted) on any failure."""
    import pika.exceptions

    conn = connect(uri, "clowder-launcher status", socket_timeout=timeout, heartbeat=None, blocked_timeout=timeout)
    try:
        channel = conn.channel()
        ok = channel.queue_declare(queue=queue, passive=True)
        ready, consumers = ok.method.message_count, ok.method.consumer_count
        reports = _agent_reports(conn, queue)
        retrying = _parked_retries(conn, queue, retry_buckets)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise BrokerError(f"queue {queue!r} does not exist on {redact_uri(uri)}") from None
        raise BrokerError(f"broker refused queue {queue!r}: {exc.reply_text}") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"query of queue {queue!r} failed: {redact_text(_describe(exc))}") \
            from None
    finally:
        try:
            conn.close()
        except Exception:  # closing a broken connection: nothing left to do
            pass
    unacked = ack_rate = None
    if management_url:
        unacked, ack_rate = _management(uri, queue, management_url, timeout)
    return QueueStats(ready, consumers, unacked, ack_rate, summarize(reports), tuple(reports), retrying=retrying)


def _parked_retries(conn: Any, queue: str, buckets: Sequence[int]) -> int:
    """Messages waiting in queue's retry queues (a retry queue never declared, or expired unused, holds none)."""
    import pika.exceptions

    total, channel = 0, None
    for seconds in buckets:
        if channel is None or not channel.is_open:
            channel = conn.channel()  # a 404 closes the channel it happened on
        try:
            total += channel.queue_declare(queue=retry_queue(queue, seconds), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            channel = None
    return total


def queues_stats(uri: str, queues: list, management_url: Optional[str] = None,
                 timeout: float = 10.0, retry_buckets: Sequence[int] = ()) -> QueueStats:
    """Several queues (agents serving several plugins) as one: see combine_stats.

    Raises BrokerError when any one cannot be queried: a partial sum would undersize the array.
    """
    return combine_stats({name: queue_stats(uri, name, management_url, timeout, retry_buckets) for name in queues})


def combine_stats(each: dict) -> QueueStats:
    """The sum of several queues' stats (unknown when one is unknown), each kept in ``per_queue``."""
    stats = list(each.values())

    def total(values: list) -> Any:
        return None if any(v is None for v in values) else sum(values)

    reports = tuple(r for s in stats for r in s.reports)
    return QueueStats(sum(s.ready for s in stats), sum(s.consumers for s in stats),
                      total([s.unacked for s in stats]), total([s.ack_rate for s in stats]),
                      summarize(list(reports)), reports, per_queue=dict(each),
                      retrying=sum(s.retrying for s in stats))


def _agent_reports(conn, queue: str) -> list:
    """The agents' recent reports, left in their window queue.

    The reports are read without acknowledgement and requeued when the channel closes, so the
    queue keeps a sliding window (its messages expire after hpc_common.reports.WINDOW seconds).
    """
    import json

    channel = conn.channel()
    name = window_queue(queue)
    channel.exchange_declare(REPORTS_EXCHANGE, exchange_type="direct", durable=True)
    channel.queue_declare(name, durable=True, arguments=WINDOW_QUEUE_ARGUMENTS)
    channel.queue_bind(name, REPORTS_EXCHANGE, routing_key=queue)
    found = []
    for _ in range(MAX_REPORTS):
        method, _props, body = channel.basic_get(name, auto_ack=False)
        if method is None:
            break
        try:
            found.append(json.loads(body))
        except ValueError:
            continue
    channel.close()  # unacknowledged: every report goes back into the window
    return [r for r in found if isinstance(r, dict)]


def _management(uri: str, queue: str, url: str, timeout: float):
    import requests

    parts = urlsplit(uri)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    api = f"{url.rstrip('/')}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    try:
        resp = requests.get(api, auth=(unquote(parts.username or "guest"),
                                       unquote(parts.password or "guest")), timeout=timeout)
        resp.raise_for_status()
        data = resp.json()
    except (requests.RequestException, ValueError) as exc:
        raise BrokerError(f"management API {url}: {redact_text(str(exc))}") from None
    rate = (data.get("message_stats") or {}).get("ack_details", {}).get("rate")
    return int(data.get("messages_unacknowledged", 0)), (float(rate) if rate is not None else None)


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One message taken with basic.get (acknowledge it with QueueClient.ack)."""

    tag: int
    body: bytes
    redelivered: bool
    properties: dict  # headers, content_type, correlation_id, reply_to, delivery_mode
    routing_key: str = ""  # the key it was published with ("" when unknown)


class QueueClient(Link):
    """A short-lived AMQP session for ``dispatch``: get, ack, and publish with confirms.

    A message is held unacknowledged only for the moment between basic.get and the ledger
    commit, never for a job's lifetime, so the broker's consumer_timeout never applies.
    """

    def __init__(self, uri: str, timeout: float = 10.0) -> None:
        super().__init__(uri, "clowder-launcher dispatch", socket_timeout=timeout, blocked_timeout=timeout)

    def publish(self, queue: str, body: bytes, properties: dict, headers: dict,  # type: ignore[override]
                declare: bool = False) -> None:
        """Publish durably to ``queue`` (default exchange) and wait for the broker's confirm.

        ``declare``: create the queue (durable, no arguments) if missing, as pyclowder does for
        ``error.<queue>``; otherwise it must exist (an unroutable message raises BrokerUnroutable).
        """
        merged = dict(properties.get("headers") or {})
        merged.update(headers)
        if declare:
            self.declare_queues([queue])
        self.publish_confirmed(queue, body, {
            "headers": merged, "content_type": properties.get("content_type"),
            "correlation_id": properties.get("correlation_id"), "reply_to": properties.get("reply_to"),
            "delivery_mode": 2})
