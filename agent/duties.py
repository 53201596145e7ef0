"""A plugin's time-driven chores, apart from its messages: registration, activity reports, orphan recovery.

The Runner calls `Duties.run(now)` every turn; each chore runs when it is due and the source can
reach its backend. None of them touches a message's state (that stays in agent.runner).

- registration: the extractor announced every `heartbeat` seconds (Clowder lists extractors that
  registered lately; pyclowder registers once at start, the agent keeps it fresh), with
  `unique_key` in its extractor_info when EXTRACTOR_KEY makes the queue private, as pyclowder's
  Connector sends it;
- activity reports: what the plugin finished since the last report, every REPORT_INTERVAL, and a
  last one at shutdown (hpc_common.reports; the launcher sizes the array from them);
- orphan recovery: messages journaled by agents that died put back every RECOVERY_INTERVAL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hpc_common import reports

from .sources.base import WorkSource

RECOVERY_INTERVAL = 30.0


@dataclass
class Activity:
    """What one plugin finished since the last report."""

    since: float
    done: int = 0
    failed: int = 0
    dead: int = 0
    busy: float = 0.0
    durations: list[float] = field(default_factory=list)

    def attempt(self, elapsed: float, ok: bool) -> None:
        """One attempt ended after elapsed seconds in a slot (ok: its file is done)."""
        self.busy += elapsed
        if len(self.durations) < reports.MAX_DURATIONS:
            self.durations.append(elapsed)
        if ok:
            self.done += 1
        else:
            self.failed += 1


class Duties:
    """When each chore is due, and doing it through the plugin's work source."""

    def __init__(self, source: WorkSource, heartbeat: float, owner: Optional[str], identity: str, slots: int,
                 now: float, extractor_key: Optional[str] = None) -> None:
        self.source = source
        self.extractor_key = extractor_key
        self.heartbeat = heartbeat
        self.owner = owner            # CLOWDER_EMAIL, sent with the registration as pyclowder does
        self.identity = identity      # "slurm 1234_5 on node7"
        self.slots = slots
        self.activity = Activity(since=now)
        self._next_register = 0.0
        self._next_recovery = 0.0

    def run(self, now: float, info: dict[str, Any]) -> None:
        """Do what is due (info: the loaded extractor's extractor_info; empty before it loaded)."""
        connected = self.source.connected
        if connected and info and now >= self._next_register:
            self.source.register(dict(info, unique_key=self.extractor_key) if self.extractor_key else info,
                                 self.owner)
            self._next_register = now + self.heartbeat
        if now - self.activity.since >= reports.REPORT_INTERVAL:
            self.report(now)
        if connected and now >= self._next_recovery:
            self._next_recovery = now + RECOVERY_INTERVAL
            self.source.recover_orphans()

    def report(self, now: float) -> None:
        """Tell the launcher what this plugin finished since the last report (best effort), start anew."""
        a = self.activity
        if self.source.connected:
            self.source.publish_report(reports.report(
                getattr(self.source, "agent_id", ""), self.source.queue, self.identity, now - a.since, a.done,
                a.failed, a.busy, dead_lettered=a.dead, slots=self.slots, durations=a.durations))
        self.activity = Activity(since=now)


__all__ = ["Activity", "Duties", "RECOVERY_INTERVAL"]
