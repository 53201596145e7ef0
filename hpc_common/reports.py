"""Agent activity reports: how the launcher learns throughput and per-file time.

Every agent publishes a small JSON report every REPORT_INTERVAL seconds (and when it stops) to
the direct exchange EXCHANGE with its queue name as routing key: files finished since the last
report and the seconds they took. The launcher keeps them in a queue bound to that key whose
messages expire after WINDOW seconds, and reads them without acknowledging (the queue is a
sliding window, not a work queue). Plain data here, no broker client: both sides import it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

EXCHANGE = "clowder-hpc-agent.reports"
REPORT_INTERVAL = 30.0
WINDOW = 600.0
MAX_REPORTS = 10000


def window_queue(queue: str) -> str:
    """The launcher's window queue for one extractor queue."""
    return f"{EXCHANGE}.{queue}"


WINDOW_QUEUE_ARGUMENTS = {"x-message-ttl": int(WINDOW * 1000), "x-max-length": MAX_REPORTS}


MAX_DURATIONS = 2000  # per-file durations one report carries (the launcher's duration plot)


def report(agent_id: str, queue: str, task: str, interval: float, done: int, failed: int,
           busy_seconds: float, now: Optional[float] = None, dead_lettered: int = 0,
           slots: Optional[int] = None, durations: Iterable[float] = ()) -> dict[str, Any]:
    """One report: files finished (done) or failed attempts (failed) in the last interval, and their time.

    ``dead_lettered``: messages this agent sent to the error queue in the interval; ``slots``:
    extractor slots the agent runs (for allocation utilization); ``durations``: seconds per file.
    """
    return {"v": 1, "agent": agent_id, "queue": queue, "task": task, "time": time.time() if now is None else now,
            "interval": round(interval, 3), "done": done, "failed": failed, "busy_seconds": round(busy_seconds, 3),
            "dead_lettered": dead_lettered, "slots": slots,
            "durations": [round(d, 3) for d in list(durations)[:MAX_DURATIONS]]}


@dataclass(frozen=True)
class Activity:
    """What the agents of one queue did in the window."""

    agents: int
    files_per_minute: float
    per_file_seconds: Optional[float]


def summarize(reports: Iterable[dict[str, Any]], now: Optional[float] = None,
              window: float = WINDOW) -> Optional[Activity]:
    """Throughput and mean seconds per file over the window; None when no agent reported in it."""
    now = time.time() if now is None else now
    recent = []
    for r in reports:
        try:
            if now - float(r["time"]) <= window:
                recent.append(r)
        except (KeyError, TypeError, ValueError):
            continue
    if not recent:
        return None
    done = sum(int(r.get("done", 0)) for r in recent)
    finished = done + sum(int(r.get("failed", 0)) for r in recent)
    busy = sum(float(r.get("busy_seconds", 0.0)) for r in recent)
    start = min(float(r["time"]) - float(r.get("interval", 0.0)) for r in recent)
    span = max(1.0, min(window, now - start))
    return Activity(agents=len({r.get("agent") for r in recent}), files_per_minute=60.0 * done / span,
                    per_file_seconds=busy / finished if finished else None)
