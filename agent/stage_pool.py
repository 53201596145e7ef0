"""The stage-ahead threads: each waiting job's file and file info fetched before its slot frees.

Used by the Runner for an agent's own slots and by an MPI rank's RankWorker for its extractors.
The Runner holds more deliveries than it has slots (its prefetch); with stage-ahead each one that
pyclowder would download (agent.stage_ahead.stageable) goes to one of these threads as it arrives
(unless a relay sent its file info and file with the lease: those are written out at once),
and a slot is given only deliveries whose staging has ended, with what was staged added to the
body (agent.stage_ahead.stage). The slot's extractor (StagedSlot) then spends no round trip on
them. A staging that fails hands the extractor nothing: pyclowder fetches what is missing itself.

Threads only fetch; every change of state happens through `post` (the Runner's main thread; a
RankWorker's lock), so the pool itself needs no lock. Staged files live in a private folder removed at close.

An extractor whose check_message skips the download (bypass, or files it ignores) never uses what
was fetched for it: after UNUSED_LIMIT such files in a row (a staging that got nothing counts
too) the pool stops staging for good (and `on_off` tells the source, so a relay stops sending
files inline), rather than double the Clowder requests of every file.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from .stage_ahead import STAGED_INFO_KEY, STAGED_KEY, discard, inline_extras, stage, stageable, usable

log = logging.getLogger("agent.stage")
UNUSED_LIMIT = 8  # files in a row whose staged copy the extractor did not take: then staging stops


class _Entry:
    __slots__ = ("key", "body", "staging", "extras", "forgotten", "since")

    def __init__(self, key: Any, body: dict[str, Any], since: float) -> None:
        self.key, self.body, self.since = key, body, since
        self.staging = True
        self.extras: dict[str, Any] = {}
        self.forgotten = False


class StagePool:
    """Stage waiting deliveries on `threads` threads; `on_staged` runs (main thread) after each."""

    def __init__(self, init: dict[str, Any], threads: int, post: Callable[[Callable[[], None]], None],
                 on_staged: Callable[[], None], on_off: Callable[[], None] = lambda: None,
                 patience: float = float("inf"), clock: Callable[[], float] = time.monotonic) -> None:
        """patience: seconds a job waits for its staging before a slot takes it without (see ready)."""
        self._init = init
        self._patience, self._clock = patience, clock
        self._on_off = on_off
        self._unused = 0
        self._threads = max(1, threads)  # the Runner gives two per slot: two files can be on their way
        self._post = post
        self._on_staged = on_staged
        self._entries: dict[int, _Entry] = {}  # id(a job's key) -> entry, which holds the key (main thread only)
        self._todo: "queue.SimpleQueue[Optional[_Entry]]" = queue.SimpleQueue()
        self._folder: Optional[str] = None
        self._staging_on = True

    @staticmethod
    def wanted(init: dict[str, Any]) -> bool:
        """False where staging is pointless (files read in place from MOUNTED_PATHS)."""
        return usable(init)

    def start(self) -> None:
        base = self._init.get("work_dir") or None
        if base:
            os.makedirs(base, exist_ok=True)
        self._folder = tempfile.mkdtemp(prefix="agent-stage-", dir=base)
        for i in range(self._threads):
            threading.Thread(target=self._stager, name=f"stage-{i}", daemon=True).start()
        log.info("stage-ahead on: %d thread(s), files in %s", self._threads, self._folder)

    def take(self, key: Any, body: dict[str, Any], inline: Optional[dict[str, Any]] = None) -> None:
        """A job waiting for a slot (key: its delivery, or the rank's job): stage it if pyclowder would download it.

        inline: its file info and file as they came with it (a relay's lease): written out at
        once; a thread fetches the rest.
        """
        if self._folder is None or not self._staging_on or not stageable(body, self._init):
            return
        entry = _Entry(key, body, self._clock())
        self._entries[id(key)] = entry
        if inline:
            entry.extras = inline_extras(body, self._init, inline, self._folder)
            if STAGED_KEY in entry.extras and STAGED_INFO_KEY in entry.extras:
                entry.staging = False
                return
        self._todo.put(entry)

    def ready(self, key: Any) -> bool:
        """True unless the job's staging is still under way, and for less than `patience` seconds.

        A slow Clowder must not hold a job back longer than that: past it the job goes without
        (pyclowder fetches everything itself) and what staging brings later is thrown away.
        """
        entry = self._entries.get(id(key))
        return entry is None or not entry.staging or self._clock() - entry.since >= self._patience

    def body_for(self, key: Any, body: dict[str, Any]) -> dict[str, Any]:
        """The body to hand the extractor: with what was staged for it."""
        entry = self._entries.get(id(key))
        if entry is not None and entry.staging:  # out of patience
            entry.forgotten = True
            return body
        return dict(body, **entry.extras) if entry is not None and entry.extras else body

    def forget(self, key: Any) -> None:
        """The job ended or left: remove its staged file (now or once staged)."""
        entry = self._entries.pop(id(key), None)
        if entry is not None:
            entry.forgotten = True
            discard(entry.extras)
            entry.extras = {}

    def note_use(self, used: bool) -> None:
        """The extractor took (or left) what was staged for a job; UNUSED_LIMIT left in a row stop staging."""
        self._unused = 0 if used else self._unused + 1
        if self._staging_on and self._unused >= UNUSED_LIMIT and self._folder is not None:
            log.info("stage-ahead off: the extractor used none of the last %d files fetched for it "
                     "(its check_message skips the download, or they could not be fetched)", UNUSED_LIMIT)
            self._staging_on = False
            self._on_off()

    def close(self) -> None:
        """Stop the threads and remove every staged file."""
        for _ in range(self._threads):
            self._todo.put(None)
        for entry in list(self._entries.values()):
            self.forget(entry.key)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _stager(self) -> None:
        while True:
            entry = self._todo.get()
            if entry is None:
                return
            folder = self._folder
            extras: dict[str, Any] = {}
            if not entry.forgotten and folder is not None:
                try:
                    extras = stage(entry.body, self._init, folder, have=entry.extras)
                except OSError as exc:  # the folder went away (closing) or is full: pyclowder fetches it
                    extras = dict(entry.extras)
                    log.info("stage-ahead skipped for file %s: %s", entry.body.get("id"), exc)
            self._post(lambda entry=entry, extras=extras: self._staged(entry, extras))

    def _staged(self, entry: _Entry, extras: dict[str, Any]) -> None:
        entry.staging = False
        if entry.forgotten:
            discard(extras)
            return
        if not extras:
            self.note_use(False)  # nothing could be fetched (Clowder away, or refusing): as good as unused
        entry.extras = extras
        self._on_staged()
