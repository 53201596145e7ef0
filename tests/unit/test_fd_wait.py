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


def test_a_closed_pipe_is_dropped_not_raised_and_the_others_are_still_served():
    waiter = FdWaiter()
    r, w = os.pipe()
    live_r, live_w = os.pipe()  # opened before r closes: it cannot take r's number
    closed_calls: list[int] = []
    got: list[bytes] = []
    waiter.watch(r, lambda: closed_calls.append(r))
    waiter.watch(live_r, lambda: got.append(os.read(live_r, 100)))
    os.close(r)
    os.close(w)
    os.write(live_w, b"frame")
    try:
        deadline = time.monotonic() + 10.0
        while not got and time.monotonic() < deadline:
            waiter.wait(0.5)  # the first wait meets the closed fd (select fails): it must drop it, not raise
        assert got == [b"frame"], "a closed watched pipe stopped the live one from being served"
        assert closed_calls == []
    finally:
        waiter.close()
        os.close(live_r)
        os.close(live_w)
