"""The agent's one event loop: the only place its main thread waits.

agent.runner_group turns it: `run_once(timeout)` waits for something to happen (an extractor's
pipe readable, a call posted from another thread, the broker's I/O), then runs the calls posted
since the last turn, in the order they were posted. Everything that changes message state runs
on this thread, so no message state needs a lock.

Who feeds it:
- slots (agent.slots) `watch` their extractor's stdout: the callback reads frames on this thread
  and posts them quietly, so a file costs no thread switch;
- threads (a slot starting its child, a relay's lease thread, MPI's comm thread) `call_soon`, which
  wakes the wait once per batch; `call_quietly` is for what may wait for the next turn (statuses);
- a work source whose backend needs I/O on this thread (RabbitMQ through pika) is itself the loop:
  agent.sources.amqp_connection.AmqpConnection waits in pika's event loop and watches the pipes
  there. Every other source gets a SelectLoop and only wakes it.
"""
from __future__ import annotations

import abc
import os
import queue
import select
from typing import Callable, Iterable

Call = Callable[[], None]
Watched = dict[int, Call]


class EventLoop(abc.ABC):
    """Watched file descriptors, posted calls, and one wait that serves both (main thread)."""

    def __init__(self) -> None:
        self._calls: "queue.SimpleQueue[Call]" = queue.SimpleQueue()
        self._wake_due = False

    # -- from any thread -------------------------------------------------------------------------
    def call_soon(self, fn: Call) -> None:
        """Run fn on the loop's thread soon, waking a wait in progress (safe from any thread)."""
        self._calls.put(fn)
        # One wake-up per batch: the flag is cleared by the loop before it drains, and the call
        # is queued before the flag is read, so a call is never left undrained.
        if not self._wake_due:
            self._wake_due = True
            self.wake()

    def call_quietly(self, fn: Call) -> None:
        """Run fn at the loop's next turn without waking it (safe from any thread).

        For what may wait a turn (status updates): they then leave with the next outcome, in
        order and in one write, instead of a wake-up and a send each.
        """
        self._calls.put(fn)

    @abc.abstractmethod
    def wake(self) -> None:
        """End the current (or the next) wait soon; safe from any thread."""

    # -- the loop's thread -----------------------------------------------------------------------
    @abc.abstractmethod
    def watch(self, fd: int, on_readable: Call) -> None:
        """Call on_readable (on the loop's thread) while fd is readable; the wait ends after the call."""

    @abc.abstractmethod
    def unwatch(self, fd: int) -> None:
        """Stop watching fd."""

    @abc.abstractmethod
    def _wait(self, timeout: float) -> None:
        """Wait up to timeout seconds for I/O or a wake-up, serving what became ready."""

    @property
    def has_calls(self) -> bool:
        """True when posted calls wait for the next turn."""
        return not self._calls.empty()

    def run_once(self, timeout: float) -> None:
        """One turn: wait (not at all when calls are queued), then run every queued call."""
        self._wait(0.0 if self.has_calls else timeout)
        self.run_calls()

    def run_calls(self) -> None:
        """Run the calls posted so far, in order."""
        self._wake_due = False
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def open(self) -> None:
        """Make the loop usable (connect its backend); sources that ride on it are opened after."""

    def close(self) -> None:
        """Release what the loop holds."""


def call_readable(watched: Watched, seconds: float, also: Iterable[int] = ()) -> list[int]:
    """Wait up to seconds for a watched fd (or one in also) to be readable; call back the watched ones.

    Returns the readable fds of `also`. A watched fd closed under us is dropped, not raised.
    """
    fds = [*also, *watched]
    if not fds:
        return []
    try:
        readable = select.select(fds, [], [], max(0.0, seconds))[0]
    except (OSError, ValueError):
        for fd in list(watched):
            try:
                os.fstat(fd)
            except OSError:
                watched.pop(fd, None)
        return []
    extra = set(also)
    for fd in readable:
        if fd not in extra:
            callback = watched.get(fd)
            if callback is not None:
                callback()
    return [fd for fd in readable if fd in extra]


class WakePipe:
    """A self-pipe: `wake()` from any thread makes its read end readable until `drain()`."""

    def __init__(self) -> None:
        self.read_fd, self._write = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write, False)

    def wake(self) -> None:
        try:
            os.write(self._write, b"w")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake is pending anyway) or closed

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self._write = -1


class SelectLoop(EventLoop):
    """The loop for sources without I/O of their own on this thread: select() over pipes and a self-pipe."""

    def __init__(self) -> None:
        super().__init__()
        self._watched: Watched = {}
        self._pipe = WakePipe()

    def watch(self, fd: int, on_readable: Call) -> None:
        self._watched[fd] = on_readable

    def unwatch(self, fd: int) -> None:
        self._watched.pop(fd, None)

    def wake(self) -> None:
        self._pipe.wake()

    def _wait(self, timeout: float) -> None:
        if call_readable(self._watched, timeout, (self._pipe.read_fd,)):
            self._pipe.drain()

    def close(self) -> None:
        self._pipe.close()


class Post:
    """What a slot is given to hand work to the loop: post(fn) wakes it, post.quiet(fn) waits a turn."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.quiet = loop.call_quietly

    def __call__(self, fn: Call) -> None:
        self.loop.call_soon(fn)


__all__ = ["EventLoop", "SelectLoop", "Post", "WakePipe", "call_readable"]
