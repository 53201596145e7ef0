"""Unit tests: a launcher serving several queues (agents with several plugins) sizes from their sum."""
from __future__ import annotations

import os

from agent.journal import Journal, JournalEntry
from launcher import backlog
from launcher.broker import QueueStats, combine_stats
from launcher.caps import Caps, Usage
from launcher.settings import queue_names, resolve
from launcher.strategy import Case, Observation, Policy, decide


def _orphan(root: str, agent: str, queue: str, n: int) -> None:
    journal = Journal(root, agent)
    for _ in range(n):
        journal.add(JournalEntry(queue=queue, body=b"{}", routing_key=queue, reply_to=None, correlation_id=None,
                                 headers={}, content_type=None))
    os.close(journal._folder._fd)  # as if the agent died: its lock is free, its entries stay
    journal._folder._fd = None


def test_queue_list_from_flags_environment_and_yaml(tmp_path):
    assert resolve({"rabbitmq_queue": ["a", "b,c"]}, {}).rabbitmq_queue == "a,b,c"
    assert queue_names(resolve({}, {"RABBITMQ_QUEUE": "a, b a"}).rabbitmq_queue) == ["a", "b"]
    config = tmp_path / "l.yaml"
    config.write_text("rabbitmq_queue: [x, y]\n")
    assert queue_names(resolve({}, {}, str(config)).rabbitmq_queue) == ["x", "y"]
    assert queue_names(resolve({}, {}).rabbitmq_queue) == []


def test_combined_stats_are_sums_and_unknown_stays_unknown():
    both = combine_stats({"a": QueueStats(7, 1, 2), "b": QueueStats(5, 2, 1)})
    assert (both.ready, both.consumers, both.unacked) == (12, 3, 3)
    assert set(both.per_queue) == {"a", "b"} and both.per_queue["b"].ready == 5
    assert combine_stats({"a": QueueStats(1, 0, 2), "b": QueueStats(1, 0, None)}).unacked is None


def test_held_work_of_each_queue_is_counted_once(tmp_path):
    root = str(tmp_path / "journal")
    _orphan(root, "dead-a", "a", 2)
    _orphan(root, "dead-b", "b", 3)
    _orphan(root, "dead-c", "c", 4)  # a queue this launcher does not serve
    settings = resolve({}, {"LAUNCHER_STATE_DIR": str(tmp_path / "state"), "AGENT_JOURNAL_DIR": root,
                            "LAUNCHER_SPOOL_DIR": str(tmp_path / "spool")})
    places = backlog.places_per_queue(settings, ["a", "b"])
    assert [p.spool_dir for p in places] == [str(tmp_path / "spool"), None]  # one spool folder, counted once
    held = backlog.held_queues(places)
    assert held.parts["journal_orphans"] == 5
    assert {q: b.parts["journal_orphans"] for q, b in held.by_queue.items()} == {"a": 2, "b": 3}


def test_scale_sizes_the_array_from_the_sum_of_the_queues():
    caps = Caps(max_array_size=10, max_running=10, max_queued=10, max_walltime_s=3600, default_walltime_s=600)
    policy = Policy(walltime_s=600, files_per_task=5, idle_grace_s=0)
    usage = Usage(queued=0, running=0, run_slots_claimed=0, node_hours_committed=0.0)
    stats = combine_stats({"a": QueueStats(12, 0, 0), "b": QueueStats(8, 0, 0)})
    obs = Observation(now=0.0, ready=stats.ready, consumers=stats.consumers, unacked=stats.unacked, held=5)
    d = decide(obs, None, policy, caps, usage)
    assert d.case == Case.SCALE_UP and d.submit == 5  # (12 + 8 + 5) / 5 files per task
    alone = Observation(now=0.0, ready=12, consumers=0, unacked=0)
    assert decide(alone, None, policy, caps, usage).submit == 3  # one queue alone would undersize it
