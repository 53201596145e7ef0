"""One RabbitMQ connection, and the agent's event loop while the agent works from RabbitMQ.

pika is not thread-safe: one BlockingConnection, used only from the agent's main thread, whose
wait (`EventLoop._wait`) runs the connection's I/O. Other threads only wake it (pika's
add_callback_threadsafe). The extractors' pipes are watched in the same loop, so a frame from
an extractor and a delivery from the broker end the same wait.

The connection owns what every queue shares: connecting (within connect_timeout), reconnecting
with backoff (within reconnect_timeout, then SourceUnavailable), the confirm channel for
publishes that must be durable before a delivery is settled (retry copies, error-queue copies,
journal recovery), and losing the connection: every consumer (agent.sources.amqp.AmqpConsumer,
one per queue) hears it and is attached again, on a fresh channel, after a reconnect.

`internals=True` (the default, AGENT_AMQP_INTERNALS) takes pika's private fast paths: the pipes
are watched in pika's own IOLoop, sends joined into one per turn (hpc_common.joined_sends). False keeps to the public
API: a thread waits on the pipes and hands readable ones to this thread (add_callback_threadsafe).
benchmarks/noop_overhead.py measures what the private paths are worth.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any, Callable, Optional, Protocol

import pika
import pika.exceptions

from hpc_common.joined_sends import join_sends
from hpc_common.redact import redact_uri

from ..event_loop import Call, EventLoop, WakePipe, Watched, call_readable
from .base import SourceLost, SourceUnavailable

log = logging.getLogger("agent.amqp")
logging.getLogger("pika").setLevel(logging.WARNING)  # its INFO lines are per connection event
PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)
_REFUSED = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
            pika.exceptions.ProbableAccessDeniedError)


class Attached(Protocol):
    """A queue's consumer riding on the connection (agent.sources.amqp.AmqpConsumer)."""

    queue: str

    def attach(self, conn: Any) -> None:
        """Open its channel on a fresh connection and consume (raises pika's errors)."""

    def detach(self) -> None:
        """The connection is gone: forget the channel and tell the runner."""

    def channel_open(self) -> bool:
        """False when the broker closed this queue's channel (its consumer_timeout, say)."""


def describe(exc: BaseException) -> str:
    """A pika error as a short sentence for logs (never the URI)."""
    if isinstance(exc, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)):
        return "the broker refused the credentials"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return "the broker denied access to the virtual host"
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


def _ioloop(conn: Any) -> Any:
    """The event loop under a BlockingConnection (pika 1.x: its SelectConnection's IOLoop), or None."""
    loop = getattr(getattr(conn, "_impl", None), "ioloop", None)
    return loop if loop is not None and hasattr(loop, "add_handler") else None


def _nothing() -> None:
    """A timer callback whose only effect is to end process_data_events."""


class _PipeThread:
    """Public-API mode: one thread waits on the watched pipes and hands readable ones to the loop.

    It posts one call per readiness and waits until the loop has run it (the callbacks read what is
    there), so a readable pipe is handed over once, not once per select().
    """

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._watched: Watched = {}
        self._lock = threading.Lock()
        self._pipe = WakePipe()   # a changed watch set ends the thread's select()
        self._served = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="amqp-pipes", daemon=True)
        self._thread.start()

    def watch(self, fd: int, on_readable: Call) -> None:
        with self._lock:
            self._watched[fd] = on_readable
        self._pipe.wake()

    def unwatch(self, fd: int) -> None:
        with self._lock:
            self._watched.pop(fd, None)
        self._pipe.wake()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                fds = dict(self._watched)
            ready = _readable(fds, self._pipe.read_fd)
            if self._pipe.read_fd in ready:
                self._pipe.drain()
            ready = [fd for fd in ready if fd in fds]
            if not ready or self._stop:
                continue
            self._served.clear()
            self._loop.call_soon(lambda: self._serve(ready))
            self._served.wait()

    def _serve(self, ready: list[int]) -> None:
        try:
            for fd in ready:
                with self._lock:
                    callback = self._watched.get(fd)
                if callback is not None:
                    callback()
        finally:
            self._served.set()

    def close(self) -> None:
        self._stop = True
        self._served.set()
        self._pipe.wake()
        self._thread.join(timeout=1.0)
        self._pipe.close()


def _readable(fds: Watched, wake_fd: int) -> list[int]:
    """select() over fds and wake_fd for up to a second; closed fds are dropped from the answer."""
    try:
        return select.select([wake_fd, *fds], [], [], 1.0)[0]
    except (OSError, ValueError):
        time.sleep(0.01)  # a pipe closed under us: the slot unwatches it on the loop's thread
        return []


class AmqpConnection(EventLoop):
    """The agent's event loop over one RabbitMQ connection, shared by every queue's consumer."""

    def __init__(self, uri: str, agent_id: str, connect_timeout: float = 60.0, reconnect_timeout: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, internals: bool = True) -> None:
        super().__init__()
        self.uri = uri
        self.agent_id = agent_id
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.internals = internals
        self._clock = clock
        self._where = redact_uri(uri)
        self.conn: Optional[pika.BlockingConnection] = None
        self._pub: Any = None  # confirm channel
        self._consumers: list[Attached] = []
        self._lost_since: Optional[float] = None
        self._next_attempt = 0.0
        self._backoff = 1.0
        self._watched: Watched = {}
        self._loop_watches = False   # True while pika's IOLoop has the watched fds
        self._tick_due: Optional[float] = None  # when the standing wait timer fires (see _pump)
        self._epoch = 0  # bumped on every connection: timers of an older one are ignored
        self._pipe = WakePipe()      # wakes a wait while there is no connection
        self._pipes = None if internals else _PipeThread(self)
        self._opened = False

    # -- consumers -------------------------------------------------------------------------------
    def add(self, consumer: Attached) -> None:
        """Serve one more queue: attach it now when connected, and after every reconnect."""
        if consumer not in self._consumers:
            self._consumers.append(consumer)
        if self.connected:
            try:
                consumer.attach(self.conn)
            except PIKA_ERRORS as exc:
                self.lose(exc, f"opening queue {consumer.queue}")

    @property
    def connected(self) -> bool:
        return self._lost_since is None and self.conn is not None

    # -- connecting ------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, trying again within connect_timeout; SourceUnavailable when that is not enough."""
        if self._opened:
            return
        deadline = self._clock() + self.connect_timeout
        delay = 1.0
        while True:
            try:
                self._connect()
                self._opened = True
                return
            except PIKA_ERRORS as exc:
                reason = describe(exc)
                if isinstance(exc, _REFUSED) or self._clock() >= deadline:
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
            join_sends(conn)
        try:
            pub = conn.channel()
            pub.confirm_delivery()
            for consumer in self._consumers:
                consumer.attach(conn)
        except BaseException:
            try:
                conn.close()
            except PIKA_ERRORS:
                pass
            raise
        self.conn, self._pub = conn, pub
        self._epoch += 1
        self._tick_due = None  # the old connection's timer died with it
        self._loop_watches = self.internals and _ioloop(conn) is not None
        for fd, callback in self._watched.items():
            self._add_handler(fd, callback)
        self._lost_since = None
        self._backoff = 1.0

    def lose(self, exc: Optional[BaseException], what: str) -> None:
        """The connection broke during `what`: close it, tell every consumer, raise SourceLost."""
        if self._lost_since is None:
            self._lost_since = self._clock()
            self._next_attempt = self._clock() + 1.0
            log.warning("lost the broker during %s (%s); reconnecting", what, describe(exc) if exc else "closed")
            try:
                if self.conn is not None and self.conn.is_open:
                    self.conn.close()
            except PIKA_ERRORS:
                pass
            self.conn = self._pub = None
            for consumer in self._consumers:
                consumer.detach()
        raise SourceLost(what)

    def _try_reconnect(self, timeout: float) -> None:
        now = self._clock()
        assert self._lost_since is not None
        if now - self._lost_since > self.reconnect_timeout:
            raise SourceUnavailable(f"broker at {self._where} unreachable for {self.reconnect_timeout:.0f}s")
        if now < self._next_attempt:
            self._wait_unconnected(min(timeout, self._next_attempt - now))
            return
        lost_for = now - self._lost_since
        try:
            self._connect()
            log.info("reconnected after %.1fs", lost_for)
        except PIKA_ERRORS as exc:
            self._backoff = min(self._backoff * 2, 15.0)
            self._next_attempt = self._clock() + self._backoff
            log.warning("reconnect failed (%s); next try in %.0fs", describe(exc), self._backoff)

    # -- durable publishes -----------------------------------------------------------------------
    def publish_durable(self, queue: str, body: bytes, props: pika.BasicProperties) -> None:
        """Publish to queue and return once the broker confirmed it; SourceLost otherwise."""
        if not self.connected:
            raise SourceLost("not connected")
        try:
            self._pub.basic_publish("", queue, body, props, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise SourceLost(f"broker did not take the message for {queue}: {exc.__class__.__name__}") from None
        except PIKA_ERRORS as exc:
            self.lose(exc, "publish")

    # -- the loop --------------------------------------------------------------------------------
    def _wait(self, timeout: float) -> None:
        if self._lost_since is not None or self.conn is None:
            if self._opened:
                self._try_reconnect(timeout)
            else:
                self._wait_unconnected(timeout)
            return
        if self._watched and not self._loop_watches and self._pipes is None:
            # a pika without the IOLoop the pipes are watched in: look at them between short waits
            call_readable(self._watched, 0.0)
            timeout = min(timeout, 0.005)
        try:
            self._pump(timeout)
            if not self._pub.is_open:
                self.lose(None, "polling")
            closed = next((c for c in self._consumers if not c.channel_open()), None)
            if closed is not None:
                self.lose(None, f"polling (the channel of {closed.queue} closed)")
        except SourceLost:
            pass
        except PIKA_ERRORS as exc:
            try:
                self.lose(exc, "polling")
            except SourceLost:
                pass

    def _pump(self, timeout: float) -> None:
        """Run the connection's I/O until something happened or timeout seconds passed.

        pika's time_limit arms and cancels a timer on every call (twice per file); one standing
        tick timer, re-armed only when it fired, bounds the wait the same way at a few a second.
        """
        conn = self.conn
        assert conn is not None
        if timeout <= 0:
            conn.process_data_events(time_limit=0)
            return
        due = self._clock() + timeout
        if self._tick_due is None or self._tick_due > due + 0.05:
            self._tick_due = due
            epoch = self._epoch
            conn.call_later(timeout, lambda: self._ticked(epoch))
        conn.process_data_events(time_limit=None)

    def _ticked(self, epoch: int) -> None:
        if epoch == self._epoch:
            self._tick_due = None

    def _wait_unconnected(self, seconds: float) -> None:
        """No connection: wait for the pipes (their callbacks run here) or a wake-up."""
        watched = self._watched if self._pipes is None else {}
        if call_readable(watched, seconds, (self._pipe.read_fd,)):
            self._pipe.drain()

    def wake(self) -> None:
        conn = self.conn
        if conn is None or self._lost_since is not None:
            self._pipe.wake()
            return
        try:
            conn.add_callback_threadsafe(_nothing)
        except PIKA_ERRORS:
            self._pipe.wake()

    # -- the extractors' pipes -------------------------------------------------------------------
    def watch(self, fd: int, on_readable: Call) -> None:
        """on_readable runs inside the wait, which returns after it: what it posts quietly runs next."""
        if self._pipes is not None:
            self._pipes.watch(fd, on_readable)
            return
        self._watched[fd] = on_readable
        if self.connected:
            self._add_handler(fd, on_readable)

    def unwatch(self, fd: int) -> None:
        if self._pipes is not None:
            self._pipes.unwatch(fd)
            return
        if self._watched.pop(fd, None) is None or not self.connected or not self._loop_watches:
            return
        try:
            _ioloop(self.conn).remove_handler(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _add_handler(self, fd: int, callback: Call) -> None:
        conn = self.conn
        loop = _ioloop(conn) if self._loop_watches else None
        if loop is None:
            return

        def on_event(_fd: int, _events: int) -> None:
            callback()
            # End this wait after the loop's turn (a zero timer, not a thread-safe wake-up: no
            # pipe write and read), so what the callback posted runs at the next turn.
            conn.call_later(0, _nothing)

        loop.add_handler(fd, on_event, loop.READ)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except PIKA_ERRORS:
                pass
        if self._pipes is not None:
            self._pipes.close()
        self._pipe.close()


__all__ = ["AmqpConnection", "PIKA_ERRORS", "describe"]
