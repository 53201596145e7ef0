"""The scaling decision, table-tested: named cases, caps, oscillation, flaky inputs."""
import dataclasses

import pytest

from launcher.caps import Caps, Usage
from launcher.strategy import Case, Observation, Policy, decide

CAPS = Caps(max_array_size=10, max_running=8, max_queued=6, max_walltime_s=3600,
            default_walltime_s=3600, cores_per_task=1, cores_per_node=1,
            node_hours_budget=None)
POLICY = Policy(walltime_s=3600, files_per_task=10, idle_grace_s=300)
NOW = 1_000_000.0


def obs(ready=0, consumers=0, queued=0, running=0, missing=0, unacked=None, now=NOW, **kw):
    return Observation(now=now, ready=ready, consumers=consumers, queued=queued,
                       running=running, missing=missing, unacked=unacked, **kw)


def usage(queued=0, running=0, claimed=None, committed=0.0):
    return Usage(queued, running, queued + running if claimed is None else claimed, committed)


# name, observation, idle_since, caps, usage, expected (case, submit, cancel_q, cancel_r)
TABLE = [
    ("empty queue, nothing present", obs(), NOW - 400, CAPS, usage(), (Case.IDLE, 0, 0, 0)),
    ("empty queue, grace not over", obs(queued=2), NOW - 10, CAPS, usage(2),
     (Case.IDLE_WAIT, 0, 0, 0)),
    ("empty queue first seen now starts the idle clock", obs(queued=2), None, CAPS, usage(2),
     (Case.IDLE_WAIT, 0, 0, 0)),
    ("empty queue: cancel queued, idle runners without consumers",
     obs(queued=2, running=3, consumers=0), NOW - 400, CAPS, usage(2, 3),
     (Case.SCALE_DOWN, 0, 2, 3)),
    ("empty queue, consumers may hold messages: running left alone",
     obs(queued=2, running=3, consumers=3), NOW - 400, CAPS, usage(2, 3),
     (Case.SCALE_DOWN, 0, 2, 0)),
    ("empty queue, management says nothing unacked: cancel runners",
     obs(running=3, consumers=3, unacked=0), NOW - 400, CAPS, usage(0, 3),
     (Case.SCALE_DOWN, 0, 0, 3)),
    ("empty queue, only busy runners", obs(running=2, consumers=2), NOW - 400, CAPS,
     usage(0, 2), (Case.IDLE, 0, 0, 0)),
    ("small backlog, nothing present", obs(ready=5), None, CAPS, usage(), (Case.SCALE_UP, 1, 0, 0)),
    ("backlog covered", obs(ready=25, running=3), None, CAPS, usage(0, 3), (Case.STEADY, 0, 0, 0)),
    ("unacked counts as backlog", obs(ready=0, unacked=15, consumers=1, running=1), NOW - 400,
     CAPS, usage(0, 1), (Case.SCALE_UP, 1, 0, 0)),
    ("missing tasks count as present (no double submit)", obs(ready=20, missing=2), None, CAPS,
     usage(), (Case.STEADY, 0, 0, 0)),
    ("big backlog capped by max_queued", obs(ready=1000), None, CAPS, usage(),
     (Case.SCALE_UP, 6, 0, 0)),
    ("big backlog capped by max_array_size",
     obs(ready=1000), None, dataclasses.replace(CAPS, max_queued=50, max_running=50), usage(),
     (Case.SCALE_UP, 10, 0, 0)),
    ("big backlog, queued tasks fill max_queued", obs(ready=1000, queued=6), None, CAPS,
     usage(6), (Case.CAPPED, 0, 0, 0)),
    ("big backlog, all run slots claimed", obs(ready=1000, running=8), None, CAPS,
     usage(0, 8), (Case.CAPPED, 0, 0, 0)),
    ("big backlog capped by node-hour budget", obs(ready=1000), None,
     dataclasses.replace(CAPS, node_hours_budget=10.0), usage(committed=7.5),
     (Case.SCALE_UP, 2, 0, 0)),
    ("budget spent", obs(ready=1000), None, dataclasses.replace(CAPS, node_hours_budget=10.0),
     usage(committed=10.0), (Case.CAPPED, 0, 0, 0)),
    ("per-file time sizes tasks", obs(ready=100, per_file_s=360.0), None, CAPS, usage(),
     (Case.SCALE_UP, 6, 0, 0)),
    ("broker down: no action", obs(ready=None), NOW - 400, CAPS, usage(),
     (Case.BROKER_UNAVAILABLE, 0, 0, 0)),
    ("flaky scheduler: no action even with a backlog", obs(ready=1000, scheduler_ok=False),
     None, CAPS, usage(), (Case.SCHEDULER_UNAVAILABLE, 0, 0, 0)),
    ("flaky scheduler: no cancel even when idle", obs(queued=3, scheduler_ok=False), NOW - 999,
     CAPS, usage(3), (Case.SCHEDULER_UNAVAILABLE, 0, 0, 0)),
]


@pytest.mark.parametrize("name,o,idle_since,caps,u,expected", TABLE, ids=[t[0] for t in TABLE])
def test_decision_table(name, o, idle_since, caps, u, expected):
    d = decide(o, idle_since, POLICY, caps, u)
    assert (d.case, d.submit, d.cancel_queued, d.cancel_running) == expected, d.reasons
    assert d.reasons, "every decision says why"


def test_capped_decision_says_so_in_one_line():
    d = decide(obs(ready=1000), None, POLICY, CAPS, usage())
    capped = [r for r in d.reasons if r.startswith("capped:")]
    assert capped == ["capped: 100 task(s) requested, 6 allowed by max_queued=6 (0 already queued)"]


def test_scale_up_throttle_keeps_running_within_max_running():
    caps = dataclasses.replace(CAPS, max_queued=50, max_array_size=50)
    d = decide(obs(ready=1000, running=5), None, POLICY, caps, usage(0, 5))
    assert d.submit == 50 and d.max_running == 3


def test_flaky_inputs_keep_the_idle_clock():
    d = decide(obs(ready=None), NOW - 123, POLICY, CAPS, usage())
    assert d.idle_since == NOW - 123
    d = decide(obs(scheduler_ok=False), NOW - 123, POLICY, CAPS, usage())
    assert d.idle_since == NOW - 123


def test_backlog_resets_the_idle_clock():
    assert decide(obs(ready=3, running=1), NOW - 400, POLICY, CAPS, usage(0, 1)).idle_since is None


def simulate(depths, step=30.0, grace=300.0, start_running=0):
    """Feed depths one tick apart; submitted tasks become running, cancelled ones vanish."""
    policy = dataclasses.replace(POLICY, idle_grace_s=grace)
    running, idle_since, actions = start_running, None, []
    for i, depth in enumerate(depths):
        o = obs(ready=depth, running=running, consumers=running, now=NOW + i * step, unacked=0)
        d = decide(o, idle_since, policy, CAPS, usage(0, running))
        idle_since = d.idle_since
        running += d.submit - d.cancel_running
        actions.append("+" if d.submit else "-" if d.cancel_queued or d.cancel_running else ".")
    return "".join(actions)


def test_no_oscillation_with_alternating_small_depths():
    # Depth flips between a few messages and zero every tick: one submit, never a cancel.
    assert simulate([5, 0] * 20) == "+" + "." * 39


def test_no_oscillation_with_alternating_large_and_small_depths():
    trace = simulate([200, 3] * 20)
    assert "-" not in trace and trace.count("+") <= 2


def test_scale_to_zero_only_after_a_sustained_idle_period():
    trace = simulate([30] + [0] * 15, step=30, grace=300)
    # submit at t=0, idle from t=30, cancel at the first tick >= 300 s later (t=330, tick 11)
    assert trace == "+" + "." * 10 + "-" + "." * 4


def test_no_flip_flop_between_submit_and_cancel_in_any_window():
    import random
    rng = random.Random(7)
    depths = [rng.choice([0, 0, 1, 2, 40, 0]) for _ in range(300)]
    trace = simulate(depths, step=30, grace=300)
    # between a cancel and the next submit (or vice versa) at least grace/step ticks pass
    last = None
    for i, a in enumerate(trace):
        if a in "+-":
            if last is not None and trace[last] != a and a == "-":
                assert i - last >= 10, trace
            last = i


def test_decide_is_pure():
    o = obs(ready=50)
    assert decide(o, None, POLICY, CAPS, usage()) == decide(o, None, POLICY, CAPS, usage())


def test_files_per_task_caps_what_the_walltime_would_allow():
    """--files-per-task 10 is honoured even when the agents' measured per-file time is tiny."""
    assert Policy(walltime_s=3600, files_per_task=10).task_capacity(0.02) == 10
    assert Policy(walltime_s=3600, files_per_task=10).task_capacity(600.0) == 5  # fewer fit
    assert Policy(walltime_s=3600).task_capacity(0.5) == 6480  # walltime * 0.9 / per-file time
    assert Policy(walltime_s=3600).task_capacity(None) == 50
