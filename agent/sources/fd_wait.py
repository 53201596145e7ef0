"""Waiting on the extractors' pipes for sources without an event loop of their own.

A source with `watches_fds` reads its slots' pipes in its own poll() on the main thread (see
agent.slots, loop mode): no thread per slot hands frames over, which is most of the per-file
cost a thread-per-slot agent pays in wake-ups. AMQP sources use pika's event loop for that; the
relay source waits here instead: one select() over the watched pipes and a self-pipe that other
threads (the relay's lease thread, the Runner's post) write a byte to, to end the wait.
"""
from __future__ import annotations

import os
import select
from typing import Callable, Iterable

Watched = dict[int, Callable[[], None]]


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


class FdWaiter:
    """select() over watched fds plus a self-pipe: wake() from any thread ends a wait()."""

    def __init__(self) -> None:
        self._watched: Watched = {}
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._watched[fd] = on_readable

    def unwatch(self, fd: int) -> None:
        self._watched.pop(fd, None)

    def wake(self) -> None:
        """End the current (or next) wait(); safe from any thread."""
        try:
            os.write(self._write, b"w")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake is pending anyway) or closed

    def wait(self, seconds: float) -> None:
        """Up to seconds: return after readable watched fds were called back, or on wake()."""
        if call_readable(self._watched, seconds, (self._read,)):
            try:
                while os.read(self._read, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read = self._write = -1


__all__ = ["FdWaiter", "call_readable"]
