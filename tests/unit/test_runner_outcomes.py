"""The Runner carries out agent.retry_policy's decisions: extractor frames in, settle calls and statuses out.

Driven through the Runner's delivery and frame callbacks with a recording WorkSource (a real
subclass of the narrow interface, no mocks) and a slot that only records the job it was given.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from agent.config import AgentConfig
from agent.messages import Delivery
from agent.runner import Runner
from agent.sources.base import WorkSource
from hpc_common.messages import ATTEMPTS
from hpc_common.redact import Redactor


class RecordingSource(WorkSource):
    """Every settle operation and status, in order."""

    queue = "q"

    def __init__(self, delayed_retry: bool = True) -> None:
        self.delayed_retry = delayed_retry
        self.calls: list[tuple] = []
        self.statuses: list[str] = []

    def open(self, wake, on_lost) -> None: ...

    def take(self) -> list:
        return []

    @property
    def connected(self) -> bool:
        return True

    def stop_intake(self) -> None:
        self.calls.append(("stop_intake",))

    def complete(self, delivery: Delivery) -> None:
        self.calls.append(("complete",))

    def release(self, delivery: Delivery) -> None:
        self.calls.append(("release",))

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        self.calls.append(("retry", attempts, reason))

    def retry_later(self, delivery: Delivery, attempts: int, reason: str, delay: float) -> None:
        self.calls.append(("retry_later", attempts, reason, delay))

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        self.calls.append(("dead_letter", attempts, reason))

    def secure(self, delivery: Delivery) -> Any:
        return delivery.token

    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        self.statuses.append(payload["status"])

    def close(self) -> None: ...


class RecordingSlot:
    """A slot that takes a job and waits for the test to hand its frame back."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy_with: Optional[Delivery] = None
        self.started_at = 0.0
        self.bodies: list[dict] = []

    def assign(self, delivery: Delivery, body: dict, job: int) -> None:
        self.busy_with = delivery
        self.bodies.append(body)

    def close(self) -> None: ...


BODY = {"id": "f1", "host": "http://clowder/", "secretKey": "k", "routing_key": "clowder.file.text.plain"}


def _runner(delayed_retry: bool = True, **cfg: Any) -> tuple[Runner, RecordingSource, RecordingSlot]:
    source = RecordingSource(delayed_retry)
    slots: list[RecordingSlot] = []

    def make_slot(i, _on_frame):
        slots.append(RecordingSlot(i))
        return slots[-1]

    runner = Runner(AgentConfig(**cfg), source, make_slot, Redactor(), clock=lambda: 0.0)
    runner.info = {"name": "x"}
    return runner, source, slots[0]


def _deliver(runner: Runner, body: dict = BODY, headers: Optional[dict] = None) -> Delivery:
    delivery = Delivery(body=json.dumps(body).encode(), routing_key="q", reply_to="r", correlation_id=None,
                        headers=dict(headers or {}), content_type=None, redelivered=False, token=1, received_at=0.0)
    runner._on_delivery(delivery)
    return delivery


def _frame(runner: Runner, slot: RecordingSlot, **frame: Any) -> None:
    runner._on_frame(slot, frame)


def test_the_extractor_sees_the_failed_attempts_as_retry_count():
    runner, _source, slot = _runner()
    _deliver(runner, headers={ATTEMPTS: 3})
    assert slot.bodies[-1]["retry_count"] == 3


def test_a_message_pyclowder_republished_is_counted_from_its_body():
    runner, source, slot = _runner()
    delivery = _deliver(runner, dict(BODY, retry_count=9))  # no header: pyclowder's own resubmit
    assert delivery.attempts == 9 and slot.bodies[-1]["retry_count"] == 9
    _frame(runner, slot, t="done", outcome="retry", reason="(#10) boom", reported=True)
    assert source.calls == [("retry_later", 10, "boom", 60.0)]
    assert source.statuses == []  # pyclowder's connector already sent "(#10) boom"


def test_pyclowders_own_error_after_the_last_attempt_keeps_its_text_and_the_agents_reason():
    runner, source, slot = _runner()
    _deliver(runner, headers={ATTEMPTS: 10})
    _frame(runner, slot, t="done", outcome="error", reason="boom", reported=True, exhausted=True, traceback="tb")
    assert source.calls == [("dead_letter", 11, "gave up after 11 attempt(s): boom")]
    assert source.statuses == []


def test_a_dead_process_gets_the_statuses_pyclowder_would_send():
    runner, source, slot = _runner(max_retries=1)
    _deliver(runner)
    _frame(runner, slot, t="died", reason="killed: time limit 5s")
    assert source.calls == [("retry_later", 1, "killed: time limit 5s", 2.0)]
    assert source.statuses == ["StatusMessage.retry: (#1) killed: time limit 5s"]
    _deliver(runner, headers={ATTEMPTS: 1})
    _frame(runner, slot, t="died", reason="killed: time limit 5s")
    assert source.calls[-1] == ("dead_letter", 2, "gave up after 2 attempt(s): killed: time limit 5s")
    assert source.statuses[-1] == "StatusMessage.error: killed: time limit 5s"


@pytest.mark.parametrize("frame, expected", [
    ({"t": "done", "outcome": "release", "reason": "scratch space: full"}, [("release",), ("stop_intake",)]),
    ({"t": "done", "outcome": "defer", "reason": "Clowder unavailable"}, []),  # held in the backoff list
])
def test_not_the_files_fault_spends_no_attempt(frame, expected):
    runner, source, slot = _runner()
    delivery = _deliver(runner, headers={ATTEMPTS: 4})
    _frame(runner, slot, **frame)
    assert source.calls == expected and source.statuses == []
    assert all(entry[2] == 4 for entry in runner.backoff)  # a deferred message keeps its count
    assert delivery.attempts == 4


def test_work_killed_at_the_end_of_a_stop_is_handed_back_uncounted():
    runner, source, slot = _runner()
    _deliver(runner, headers={ATTEMPTS: 2})
    runner._killed_for_stop.add(slot.index)
    _frame(runner, slot, t="died", reason="killed")
    assert source.calls == [("release",)] and source.statuses == []


def test_a_success_is_acknowledged():
    runner, source, slot = _runner()
    _deliver(runner, headers={ATTEMPTS: 2})
    _frame(runner, slot, t="done", outcome="ok")
    assert source.calls == [("complete",)] and runner.counters.succeeded == 1
