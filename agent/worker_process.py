"""The extractor process: loads one plugin once, then runs the jobs the agent sends it.

Run as `python -m agent.worker_process` by the agent, never by hand. The extractor is somebody
else's code, so it lives in its own process: when it segfaults, calls os._exit or hangs, the
agent sees the pipe close (or kills it) and carries on. Frames (agent.ipc) travel on a private
copy of the original stdout; fd 1 is pointed at stderr so an extractor's print() cannot corrupt
them. Nothing secret is on this process's command line: settings arrive in the first frame.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, BinaryIO

from . import frames, ipc
from .frames import Kind


def _private_channel() -> tuple[BinaryIO, BinaryIO]:
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything the extractor prints goes to the agent's log, not into the frames
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return os.fdopen(0, "rb", buffering=0, closefd=False), os.fdopen(out_fd, "wb", buffering=0)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the agent dies, so no orphan keeps computing."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


STATUS_HOLD = 0.05  # seconds a status frame may wait to share a write with the frames after it


class _FrameWriter:
    """Frames to the agent: status frames wait up to STATUS_HOLD, other frames go at once.

    A trivial file sends four statuses and its outcome; written one by one that is five pipe
    writes, each waking the agent. Held statuses leave with the next outcome (one write, in
    order), or after STATUS_HOLD by the flusher thread when the extractor works longer.
    """

    def __init__(self, outbox: BinaryIO) -> None:
        self._outbox = outbox
        self._lock = threading.Lock()  # extractors may spawn threads that report status
        self._held: list[bytes] = []
        threading.Thread(target=self._flusher, name="status-flusher", daemon=True).start()

    def emit(self, frame: dict[str, Any]) -> None:
        data = ipc.encode(frame)
        with self._lock:
            self._held.append(data)
            if frame.get(frames.KIND) != Kind.STATUS:
                self._flush()

    def _flush(self) -> None:
        if self._held:
            self._outbox.write(b"".join(self._held))
            self._held.clear()

    def _flusher(self) -> None:
        while True:
            time.sleep(STATUS_HOLD)
            if self._held:
                with self._lock:
                    try:
                        self._flush()
                    except OSError:
                        return  # the agent went away; the main loop sees it too


def main() -> int:
    _die_with_parent()
    if os.getppid() == 1:  # the agent died before we could ask
        return 1
    inbox, outbox = _private_channel()
    init = ipc.recv(inbox)
    if not init or init.get(frames.KIND) != Kind.INIT:
        return 2
    emit = _FrameWriter(outbox).emit

    # pyclowder reads CLOWDER_VERSION when first imported, so it must be set before that.
    os.environ["CLOWDER_VERSION"] = str(init["clowder_version"])
    if init.get("work_dir"):
        os.makedirs(init["work_dir"], exist_ok=True)
        os.environ["TMPDIR"] = init["work_dir"]
        import tempfile
        tempfile.tempdir = None

    from .plugin_loader import PluginError, PluginSpec, instantiate
    try:
        spec = PluginSpec(**init["plugin"])
        extractor = instantiate(spec)
    except PluginError as exc:
        emit({frames.KIND: Kind.FATAL.value, "reason": str(exc)})
        return 3
    from .connector import AgentConnector

    info = extractor.extractor_info
    connector = AgentConnector(init["queue"], info, extractor.check_message, extractor.process_message,
                               emit=emit, ssl_verify=init["ssl_verify"], mounted_paths=init["mounted_paths"],
                               clowder_url=init.get("clowder_url"), max_retry=init.get("max_retries"))
    # pyclowder logs every status at INFO; the agent already reports them, once.
    logging.getLogger("pyclowder.connectors").setLevel(logging.WARNING)
    emit({frames.KIND: Kind.READY.value, "info": info, "pid": os.getpid()})
    while True:
        frame = ipc.recv(inbox)
        if frame is None or frame.get(frames.KIND) == Kind.EXIT:
            return 0
        if frame.get(frames.KIND) != Kind.JOB:
            continue
        outcome = connector.run(frame["body"])
        emit(frames.done(frame["job"], outcome))


if __name__ == "__main__":
    sys.exit(main())
