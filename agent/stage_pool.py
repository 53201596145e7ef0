"""The agent's stage-ahead threads: each waiting delivery's file and file info fetched before its slot frees.

The Runner holds more deliveries than it has slots (its prefetch); with stage-ahead each one that
pyclowder would download (agent.stage_ahead.stageable) goes to one of these threads as it arrives
(unless a relay sent its file info and file with the lease: those are written out at once),
and a slot is given only deliveries whose staging has ended, with what was staged added to the
body (agent.stage_ahead.stage). The slot's extractor (StagedSlot) then spends no round trip on
them. A staging that fails hands the extractor nothing: pyclowder fetches what is missing itself.

Threads only fetch; every change of state happens on the Runner's main thread (`post`), so the
Runner needs no lock. Staged files live in a private folder removed at close.

An extractor whose check_message skips the download (bypass, or files it ignores) never uses what
was fetched for it: after UNUSED_LIMIT such files in a row the pool stops staging for good (and
`on_off` tells the source, so a relay stops sending files inline), rather than double the
Clowder requests of every file.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from typing import Any, Callable, Optional

from .messages import Delivery
from .stage_ahead import STAGED_INFO_KEY, STAGED_KEY, discard, inline_extras, stage, stageable, usable

log = logging.getLogger("agent.stage")
UNUSED_LIMIT = 8  # files in a row whose staged copy the extractor did not take: then staging stops


class _Entry:
    __slots__ = ("delivery", "body", "staging", "extras", "forgotten")

    def __init__(self, delivery: Delivery, body: dict[str, Any]) -> None:
        self.delivery, self.body = delivery, body
        self.staging = True
        self.extras: dict[str, Any] = {}
        self.forgotten = False


class StagePool:
    """Stage waiting deliveries on `threads` threads; `on_staged` runs (main thread) after each."""

    def __init__(self, init: dict[str, Any], threads: int, post: Callable[[Callable[[], None]], None],
                 on_staged: Callable[[], None], on_off: Callable[[], None] = lambda: None) -> None:
        self._init = init
        self._on_off = on_off
        self._unused = 0
        self._threads = max(1, threads)  # the Runner gives two per slot: two files can be on their way
        self._post = post
        self._on_staged = on_staged
        self._entries: dict[int, _Entry] = {}    # id(delivery) -> entry (main thread only)
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

    def take(self, delivery: Delivery, body: dict[str, Any]) -> None:
        """A delivery waiting for a slot: stage it if pyclowder would download it.

        What came inline with it (delivery.inline) is written out at once; a thread fetches the rest.
        """
        inline, delivery.inline = delivery.inline, None
        if self._folder is None or not self._staging_on or not stageable(body, self._init):
            return
        entry = _Entry(delivery, body)
        self._entries[id(delivery)] = entry
        if inline:
            entry.extras = inline_extras(body, self._init, inline, self._folder)
            if STAGED_KEY in entry.extras and STAGED_INFO_KEY in entry.extras:
                entry.staging = False
                return
        self._todo.put(entry)

    def ready(self, delivery: Delivery) -> bool:
        """True unless the delivery's staging is still under way."""
        entry = self._entries.get(id(delivery))
        return entry is None or not entry.staging

    def body_for(self, delivery: Delivery, body: dict[str, Any]) -> dict[str, Any]:
        """The body to hand the extractor: with what was staged for it."""
        entry = self._entries.get(id(delivery))
        return dict(body, **entry.extras) if entry is not None and entry.extras else body

    def forget(self, delivery: Delivery) -> None:
        """The delivery's job ended or it left this agent: remove its staged file (now or once staged)."""
        entry = self._entries.pop(id(delivery), None)
        if entry is not None:
            entry.forgotten = True
            discard(entry.extras)
            entry.extras = {}

    def note_use(self, used: bool) -> None:
        """The extractor took (or left) what was staged for a job; UNUSED_LIMIT left in a row stop staging."""
        self._unused = 0 if used else self._unused + 1
        if self._unused == UNUSED_LIMIT and self._folder is not None:
            log.info("stage-ahead off: the extractor used none of the last %d files fetched for it "
                     "(its check_message skips the download)", UNUSED_LIMIT)
            self._staging_on = False
            self._on_off()

    def close(self) -> None:
        """Stop the threads and remove every staged file."""
        for _ in range(self._threads):
            self._todo.put(None)
        for entry in list(self._entries.values()):
            self.forget(entry.delivery)
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
                    log.info("stage-ahead skipped for file %s: %s", entry.delivery.file_id, exc)
            self._post(lambda entry=entry, extras=extras: self._staged(entry, extras))

    def _staged(self, entry: _Entry, extras: dict[str, Any]) -> None:
        entry.staging = False
        if entry.forgotten:
            discard(extras)
            return
        entry.extras = extras
        self._on_staged()
