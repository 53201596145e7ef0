"""Unit tests: the backlog's arithmetic and its parts (relay table, spool, journal), retry buckets."""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from agent.event_loop import SelectLoop
from agent.journal import Journal, JournalEntry
from hpc_common import retry_queues
from hpc_common.spool_layout import SpoolLayout
from launcher import backlog
from launcher.caps import Caps, Usage
from hpc_common.messages import Message
from launcher.relay.store import LeaseStore, read_backlog
from launcher.strategy import Case, Observation, Policy, decide


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_total_is_the_sum_of_the_waiting_parts_only():
    held = backlog.from_relay_counts({"ready": 3, "backoff": 2, "stale": 1, "leased": 4, "dead": 7,
                                      "retry_after": 5.0})
    held = held.merge(backlog.Backlog(parts={"journal_orphans": 2}, errors=["spool x: gone"]))
    whole = backlog.total(10, held)
    assert whole.total == 10 + 3 + 2 + 1 + 2  # leased (in flight) and dead (error queue) do not wait
    assert whole.held == 8
    out = whole.as_json()
    assert out["total"] == 18 and out["rabbitmq_ready"] == 10 and out["relay_stale"] == 1
    assert out["in_flight"] == {"relay_leased": 4} and out["retry_after"] == 5.0
    assert out["errors"] == ["spool x: gone"]
    assert backlog.total(None, held).total == 8  # broker query failed: the rest still counts


def test_merging_relays_adds_parts_and_keeps_the_earliest_retry():
    a = backlog.from_relay_counts({"ready": 1, "backoff": 1, "retry_after": 9.0, "leased": 1})
    b = backlog.from_relay_counts({"ready": 2, "stale": 1, "retry_after": 3.0, "leased": 2})
    m = a.merge(b)
    assert m.parts == {"relay_ready": 3, "relay_backoff": 1, "relay_stale": 1}
    assert m.in_flight == {"relay_leased": 3} and m.retry_after == 3.0


def _store(tmp_path: Path, clock: Clock) -> LeaseStore:
    store = LeaseStore(str(tmp_path / "relay-q" / "leases.sqlite3"), clock=clock)
    store.set_meta("lease_ttl", "15.0")
    return store


def test_relay_table_counts_ready_backoff_stale_and_live_leases(tmp_path):
    clock = Clock(time.time() - 10.0)  # near real time: the launcher's read below uses the real clock
    store = _store(tmp_path, clock)
    store.add([Message(body=json.dumps({"id": str(i)}).encode(), routing_key="q") for i in range(6)])
    host = lambda lease_id: "http://relay/"  # noqa: E731
    live, dying, failing = (store.lease(agent, 1, 15.0, host)[0] for agent in ("a", "b", "c"))
    store.fail(failing.lease_id, 1, "boom", 3, lambda attempts: 30.0)  # backoff: leasable at t+30
    clock.t += 10.0                       # a heartbeats, b is silent
    store.extend([live.lease_id], 15.0)
    counts = store.backlog(15.0)
    assert counts == {"ready": 3, "backoff": 1, "stale": 1, "leased": 1, "dead": 0, "pending": 2,
                      "retry_after": 6.0}  # b's lease expires at t+15, the reaper takes it a second later
    # What the launcher reads from the same file, read-only, while the relay has it open.
    assert read_backlog(store.path, now=clock.t) == counts
    whole = backlog.total(0, backlog.local_relays(backlog.relay_tables(tmp_path, "q")))
    assert whole.parts["relay_ready"] == 3 and whole.parts["relay_stale"] == 1
    store.close()


def test_relay_tables_are_found_by_queue_or_all(tmp_path):
    for q in ("a", "b"):
        LeaseStore(str(tmp_path / f"relay-{q}" / "leases.sqlite3")).close()
    assert backlog.relay_tables(tmp_path, "a") == [str(tmp_path / "relay-a" / "leases.sqlite3")]
    assert len(backlog.relay_tables(tmp_path, None)) == 2
    assert backlog.relay_tables(tmp_path, "missing") == []


def _hold(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_spool_counts_the_inbox_and_claims_of_dead_agents_only(tmp_path):
    layout = SpoolLayout(str(tmp_path / "spool"))
    layout.make()
    for i in range(3):
        SpoolLayout.write_json(layout.staged(f"m{i}"), {"body_b64": ""})
    for agent, claims in (("alive", 2), ("dead", 1), ("starting", 0)):
        folder = os.path.join(layout.claimed, agent)
        os.makedirs(folder)
        open(os.path.join(folder, "lock"), "w").close()
        for i in range(claims):
            SpoolLayout.write_json(os.path.join(folder, f"{agent}{i}.json"), {})
    fd = _hold(os.path.join(layout.claimed, "alive", "lock"))
    try:
        b = backlog.spool(layout.root)
        assert b.parts == {"spool_inbox": 3, "spool_dead_claims": 1}
        assert not _lock_free_check_left_locked(os.path.join(layout.claimed, "dead", "lock"))
    finally:
        os.close(fd)
    assert backlog.spool(str(tmp_path / "nowhere")).errors


def _lock_free_check_left_locked(path: str) -> bool:
    """True if someone still holds path's lock (the backlog's probe must drop it)."""
    try:
        os.close(_hold(path))
        return False
    except BlockingIOError:
        return True


def test_spool_folders_recorded_in_the_state_dir(tmp_path):
    backlog.record_spool(tmp_path, "q.x", str(tmp_path / "sp"))
    assert backlog.spool_dirs(tmp_path, "q.x", None) == [str(tmp_path / "sp")]
    assert backlog.spool_dirs(tmp_path, None, str(tmp_path / "other")) == [str(tmp_path / "sp"),
                                                                          str(tmp_path / "other")]
    assert backlog.spool_dirs(tmp_path, "nope", None) == []


def _entry() -> JournalEntry:
    return JournalEntry(queue="q", body=b"{}", routing_key="q", reply_to=None, correlation_id=None, headers={},
                        content_type=None)


def _die(journal: Journal) -> None:
    """As if the journal's process died: its lock fd closes (the kernel drops the lock), files stay."""
    os.close(journal._folder._fd)
    journal._folder._fd = None


def test_journal_orphans_are_entries_of_agents_whose_lock_is_free(tmp_path):
    root = str(tmp_path / "journal")
    alive = Journal(root, "alive")
    alive.add(_entry())
    dead = Journal(root, "dead")
    dead.add(_entry())
    dead.add(_entry())
    _die(dead)
    assert backlog.journal(root).parts == {"journal_orphans": 2}
    other = Journal(root, "dead-other-queue")
    other.add(JournalEntry(queue="other", body=b"{}", routing_key="other", reply_to=None, correlation_id=None,
                           headers={}, content_type=None))
    _die(other)
    assert backlog.journal(root, "q").parts == {"journal_orphans": 2}  # one journal serves every queue
    assert backlog.journal(root).parts == {"journal_orphans": 3}
    alive.close()
    assert backlog.journal(str(tmp_path / "none")).parts == {"journal_orphans": 0}


def test_places_from_settings_and_a_remote_relay_without_token_is_an_error(tmp_path):
    from launcher.settings import resolve

    settings = resolve({}, {"LAUNCHER_RELAY_URL": "http://relay:1", "LAUNCHER_STATE_DIR": str(tmp_path)})
    places = backlog.Places.from_settings(settings, "q")
    assert places.journal_dir == os.path.join("~", ".clowder-hpc-agent", "journal")
    assert backlog.held(places).errors == ["LAUNCHER_RELAY_URL is set without LAUNCHER_RELAY_TOKEN_FILE"]


def test_scale_sizes_from_work_held_outside_rabbitmq():
    caps = Caps(max_array_size=10, max_running=10, max_queued=10, max_walltime_s=3600,
                default_walltime_s=600)
    policy = Policy(walltime_s=600, files_per_task=5, idle_grace_s=0)
    usage = Usage(queued=0, running=0, run_slots_claimed=0, node_hours_committed=0.0)
    relay_only = Observation(now=0.0, ready=0, consumers=1, unacked=0, held=12)
    d = decide(relay_only, None, policy, caps, usage)
    assert d.case == Case.SCALE_UP and d.submit == 3
    # Leases of live agents are in flight: never cancel running agents under them.
    busy = Observation(now=10.0, ready=0, consumers=1, unacked=0, running=1, held=0, held_in_flight=0)
    assert decide(busy, 0.0, policy, caps, usage).cancel_running == 1
    leased = Observation(now=10.0, ready=0, consumers=1, unacked=0, running=1, held_in_flight=2)
    assert decide(leased, 0.0, policy, caps, usage).case == Case.STEADY


def test_retry_buckets_are_whole_seconds_and_queues_dead_letter_back():
    assert [retry_queues.bucket(x) for x in (0.2, 1.0, 1.5, 10.0, 60.0, 10 ** 9)] == [1, 1, 2, 10, 60, 86400]
    assert retry_queues.retry_queue("q", 10) == "retry.q.10"
    args = retry_queues.retry_queue_arguments("q", 10)
    assert args["x-message-ttl"] == 10000 and args["x-dead-letter-exchange"] == ""
    assert args["x-dead-letter-routing-key"] == "q" and args["x-expires"] > args["x-message-ttl"]


def test_retry_buckets_follow_the_backoff_settings():
    """The launcher and an idle agent find parked retries by these names: they must match the agent's delays."""
    assert [retry_queues.backoff(2.0, a) for a in (1, 2, 3, 6, 7)] == [2.0, 4.0, 8.0, 60.0, 60.0]
    assert retry_queues.buckets(2.0, 3) == [2, 4, 8]
    assert retry_queues.buckets(1.5, 8) == [2, 3, 6, 12, 24, 48, 60]
    assert retry_queues.buckets(10.0, 0) == []


class _IdleSlot:
    busy_with = None


def _runner(source, now):
    from agent.config import AgentConfig
    from hpc_common.redact import Redactor
    from agent.runner import Runner

    runner = Runner(AgentConfig(), source, lambda *a: _IdleSlot(), Redactor(), clock=lambda: now[0])
    runner.info = {"name": "x"}
    return runner


def _group_tick(group, now):
    """One turn of the group's loop without I/O: each runner's duties, then the idle check."""
    for runner in group.runners:
        runner._tick(now)
    group._check_idle(now)


def test_idle_agent_stays_while_its_source_holds_work_for_soon():
    from unittest import mock

    from agent.runner_group import RunnerGroup

    now = [0.0]
    source = mock.MagicMock(connected=True, agent_id="a", queue="q")
    source.recover_orphans.return_value = 0
    source.work_soon.return_value = 3.0      # e.g. a dead agent's lease expires in 3 s
    runner = _runner(source, now)
    group = RunnerGroup([runner], idle_exit=5, clock=lambda: now[0], loop=SelectLoop())
    now[0] = 5.0
    _group_tick(group, now[0])
    assert runner._stop_reason is None
    now[0] = 7.0                              # asked again only when that time has come
    _group_tick(group, now[0])
    assert source.work_soon.call_count == 1
    source.work_soon.return_value = None      # nothing more is coming
    now[0] = 8.0
    _group_tick(group, now[0])
    assert source.work_soon.call_count == 2 and "idle" in (runner._stop_reason or "")


def test_failed_attempt_is_handed_to_a_source_that_holds_backoffs():
    from unittest import mock

    from agent.messages import Delivery
    from agent.retry_policy import Attempt, decide

    now = [0.0]
    source = mock.MagicMock(connected=True, agent_id="a", queue="q", delayed_retry=True)
    runner = _runner(source, now)
    delivery = Delivery(body=b"{}", routing_key="q", reply_to=None, correlation_id=None, headers={},
                        content_type=None, redelivered=False, token=1, received_at=0.0)
    failed = decide(Attempt("retry", "boom"), delivery.attempts, runner.retry_settings)
    runner._carry_out(delivery, failed, "", 0.1)
    source.retry_later.assert_called_once_with(delivery, 1, "boom", 2.0)
    assert runner.backoff == [] and runner.counters.retried == 1
    source.delayed_retry = False              # e.g. the message-file source: the agent waits
    runner._carry_out(delivery, failed, "", 0.1)
    assert len(runner.backoff) == 1
