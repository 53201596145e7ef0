"""A slot: one extractor process, read by the agent's event loop, and the thread that starts it.

The agent's main thread owns all message state. It writes each job to the child's pipe and
reads the child's frames itself, when the event loop (agent.event_loop) says the pipe is
readable: no thread is woken per file, so a file costs the agent no thread switch. The slot's
thread only starts the child (its handshake blocks), hands its pipes to the loop and, when the
child dies, waits for it, posts a "died" frame and starts a fresh child for the next job.

Every slot offers the same small interface (ExtractorSlot), which an MPI leader's lanes
(agent.mpi_ranks.LaneSlot: a rank's extractor, reached over MPI) offer too.

Limits (the init frame's "limits": time_limit seconds, memory_limit MB, recycle_after files) are
enforced here, next to the process: a watchdog kills a child that runs a job too long or whose
process tree grows past the memory limit, and the "died" frame says which limit it broke. A child
is replaced after recycle_after files, or when it idles at more than half the memory limit, so a
slow leak never reaches the limit mid-file.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import psutil

from hpc_common.redact import Redactor

from . import frames, ipc
from .event_loop import EventLoop
from .frames import Kind

log = logging.getLogger("agent.slot")
OnFrame = Callable[[Any, dict[str, Any]], None]


@runtime_checkable
class ExtractorSlot(Protocol):
    """What the Runner asks of a slot (agent.slots.Slot, an MPI leader's LaneSlot)."""

    index: int
    busy_with: Any          # the Delivery it works on (main thread), None when idle
    started_at: float       # when that job was assigned (monotonic)

    def start(self) -> None:
        """Begin starting the extractor (its loading runs in parallel with other slots')."""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the extractor loaded; its extractor_info. RuntimeError with the reason if not."""

    def assign(self, delivery: Any, body: dict[str, Any], job_number: int) -> None:
        """Start a job; its frames come back through on_frame, the last one ends it (frames.ends_job)."""

    def kill(self, reason: Optional[str] = None) -> None:
        """Kill the job in progress; its "died" frame follows."""

    def close(self) -> None:
        """End the extractor (no job in progress)."""


class Slot:
    """One extractor child process, restarted when it dies (an ExtractorSlot)."""

    #: the module the child runs (python -m ...); subclasses name their own
    worker_module = "agent.worker_process"

    def __init__(self, index: int, init_frame: dict[str, Any], loop: EventLoop, on_frame: OnFrame,
                 redactor: Redactor, env: Optional[dict[str, str]] = None) -> None:
        self.index = index
        self._init = init_frame
        self._loop = loop
        self._on_frame = on_frame
        self._redactor = redactor
        self._env = env
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.busy_with: Any = None        # the Delivery in this slot, owned by the main thread
        self.started_at = 0.0
        self.info: Optional[dict[str, Any]] = None
        self._thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)
        self._ready = threading.Event()
        self._fatal: Optional[str] = None
        limits = init_frame.get("limits") or {}
        self.time_limit = float(limits.get("time_limit") or 0)
        self.memory_limit_mb = float(limits.get("memory_limit") or 0)
        self.recycle_after = int(limits.get("recycle_after") or 0)
        self._job_started: Optional[float] = None   # set while the child works on a job
        self._kill_reason: Optional[str] = None
        self._served = 0
        # the main thread holds the child's pipes between its handshake and its end
        self._control: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()  # main -> slot thread
        self._child: Optional[subprocess.Popen[bytes]] = None  # attached child (main thread)
        self._inbuf = bytearray()
        self._queued: Optional[bytes] = None   # a job assigned while no child was attached
        self._closed = False

    # -- main-thread API -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the first child loaded its plugin; raise RuntimeError with the reason if not."""
        if not self._ready.wait(timeout):
            raise RuntimeError(f"extractor process did not start within {timeout:.0f}s")
        if self._fatal:
            raise RuntimeError(self._fatal)
        assert self.info is not None
        return self.info

    def assign(self, delivery: Any, body: dict[str, Any], job_number: int) -> None:
        self.busy_with = delivery
        self.started_at = time.monotonic()
        job = frames.job(job_number, body)
        if self._child is None:
            self._queued = ipc.encode(job)  # sent once the (re)started child is attached
        else:
            self._send_job(ipc.encode(job))

    def kill(self, reason: Optional[str] = None) -> None:
        """Kill the child (hung or over its limits); the thread reports it as died, with reason."""
        if reason and self._kill_reason is None:
            self._kill_reason = reason
        proc = self.proc
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._closed = True
        self._detach()
        self._control.put(None)

    def memory_mb(self) -> float:
        """Resident memory of the child and all its descendants, in MB (0 when there is none)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return 0.0
        try:
            root = psutil.Process(proc.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0.0
        total = 0
        for p in tree:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / (1024 * 1024)

    # -- the main thread's side of the child's pipes ----------------------------------------------
    def _attach(self, proc: subprocess.Popen[bytes]) -> None:
        """A child finished its handshake: read its frames from the main loop from now on."""
        if self._closed:
            return  # the slot thread already has the close request and ends this child
        assert proc.stdout is not None
        self._child = proc
        self._inbuf.clear()
        os.set_blocking(proc.stdout.fileno(), False)
        self._loop.watch(proc.stdout.fileno(), self._readable)
        if self._queued is not None:
            job, self._queued = self._queued, None
            self._send_job(job)

    def _detach(self) -> None:
        proc, self._child = self._child, None
        if proc is not None:
            assert proc.stdout is not None
            self._loop.unwatch(proc.stdout.fileno())

    def _send_job(self, data: bytes) -> None:
        proc = self._child
        assert proc is not None and proc.stdin is not None
        self._kill_reason = None
        self._job_started = time.monotonic()
        try:
            ipc.write(proc.stdin, data)  # unbuffered (see _spawn)
        except OSError:
            pass  # the child is gone: its pipe's end of file follows and reports the job as died

    def _readable(self) -> None:
        """The loop's callback: take what the child wrote, hand complete frames to the Runner."""
        proc = self._child
        if proc is None:
            return
        assert proc.stdout is not None
        try:
            data = os.read(proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._detach()
            self._job_started = None
            self._control.put("ended")  # the slot thread waits for the exit code and posts "died"
            return
        self._inbuf += data
        try:
            for frame in ipc.take_frames(self._inbuf):
                self._deliver(frame)
        except ipc.FrameError as exc:
            log.error("slot %d: the extractor process sent %s; ending it", self.index, exc)
            self.kill("the extractor process broke the frame protocol")
            self._inbuf.clear()

    def _deliver(self, frame: dict[str, Any]) -> None:
        # No wake-up needed: the loop's wait returns after this callback (EventLoop.watch).
        self._loop.call_quietly(lambda f=frame: self._on_frame(self, f))
        if frame.get(frames.KIND) == Kind.DONE:
            self._job_started = None
            self._served += 1
            if self._should_recycle():
                self._detach()
                self._control.put("retire")

    def _watch(self) -> None:
        """Watchdog thread: enforce the time and memory limits of the job in progress."""
        while True:
            time.sleep(0.5)
            started = self._job_started
            if started is None:
                continue
            if self.time_limit and time.monotonic() - started > self.time_limit:
                self.kill(f"time limit of {self.time_limit:g}s exceeded")
            elif self.memory_limit_mb:
                used = self.memory_mb()
                if used > self.memory_limit_mb:
                    self.kill(f"memory limit of {self.memory_limit_mb:g} MB exceeded ({used:.0f} MB)")

    # -- slot thread ---------------------------------------------------------------------------
    def _spawn(self) -> tuple[subprocess.Popen[bytes], Any]:
        launch = self._init.get("launch")  # the plugin's interpreter and prefix (agent.extractor_launch)
        if launch:
            argv, cwd = [*launch["argv"], self.worker_module], launch["cwd"]
        else:
            argv, cwd = [sys.executable, "-m", self.worker_module], os.path.dirname(os.path.dirname(__file__))
        # The main thread reads the child's frames from its pipe itself: unbuffered, so that nothing
        # the handshake read ahead is left in a buffer the loop never looks at.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self._env, start_new_session=True, cwd=cwd, bufsize=0)
        self.proc = proc
        threading.Thread(target=self._relay_stderr, args=(proc,), name=f"slot-{self.index}-log",
                         daemon=True).start()
        assert proc.stdin is not None and proc.stdout is not None
        ipc.send(proc.stdin, self._init)
        first = ipc.recv(proc.stdout)
        return proc, first

    def _relay_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        """Everything the extractor writes reaches the agent's log, with secrets masked."""
        assert proc.stderr is not None
        child_log = logging.getLogger(f"extractor.{self.index}")
        for raw in iter(proc.stderr.readline, b""):
            if not child_log.isEnabledFor(logging.INFO):
                continue  # read and dropped: no decoding or masking of lines nobody keeps
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                child_log.info("%s", self._redactor(line))

    def _run(self) -> None:
        if self.time_limit or self.memory_limit_mb:
            threading.Thread(target=self._watch, name=f"slot-{self.index}-watch", daemon=True).start()
        while True:
            try:
                proc, first = self._spawn()
            except (OSError, ipc.FrameError, ValueError) as exc:
                first, proc = None, self.proc
                log.error("slot %d: extractor process failed to start: %s", self.index, exc)
            if not first or first.get(frames.KIND) != Kind.READY:
                reason = (first or {}).get("reason") or "extractor process exited while starting"
                if proc is not None:
                    proc.wait()
                if not self._ready.is_set():
                    self._fatal = reason
                    self._ready.set()
                    return
                log.error("slot %d: %s; retrying in 5s", self.index, reason)
                time.sleep(5)
                continue
            self.info = first["info"]
            self._ready.set()
            if not self._hand_over(proc):
                return

    def _hand_over(self, proc: subprocess.Popen[bytes]) -> bool:
        """Give the child's pipes to the main thread, then wait for the child's end.

        True: spawn another (it died or is retired); False: the slot closed.
        """
        self._loop.call_soon(lambda: self._attach(proc))
        what = self._control.get()
        if what == "ended":
            self._report_died(proc)
            return True
        if what == "retire":
            self._retire(proc)
            return True
        self._end(proc)
        return False

    def _report_died(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a child that ended and post its "died" frame (the kill reason when we killed it)."""
        code = proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        reason = self._kill_reason or f"extractor process {how}"
        self._loop.call_soon(lambda: self._on_frame(self, frames.died(reason)))

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        """The slot closed: ask the child to exit, kill it if it does not within 5 s."""
        try:
            assert proc.stdin is not None
            ipc.send(proc.stdin, {frames.KIND: Kind.EXIT.value})
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def _should_recycle(self) -> bool:
        if self.recycle_after and self._served >= self.recycle_after:
            return True
        return bool(self.memory_limit_mb) and self.memory_mb() > self.memory_limit_mb / 2

    def _retire(self, proc: subprocess.Popen[bytes]) -> None:
        """End an idle child politely so a fresh one takes its place."""
        log.info("slot %d: replacing its extractor process after %d file(s) (%.0f MB)", self.index,
                 self._served, self.memory_mb())
        self._served = 0
        try:
            assert proc.stdin is not None
            ipc.send(proc.stdin, {frames.KIND: Kind.EXIT.value})
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
            proc.wait()


class StagedSlot(Slot):
    """A Slot whose extractor process understands staged files (agent.stage_ahead).

    Here, not in agent.stage_ahead: that module runs in the extractor process, which may be a
    plugin's own environment without the agent's dependencies (psutil).
    """

    worker_module = "agent.stage_ahead"
