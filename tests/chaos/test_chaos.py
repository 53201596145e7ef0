"""Chaos suite (issue 3): the agent under broker, Clowder, disk and signal faults.

The scenarios live in tests/helpers/chaos_scenarios.py, shared with benchmarks/reliability_report.py,
which writes the same runs up as benchmarks/results/reliability.md. Each test asserts what the
issue asks of every scenario: every file ends with metadata in Clowder or in error.<queue> with a
reason, none is lost, agents exit only as the scenario expects (killed only where it kills them),
and duplicates (at-least-once) are counted and reported, not hidden.

Markers: chaos on all, integration on those that need the broker, slow on those that take more
than about 30 s. They need root (tmpfs, rabbitmqctl) like CI has; without it they fail with
CI=true and skip elsewhere.

Time: the three longest scenarios (two 30 s outages and the 20-round kill -9 loop) mostly wait,
and none of them touches the shared broker, so they run at once, each on its own queue, stand-in
and agents (`waiting_faults`, one xdist worker: group "chaos-waiting"). The broker restart stops
the second broker node of scripts/services.sh (`chaos_rabbitmq`), never the main one, so under
pytest-xdist it runs beside the rest of the suite (group "chaos-broker": one broker-stopping
test at a time). The other scenarios use the main broker without disturbing it (their own
queues, users, proxies and tmpfs). The report script runs every scenario alone.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from helpers import chaos_scenarios as cs
from helpers.services import unavailable

pytestmark = [pytest.mark.chaos]


def run(fn, rabbitmq, tmp_path) -> cs.Result:
    try:
        r = fn(rabbitmq, tmp_path)
    except cs.Unavailable as exc:
        unavailable(str(exc))
        raise  # unreachable: unavailable() fails or skips
    print(f"\n{r.scenario}: sent {r.sent}, processed {r.processed}, dead-lettered {r.dead_lettered}, "
          f"lost {r.lost}, extra runs {r.duplicates}, duplicate metadata {r.duplicate_metadata}, "
          f"recover {r.recover_seconds}s, {r.seconds}s, exits {r.agent_exits}; {' | '.join(r.notes)}")
    assert r.lost == 0, r.problems
    assert r.processed + r.dead_lettered >= r.sent
    assert r.agent_exits == r.expected_exits, r.problems
    assert r.problems == [], "\n".join(r.problems)
    return r


# Test name -> scenario run in the background by `waiting_faults`.
CONCURRENT = {"test_broker_unreachable_for_30s": cs.broker_unreachable,
              "test_clowder_5xx_and_timeouts_for_30s": cs.clowder_outage,
              "test_kill_9_loop_20_rounds": cs.kill9_loop}


@pytest.fixture(scope="module")
def waiting_faults(request, rabbitmq, tmp_path_factory):
    """Start the selected CONCURRENT scenarios together; each test waits for its own result."""
    selected = sorted({item.originalname for item in request.session.items} & CONCURRENT.keys())
    pool = ThreadPoolExecutor(max_workers=max(1, len(selected)))
    futures = {name: pool.submit(CONCURRENT[name], rabbitmq, tmp_path_factory.mktemp(name[5:25]))
               for name in selected}
    try:
        yield futures
    finally:
        pool.shutdown(wait=True)


def run_concurrent(name, futures) -> cs.Result:
    return run(lambda *_: futures[name].result(), None, None)


# Stops a broker's application: the chaos node's (scripts/services.sh), which only the
# "chaos-broker" group uses, one test at a time; the other tests never see it.
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("chaos-broker")
def test_broker_restart_mid_run(chaos_rabbitmq, tmp_path, monkeypatch):
    url, node = chaos_rabbitmq
    monkeypatch.setattr(cs, "BROKER_NODE", node)
    r = run(cs.broker_restart, url, tmp_path)
    assert r.dead_lettered == 0 and r.processed == r.sent
    assert r.recover_seconds is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("chaos-waiting")
def test_broker_unreachable_for_30s(waiting_faults):
    r = run_concurrent("test_broker_unreachable_for_30s", waiting_faults)
    assert r.dead_lettered == 0 and r.processed == r.sent
    assert r.recover_seconds is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("chaos-waiting")
def test_clowder_5xx_and_timeouts_for_30s(waiting_faults):
    r = run_concurrent("test_clowder_5xx_and_timeouts_for_30s", waiting_faults)
    assert r.dead_lettered == 0 and r.processed == r.sent  # an outage spends no attempts
    assert r.recover_seconds is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("chaos-waiting")
def test_kill_9_loop_20_rounds(waiting_faults):
    r = run_concurrent("test_kill_9_loop_20_rounds", waiting_faults)
    assert r.dead_lettered == 0 and r.processed == r.sent


@pytest.mark.integration
def test_clowder_drops_connections_mid_download(rabbitmq, tmp_path):
    r = run(cs.clowder_drops, rabbitmq, tmp_path)
    assert r.dead_lettered == 0 and r.processed == r.sent  # lengths are checked in account()


@pytest.mark.integration
def test_scratch_full_enospc(rabbitmq, tmp_path):
    r = run(cs.scratch_full, rabbitmq, tmp_path)
    assert r.dead_lettered == 0 and r.processed == r.sent
    assert r.duplicates == 0


@pytest.mark.integration
@pytest.mark.parametrize("phase", ["download", "extraction", "upload"])
def test_sigterm_during(phase, rabbitmq, tmp_path):
    fn = {"download": cs.sigterm_download, "extraction": cs.sigterm_extraction, "upload": cs.sigterm_upload}[phase]
    r = run(fn, rabbitmq, tmp_path)
    assert r.dead_lettered == 0 and r.processed == r.sent == 2


@pytest.mark.integration
def test_poison_messages_end_in_the_error_queue(rabbitmq, tmp_path):
    r = run(cs.poison, rabbitmq, tmp_path)
    assert r.dead_lettered == 7 and r.processed == r.sent - 7


@pytest.mark.integration
def test_secrets_never_leak(rabbitmq, tmp_path):
    r = run(cs.secrets_scan, rabbitmq, tmp_path)
    assert r.dead_lettered == 3


class _IdleSlot:
    busy_with = None


def test_time_without_the_broker_is_not_idleness():
    """Regression (found by test_broker_unreachable_for_30s): an agent whose broker was unreachable
    for longer than idle_exit exited 0 "idle" while its queue was full."""
    from agent.config import AgentConfig
    from agent.event_loop import SelectLoop
    from hpc_common.redact import Redactor
    from agent.runner import Runner
    from agent.runner_group import RunnerGroup

    now = [0.0]
    # Just enough of a WorkSource for Runner._tick: a broker that is away until told otherwise.
    source = mock.MagicMock(connected=False, agent_id="agent-x", queue="q")
    source.recover_orphans.return_value = 0
    source.work_soon.return_value = None  # nothing held for later
    runner = Runner(AgentConfig(), source, lambda *a: _IdleSlot(), Redactor(), clock=lambda: now[0])
    runner.info = {"name": "x"}
    group = RunnerGroup([runner], idle_exit=5, clock=lambda: now[0], loop=SelectLoop())

    def tick(t: float) -> None:  # one turn of the group's loop without I/O
        now[0] = t
        runner._tick(t)
        group._check_idle(t)

    for t in range(1, 60):        # a minute without the broker
        tick(float(t))
    assert runner._stop_reason is None
    source.connected = True       # back, and a delivery may arrive any moment
    tick(61.0)
    assert runner._stop_reason is None
    tick(66.0)                    # really idle now
    assert runner._stop_reason and "idle" in runner._stop_reason
