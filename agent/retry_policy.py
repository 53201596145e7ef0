"""Where a retry is decided: one pure function from an attempt's outcome to how its message is settled.

pyclowder's rules, which the agent keeps so that Clowder sees the same thing either way
(pyclowder/connectors.py, `_process_message`; 2.x and 3.0.8 alike):

- the message body's `retry_count` is the number of failed attempts so far; a failure with
  `retry_count < MAX_RETRY` (default 10) is retried with the status
  "StatusMessage.retry: (#<retry_count+1>) <message>", otherwise the status is
  "StatusMessage.error: <message>" and the message goes to `error.<queue>`: with the defaults a
  file that always fails gets 11 attempts;
- CalledProcessError and PyClowderExtractionAbort go to the error queue at once.

What the agent adds: a count shared by every worker (the `x-agent-attempts` header), a backoff
between attempts, failures the extractor cannot report itself (its process died or was killed
for its time limit), and outcomes that are not the file's fault and so spend no attempt: work
handed back at a stop or a walltime drain, a full scratch disk ("release": another node should
take it), and Clowder unreachable ("defer"). No I/O here: the Runner carries out the decision.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from hpc_common import retry_queues

from .frames import Outcome

#: pyclowder's MAX_RETRY default: retries after the first failed attempt (so 11 attempts in all)
DEFAULT_MAX_RETRIES = retry_queues.DEFAULT_MAX_RETRIES
DEFER_STEPS = 5  # "Clowder unavailable" backoffs double this many times, then stay

_RETRY_NUMBER = re.compile(r"^\(#\d+\) ")


class Action(str, enum.Enum):
    """How a message is settled after an attempt."""

    ACK = "ack"                  # done: acknowledge
    RETRY = "retry"              # a failed attempt: try again after `delay` with the new count
    DEAD_LETTER = "dead-letter"  # to error.<queue> with `reason`
    HAND_BACK = "hand back"      # not the file's fault, and not for this agent: back to the queue as it was
    DEFER = "defer"              # not the file's fault: try again after `delay` without spending an attempt


@dataclass(frozen=True)
class RetrySettings:
    """The settings a decision depends on (AgentConfig's max_retries and retry_backoff)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff: float = 2.0


@dataclass(frozen=True)
class Attempt:
    """What one attempt came to, as the extractor process (or its death) reported it.

    outcome: an agent.frames.Outcome value (a frame's plain string compares equal to it); one
    this agent does not know counts as a failed attempt.
    reported: the extractor already sent pyclowder's status for this outcome (its own
    connector's retry or error status), so the agent must not send another.
    exhausted: pyclowder itself gave up because retry_count reached its max_retry.
    """

    outcome: str
    reason: str = ""
    reported: bool = False
    exhausted: bool = False


@dataclass(frozen=True)
class Settle:
    """The decision: what to do with the message, and what to tell Clowder (status kind, text) if anything."""

    action: Action
    attempts: int              # failed attempts to record with the message (x-agent-attempts)
    delay: float = 0.0         # seconds before it may run again (RETRY, DEFER)
    reason: str = ""           # for logs, the retry header and the error queue's x-error-reason
    status: Optional[tuple[str, str]] = None  # ("retry" | "error", message) for the agent to send
    stop_agent: bool = False   # this node cannot work (RELEASE): stop taking work


def decide(attempt: Attempt, attempts: int, settings: RetrySettings, defers: int = 0) -> Settle:
    """Settle one attempt of a message that had `attempts` failed attempts before it.

    defers: consecutive "Clowder unavailable" outcomes so far in this agent, this one included
    (their backoff grows with it).
    """
    outcome, reason = attempt.outcome, attempt.reason
    if outcome == Outcome.OK:
        return Settle(Action.ACK, attempts)
    if outcome == Outcome.STOPPED:
        return Settle(Action.HAND_BACK, attempts, reason=reason or "stopped")
    if outcome == Outcome.RELEASE:
        return Settle(Action.HAND_BACK, attempts, reason=reason or "resources", stop_agent=True)
    if outcome == Outcome.DEFER:
        delay = retry_queues.backoff(settings.retry_backoff, min(max(defers, 1), DEFER_STEPS) + 1)
        return Settle(Action.DEFER, attempts, delay=delay, reason=reason)
    failed = attempts + 1
    plain = _RETRY_NUMBER.sub("", reason)
    if outcome == Outcome.ERROR:
        why = f"gave up after {failed} attempt(s): {plain}" if attempt.exhausted else plain
        return Settle(Action.DEAD_LETTER, failed, reason=why,
                      status=None if attempt.reported else ("error", plain))
    # RETRY, DIED or anything unknown: a failed attempt
    if failed > settings.max_retries:
        # pyclowder's message_error text is the extractor's own message; the header says more.
        return Settle(Action.DEAD_LETTER, failed, reason=f"gave up after {failed} attempt(s): {plain}",
                      status=("error", plain))
    return Settle(Action.RETRY, failed, delay=retry_queues.backoff(settings.retry_backoff, failed),
                  reason=plain, status=None if attempt.reported else ("retry", f"(#{failed}) {plain}"))


def attempts_so_far(header_attempts: int, body: Mapping[str, Any]) -> int:
    """Failed attempts of a message: the agents' header, or pyclowder's body retry_count when higher.

    A message republished by pyclowder itself (a site moving from pyclowder to the agent) carries
    its count only in the body.
    """
    count = body.get("retry_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > header_attempts:
        return count
    return header_attempts


__all__ = ["Action", "Attempt", "RetrySettings", "Settle", "attempts_so_far", "decide", "DEFAULT_MAX_RETRIES"]
