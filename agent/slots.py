"""A slot: one extractor process and the thread that talks to it.

The agent's main thread owns all message state. A slot's thread only carries frames: it writes
the job to the child's pipe and forwards every frame the child sends back to the main thread
through `post` (for the AMQP source, pika's add_callback_threadsafe). When the child dies, the
thread posts a "died" frame and the slot starts a fresh child for the next job.
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
from typing import Any, Callable, Optional

from . import ipc
from .redact import Redactor

log = logging.getLogger("agent.slot")
Post = Callable[[Callable[[], None]], None]
OnFrame = Callable[["Slot", dict[str, Any]], None]


class Slot:
    """One extractor child process, restarted when it dies."""

    def __init__(self, index: int, init_frame: dict[str, Any], post: Post, on_frame: OnFrame,
                 redactor: Redactor, env: Optional[dict[str, str]] = None) -> None:
        self.index = index
        self._init = init_frame
        self._post = post
        self._on_frame = on_frame
        self._redactor = redactor
        self._env = env
        self._jobs: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.busy_with: Any = None        # the Delivery in this slot, owned by the main thread
        self.started_at = 0.0
        self.info: Optional[dict[str, Any]] = None
        self._thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)
        self._ready = threading.Event()
        self._fatal: Optional[str] = None

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
        self._jobs.put({"t": "job", "job": job_number, "body": body})

    def kill(self) -> None:
        """Kill the child (hung or over its limits); the thread reports it as died."""
        proc = self.proc
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._jobs.put(None)

    # -- slot thread ---------------------------------------------------------------------------
    def _spawn(self) -> tuple[subprocess.Popen[bytes], Any]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.worker_process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self._env, start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)))
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
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                child_log.info("%s", self._redactor(line))

    def _run(self) -> None:
        while True:
            try:
                proc, first = self._spawn()
            except (OSError, ipc.FrameError, ValueError) as exc:
                first, proc = None, self.proc
                log.error("slot %d: extractor process failed to start: %s", self.index, exc)
            if not first or first.get("t") != "ready":
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
            if not self._serve(proc):
                return

    def _serve(self, proc: subprocess.Popen[bytes]) -> bool:
        """Feed jobs to one child until it dies (True: spawn another) or the slot closes (False)."""
        assert proc.stdin is not None and proc.stdout is not None
        while True:
            job = self._jobs.get()
            if job is None:
                try:
                    ipc.send(proc.stdin, {"t": "exit"})
                except OSError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.kill()
                return False
            try:
                ipc.send(proc.stdin, job)
                while True:
                    frame = ipc.recv(proc.stdout)
                    if frame is None:
                        raise ipc.FrameError("closed")
                    self._post(lambda f=frame: self._on_frame(self, f))
                    if frame.get("t") == "done":
                        break
            except (OSError, ipc.FrameError, ValueError):
                code = proc.wait()
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self._post(lambda h=how: self._on_frame(self, {"t": "died", "reason": f"extractor process {h}"}))
                return True
