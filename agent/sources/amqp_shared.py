"""Several queues over one RabbitMQ connection: an agent serving several plugins (agent.runner_group).

The first plugin's source, a SharedAmqpSource, owns the connection and its confirm channel exactly
as a one-plugin AmqpSource does; `add_queue` gives every further plugin an AmqpQueue: a source of
its own (its own consume channel, prefetch, consumer, error queue, retry queues, registration) that
rides on that connection. Connecting, polling, waking and losing the connection are the owner's
business: a lost connection is lost for every queue (each one's runner hears on_lost), and a
reconnect opens every queue's channel again before any delivery is taken.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from .amqp import _PIKA_ERRORS, AmqpSource
from .base import OnDelivery, SourceLost

log = logging.getLogger("agent.amqp")


class SharedAmqpSource(AmqpSource):
    """One queue and the connection that further queues (add_queue) share."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members: list[AmqpQueue] = []
        self._users = 1  # sources still open on the connection (this one included)

    def add_queue(self, queue: str, prefetch: int) -> "AmqpQueue":
        """A source for one more queue on this connection (before start)."""
        member = AmqpQueue(self, queue, prefetch)
        self.members.append(member)
        self._users += 1
        return member

    def _connect(self) -> None:
        lost_since = self._lost_since
        super()._connect()
        try:
            for member in self.members:
                member._attach(self._conn, self._pub)
        except BaseException:
            conn, self._conn, self._ch, self._pub = self._conn, None, None, None
            self._lost_since = lost_since  # still lost: the reconnect clock keeps running
            try:
                conn.close()
            except _PIKA_ERRORS:
                pass
            raise

    def _lose(self, exc: Optional[BaseException], what: str) -> None:
        first = self._lost_since is None
        try:
            super()._lose(exc, what)
        finally:
            if first:
                for member in self.members:
                    member._detach()

    def poll(self, timeout: float) -> None:
        super().poll(timeout)
        if self.connected and any(m._ch is None or not m._ch.is_open for m in self.members):
            try:
                self._lose(None, "polling")  # one queue's channel closed (e.g. its consumer_timeout)
            except SourceLost:
                pass

    def close(self) -> None:
        self._users -= 1
        if self._users <= 0:
            super().close()


class AmqpQueue(AmqpSource):
    """One more queue on a SharedAmqpSource's connection; settles its own deliveries on its own channel."""

    def __init__(self, owner: SharedAmqpSource, queue: str, prefetch: int) -> None:
        super().__init__(owner.uri, queue, prefetch, owner.journal, owner.agent_id,
                         connect_timeout=owner.connect_timeout, reconnect_timeout=owner.reconnect_timeout,
                         clock=owner._clock, retry_buckets=owner.retry_buckets, internals=owner.internals)
        self.owner = owner

    def start(self, on_delivery: OnDelivery, on_lost: Callable[[], None]) -> None:
        """Take the callbacks; the owner's start (or a connection it already holds) opens the channel."""
        self._on_delivery, self._on_lost = on_delivery, on_lost
        if self.owner.connected and self._conn is None:
            try:
                self._attach(self.owner._conn, self.owner._pub)
            except _PIKA_ERRORS as exc:
                self.owner._lose(exc, f"opening queue {self.queue}")

    def _attach(self, conn: Any, pub: Any) -> None:
        """Declare the queue and its error queue on a fresh channel of conn and consume it."""
        ch = conn.channel()
        self._declare(conn, ch)
        ch = conn.channel() if not ch.is_open else ch
        ch.basic_qos(prefetch_count=self.prefetch)
        self._conn, self._ch, self._pub, self._decl = conn, ch, pub, None
        self.generation += 1  # deliveries of an earlier channel can no longer be settled
        self._consumer_tag = ch.basic_consume(self.queue, self._on_message, auto_ack=False) if self._intake else None
        self._lost_since = None
        log.info("consuming %s on the same connection (prefetch %d)", self.queue, self.prefetch)

    def _detach(self) -> None:
        """The owner lost the connection: so did this queue (its waiting deliveries are back in the broker)."""
        if self._lost_since is None:
            self._lost_since = self._clock()
        self._conn = self._ch = self._pub = self._decl = None
        if self._on_lost:
            self._on_lost()

    def _lose(self, exc: Optional[BaseException], what: str) -> None:
        self.owner._lose(exc, what)

    def poll(self, timeout: float) -> None:
        self.owner.poll(timeout)

    def wake(self) -> None:
        self.owner.wake()

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        self.owner.watch(fd, on_readable)

    def unwatch(self, fd: int) -> None:
        self.owner.unwatch(fd)

    def close(self) -> None:
        self._intake = False
        self.owner.close()
