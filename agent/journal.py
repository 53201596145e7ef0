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

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from hpc_common.journal_layout import SUFFIX
from hpc_common.messages import Message
from hpc_common.owned_folders import OwnedFolder, release_folder, take_over_dead_owners, write_atomic

log = logging.getLogger("agent.journal")


@dataclass
class JournalEntry(Message):
    """A message recorded durably, with the queue to publish it to again."""

    queue: str = ""
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.fields_json(), queue=self.queue, journaled_at=time.time())

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> "JournalEntry":
        return cls(queue=data["queue"], path=path, **Message.fields_from_json(data, data["queue"]))


class Journal:
    """This agent's journal folder, locked for the life of the process."""

    def __init__(self, root: str, agent_id: str) -> None:
        self._folder = OwnedFolder(root, agent_id)
        self.root = self._folder.root
        self.dir = self._folder.dir
        self._seq = 0

    def open(self) -> None:
        """Create the folder and take its lock (the lock dies with this process)."""
        self._folder.open()

    def add(self, entry: JournalEntry) -> str:
        """Write entry durably; return its path. Raises OSError when the disk refuses."""
        if not self._folder.held:
            self.open()
        self._seq += 1
        final = os.path.join(self.dir, f"{time.time_ns()}-{self._seq}{SUFFIX}")
        write_atomic(final, json.dumps(entry.to_json()).encode("utf-8"), tmp=final + ".tmp")
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
        if self._folder.held:
            self._folder.close(remove=not self.entries())


def recover(root: str, own_dir: str, republish: Callable[[JournalEntry], None], min_age: float = 60.0) -> int:
    """Republish every entry left by dead agents under root; return how many were recovered.

    republish must return only once the broker has confirmed the message; an exception leaves
    the entry in place for the next scan.
    """
    root = os.path.abspath(os.path.expanduser(root))
    recovered = 0

    def take_over(folder: str) -> None:
        nonlocal recovered
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
            release_folder(folder)

    take_over_dead_owners(root, own_dir, min_age, take_over, "journal: recovery of")
    return recovered
