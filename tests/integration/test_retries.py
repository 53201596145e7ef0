"""Retries that never block, kill -9 during a backoff, and the registration interval (real broker).

A failed message waits for its retry in `retry.<queue>.<seconds>` (hpc_common.retry_queues),
not in the agent's prefetch window, so the rest of the queue runs meanwhile.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pika
import pika.exceptions
import pytest

from devtools.amqp_queues import delete_queues
from hpc_common.retry_queues import retry_queue
from helpers.agent_harness import REPO, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def _retry_depth(h, seconds: int) -> int:
    ch = h._conn.channel()
    try:
        return ch.queue_declare(retry_queue(h.queue, seconds), passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return -1  # not declared
    finally:
        if ch.is_open:
            ch.close()


def _drop_retry_queues(h, *seconds: int) -> None:
    """Best effort, on a connection of its own (cleanup must not hide the test's result)."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(h.url))
        try:
            delete_queues(conn.channel(), [retry_queue(h.queue, s) for s in seconds])
        finally:
            conn.close()
    except pika.exceptions.AMQPError as exc:
        print(f"could not delete the retry queues of {h.queue}: {exc}")


def test_failing_files_wait_outside_the_prefetch_window_and_end_in_the_error_queue(harness):
    """The contract: AGENT_RETRY_BACKOFF=10, two failing files before twenty good ones."""
    h = harness
    failing = [h.publish_file(b"raise\n", name=f"bad{i}.txt") for i in range(2)]
    good = [h.publish_file(b"ok\n", name=f"good{i}.txt") for i in range(20)]
    try:
        proc = h.start_agent("--idle-exit", "3", AGENT_RETRY_BACKOFF="10", AGENT_MAX_RETRIES="1")
        h.wait_for(lambda: all(h.standin.metadata_for(f) for f in good), 60, "the good files")
        assert proc.wait(timeout=90) == 0, h.log_text()
        runs = [r[0] for r in h.runs()]
        # Every good file ran before the first retry of a failing one (due 10 s after its failure).
        second_attempts = [i for i, f in enumerate(runs) if f in failing and runs[:i].count(f) == 1]
        last_good = max(runs.index(f) for f in good)
        assert len(second_attempts) == 2 and last_good < min(second_attempts), runs
        errors = {json.loads(body)["id"]: props for props, body in h.errors()}
        assert set(errors) == set(failing)
        for props in errors.values():
            assert props.headers["x-agent-attempts"] == 2
            assert "gave up after 2 attempt(s)" in props.headers["x-error-reason"]
        assert h.depth() == 0 and _retry_depth(h, 10) == 0
    finally:
        _drop_retry_queues(h, 10)


def test_kill_9_during_a_backoff_loses_nothing(harness, tmp_path):
    h = harness
    fid = h.publish_file(f"raise-once {tmp_path / 'marker'}\n".encode())
    try:
        first = h.start_agent(AGENT_RETRY_BACKOFF="5")
        h.wait_for(lambda: "retrying in 5.0s" in h.log_text(), 30, "the first failure")
        h.wait_for(lambda: _retry_depth(h, 5) == 1, 10, "the retry copy in its retry queue")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        # The original was acknowledged only after the broker confirmed the retry copy.
        assert h.depth() == 0
        h.wait_for(lambda: h.depth() == 1, 20, "the retry queue to dead-letter it back")
        assert h.run_agent("--idle-exit", "2") == 0, h.log_text()
        assert len(h.standin.metadata_for(fid)) == 1
        assert [r[2] for r in h.runs()] == ["raise-once", "raise-once"]
        assert h.errors() == [] and _retry_depth(h, 5) == 0
    finally:
        _drop_retry_queues(h, 5)


def _launcher_status(h, tmp_path, **env) -> dict:
    caps = tmp_path / "caps.yaml"
    caps.write_text('max_array_size: 2\nmax_running: 1\nmax_queued: 2\nmax_walltime: "00:05:00"\ncores_per_task: 1\n')
    caps.chmod(0o644)
    run_env = dict(os.environ, RABBITMQ_URI=h.url, RABBITMQ_QUEUE=h.queue, LAUNCHER_CAPS=str(caps),
                   LAUNCHER_STATE_DIR=str(tmp_path / "launcher"), LAUNCHER_SCHEDULER="slurm",
                   AGENT_JOURNAL_DIR=h.journal_dir, PYTHONPATH=REPO, **env)
    proc = subprocess.run([sys.executable, "-m", "launcher", "status", "--json"], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_a_retry_parked_by_a_killed_agent_is_seen_by_the_launcher_and_the_next_agent(harness, tmp_path, slurm):
    """kill -9 after the retry copy is parked: `launcher status` counts it in backlog.total, and an
    agent started meanwhile with a shorter idle exit stays for it and finishes the file."""
    h = harness
    fid = h.publish_file(f"raise-once {tmp_path / 'marker'}\n".encode())
    try:
        first = h.start_agent(AGENT_RETRY_BACKOFF="12")
        h.wait_for(lambda: _retry_depth(h, 12) == 1, 30, "the retry copy in its retry queue")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        status = _launcher_status(h, tmp_path, AGENT_RETRY_BACKOFF="12")
        assert status["backlog"]["rabbitmq_retry"] == 1 and status["backlog"]["total"] == 1, status["backlog"]
        assert status["broker"]["ready"] == 0
        # The launcher's bucket names follow the agents' settings: other settings, other queues.
        assert _launcher_status(h, tmp_path, AGENT_RETRY_BACKOFF="5")["backlog"]["total"] == 0
        assert h.run_agent("--idle-exit", "2", AGENT_RETRY_BACKOFF="12") == 0, h.log_text()
        assert len(h.standin.metadata_for(fid)) == 1
        assert [r[2] for r in h.runs()] == ["raise-once", "raise-once"]
        assert "source holds work deliverable" in h.log_text()
    finally:
        _drop_retry_queues(h, 12)


def test_agent_stays_for_its_own_retries_when_idle_exit_is_shorter(harness, tmp_path):
    h = harness
    fid = h.publish_file(f"raise-once {tmp_path / 'marker'}\n".encode())
    try:
        assert h.run_agent("--idle-exit", "1", AGENT_RETRY_BACKOFF="4") == 0, h.log_text()
        assert len(h.standin.metadata_for(fid)) == 1
        assert "source holds work deliverable" in h.log_text()
    finally:
        _drop_retry_queues(h, 4)


def _registrations(h, seconds: float, **env) -> tuple[list[float], str]:
    """Start an agent; collect its registrations on the `extractors` fanout for seconds after its first."""
    listen = h.registrations()
    proc = h.start_agent(**env)
    seen: list[float] = []
    deadline = time.monotonic() + 60.0  # until the first registration (the extractor's start-up)
    while time.monotonic() < deadline:
        fresh = listen()
        if fresh and not seen:
            deadline = fresh[0] + seconds
        seen += fresh
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    return seen, h.log_text()


def test_registration_interval_follows_heartbeat(harness):
    seen, log = _registrations(harness, 6.5, HEARTBEAT="2")
    assert 3 <= len(seen) <= 5, (seen, log)  # at start, then every 2 s


def test_default_registration_is_well_inside_clowder_v2s_window():
    from agent.config import load_config

    assert load_config({}, {}, None).heartbeat == 60.0
    assert load_config({}, {"HEARTBEAT": "300"}, None).heartbeat == 300.0
    assert load_config({}, {"AGENT_HEARTBEAT": "30", "HEARTBEAT": "300"}, None).heartbeat == 30.0


def _scenario(fn, rabbitmq, tmp_path):
    """Run a chaos scenario that needs no broker restart as a normal test (tests/chaos_scenarios.py)."""
    r = fn(rabbitmq, tmp_path)
    print(f"\n{r.scenario}: sent {r.sent}, processed {r.processed}, dead-lettered {r.dead_lettered}, lost {r.lost}, "
          f"extra runs {r.duplicates}, recover {r.recover_seconds}s; {' | '.join(r.notes)}")
    assert r.lost == 0 and r.problems == [], "\n".join(r.problems)
    assert r.agent_exits == r.expected_exits
    return r


def test_scenario_kill_9_during_retry_backoffs(rabbitmq, tmp_path):
    from helpers import chaos_scenarios as cs

    r = _scenario(cs.kill9_during_backoff, rabbitmq, tmp_path)
    assert r.processed == r.sent == 10 and r.dead_lettered == 0


def test_scenario_kill_9_under_the_relay(rabbitmq, tmp_path):
    from helpers import chaos_scenarios as cs

    r = _scenario(cs.relay_lease_expiry, rabbitmq, tmp_path)
    assert r.processed == r.sent == 20 and r.dead_lettered == 0


def test_spool_launcher_registers_only_while_agents_write_their_info(harness, tmp_path):
    from hpc_common.spool_layout import SpoolLayout
    from launcher.relay.spool import Spooler

    h = harness
    listen = h.registrations()

    def ours() -> int:
        time.sleep(0.5)  # the broker routes the publish
        return len(listen())

    spooler = Spooler(h.url, h.queue, str(tmp_path / "spool"), heartbeat=60.0)
    spooler.fs.make()
    spooler.connect()
    try:
        info = {"extractor_info": {"name": "x"}, "owner": ""}
        SpoolLayout.write_json(SpoolLayout(str(tmp_path / "spool")).info_file, dict(info, at=time.time() - 600))
        spooler._register()
        assert ours() == 0  # no agent wrote it for 10 minutes: none lives
        SpoolLayout.write_json(SpoolLayout(str(tmp_path / "spool")).info_file, dict(info, at=time.time()))
        spooler._register()
        spooler._register()  # within the interval: once
        assert ours() == 1
    finally:
        spooler.shutdown()
