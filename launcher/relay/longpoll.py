"""Lease long polls on the event loop: many waiting agents, no thread each.

An agent's POST /v1/lease may wait up to max_wait seconds for its first message. With thousands
of agents connected, one thread per waiter (and all of them waking on every change) would cost
more than the work itself, so waiters are futures in one FIFO queue, served by one task:

- a bridge thread sleeps on the lease store's `changed` condition (holding its lock between
  waits, so no notification is missed) and kicks the task on the loop;
- the task, kicked or every POLL seconds (a retry's backoff ends without a notification), leases
  for the waiters in queue order, up to BATCH of them in one trip to the thread pool, until the
  store has nothing leasable; a waiter that left (timeout, hung-up agent) is skipped, and leases
  taken for one that left in the meantime are released at once.

LeaseStore stays synchronous and thread-safe: its calls run in the relay's thread pool.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence

from .store import Lease, LeaseStore

POLL = 0.5
BATCH = 64      # waiters served per trip to the thread pool


@dataclass
class _Waiter:
    agent: str
    limit: int
    host_for: Callable[[str], str]
    gone: Callable[[], bool]
    future: "asyncio.Future[list[Lease]]" = field(repr=False, default=None)  # type: ignore[assignment]


class LeaseWaiters:
    """Long-polling lessees as futures in FIFO order (see the module docstring)."""

    def __init__(self, store: LeaseStore, ttl: float, run: Callable[..., Awaitable[Any]]) -> None:
        self.store = store
        self.ttl = ttl
        self._run = run                      # runs a blocking call in the relay's thread pool
        self._queue: "collections.deque[_Waiter]" = collections.deque()
        self._kick: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._halt = threading.Event()
        self._task: Optional[asyncio.Task] = None
        self._bridge: Optional[threading.Thread] = None

    @property
    def waiting(self) -> int:
        """Lessees waiting now."""
        return len(self._queue)

    def start(self) -> None:
        """Start the serving task and the bridge thread (call on the loop)."""
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._task = self._loop.create_task(self._serve())
        self._bridge = threading.Thread(target=self._watch_store, name="relay-lease-bridge", daemon=True)
        self._bridge.start()

    async def stop(self) -> None:
        """Answer every waiter with nothing, stop the task and the bridge (call on the loop)."""
        self._halt.set()
        with self.store.changed:
            self.store.changed.notify_all()
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result([])
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def lease(self, agent: str, limit: int, wait: float, host_for: Callable[[str], str],
                    gone: Callable[[], bool], complete: Sequence[str] = ()) -> tuple[list[Lease], list[str]]:
        """Settle the `complete` lease ids, then up to limit leases for agent, waiting up to wait
        seconds for the first one; returns (leases, the lease ids completed)."""
        done: list[str] = []
        if not self._queue:  # nobody ahead: try at once (with the completions, one pool hop)
            done, got = await self._run(self._complete_then_lease, list(complete), agent, limit, host_for)
            if got or wait <= 0 or self._halt.is_set():
                return got, done
        elif complete:
            done = await self._run(self.store.complete_many, list(complete))
        assert self._loop is not None and self._kick is not None
        waiter = _Waiter(agent, limit, host_for, gone, self._loop.create_future())
        self._queue.append(waiter)
        self.store.demand.set()  # the broker link should fetch now
        self._kick.set()
        await asyncio.wait({waiter.future}, timeout=max(0.0, wait))
        if waiter.future.done():
            return waiter.future.result(), done
        waiter.future.cancel()  # the serving task skips it (and releases what it took meanwhile)
        return [], done

    def _complete_then_lease(self, complete: list[str], agent: str, limit: int, host_for: Callable[[str], str]
                             ) -> tuple[list[str], list[Lease]]:
        return self.store.complete_then_lease(complete, agent, limit, self.ttl, host_for)  # one commit

    async def _serve(self) -> None:
        assert self._kick is not None
        while not self._halt.is_set():
            try:
                await asyncio.wait_for(self._kick.wait(), POLL)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            while self._queue and not self._halt.is_set():
                batch = self._next_batch()
                if not batch:
                    break
                served = await self._run(self._lease_for, batch)  # one pool hop for the whole batch
                left: list[Lease] = []
                for waiter, got in zip(batch, served):
                    if waiter.future.done():  # left while we leased for it: hand the leases back
                        left.extend(got)
                    else:
                        waiter.future.set_result(got)
                if left:
                    await self._run(lambda: [self.store.release(lease.lease_id) for lease in left])
                if len(served) < len(batch):  # nothing more leasable: the rest wait at the front
                    self._queue.extendleft(reversed(batch[len(served):]))
                    self.store.demand.set()
                    break

    def _next_batch(self) -> list[_Waiter]:
        """Up to BATCH waiters from the front that are still waiting (the others are answered [])."""
        batch: list[_Waiter] = []
        while self._queue and len(batch) < BATCH:
            waiter = self._queue.popleft()
            if waiter.future.done() or waiter.gone():
                if not waiter.future.done():
                    waiter.future.set_result([])
                continue
            batch.append(waiter)
        return batch

    def _lease_for(self, batch: list[_Waiter]) -> list[list[Lease]]:
        """In the pool: lease for each waiter in order until the store has nothing leasable."""
        out: list[list[Lease]] = []
        for waiter in batch:
            got = self.store.lease(waiter.agent, waiter.limit, self.ttl, waiter.host_for)
            if not got:
                break
            out.append(got)
        return out

    def _watch_store(self) -> None:
        """Thread: forward the store's notifications to the serving task."""
        loop, kick = self._loop, self._kick
        assert loop is not None and kick is not None
        with self.store.changed:
            while not self._halt.is_set():
                if self.store.changed.wait(1.0) and not self._halt.is_set():
                    try:
                        loop.call_soon_threadsafe(kick.set)
                    except RuntimeError:  # the loop is closed: the relay is stopping
                        return

