"""The spool folder's layout, shared by the agents that claim from it and the launcher that fills it.

  inbox/<msg>.json               staged messages, claimable
  files/<msg>/<filename>         the staged input file
  claimed/<agent>/lock           flock held by the agent for its whole life (hpc_common.owned_folders)
  claimed/<agent>/<msg>.json     claimed by atomic rename from inbox/ (one winner, also on NFS)
  outbox/<msg>.partial/          what the extractor sent so far
  outbox/<msg>/                  the same, complete, with result.json
  extractor_info.json            written by agents; the launcher registers the extractor with it

Standard library only: `python -m launcher.relay.spool_fs` runs this on a remote login node.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Any, Optional

from .messages import ATTEMPTS, retry_headers
from .owned_folders import LOCK_NAME, release_folder, take_over_dead_owners, write_atomic

log = logging.getLogger("hpc_common.spool")
RECLAIM_MIN_AGE = 30.0   # seconds a claim folder without its lock file is left to its agent's start-up


class SpoolLayout:
    """Paths and atomic file operations of one spool folder."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.inbox = os.path.join(self.root, "inbox")
        self.files = os.path.join(self.root, "files")
        self.claimed = os.path.join(self.root, "claimed")
        self.outbox = os.path.join(self.root, "outbox")
        self.info_file = os.path.join(self.root, "extractor_info.json")

    def make(self) -> None:
        """Create the spool's folders (mode 0700)."""
        for folder in (self.root, self.inbox, self.files, self.claimed, self.outbox):
            os.makedirs(folder, mode=0o700, exist_ok=True)

    def staged(self, msg: str) -> str:
        """Path of a staged (claimable) message."""
        return os.path.join(self.inbox, msg + ".json")

    def result_dir(self, msg: str, partial: bool = False) -> str:
        """Outbox folder of a message: partial while the extractor runs, final once settled."""
        return os.path.join(self.outbox, msg + (".partial" if partial else ""))

    @staticmethod
    def write_json(path: str, data: Any) -> None:
        """Write JSON durably: temporary file, fsync, rename, fsync of the folder."""
        write_atomic(path, json.dumps(data).encode("utf-8"),
                     tmp=f"{path}.tmp-{os.getpid()}-{threading.get_ident()}")

    @staticmethod
    def read_json(path: str) -> Any:
        """Read one of the spool's JSON files."""
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


def bump_attempts(staged: dict[str, Any], reason: str) -> int:
    """Count one more failed attempt in a staged message's headers; return the new count."""
    headers = staged.get("headers") or {}
    try:
        attempts = int(headers.get(ATTEMPTS, 0)) + 1
    except (TypeError, ValueError):
        attempts = 1
    staged["headers"] = retry_headers(headers, attempts, reason)
    return attempts


def reclaim(layout: SpoolLayout, own: Optional[str] = None, min_age: float = RECLAIM_MIN_AGE) -> int:
    """Put back the claims of agents that died; return how many messages went back to inbox/."""
    back = 0

    def take_over(folder: str) -> None:
        nonlocal back
        name = os.path.basename(folder)
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".json"):
                continue
            msg = entry[:-5]
            claim = os.path.join(folder, entry)
            if os.path.isdir(layout.result_dir(msg)):
                os.unlink(claim)  # it finished: the launcher collects its outbox
                continue
            shutil.rmtree(layout.result_dir(msg, partial=True), ignore_errors=True)
            staged = SpoolLayout.read_json(claim)
            bump_attempts(staged, f"agent {name} died while holding the message")
            SpoolLayout.write_json(claim, staged)
            os.rename(claim, layout.staged(msg))
            back += 1
            log.warning("spool: message %s put back: its agent %s died", msg, name)
        for entry in os.listdir(folder):
            if entry != LOCK_NAME:
                os.unlink(os.path.join(folder, entry))
        release_folder(folder)

    own_dir = os.path.join(layout.claimed, own) if own else None
    take_over_dead_owners(layout.claimed, own_dir, min_age, take_over, "spool: reclaiming")
    return back
