"""The extractor process(es) of one MPI rank and the files waiting for them.

A rank's RankWorker receives jobs tagged with a *lane* (the leader's slot number), runs them one
at a time per extractor process through agent.slots.Slot, and reports every frame back with its
lane. It knows nothing about MPI or the broker: the leader rank drives it directly for its own
extractor and over MPI for the other ranks (agent.mpi_ranks).

With stage-ahead, a rank holds one more job per extractor than it runs: that job's file is
downloaded (agent.stage_ahead) while the current one is processed, and the extractor is handed
the local copy, so download and compute overlap.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hpc_common.redact import Redactor

from .slots import Slot, StagedSlot

log = logging.getLogger("agent.rank")
Emit = Callable[[int, dict[str, Any]], None]


@dataclass
class _Job:
    lane: int
    number: int
    body: dict[str, Any]
    staging: bool = False              # a download is under way for it
    staged: Optional[dict[str, Any]] = None  # its staged file and file info (keys for its body)
    cancelled: bool = False


class RankWorker:
    """Runs jobs in `extractors` extractor processes, FIFO, reporting frames as emit(lane, frame)."""

    def __init__(self, init: dict[str, Any], env: dict[str, str], redactor: Redactor, emit: Emit,
                 extractors: int = 1, stage_ahead: bool = False,
                 on_ready: Optional[Callable[[Optional[dict[str, Any]], str], None]] = None) -> None:
        from . import stage_ahead as staging

        self._emit = emit
        self._on_ready = on_ready
        self._lock = threading.RLock()
        self._waiting: list[_Job] = []
        self._running: dict[int, _Job] = {}      # slot index -> job
        self.stage_ahead = stage_ahead and staging.usable(init)
        self.extractors = extractors
        self.info: Optional[dict[str, Any]] = None
        self.fatal: Optional[str] = None
        self.ready = threading.Event()
        self._closed = False
        self._stage_dir: Optional[str] = None
        self._stage_q: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._init = init
        slot_cls = StagedSlot if self.stage_ahead else Slot
        self._slots = [slot_cls(i, init, self._now, self._on_child_frame, redactor, env=env)
                       for i in range(extractors)]

    @property
    def capacity(self) -> int:
        """Jobs this worker takes at once: one per extractor, two with stage-ahead."""
        return self.extractors * (2 if self.stage_ahead else 1)

    # -- control (any thread) --------------------------------------------------------------------
    def start(self) -> None:
        for slot in self._slots:
            slot.start()
        if self.stage_ahead:
            base = self._init.get("work_dir") or None
            if base:
                os.makedirs(base, exist_ok=True)
            self._stage_dir = tempfile.mkdtemp(prefix="agent-stage-", dir=base)
            for i in range(self.extractors):
                threading.Thread(target=self._stager, name=f"stage-{i}", daemon=True).start()
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
        job = _Job(lane, number, body)
        with self._lock:
            if self.stage_ahead:
                from .stage_ahead import stageable
                if stageable(body, self._init):
                    job.staging = True
                    self._stage_q.put(job)
            self._waiting.append(job)
            self._feed()

    def kill(self, lane: int) -> None:
        """Stop the lane's job: kill its extractor if it runs, drop it if it still waits."""
        with self._lock:
            for index, job in self._running.items():
                if job.lane == lane:
                    self._slots[index].kill()  # the slot reports it as died
                    return
            for job in self._waiting:
                if job.lane == lane:
                    self._waiting.remove(job)
                    self._drop(job)
                    self._emit(lane, {"t": "died", "reason": "stopped before it started"})
                    return

    def load(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._running)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._waiting:
                self._drop(job)
            self._waiting.clear()
        for slot in self._slots:
            slot.close()
        for _ in range(self.extractors):
            self._stage_q.put(None)

    def join(self, timeout: float) -> None:
        """Wait (up to timeout) for the extractor processes to exit after close()."""
        for slot in self._slots:
            slot._thread.join(timeout)
        if self._stage_dir:
            shutil.rmtree(self._stage_dir, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _now(fn: Callable[[], None]) -> None:
        fn()

    def _feed(self) -> None:
        """Give each idle extractor the oldest job whose file is ready (lock held)."""
        if self._closed:
            return
        for index in range(len(self._slots)):
            if index in self._running:
                continue
            job = next((j for j in self._waiting if not j.staging), None)
            if job is None:
                return
            self._waiting.remove(job)
            self._running[index] = job
            body = job.body
            if job.staged:
                body = dict(body, **job.staged)
            self._slots[index].assign(None, body, job.number)

    def _on_child_frame(self, slot: Slot, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        with self._lock:
            job = self._running.get(slot.index)
            if job is None:
                if kind == "died":
                    log.warning("extractor %d: idle %s", slot.index, frame.get("reason"))
                return
            if kind in ("done", "died"):
                del self._running[slot.index]
                self._drop(job)
            self._emit(job.lane, frame)
            if kind in ("done", "died"):
                self._feed()

    @staticmethod
    def _drop(job: _Job) -> None:
        from .stage_ahead import discard

        job.cancelled = True
        if job.staged:
            discard(job.staged)
            job.staged = None

    def _stager(self) -> None:
        from .stage_ahead import discard, stage

        while True:
            job = self._stage_q.get()
            if job is None:
                return
            extras: dict[str, Any] = {}
            if not job.cancelled:
                extras = stage(job.body, self._init, self._stage_dir or tempfile.gettempdir())
            with self._lock:
                job.staging = False
                if job.cancelled:
                    discard(extras)
                    continue
                job.staged = extras
                self._feed()
