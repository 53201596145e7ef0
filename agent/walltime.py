"""Walltime inside a task: estimating a file's duration, and the admission rule.

(Reading walltime limits is hpc_common.walltime, shared with the launcher.)

A batch task must take a file only when it can finish it before the scheduler's end time;
otherwise the file would be killed half-done at the limit and retried by another task.
"""
from __future__ import annotations

import collections
from typing import Optional


class DurationEstimate:
    """A cautious running estimate of how long one file takes with this plugin.

    Uses the longest of the recent durations: under-estimating costs a file killed at the
    limit, over-estimating only ends the task a little early.
    """

    def __init__(self, window: int = 20, initial: Optional[float] = None) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._initial = initial

    def add(self, seconds: float) -> None:
        self._recent.append(max(0.0, seconds))

    def value(self) -> Optional[float]:
        """Estimated seconds per file; None when nothing is known yet."""
        if self._recent:
            return max(self._recent)
        return self._initial


MIN_MARGIN = 20.0  # above the 15 s by which pbs/agent_array.slurm asks Slurm to signal early


def default_margin(total_walltime: Optional[float]) -> float:
    """Safety margin kept free at the end of an allocation: 5% of it, at least 20 s, at most 5 min."""
    if not total_walltime:
        return MIN_MARGIN
    return min(300.0, max(MIN_MARGIN, 0.05 * total_walltime))


def admit(remaining: Optional[float], estimate: Optional[float], margin: float) -> bool:
    """May a task with `remaining` seconds left take a file expected to take `estimate` seconds?

    No known end time: always. Unknown duration: only while more than the margin is left.
    """
    if remaining is None:
        return True
    return remaining > (estimate or 0.0) + margin
