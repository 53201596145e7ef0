"""The frames between the agent and its extractor processes: one definition of their kinds and fields.

On the wire a frame is a JSON object (agent.ipc; MPI ranks pickle the same dicts) whose "t"
says its kind. The agent sends INIT once, then JOB per file and EXIT; the extractor process
answers READY (or FATAL), STATUS while a file runs and DONE with the file's Outcome. DIED is
made on the agent's side when an extractor process ends without an answer (crash, kill, a lost
MPI rank). The frame types are TypedDicts, so a frame stays a plain dict at run time: nothing
is converted on the hot path, and type checkers see the fields.

This module runs inside extractor processes and container images too: Python 3.8 or later,
standard library only.
"""
from __future__ import annotations

import enum
from typing import Any, Dict, Optional

try:  # Python 3.8 has TypedDict, but not NotRequired: total=False classes stand in for it
    from typing import TypedDict
except ImportError:  # pragma: no cover - older than the supported 3.8
    TypedDict = dict  # type: ignore[misc, assignment]

KIND = "t"  # the key that holds a frame's kind


class Kind(str, enum.Enum):
    """What a frame is (its "t")."""

    INIT = "init"      # agent -> extractor: settings (agent.worker_settings.worker_init)
    READY = "ready"    # extractor -> agent: loaded, with its extractor_info
    FATAL = "fatal"    # extractor -> agent: could not load the extractor
    JOB = "job"        # agent -> extractor: one message body to process
    STATUS = "status"  # extractor -> agent: a status for Clowder, as pyclowder made it
    DONE = "done"      # extractor -> agent: the job's outcome
    DIED = "died"      # made by the agent: the process ended without an outcome
    EXIT = "exit"      # agent -> extractor: finish


class Outcome(str, enum.Enum):
    """What became of one job; agent.retry_policy decides what that does to its message."""

    OK = "ok"            # processed: acknowledge
    RETRY = "retry"      # a failure pyclowder would resubmit
    ERROR = "error"      # a failure pyclowder sends to the error queue
    DEFER = "defer"      # Clowder unreachable: later, without spending an attempt
    RELEASE = "release"  # this node cannot take it (scratch space): hand it back
    # The agent's own, never sent by an extractor process:
    DIED = "died"        # the process ended without an outcome (crash, time or memory limit)
    STOPPED = "stopped"  # the agent killed it at the end of a stop's grace period


class StatusFrame(TypedDict):
    t: str
    payload: Dict[str, Any]


class JobFrame(TypedDict):
    t: str
    job: int
    body: Dict[str, Any]


class JobResult(TypedDict, total=False):
    """A job's outcome as the connector reports it (the fields of DONE beside "t" and "job")."""

    outcome: str
    reason: str
    traceback: str
    reported: bool     # the extractor already sent pyclowder's status for it
    exhausted: bool    # pyclowder gave up because retry_count reached max_retry
    staged_used: bool  # stage-ahead: pyclowder took the file fetched for it


class DoneFrame(JobResult, total=False):
    t: str
    job: int


class DiedFrame(TypedDict):
    t: str
    reason: str


def job(number: int, body: Dict[str, Any]) -> JobFrame:
    """The frame that hands one message body to an extractor process."""
    return {"t": Kind.JOB.value, "job": number, "body": body}


def status(payload: Dict[str, Any]) -> StatusFrame:
    """A status for Clowder (agent.messages.status_payload's form)."""
    return {"t": Kind.STATUS.value, "payload": payload}


def result(outcome: Outcome, reason: str = "", traceback: str = "", reported: bool = False,
           exhausted: bool = False) -> JobResult:
    """A job's outcome, for a DONE frame."""
    return {"outcome": outcome.value, "reason": reason, "traceback": traceback, "reported": reported,
            "exhausted": exhausted}


def done(number: int, outcome: JobResult) -> DoneFrame:
    """The frame that ends job number with its outcome."""
    frame: DoneFrame = {"t": Kind.DONE.value, "job": number}
    frame.update(outcome)
    return frame


def died(reason: str) -> DiedFrame:
    """The agent's stand-in for an outcome when an extractor process ended without one."""
    return {"t": Kind.DIED.value, "reason": reason}


def kind(frame: Dict[str, Any]) -> Optional[str]:
    """A frame's kind (compare with Kind members), None when it has none."""
    return frame.get(KIND)


_ENDS_JOB = frozenset((Kind.DONE.value, Kind.DIED.value))  # once: an enum's .value is a lookup each time


def ends_job(frame: Dict[str, Any]) -> bool:
    """True for the frames after which a slot is free (DONE, DIED)."""
    return frame.get(KIND) in _ENDS_JOB


def outcome_of(frame: Dict[str, Any]) -> Optional[str]:
    """The outcome a DONE frame carries (compare with Outcome members)."""
    return frame.get("outcome")


__all__ = ["DiedFrame", "DoneFrame", "JobFrame", "JobResult", "KIND", "Kind", "Outcome", "StatusFrame",
           "died", "done", "ends_job", "job", "kind", "outcome_of", "result", "status"]
