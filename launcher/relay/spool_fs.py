"""Where the spool folder is: on this machine, or on a login node reached over SSH.

`LocalSpoolFS` does the spool's file operations with os calls. `RemoteSpoolFS` does the same
operations on another machine through one SSH connection: it starts
`cd <remote home> && <python> -m launcher.relay.spool_fs <root>` there (the project checkout the
agents run from; the remote side needs only Python 3.9+ and the standard library) and sends one
JSON line per operation, getting one JSON line back. Bytes travel base64-encoded in 1 MiB
pieces. Everything that must be atomic (write-then-rename, fsync, flock for reclaiming dead
agents' claims) happens on the remote side, on the filesystem the agents share, so the rules
are the same as for a local spool. Paths are relative to the spool root; `..` is refused.

    python -m launcher.relay.spool_fs ROOT     # the remote end (reads stdin, writes stdout)
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import Any, Iterable, Optional

from hpc_common.owned_folders import fsync_dir
from hpc_common.spool_layout import SpoolLayout, reclaim
from launcher.errors import ServiceError

PIECE = 1 << 20


class SpoolFSError(ServiceError, OSError):
    """A spool operation failed (on the remote side, or the SSH connection broke)."""


class LocalSpoolFS:
    """The spool's file operations on this machine; paths are relative to root."""

    def __init__(self, root: str) -> None:
        self.layout = SpoolLayout(root)
        self.root = self.layout.root
        self.description = self.root

    def _p(self, rel: str) -> str:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise SpoolFSError(f"path outside the spool: {rel}")
        return os.path.join(self.root, rel) if rel else self.root

    def make(self) -> None:
        self.layout.make()

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except FileNotFoundError:
            return []

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._p(rel))

    def isfile(self, rel: str) -> bool:
        return os.path.isfile(self._p(rel))

    def read_json(self, rel: str) -> Any:
        return SpoolLayout.read_json(self._p(rel))

    def write_json(self, rel: str, data: Any) -> None:
        SpoolLayout.write_json(self._p(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as fh:
            return fh.read()

    def makedirs(self, rel: str) -> None:
        os.makedirs(self._p(rel), mode=0o700, exist_ok=True)

    def rename(self, src: str, dst: str) -> bool:
        """Rename; False when src is gone (someone else took it)."""
        try:
            os.rename(self._p(src), self._p(dst))
        except FileNotFoundError:
            return False
        return True

    def unlink(self, rel: str) -> None:
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass

    def rmtree(self, rel: str) -> None:
        shutil.rmtree(self._p(rel), ignore_errors=True)

    def write_file(self, rel: str, pieces: Iterable[bytes]) -> None:
        """Write a file from pieces, fsync it and its folder."""
        path = self._p(rel)
        with open(path, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(os.path.dirname(path))

    def reclaim(self) -> int:
        return reclaim(self.layout)

    def close(self) -> None:
        pass


class RemoteSpoolFS:
    """The same operations on another machine, over one `ssh` connection (see the module docstring)."""

    def __init__(self, host: str, root: str, ssh_config: Optional[str] = None, remote_home: Optional[str] = None,
                 remote_python: str = "python3") -> None:
        self.host = host
        self.root = root
        self.description = f"{host}:{root}"
        home = remote_home or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        remote = f"cd {_quote(home)} && exec {_quote(remote_python)} -m launcher.relay.spool_fs {_quote(root)}"
        argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30"]
        if ssh_config:
            argv += ["-F", ssh_config]
        argv += [host, remote]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._lock = threading.Lock()
        self._call("ping")

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            if self._proc.poll() is not None:
                raise SpoolFSError(f"ssh to {self.host} ended: {self._stderr()}")
            try:
                self._proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except OSError as exc:
                raise SpoolFSError(f"ssh to {self.host} broke: {exc.strerror}") from None
            if not line:
                raise SpoolFSError(f"ssh to {self.host} ended: {self._stderr()}")
        answer = json.loads(line)
        if "error" in answer:
            raise SpoolFSError(f"{self.host}: {op}: {answer['error']}")
        return answer.get("ok")

    def _stderr(self) -> str:
        try:
            self._proc.wait(timeout=5)
            return (self._proc.stderr.read() or b"").decode("utf-8", "replace").strip()[-500:] or "no message"
        except (OSError, subprocess.TimeoutExpired):
            return "no message"

    def make(self) -> None:
        self._call("make")

    def listdir(self, rel: str) -> list[str]:
        return self._call("listdir", rel)

    def exists(self, rel: str) -> bool:
        return self._call("exists", rel)

    def isfile(self, rel: str) -> bool:
        return self._call("isfile", rel)

    def read_json(self, rel: str) -> Any:
        return self._call("read_json", rel)

    def write_json(self, rel: str, data: Any) -> None:
        self._call("write_json", rel, data)

    def read_bytes(self, rel: str) -> bytes:
        out, offset = [], 0
        while True:
            piece = base64.b64decode(self._call("read_piece", rel, offset))
            if not piece:
                return b"".join(out)
            out.append(piece)
            offset += len(piece)

    def makedirs(self, rel: str) -> None:
        self._call("makedirs", rel)

    def rename(self, src: str, dst: str) -> bool:
        return self._call("rename", src, dst)

    def unlink(self, rel: str) -> None:
        self._call("unlink", rel)

    def rmtree(self, rel: str) -> None:
        self._call("rmtree", rel)

    def write_file(self, rel: str, pieces: Iterable[bytes]) -> None:
        tmp = rel + ".part"
        self._call("truncate", tmp)
        for piece in pieces:
            for start in range(0, len(piece), PIECE):
                self._call("append", tmp, base64.b64encode(piece[start:start + PIECE]).decode("ascii"))
        self._call("seal", tmp, rel)

    def reclaim(self) -> int:
        return self._call("reclaim")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()


def _quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


def serve(root: str) -> int:
    """The remote end: one JSON request per stdin line, one JSON answer per stdout line."""
    fs = LocalSpoolFS(root)

    def read_piece(rel: str, offset: int) -> str:
        with open(fs._p(rel), "rb") as fh:
            fh.seek(offset)
            return base64.b64encode(fh.read(PIECE)).decode("ascii")

    def truncate(rel: str) -> None:
        open(fs._p(rel), "wb").close()

    def append(rel: str, data: str) -> None:
        with open(fs._p(rel), "ab") as fh:
            fh.write(base64.b64decode(data))

    def seal(tmp: str, rel: str) -> None:
        with open(fs._p(tmp), "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(fs._p(tmp), fs._p(rel))
        fsync_dir(os.path.dirname(fs._p(rel)))

    ops = {"ping": lambda: True, "make": fs.make, "listdir": fs.listdir, "exists": fs.exists, "isfile": fs.isfile,
           "read_json": fs.read_json, "write_json": fs.write_json, "makedirs": fs.makedirs, "rename": fs.rename,
           "unlink": fs.unlink, "rmtree": fs.rmtree, "reclaim": fs.reclaim, "read_piece": read_piece,
           "truncate": truncate, "append": append, "seal": seal}
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            answer = {"ok": ops[request["op"]](*request.get("args", []))}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as text
            answer = {"error": f"{exc.__class__.__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
