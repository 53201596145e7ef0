"""agent.duties: registration, activity reports and orphan recovery, each when due and only when connected."""
from __future__ import annotations

from typing import Any, Optional

from agent.duties import RECOVERY_INTERVAL, Duties
from agent.messages import Delivery
from agent.sources.base import WorkSource
from hpc_common import reports


class Backend(WorkSource):
    """A source that records what the duties asked of it; `up` says whether it is reachable."""

    queue = "q"
    agent_id = "agent-1"

    def __init__(self) -> None:
        self.up = True
        self.registered: list[tuple[dict, Optional[str]]] = []
        self.reports: list[dict] = []
        self.recoveries = 0

    def open(self, wake, on_lost) -> None: ...
    def take(self) -> list[Delivery]:
        return []

    @property
    def connected(self) -> bool:
        return self.up

    def stop_intake(self) -> None: ...
    def complete(self, delivery: Delivery) -> None: ...
    def release(self, delivery: Delivery) -> None: ...
    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None: ...
    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None: ...
    def secure(self, delivery: Delivery) -> Any: ...
    def close(self) -> None: ...

    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        self.registered.append((extractor_info, owner))

    def publish_report(self, report: dict[str, Any]) -> None:
        self.reports.append(report)

    def recover_orphans(self) -> int:
        self.recoveries += 1
        return 0


INFO = {"name": "ncsa.wordcount", "version": "2.0"}


def test_registration_every_heartbeat_with_the_private_key_as_pyclowder_sends_it():
    source = Backend()
    duties = Duties(source, heartbeat=60, owner="me@example.org", identity="slurm 1_2", slots=2, now=0.0,
                    extractor_key="k3y")
    duties.run(0.0, {})                 # the extractor has not loaded yet: nothing to announce
    assert source.registered == []
    duties.run(1.0, INFO)
    duties.run(30.0, INFO)              # not due again before the heartbeat
    assert source.registered == [(dict(INFO, unique_key="k3y"), "me@example.org")]
    assert "unique_key" not in INFO     # the plugin's own info is left as it is
    source.up = False
    duties.run(61.0, INFO)              # due, but the backend is away: it waits for it
    source.up = True
    duties.run(62.0, INFO)
    assert len(source.registered) == 2


def test_no_unique_key_without_a_private_queue():
    source = Backend()
    Duties(source, 60, None, "", 1, 0.0).run(0.0, INFO)
    assert source.registered == [(INFO, None)]


def test_reports_count_attempts_and_start_anew():
    source = Backend()
    duties = Duties(source, 60, None, "pbs 7[1]", slots=3, now=100.0)
    duties.activity.attempt(2.0, ok=True)
    duties.activity.attempt(1.0, ok=False)
    duties.activity.dead += 1
    duties.run(100.0 + reports.REPORT_INTERVAL - 1, INFO)
    assert source.reports == []
    duties.run(100.0 + reports.REPORT_INTERVAL, INFO)
    (report,) = source.reports
    assert (report["done"], report["failed"], report["dead_lettered"], report["slots"]) == (1, 1, 1, 3)
    assert report["busy_seconds"] == 3.0 and report["durations"] == [2.0, 1.0] and report["task"] == "pbs 7[1]"
    assert duties.activity.done == 0 and duties.activity.durations == []


def test_orphan_recovery_every_interval_while_connected():
    source = Backend()
    duties = Duties(source, 60, None, "", 1, 0.0)
    duties.run(0.0, INFO)
    duties.run(RECOVERY_INTERVAL - 1, INFO)
    assert source.recoveries == 1
    source.up = False
    duties.run(RECOVERY_INTERVAL, INFO)
    assert source.recoveries == 1
    source.up = True
    duties.run(RECOVERY_INTERVAL + 1, INFO)
    assert source.recoveries == 2
