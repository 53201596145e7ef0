"""agent.retry_policy, table-tested: outcome x attempts so far x settings -> how the message is settled."""
from __future__ import annotations

import pytest

from agent.retry_policy import (DEFAULT_MAX_RETRIES, Action, Attempt, RetrySettings, Settle, attempts_so_far,
                                decide)

DEFAULTS = RetrySettings()
FAST = RetrySettings(max_retries=2, retry_backoff=0.5)
NONE = RetrySettings(max_retries=0, retry_backoff=2.0)

# (attempt, failed attempts before it, settings, defers) -> expected settle
TABLE = [
    # success: acknowledged, the count kept as it was
    (Attempt("ok"), 0, DEFAULTS, 0, Settle(Action.ACK, 0)),
    (Attempt("ok"), 7, DEFAULTS, 0, Settle(Action.ACK, 7)),
    # pyclowder resubmitted (it sent "(#n) ..." itself): retried, backoff doubling from retry_backoff
    (Attempt("retry", "(#1) boom", reported=True), 0, DEFAULTS, 0,
     Settle(Action.RETRY, 1, delay=2.0, reason="boom")),
    (Attempt("retry", "(#3) boom", reported=True), 2, DEFAULTS, 0,
     Settle(Action.RETRY, 3, delay=8.0, reason="boom")),
    (Attempt("retry", "(#10) boom", reported=True), 9, DEFAULTS, 0,
     Settle(Action.RETRY, 10, delay=60.0, reason="boom")),  # the backoff's cap
    (Attempt("retry", "(#2) boom", reported=True), 1, FAST, 0, Settle(Action.RETRY, 2, delay=1.0, reason="boom")),
    # pyclowder gave up for the count (the 11th attempt with the defaults): its ERROR status was sent
    (Attempt("error", "boom", reported=True, exhausted=True), 10, DEFAULTS, 0,
     Settle(Action.DEAD_LETTER, 11, reason="gave up after 11 attempt(s): boom")),
    # CalledProcessError / abort / a 4xx from Clowder: the error queue at once, whatever the count
    (Attempt("error", "Aborting message: no", reported=True), 0, DEFAULTS, 0,
     Settle(Action.DEAD_LETTER, 1, reason="Aborting message: no")),
    (Attempt("error", "Error in subprocess [exit code=1]:\nx", reported=True), 4, DEFAULTS, 0,
     Settle(Action.DEAD_LETTER, 5, reason="Error in subprocess [exit code=1]:\nx")),
    # an error the extractor did not report: the agent sends pyclowder's ERROR text
    (Attempt("error", "bad"), 0, DEFAULTS, 0, Settle(Action.DEAD_LETTER, 1, reason="bad", status=("error", "bad"))),
    # the process died (crash, time or memory limit): the agent sends the statuses pyclowder would
    (Attempt("died", "killed: time limit"), 0, DEFAULTS, 0,
     Settle(Action.RETRY, 1, delay=2.0, reason="killed: time limit", status=("retry", "(#1) killed: time limit"))),
    (Attempt("died", "segfault"), 10, DEFAULTS, 0,
     Settle(Action.DEAD_LETTER, 11, reason="gave up after 11 attempt(s): segfault", status=("error", "segfault"))),
    (Attempt("died", "segfault"), 2, FAST, 0,
     Settle(Action.DEAD_LETTER, 3, reason="gave up after 3 attempt(s): segfault", status=("error", "segfault"))),
    (Attempt("died", "segfault"), 0, NONE, 0,
     Settle(Action.DEAD_LETTER, 1, reason="gave up after 1 attempt(s): segfault", status=("error", "segfault"))),
    # the extractor reported a retry the agent's count does not allow (its max differs): ERROR from the agent
    (Attempt("retry", "(#3) boom", reported=True), 2, FAST, 0,
     Settle(Action.DEAD_LETTER, 3, reason="gave up after 3 attempt(s): boom", status=("error", "boom"))),
    # not the file's fault: no attempt spent
    (Attempt("stopped", "grace over"), 3, DEFAULTS, 0, Settle(Action.HAND_BACK, 3, reason="grace over")),
    (Attempt("release", "scratch space: full"), 10, DEFAULTS, 0,
     Settle(Action.HAND_BACK, 10, reason="scratch space: full", stop_agent=True)),
    (Attempt("defer", "Clowder unavailable"), 10, DEFAULTS, 1,
     Settle(Action.DEFER, 10, delay=4.0, reason="Clowder unavailable")),
    (Attempt("defer", "Clowder unavailable"), 0, DEFAULTS, 3,
     Settle(Action.DEFER, 0, delay=16.0, reason="Clowder unavailable")),
    (Attempt("defer", "Clowder unavailable"), 0, DEFAULTS, 50,
     Settle(Action.DEFER, 0, delay=60.0, reason="Clowder unavailable")),
    # an outcome this agent does not know (a newer extractor side): a failed attempt, never a success
    (Attempt("weird", "?"), 0, DEFAULTS, 0, Settle(Action.RETRY, 1, delay=2.0, reason="?", status=("retry", "(#1) ?"))),
]


@pytest.mark.parametrize("attempt, before, settings, defers, expected", TABLE)
def test_decide(attempt, before, settings, defers, expected):
    assert decide(attempt, before, settings, defers) == expected


def test_defaults_give_pyclowders_eleven_attempts_and_its_statuses():
    """A file that always fails, decided attempt by attempt: (#1)..(#10), then the error queue."""
    attempts, statuses = 0, []
    while True:
        n = attempts + 1
        # what pyclowder's own _process_message does with retry_count = attempts and max_retry = 10
        if attempts < DEFAULT_MAX_RETRIES:
            settle = decide(Attempt("retry", f"(#{n}) boom", reported=True), attempts, DEFAULTS)
        else:
            settle = decide(Attempt("error", "boom", reported=True, exhausted=True), attempts, DEFAULTS)
        statuses.append(settle.action)
        if settle.action is not Action.RETRY:
            break
        attempts = settle.attempts
    assert DEFAULT_MAX_RETRIES == 10
    assert statuses == [Action.RETRY] * 10 + [Action.DEAD_LETTER]
    assert settle.attempts == 11 and settle.reason == "gave up after 11 attempt(s): boom"


@pytest.mark.parametrize("header, body, expected", [
    (0, {}, 0),
    (3, {"retry_count": 0}, 3),                 # the agents' count
    (0, {"retry_count": 4}, 4),                 # republished by pyclowder itself
    (2, {"retry_count": 5}, 5),
    (6, {"retry_count": 5}, 6),
    (1, {"retry_count": True}, 1),              # not a count
    (1, {"retry_count": "9"}, 1),
])
def test_attempts_so_far(header, body, expected):
    assert attempts_so_far(header, body) == expected


def test_agent_and_launcher_defaults_follow_pyclowders_max_retry():
    from agent.config import load_config
    from launcher.settings import SETTINGS

    assert load_config({}, {}, None).max_retries == 10
    assert load_config({}, {"MAX_RETRY": "4"}, None).max_retries == 4
    assert load_config({}, {"AGENT_MAX_RETRIES": "2", "MAX_RETRY": "4"}, None).max_retries == 2
    assert next(s for s in SETTINGS if s.name == "max_retries").default == 10
