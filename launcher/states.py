"""Normalized job states and the per-scheduler tables that translate into them.

One enum for every scheduler. TIMEOUT is distinct from FAILED (the agent was killed at its
walltime: normal for a resident pull-worker) and MISSING is distinct from COMPLETED (the scheduler
no longer knows the job: we do not know how it ended, and we never pretend it succeeded).
"""
from __future__ import annotations

import enum
from typing import Collection, Optional


class JobState(str, enum.Enum):
    """State of one array task (or of a whole non-array job)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    MISSING = "missing"

    @property
    def terminal(self) -> bool:
        """True when the task will never run again (MISSING is not terminal: it may reappear)."""
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """True when the task holds or waits for resources (counts against caps)."""
        return self in (JobState.QUEUED, JobState.RUNNING)


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED}
)

# ---------------------------------------------------------------- PBS Pro / OpenPBS
# job_state letters (qstat -f). F (finished, history) and X (finished subjob) are translated
# through the exit status, see pbs_finished_state().
PBS_STATES = {
    "Q": JobState.QUEUED,  # queued
    "H": JobState.QUEUED,  # held
    "W": JobState.QUEUED,  # waiting for its execution time
    "T": JobState.QUEUED,  # being moved
    "M": JobState.QUEUED,  # moved to another server
    "B": JobState.RUNNING,  # array parent: at least one subjob started
    "R": JobState.RUNNING,
    "E": JobState.RUNNING,  # exiting after having run
    "S": JobState.RUNNING,  # suspended: still holds its allocation
    "U": JobState.RUNNING,  # suspended for workstation user activity
}
PBS_FINISHED = frozenset({"F", "X"})
PBS_EXIT_WALLTIME = -29  # JOB_EXEC_KILL_WALLTIME
PBS_EXIT_DELETED = (271, 265)  # 256 + SIGTERM (qdel), 256 + SIGKILL (qdel after kill_delay)


def _finished_state(exit_status: Optional[int], walltime_code: int, deleted_codes: Collection[int]) -> JobState:
    """A finished PBS-family job's state from its exit status; None means deleted before it ran."""
    if exit_status is None:
        return JobState.CANCELLED
    if exit_status == 0:
        return JobState.COMPLETED
    if exit_status == walltime_code:
        return JobState.TIMEOUT
    if exit_status in deleted_codes:
        return JobState.CANCELLED
    return JobState.FAILED


PBS_SUBSTATE_TERMINATED = 91  # finished by qdel (substate 92: finished, 93: failed)


def pbs_finished_state(exit_status: Optional[int], substate: Optional[int] = None) -> JobState:
    """Translate the Exit_status (and substate) of a finished PBS Pro job or subjob.

    No exit status on a finished job means it never ran: it was deleted while queued. Substate 91
    says qdel ended it whatever the exit status (a subjob deleted while starting can show 1).
    An array parent keeps Exit_status 0 when a subjob failed: only the subjobs tell.
    """
    if substate == PBS_SUBSTATE_TERMINATED and exit_status != PBS_EXIT_WALLTIME:
        return JobState.CANCELLED
    return _finished_state(exit_status, PBS_EXIT_WALLTIME, PBS_EXIT_DELETED)


# ---------------------------------------------------------------- Torque
TORQUE_STATES = {
    "Q": JobState.QUEUED,
    "H": JobState.QUEUED,
    "W": JobState.QUEUED,
    "T": JobState.QUEUED,
    "R": JobState.RUNNING,
    "E": JobState.RUNNING,
    "S": JobState.RUNNING,
}
TORQUE_FINISHED = frozenset({"C"})
TORQUE_EXIT_WALLTIME = -11  # JOB_EXEC_OVERLIMIT_WT
TORQUE_EXIT_DELETED = (271, 265)


def torque_finished_state(exit_status: Optional[int]) -> JobState:
    """Translate the exit_status of a completed (C) Torque job or array task."""
    return _finished_state(exit_status, TORQUE_EXIT_WALLTIME, TORQUE_EXIT_DELETED)


# ---------------------------------------------------------------- Slurm
SLURM_STATES = {
    "PENDING": JobState.QUEUED,
    "CONFIGURING": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED,
    "REQUEUE_FED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.QUEUED,
    "RESV_DEL_HOLD": JobState.QUEUED,
    "SPECIAL_EXIT": JobState.QUEUED,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
}


def slurm_state(name: str) -> Optional[JobState]:
    """Translate a Slurm state name (``"CANCELLED by 0"`` and flag suffixes tolerated)."""
    base = name.strip().split()[0].upper() if name.strip() else ""
    return SLURM_STATES.get(base)
