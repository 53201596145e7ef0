"""The extractor process(es) of one MPI rank and the files waiting for them.

A rank's RankWorker receives jobs tagged with a *lane* (the leader's slot number), runs them one
at a time per extractor process through agent.slots.Slot, and reports every frame back with its
lane. It knows nothing about MPI or the broker: the leader rank drives it directly for its own
extractor and over MPI for the other ranks (agent.mpi_ranks). Its extractors' pipes are read by
an event loop (agent.event_loop): on a follower its own, turned by one thread, with jobs and kills
from other threads posted to it, so only that thread writes to an extractor; on the leader the
agent's loop, whose thread also calls submit and kill.

With stage-ahead, a rank holds one more job per extractor than it runs: that job's file and file
info are fetched (agent.stage_pool, under this worker's lock) while the current one is
processed, and the extractor is handed the local copy, so download and compute overlap.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hpc_common.redact import Redactor

from . import frames
from .event_loop import EventLoop, SelectLoop
from .frames import Kind
from .slots import Slot, StagedSlot
from .stage_pool import StagePool

log = logging.getLogger("agent.rank")
Emit = Callable[[int, dict[str, Any]], None]


@dataclass
class _Job:
    lane: int
    number: int
    body: dict[str, Any]


class RankWorker:
    """Runs jobs in `extractors` extractor processes, FIFO, reporting frames as emit(lane, frame)."""

    def __init__(self, init: dict[str, Any], env: dict[str, str], redactor: Redactor, emit: Emit,
                 extractors: int = 1, stage_ahead: bool = False,
                 on_ready: Optional[Callable[[Optional[dict[str, Any]], str], None]] = None,
                 loop: Optional[EventLoop] = None) -> None:
        """loop: an event loop turned by its owner, whose thread calls submit/kill/close (the MPI leader's
        agent loop); None: a loop of this worker's own on a thread of its own."""
        self._emit = emit
        self._on_ready = on_ready
        self._lock = threading.RLock()
        self._waiting: list[_Job] = []
        self._running: dict[int, _Job] = {}      # slot index -> job
        self.stage_ahead = stage_ahead and StagePool.wanted(init)
        self.extractors = extractors
        self.info: Optional[dict[str, Any]] = None
        self.fatal: Optional[str] = None
        self.ready = threading.Event()
        self._closed = False
        self._ended = False
        self._posted = 0  # jobs submitted, not yet taken by the loop's thread
        self._shared = loop is not None
        self._loop: EventLoop = loop if loop is not None else SelectLoop()
        self._stager = StagePool(init, extractors, self._locked, self._feed) if self.stage_ahead else None
        slot_cls = StagedSlot if self.stage_ahead else Slot
        self._slots = [slot_cls(i, init, self._loop, self._on_child_frame, redactor, env=env)
                       for i in range(extractors)]
        self._turner = threading.Thread(target=self._turn, name="rank-extractors", daemon=True)

    @property
    def capacity(self) -> int:
        """Jobs this worker takes at once: one per extractor, two with stage-ahead."""
        return self.extractors * (2 if self.stage_ahead else 1)

    # -- control (any thread) --------------------------------------------------------------------
    def start(self) -> None:
        if not self._shared:
            self._turner.start()
        for slot in self._slots:
            slot.start()
        if self._stager is not None:
            self._stager.start()
        threading.Thread(target=self._await_ready, name="rank-ready", daemon=True).start()

    def _await_ready(self) -> None:
        try:
            self.info = self._slots[0].wait_ready(timeout=600)
        except RuntimeError as exc:
            self.fatal = str(exc)
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready(self.info, self.fatal or "")

    def submit(self, lane: int, number: int, body: dict[str, Any]) -> None:
        """Queue a job (any thread): it starts as soon as an extractor (and its staged file) is free."""
        job = _Job(lane, number, body)
        with self._lock:
            self._posted += 1
        self._post(lambda: self._submitted(job))

    def _submitted(self, job: _Job) -> None:
        with self._lock:
            self._posted -= 1
            if self._closed:
                return
            if self._stager is not None:
                self._stager.take(job, job.body)
            self._waiting.append(job)
            self._feed()

    def kill(self, lane: int) -> None:
        """Stop the lane's job (any thread): kill its extractor if it runs, drop it if it still waits."""
        self._post(lambda: self._kill(lane))

    def _kill(self, lane: int) -> None:
        with self._lock:
            for index, job in self._running.items():
                if job.lane == lane:
                    self._slots[index].kill()  # the slot reports it as died
                    return
            for job in self._waiting:
                if job.lane == lane:
                    self._waiting.remove(job)
                    self._drop(job)
                    self._emit(lane, frames.died("stopped before it started"))
                    return

    def load(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._running) + self._posted

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._waiting:
                self._drop(job)
            self._waiting.clear()
        for slot in self._slots:
            if self._shared:
                slot.close()  # the loop's own thread (it may not turn again)
            else:
                self._loop.call_soon(slot.close)

    def join(self, timeout: float) -> None:
        """Wait (up to timeout) for the extractor processes to exit after close()."""
        for slot in self._slots:
            slot._thread.join(timeout)
        if not self._shared:
            self._ended = True
            self._loop.wake()
            self._turner.join(timeout)
        if self._stager is not None:
            with self._lock:
                self._stager.close()  # its threads stop and its folder goes, with any file left in it

    # -- internals (the loop's thread) -------------------------------------------------------------
    def _turn(self) -> None:
        while not self._ended:
            self._loop.run_once(0.5)
        self._loop.close()

    def _post(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop's thread: a shared loop's thread is the caller, and its turn is on the way."""
        (self._loop.call_quietly if self._shared else self._loop.call_soon)(fn)

    def _locked(self, fn: Callable[[], None]) -> None:
        """What the stage pool posts: run on the loop's thread, under this worker's lock."""
        self._loop.call_soon(lambda: self._run_locked(fn))

    def _run_locked(self, fn: Callable[[], None]) -> None:
        with self._lock:
            fn()

    def _feed(self) -> None:
        """Give each idle extractor the oldest job whose file is ready (lock held)."""
        if self._closed:
            return
        for index in range(len(self._slots)):
            if index in self._running:
                continue
            stager = self._stager
            job = next((j for j in self._waiting if stager is None or stager.ready(j)), None)
            if job is None:
                return
            self._waiting.remove(job)
            self._running[index] = job
            body = job.body if stager is None else stager.body_for(job, job.body)
            self._slots[index].assign(None, body, job.number)

    def _on_child_frame(self, slot: Slot, frame: dict[str, Any]) -> None:
        ends = frames.ends_job(frame)
        with self._lock:
            job = self._running.get(slot.index)
            if job is None:
                if frame.get(frames.KIND) == Kind.DIED:
                    log.warning("extractor %d: idle %s", slot.index, frame.get("reason"))
                return
            if ends:
                del self._running[slot.index]
                self._drop(job)
                if self._stager is not None and "staged_used" in frame:
                    self._stager.note_use(bool(frame["staged_used"]))
            self._emit(job.lane, frame)
            if ends:
                self._feed()

    def _drop(self, job: _Job) -> None:
        """The job ended or will not run: its staged file goes (lock held)."""
        if self._stager is not None:
            self._stager.forget(job)
