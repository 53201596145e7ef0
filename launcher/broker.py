"""What the launcher needs from RabbitMQ: queue depth and consumers. The only module using pika.

Depth and consumer count come from a passive ``queue.declare`` (works for any user allowed to
read the queue). Unacknowledged messages and the ack rate are not visible over AMQP; when a
management API URL is given they come from ``/api/queues/<vhost>/<queue>``, with the same user and
password as the AMQP URI (never put on a command line).
"""
from __future__ import annotations

import dataclasses
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

from launcher.redact import redact_text, redact_uri


class BrokerError(Exception):
    """The broker could not be queried (message already redacted)."""


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """One look at a queue."""

    ready: int
    consumers: int
    unacked: Optional[int] = None  # None: unknown
    ack_rate: Optional[float] = None  # messages/s acknowledged recently, None: unknown


def queue_stats(uri: str, queue: str, management_url: Optional[str] = None,
                timeout: float = 10.0) -> QueueStats:
    """Depth and consumers of ``queue``; raises BrokerError (redacted) on any failure."""
    import pika
    import pika.exceptions

    try:
        params = pika.URLParameters(uri)
        params.socket_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.connection_attempts = 1
        conn = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
        raise BrokerError(f"cannot connect to {redact_uri(uri)}: "
                          f"{redact_text(_describe(exc))}") from None
    try:
        channel = conn.channel()
        ok = channel.queue_declare(queue=queue, passive=True)
        ready, consumers = ok.method.message_count, ok.method.consumer_count
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
    return QueueStats(ready, consumers, unacked, ack_rate)


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
