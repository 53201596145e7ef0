"""Agent activity reports: the summary the launcher scales with, and the real broker round trip."""
from __future__ import annotations

import pytest

from hpc_common.reports import report, summarize
from helpers.agent_harness import harness  # noqa: F401 (fixture)


def test_summary_over_the_window():
    now = 10_000.0
    reports = [report("a1", "q", "", 30, 30, 0, 60.0, now=now - 30),
               report("a1", "q", "", 30, 30, 2, 64.0, now=now),
               report("a2", "q", "", 30, 15, 0, 45.0, now=now),
               report("old", "q", "", 30, 999, 0, 1.0, now=now - 3600)]   # outside the window
    act = summarize(reports, now=now)
    assert act.agents == 2
    assert act.files_per_minute == pytest.approx(75 / 60 * 60)   # 75 files in the 60 s covered
    assert act.per_file_seconds == pytest.approx(169.0 / 77)
    assert summarize([], now=now) is None
    assert summarize([{"junk": 1}], now=now) is None


@pytest.mark.integration
def test_launcher_sees_what_the_agents_did(harness, rabbitmq):
    from launcher.broker import queue_stats

    queue_stats(rabbitmq, harness.queue)  # the launcher's window queue exists before agents report
    ids = [harness.publish_file(b"sleep 0.3\n") for _ in range(5)]
    assert harness.run_agent("--idle-exit", "1") == 0
    assert all(harness.standin.metadata_for(f) for f in ids)
    stats = queue_stats(rabbitmq, harness.queue)
    assert stats.activity is not None and stats.activity.agents == 1
    assert stats.activity.per_file_seconds == pytest.approx(0.3, abs=0.25)
    assert stats.activity.files_per_minute > 0
    again = queue_stats(rabbitmq, harness.queue)  # reading does not consume the window
    assert again.activity is not None and again.activity.agents == 1
    harness.ch.queue_delete(f"clowder-hpc-agent.reports.{harness.queue}")


@pytest.mark.integration
def test_reports_count_dead_letters_and_carry_per_file_times(harness, rabbitmq):
    """Without the launcher having looked first: the agent declares the window queue itself."""
    from launcher.broker import queue_stats

    harness.ch.queue_delete(f"clowder-hpc-agent.reports.{harness.queue}")
    ok = [harness.publish_file(b"sleep 0.2\n") for _ in range(3)]
    harness.publish_file(b"abort\n")  # a permanent failure: dead-lettered at once
    assert harness.run_agent("--idle-exit", "1") == 0
    assert all(harness.standin.metadata_for(f) for f in ok)
    try:
        reports = queue_stats(rabbitmq, harness.queue).reports
    finally:
        harness.ch.queue_delete(f"clowder-hpc-agent.reports.{harness.queue}")
    assert sum(r["done"] for r in reports) == 3
    assert sum(r["dead_lettered"] for r in reports) == 1
    durations = [d for r in reports for d in r["durations"]]
    assert len(durations) == 4 and sum(1 for d in durations if d >= 0.2) >= 3
    assert all(r["slots"] >= 1 for r in reports)


@pytest.mark.integration
@pytest.mark.parametrize("internals", [False, True], ids=["public-api", "one-send"])
def test_a_status_batch_reaches_its_queues_in_order(rabbitmq, internals):
    import uuid

    import pika

    from launcher.broker import Link

    link = Link(rabbitmq, "test publish_many", internals=internals)
    assert (link._queued is not None) == internals  # the private path is taken when asked (this pika has it)
    queues = [f"test-batch-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        link.declare_queues(queues)
        link.publish_many(("", queues[i % 2], f"status {i}".encode(), {"correlation_id": f"c{i}"}) for i in range(6))
        got = {name: [] for name in queues}
        for name in queues:
            while True:
                taken = link.get(name)
                if taken is None:
                    break
                link.ack(taken.tag)
                got[name].append((taken.body.decode(), taken.properties["correlation_id"]))
        assert got[queues[0]] == [("status 0", "c0"), ("status 2", "c2"), ("status 4", "c4")]
        assert got[queues[1]] == [("status 1", "c1"), ("status 3", "c3"), ("status 5", "c5")]
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(rabbitmq))
        for name in queues:
            conn.channel().queue_delete(name)
        conn.close()
        link.close()
