"""How many agent tasks to add, or which idle ones to cancel: one pure function, named cases.

Rules (they make oscillation impossible by construction):

* Tasks are added only while there is a backlog (ready + unacknowledged messages, plus work held
  outside RabbitMQ by a relay, a spool or the journal: launcher.backlog), up to the
  number of tasks the backlog needs, minus the tasks already queued, running or unaccounted for
  (MISSING counts as present: never double-submit for a job we cannot see), within the caps.
* Tasks are cancelled only when the backlog has been zero for ``idle_grace_s`` without a break.
  Queued tasks are cancelled first; running ones only when nothing can be in flight (no unacked
  message, or no consumer at all). Otherwise running agents are left to exit on their own.
* Any failed input (broker or scheduler query) means no action, and the idle clock is kept as is.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional, Tuple

from launcher.caps import Caps, Request, Usage, clamp


class Case(str, enum.Enum):
    """The named situations decide() recognises."""

    BROKER_UNAVAILABLE = "broker_unavailable"
    SCHEDULER_UNAVAILABLE = "scheduler_unavailable"
    SCALE_UP = "scale_up"
    CAPPED = "capped"  # more tasks needed, caps allow none
    STEADY = "steady"  # backlog covered by present tasks
    IDLE_WAIT = "idle_wait"  # backlog zero, grace period not over yet
    SCALE_DOWN = "scale_down"  # idle: cancel queued (and idle running) tasks
    IDLE = "idle"  # idle and nothing to cancel


@dataclasses.dataclass(frozen=True)
class Observation:
    """One look at the world. ``None`` broker numbers mean the broker query failed."""

    now: float
    ready: Optional[int]
    consumers: Optional[int]
    queued: int = 0  # our tasks, from the scheduler
    running: int = 0
    missing: int = 0
    unacked: Optional[int] = None  # None: unknown (needs the management API)
    scheduler_ok: bool = True
    per_file_s: Optional[float] = None  # recent mean seconds per file, if known
    held: int = 0  # waiting outside RabbitMQ: relay, spool, journal (launcher.backlog)
    held_in_flight: int = 0  # relay leases of agents that heartbeat: in flight, like unacked

    @property
    def backlog(self) -> Optional[int]:
        if self.ready is None:
            return None
        return self.ready + (self.unacked or 0) + self.held + self.held_in_flight


DEFAULT_FILES_PER_TASK = 50  # one task's share of the backlog when nothing says how long a file takes


@dataclasses.dataclass(frozen=True)
class Policy:
    """Launcher tuning (not site caps)."""

    walltime_s: int
    #: most files one task is given (--files-per-task); None: as many as its walltime allows,
    #: DEFAULT_FILES_PER_TASK when the per-file time is unknown
    files_per_task: Optional[int] = None
    idle_grace_s: float = 300.0
    queue: Optional[str] = None
    account: Optional[str] = None

    def task_capacity(self, per_file_s: Optional[float]) -> int:
        """Files one task is given: what fits in its walltime, never more than files_per_task."""
        if per_file_s and per_file_s > 0:
            fits = max(1, int(self.walltime_s * 0.9 // per_file_s))
            return fits if self.files_per_task is None else max(1, min(fits, self.files_per_task))
        return max(1, self.files_per_task if self.files_per_task is not None else DEFAULT_FILES_PER_TASK)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do now, why, and the idle clock to carry to the next decision."""

    case: Case
    submit: int = 0
    cancel_queued: int = 0
    cancel_running: int = 0
    walltime_s: int = 0
    queue: Optional[str] = None
    account: Optional[str] = None
    max_running: int = 0  # throttle for the new array
    reasons: Tuple[str, ...] = ()
    idle_since: Optional[float] = None

    @property
    def acts(self) -> bool:
        return bool(self.submit or self.cancel_queued or self.cancel_running)


def decide(obs: Observation, idle_since: Optional[float], policy: Policy, caps: Caps,
           usage: Usage) -> Decision:
    """The scaling decision for ``obs``; ``idle_since`` is the previous decision's idle clock."""
    if obs.backlog is None:
        return Decision(Case.BROKER_UNAVAILABLE, idle_since=idle_since,
                        reasons=("broker query failed: no action",))
    if not obs.scheduler_ok:
        return Decision(Case.SCHEDULER_UNAVAILABLE, idle_since=idle_since,
                        reasons=("scheduler query failed: no action",))
    backlog = obs.backlog
    present = obs.queued + obs.running + obs.missing
    if backlog == 0:
        return _idle(obs, idle_since if idle_since is not None else obs.now, policy)

    capacity = policy.task_capacity(obs.per_file_s)
    target = math.ceil(backlog / capacity)
    basis = f"backlog {backlog}, {capacity} file(s) per task: {target} task(s) needed"
    if target <= present:
        return Decision(Case.STEADY, reasons=(f"{basis}, {present} present",))
    allowance = clamp(Request(target - present, policy.walltime_s, policy.queue, policy.account),
                      usage, caps)
    reasons = (f"{basis}, {present} present",) + allowance.reasons
    if allowance.refused:
        return Decision(Case.CAPPED, reasons=reasons)
    return Decision(Case.SCALE_UP, submit=allowance.tasks, walltime_s=allowance.walltime_s,
                    queue=allowance.queue, account=allowance.account,
                    max_running=allowance.max_running, reasons=reasons)


def _idle(obs: Observation, idle_since: float, policy: Policy) -> Decision:
    idle_for = obs.now - idle_since
    if idle_for < policy.idle_grace_s:
        return Decision(Case.IDLE_WAIT, idle_since=idle_since, reasons=(
            f"queue empty for {idle_for:.0f} s of {policy.idle_grace_s:.0f} s grace",))
    nothing_in_flight = (obs.unacked == 0 or obs.consumers == 0) and obs.held_in_flight == 0
    cancel_running = obs.running if nothing_in_flight else 0
    if not obs.queued and not cancel_running:
        why = "queue empty, no task to cancel"
        if obs.running:
            why += f"; {obs.running} running task(s) may hold messages: left to exit when idle"
        return Decision(Case.IDLE, idle_since=idle_since, reasons=(why,))
    reasons = [f"queue empty for {idle_for:.0f} s: cancel {obs.queued} queued task(s)"]
    if cancel_running:
        reasons.append(f"cancel {cancel_running} idle running task(s) (nothing in flight)")
    elif obs.running:
        reasons.append(f"{obs.running} running task(s) may hold messages: left to exit when idle")
    return Decision(Case.SCALE_DOWN, cancel_queued=obs.queued, cancel_running=cancel_running,
                    idle_since=idle_since, reasons=tuple(reasons))
