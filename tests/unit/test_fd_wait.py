"""agent.sources.fd_wait: the select() the relay source's poll() waits in."""
from __future__ import annotations

import os
import threading
import time

from agent.sources.fd_wait import FdWaiter


def test_a_readable_pipe_is_called_back_and_wake_ends_the_wait():
    waiter = FdWaiter()
    r, w = os.pipe()
    got: list[bytes] = []
    try:
        waiter.watch(r, lambda: got.append(os.read(r, 100)))
        threading.Timer(0.1, os.write, (w, b"frame")).start()
        started = time.monotonic()
        waiter.wait(10.0)
        assert got == [b"frame"] and time.monotonic() - started < 5
        threading.Timer(0.1, waiter.wake).start()
        started = time.monotonic()
        waiter.wait(10.0)  # nothing to read: only the wake-up ends it
        assert got == [b"frame"] and time.monotonic() - started < 5
        waiter.wake()
        waiter.wake()
        waiter.wait(0.0)  # both wake-ups drained at once ...
        started = time.monotonic()
        waiter.wait(0.2)  # ... so this one waits its time
        assert time.monotonic() - started >= 0.15
        waiter.unwatch(r)
        os.write(w, b"more")
        waiter.wait(0.05)
        assert got == [b"frame"]  # unwatched: not called back
    finally:
        waiter.close()
        os.close(r)
        os.close(w)


def test_a_closed_pipe_is_dropped_not_raised():
    waiter = FdWaiter()
    r, w = os.pipe()
    waiter.watch(r, lambda: None)
    os.close(r)
    os.close(w)
    try:
        waiter.wait(0.05)
        waiter.wait(0.05)
    finally:
        waiter.close()
