"""The in-flight journal: how an extraction outlives RabbitMQ's consumer_timeout.

RabbitMQ closes a channel that holds a delivery unacknowledged longer than consumer_timeout
(30 min by default, 60 s in our CI; global-only in 3.10, and heartbeats do not extend it), and
requeues the message to a second worker while the first is still computing. So a delivery
must not stay open for the length of an extraction.

Design: a delivery is held open only while it is young (journal_after, default 20 s, well under
any sane consumer_timeout). Most files finish sooner and are simply acknowledged after their
results are in Clowder. A delivery still in flight at journal_after is written to this journal
(fsync'd file, atomic rename) and only then acknowledged. From then on the journal entry is the
message's only durable copy: when the work ends the entry is removed (after its retry or
dead-letter copy has been confirmed by the broker).

Each agent process writes under its own folder, `<root>/<agent id>/`, holding an exclusive
flock on `<agent id>/lock` for its whole life. The kernel drops that lock when the process dies,
however it dies (kill -9, OOM, walltime). Any agent, on start and periodically, scans the root for
folders whose lock it can take: their owner is dead, so it republishes each entry to its queue
(publisher-confirmed) and deletes it. The root must be on a filesystem every node running agents
sees (home or project space on a cluster) and that supports flock (NFSv4 and Lustre with -o flock
do). A crash between "results in Clowder" and "entry removed" redoes the file: at-least-once.
"""
from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger("agent.journal")
LOCK_NAME = "lock"
SUFFIX = ".msg.json"


@dataclass
class JournalEntry:
    """A message recorded durably: enough to publish it again exactly as received."""

    queue: str
    body: bytes
    routing_key: str
    reply_to: Optional[str]
    correlation_id: Optional[str]
    headers: dict[str, Any]
    content_type: Optional[str]
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "body_b64": base64.b64encode(self.body).decode("ascii"),
                "routing_key": self.routing_key, "reply_to": self.reply_to,
                "correlation_id": self.correlation_id, "headers": self.headers,
                "content_type": self.content_type, "journaled_at": time.time()}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> "JournalEntry":
        return cls(queue=data["queue"], body=base64.b64decode(data["body_b64"]),
                   routing_key=data.get("routing_key") or data["queue"], reply_to=data.get("reply_to"),
                   correlation_id=data.get("correlation_id"), headers=data.get("headers") or {},
                   content_type=data.get("content_type"), path=path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """This agent's journal folder, locked for the life of the process."""

    def __init__(self, root: str, agent_id: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dir = os.path.join(self.root, agent_id)
        self._lock_fd: Optional[int] = None
        self._seq = 0

    def open(self) -> None:
        """Create the folder and take its lock (the lock dies with this process)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd

    def add(self, entry: JournalEntry) -> str:
        """Write entry durably; return its path. Raises OSError when the disk refuses."""
        if self._lock_fd is None:
            self.open()
        self._seq += 1
        final = os.path.join(self.dir, f"{time.time_ns()}-{self._seq}{SUFFIX}")
        tmp = final + ".tmp"
        data = json.dumps(entry.to_json()).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        entry.path = final
        return final

    def remove(self, path: str) -> None:
        """Forget an entry whose work is finished (or whose message is safely elsewhere)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def entries(self) -> list[str]:
        return sorted(os.path.join(self.dir, n) for n in os.listdir(self.dir) if n.endswith(SUFFIX))

    def close(self) -> None:
        """Release the lock; remove the folder when no entry is left."""
        if self._lock_fd is None:
            return
        if not self.entries():
            try:
                os.unlink(os.path.join(self.dir, LOCK_NAME))
                os.rmdir(self.dir)
            except OSError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = None


def _orphans(root: str, own_dir: str, min_age: float) -> Iterator[tuple[str, int]]:
    """Folders whose owner is dead, each yielded with its lock held by us."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        folder = os.path.join(root, name)
        if folder == own_dir or not os.path.isdir(folder):
            continue
        lock_path = os.path.join(folder, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            # The owner died before taking its lock, or a recoverer just finished: only an old
            # folder is safe to take over.
            try:
                if time.time() - os.stat(folder).st_mtime > min_age:
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                else:
                    continue
            except OSError:
                continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("journal: cannot lock %s: %s", folder, exc.strerror)
            continue
        yield folder, fd


def recover(root: str, own_dir: str, republish: Callable[[JournalEntry], None], min_age: float = 60.0) -> int:
    """Republish every entry left by dead agents under root; return how many were recovered.

    republish must return only once the broker has confirmed the message; an exception leaves
    the entry in place for the next scan.
    """
    root = os.path.abspath(os.path.expanduser(root))
    recovered = 0
    for folder, fd in _orphans(root, own_dir, min_age):
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX))
            for name in names:
                path = os.path.join(folder, name)
                try:
                    with open(path, encoding="utf-8") as fh:
                        entry = JournalEntry.from_json(json.load(fh), path)
                except (OSError, ValueError, KeyError) as exc:
                    log.error("journal: unreadable entry %s kept for a person to inspect: %s", path, exc)
                    continue
                republish(entry)
                os.unlink(path)
                recovered += 1
            for name in os.listdir(folder):
                if name.endswith(".tmp"):  # never renamed: its delivery was never acknowledged
                    os.unlink(os.path.join(folder, name))
            if not any(n.endswith(SUFFIX) for n in os.listdir(folder)):
                os.unlink(os.path.join(folder, LOCK_NAME))
                os.rmdir(folder)
        except OSError as exc:
            log.warning("journal: recovery of %s stopped: %s", folder, exc)
        finally:
            os.close(fd)
    return recovered
