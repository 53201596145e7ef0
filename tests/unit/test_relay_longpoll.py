"""Relay long polls on the event loop (launcher.relay.longpoll) over a real lease table."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools

from hpc_common.messages import Message
from launcher.relay.longpoll import LeaseWaiters
from launcher.relay.store import LeaseStore


def _run_with(store: LeaseStore, scenario) -> object:
    pool = concurrent.futures.ThreadPoolExecutor(2)

    async def run_blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def main():
        waiters = LeaseWaiters(store, 30.0, run_blocking)
        waiters.start()
        try:
            return await scenario(waiters)
        finally:
            await waiters.stop()

    try:
        return asyncio.run(main())
    finally:
        pool.shutdown()


async def _until_waiting(waiters: LeaseWaiters, n: int) -> None:
    """Until n lessees are queued (their first try, in the pool, found nothing)."""
    for _ in range(200):
        if waiters.waiting >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {waiters.waiting} of {n} lessees queued")


def _host(lease_id: str) -> str:
    return f"http://relay/clowder/{lease_id}/"


def test_waiters_are_served_in_arrival_order_as_messages_arrive(tmp_path):
    store = LeaseStore(str(tmp_path / "l.sqlite3"))

    async def scenario(waiters):
        polls = []
        for i in range(3):  # one after the other: each first tries at once, then queues
            polls.append(asyncio.ensure_future(waiters.lease(f"a{i}", 1, 10.0, _host, lambda: False)))
            await _until_waiting(waiters, i + 1)
        assert not any(p.done() for p in polls)
        await asyncio.get_running_loop().run_in_executor(
            None, store.add, [Message(body=b'{"id": "%d"}' % i, routing_key="q") for i in range(2)])
        done, pending = await asyncio.wait(polls, timeout=5, return_when=asyncio.ALL_COMPLETED)
        return [p.result()[0] for p in polls[:2]], pending

    (first, second), pending = _run_with(store, scenario)
    assert [x.body for x in first] == [b'{"id": "0"}'] and [x.body for x in second] == [b'{"id": "1"}']
    assert len(pending) == 1  # the third is still waiting when the scenario ends
    assert store.counts()["leased"] == 2


def test_a_waiter_that_timed_out_or_hung_up_gets_nothing_and_holds_nothing(tmp_path):
    store = LeaseStore(str(tmp_path / "l.sqlite3"))

    async def scenario(waiters):
        assert await waiters.lease("quick", 1, 0.1, _host, lambda: False) == ([], [])  # timed out
        hung_up = await asyncio.wait_for(waiters.lease("gone", 1, 10.0, _host, lambda: True), 5)  # answered at once
        live = asyncio.ensure_future(waiters.lease("live", 1, 10.0, _host, lambda: False))
        await _until_waiting(waiters, 1)
        await asyncio.get_running_loop().run_in_executor(None, store.add, [Message(body=b"x", routing_key="q")])
        return hung_up[0], (await asyncio.wait_for(live, 5))[0]

    hung_up, live = _run_with(store, scenario)
    assert hung_up == [] and len(live) == 1
    assert store.counts() == {"ready": 0, "leased": 1, "dead": 0}


def test_stop_answers_every_waiter_with_nothing(tmp_path):
    store = LeaseStore(str(tmp_path / "l.sqlite3"))

    async def scenario(waiters):
        polls = [asyncio.ensure_future(waiters.lease(f"a{i}", 1, 30.0, _host, lambda: False)) for i in range(5)]
        await _until_waiting(waiters, 5)
        await waiters.stop()
        return await asyncio.wait_for(asyncio.gather(*polls), 5)

    assert _run_with(store, scenario) == [([], [])] * 5


def test_completions_sent_with_a_lease_call_are_settled_before_it_leases(tmp_path):
    store = LeaseStore(str(tmp_path / "l.sqlite3"))
    store.add([Message(body=b'{"id": "%d"}' % i, routing_key="q") for i in range(2)])
    first = store.lease("a", 1, 30.0, _host)[0]

    async def scenario(waiters):
        return await waiters.lease("a", 1, 0.0, _host, lambda: False, [first.lease_id, "not-a-lease"])

    leases, done = _run_with(store, scenario)
    assert done == [first.lease_id] and [x.body for x in leases] == [b'{"id": "1"}']
    assert store.live(first.lease_id) is None
    assert store.counts() == {"ready": 0, "leased": 1, "dead": 0}
