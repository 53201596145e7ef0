"""agent.event_loop: the agent's one wait (SelectLoop: watched pipes, a self-pipe, posted calls)."""
from __future__ import annotations

import os
import threading
import time

from agent.event_loop import Post, SelectLoop


def test_a_readable_pipe_is_called_back_and_wake_ends_the_wait():
    waiter = SelectLoop()
    r, w = os.pipe()
    got: list[bytes] = []
    try:
        waiter.watch(r, lambda: got.append(os.read(r, 100)))
        threading.Timer(0.1, os.write, (w, b"frame")).start()
        started = time.monotonic()
        waiter.run_once(10.0)
        assert got == [b"frame"] and time.monotonic() - started < 5
        threading.Timer(0.1, waiter.wake).start()
        started = time.monotonic()
        waiter.run_once(10.0)  # nothing to read: only the wake-up ends it
        assert got == [b"frame"] and time.monotonic() - started < 5
        waiter.wake()
        waiter.wake()
        waiter.run_once(0.0)  # both wake-ups drained at once ...
        started = time.monotonic()
        waiter.run_once(0.2)  # ... so this one waits its time
        assert time.monotonic() - started >= 0.15
        waiter.unwatch(r)
        os.write(w, b"more")
        waiter.run_once(0.05)
        assert got == [b"frame"]  # unwatched: not called back
    finally:
        waiter.close()
        os.close(r)
        os.close(w)


def test_a_closed_pipe_is_dropped_not_raised_and_the_others_are_still_served():
    waiter = SelectLoop()
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
            waiter.run_once(0.5)  # the first wait meets the closed fd (select fails): it must drop it, not raise
        assert got == [b"frame"], "a closed watched pipe stopped the live one from being served"
        assert closed_calls == []
    finally:
        waiter.close()
        os.close(live_r)
        os.close(live_w)


def test_one_wake_per_batch_and_none_for_quiet_calls():
    loop = SelectLoop()
    wakes = []
    real_wake = loop.wake
    loop.wake = lambda: (wakes.append(1), real_wake())  # type: ignore[method-assign]
    ran: list[str] = []
    post = Post(loop)
    try:
        post.quiet(lambda: ran.append("status"))
        assert wakes == []                       # a status waits for the next turn
        post(lambda: ran.append("done 1"))
        post(lambda: ran.append("done 2"))
        assert len(wakes) == 1                   # one wake-up for what is queued before the turn
        started = time.monotonic()
        loop.run_once(10.0)                      # calls queued: no wait at all
        assert ran == ["status", "done 1", "done 2"] and time.monotonic() - started < 5  # in the order posted
        post(lambda: ran.append("done 3"))
        assert len(wakes) == 2                   # after a turn the next call wakes again
        loop.run_once(10.0)
        assert ran[-1] == "done 3"
    finally:
        loop.close()


def test_calls_from_threads_are_never_left_undrained():
    loop = SelectLoop()
    ran: list[int] = []
    lock = threading.Lock()

    def add(i: int) -> None:
        with lock:
            ran.append(i)

    def producer(base: int) -> None:
        for i in range(2000):
            loop.call_soon(lambda i=base + i: add(i))

    threads = [threading.Thread(target=producer, args=(k * 10000,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            loop.run_once(0.01)
        for t in threads:
            t.join()
        # whatever is still queued has a wake-up pending, so the next wait returns at once
        started = time.monotonic()
        while len(ran) < 6000 and time.monotonic() - started < 10:
            loop.run_once(10.0)
        assert len(ran) == 6000 and len(set(ran)) == 6000
    finally:
        loop.close()
