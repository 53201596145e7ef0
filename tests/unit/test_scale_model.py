"""The scale model (benchmarks/scale_sim): pure unit tests, no services, small simulations."""
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)

from scale_sim.calibration import DEFAULT, SOURCES, Costs  # noqa: E402
from scale_sim.model import Config, SimulationStuck, simulate  # noqa: E402
from scale_sim.report import capacities  # noqa: E402
from scale_sim.workload import DistError, fixed, parse_dist  # noqa: E402

RANDOM_WORK = parse_dist("lognormal:median=2,sigma=0.8")
RANDOM_WAIT = parse_dist("exp:mean=30")


def test_every_constant_says_where_it_came_from():
    names = {f for f in Costs.__dataclass_fields__}
    assert names == set(SOURCES)
    assert all(SOURCES[n].strip() for n in names)


@pytest.mark.parametrize("cfg", [
    Config(nodes=3, ranks=4, files=300, work=parse_dist("lognormal:median=3,sigma=1.2"), queue_wait=RANDOM_WAIT,
           walltime=45, idle_exit=5, costs=DEFAULT.with_overrides({"walltime_margin_s": 1})),
    Config(nodes=5, ranks=2, files=200, work=RANDOM_WORK, queue_wait=RANDOM_WAIT, mode="dispatch"),
    Config(nodes=2, ranks=8, files=400, work=RANDOM_WORK, source="relay", host_cores=2),
], ids=["array-walltime-handbacks", "dispatch", "relay-shared-host"])
def test_every_file_finishes_exactly_once(cfg):
    res = simulate(cfg)
    assert sorted(res.done) == list(range(cfg.files))
    assert len(res.done_times) == cfg.files
    if cfg.walltime:
        assert res.handbacks > 0          # the case really cut files at the walltime...
        assert res.tasks_run > cfg.nodes  # ...and resubmitted tasks finished them


def test_files_longer_than_the_walltime_are_reported_not_looped_on():
    cfg = Config(nodes=1, files=3, work=fixed(100), walltime=60,
                 costs=DEFAULT.with_overrides({"walltime_margin_s": 5}))
    with pytest.raises(SimulationStuck):
        simulate(cfg)


def _rate(ranks, costs=DEFAULT, work=1.0):
    cfg = Config(nodes=1, ranks=ranks, files=ranks * 20, work=fixed(work), include_startup=False, costs=costs)
    return simulate(cfg).files_per_s


def test_speedup_is_monotonic_until_the_broker_saturates():
    costs = DEFAULT.with_overrides({"broker_ops_per_s": 11 * 40})  # the broker's ceiling: 40 files/s
    ceiling = capacities(costs)["broker"]
    rates = [_rate(r, costs) for r in (1, 2, 4, 8, 16, 32)]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    assert rates[0] == pytest.approx(1.0, rel=0.05)            # one rank: one 1 s file at a time
    assert rates[3] == pytest.approx(8 * rates[0], rel=0.05)   # below the ceiling: linear
    plateau = [_rate(r, costs) for r in (64, 128, 256)]
    assert all(ceiling * 0.85 <= p <= ceiling * 1.001 for p in plateau)


@pytest.mark.parametrize("name, overrides, cfg", [
    ("broker", {"broker_ops_per_s": 11 * 30}, dict(nodes=4, ranks=32)),
    ("clowder", {"clowder_service_s": 0.02}, dict(nodes=4, ranks=32)),
    ("relay", {"relay_files_per_s": 20}, dict(nodes=4, ranks=32, source="relay")),
    ("leader", {"leader_cpu_s": 0.05}, dict(nodes=2, ranks=64)),
    ("none", {}, dict(nodes=2, ranks=4)),
])
def test_the_saturating_component_is_named(name, overrides, cfg):
    costs = DEFAULT.with_overrides(overrides)
    res = simulate(Config(files=cfg["nodes"] * cfg["ranks"] * 20, work=fixed(1.0), include_startup=False,
                          costs=costs, **cfg))
    assert res.bottleneck == name
    if name != "none":
        assert res.load(name) >= 0.85


def test_same_seed_same_history_other_seed_other_history():
    def run(seed):
        res = simulate(Config(nodes=4, ranks=4, files=200, work=RANDOM_WORK, queue_wait=RANDOM_WAIT,
                              walltime=60, idle_exit=5, seed=seed,
                              costs=DEFAULT.with_overrides({"walltime_margin_s": 5})))
        return res.done, res.done_times, res.makespan, res.handbacks

    assert run(7) == run(7)
    assert run(7)[2] != run(8)[2]


def test_dispatch_pays_the_queue_wait_per_file_the_array_once_per_task():
    common = dict(nodes=4, ranks=4, files=320, work=fixed(2.0), queue_wait=fixed(120.0), idle_exit=5)
    array = simulate(Config(**common))
    dispatch = simulate(Config(mode="dispatch", **common))
    # 20 files per slot: the array waits once (~120 s + 40 s of work), dispatch 20 times
    assert dispatch.makespan > 10 * array.makespan
    assert array.peak_connections == 4 and dispatch.peak_connections == 1


def test_rates_and_connections_are_reported():
    res = simulate(Config(nodes=3, ranks=8, files=480, work=fixed(1.0), include_startup=False))
    assert res.broker_ops == 480 * DEFAULT.broker_ops_per_file
    assert res.clowder_requests == 480 * DEFAULT.clowder_requests_per_file
    assert res.peak_connections == 3
    assert res.broker_ops_per_s == pytest.approx(res.broker_ops / res.makespan)
    assert 0 < res.utilization <= 1
    relay = simulate(Config(nodes=3, ranks=8, files=480, work=fixed(1.0), source="relay", include_startup=False))
    assert relay.peak_connections == 1 and 0 < relay.relay_load < 1


@pytest.mark.parametrize("text", ["", "gauss:1", "fixed:x", "fixed:-1", "uniform:3,1", "exp:1",
                                  "lognormal:median=0,sigma=1", "lognormal:median=5", "fixed:inf"])
def test_bad_distributions_are_refused(text):
    with pytest.raises(DistError):
        parse_dist(text)


def test_distributions_round_trip_and_draw_within_bounds():
    import random

    for text in ("fixed:2", "uniform:1,3", "exp:mean=60", "lognormal:median=120,sigma=1"):
        assert str(parse_dist(text)) == text
    rng = random.Random(1)
    assert all(1 <= parse_dist("uniform:1,3").sample(rng) <= 3 for _ in range(100))


@pytest.mark.parametrize("args", [
    ["run", "--nodes", "0"],
    ["run", "--work", "gauss:1"],
    ["run", "--set", "no_such_constant=1"],
    ["run", "--set", "leader_cpu_s"],
    ["run", "--walltime", "10"],
    ["run", "--files", "3", "--work", "fixed:100", "--walltime", "60", "--queue-wait", "fixed:0"],
    ["sweep", "--ranks", "1,x"],
    ["frobnicate"],
    [],
])
def test_cli_bad_input_is_one_line_and_exit_2(args):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "scale_model.py"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale_model.py: error: "), proc.stderr
    assert proc.stdout == ""


def test_cli_run_prints_the_result_as_json():
    import json

    proc = subprocess.run([sys.executable, os.path.join(BENCH, "scale_model.py"), "run", "--nodes", "2",
                           "--ranks", "4", "--files", "80", "--work", "fixed:1", "--queue-wait", "fixed:0",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["files_done"] == 80 and out["broker_connections"] == 2 and out["saturated"] == "none"


def test_validation_gives_a_task_that_never_started_a_wait_past_the_run():
    from scale_sim.report import _waits

    assert _waits({"makespan": 30.0, "waits": [0.4, float("nan"), -0.1]}) == (0.4, 30.0, 0.0)


def test_sweep_page_lists_every_run_and_every_constant():
    from scale_sim.report import Workload, sweep, sweep_markdown

    load = Workload(fixed(1.0), fixed(5.0), 0.0, 2, 1)
    results = sweep(load, DEFAULT, lambda line: None, nodes=(1, 3), ranks=(1, 2))
    assert len(results) == 4 + 2 * 2  # the grid, then relay and dispatch per node count
    text = sweep_markdown(results, load, DEFAULT, "cmd")
    assert text.count("\n| 3 | 2 | ") == 3 and all(f"| {name} |" in text for name in SOURCES)
