"""Site caps: strict loading, unsafe files refused, clamp never exceeds a cap."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from launcher.caps import Caps, CapsError, Request, Usage, clamp, load_caps, period_start

GOOD = """\
max_array_size: 100
max_running: 20
max_queued: 50
max_walltime: "24:00:00"
default_walltime: "04:00:00"
allowed_queues: [normal, long]
allowed_accounts: [proj1]
cores_per_task: 4
cores_per_node: 8
node_hours:
  budget: 1000
  period: week
"""


def write(tmp_path, text, mode=0o644, name="caps.yaml"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_load_good_caps(tmp_path):
    caps = load_caps(write(tmp_path, GOOD))
    assert caps.max_array_size == 100 and caps.max_walltime_s == 86400
    assert caps.default_walltime_s == 4 * 3600
    assert caps.allowed_queues == ("normal", "long") and caps.allowed_accounts == ("proj1",)
    assert caps.node_hours_budget == 1000 and caps.budget_period == "week"
    assert caps.nodes_per_task == 1.0  # 4 cores of an 8-core node: charged one node


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646, 0o620])
def test_writable_by_others_is_refused(tmp_path, mode):
    with pytest.raises(CapsError, match="writable by group or others.*chmod go-w"):
        load_caps(write(tmp_path, GOOD, mode))


def test_file_in_world_writable_directory_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(CapsError, match="anyone can write"):
        load_caps(write(d, GOOD))


def test_missing_file(tmp_path):
    with pytest.raises(CapsError, match="No such file"):
        load_caps(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,message", [
    ("max_running: [1,\n", r"not valid YAML at line \d+, column \d+"),
    ("- 1\n- 2\n", "expected a mapping"),
    (GOOD + "max_runing: 3\n", "unknown key.*max_runing"),
    ("max_running: 1\nmax_queued: 1\nmax_walltime: 01:00:00\n", "missing required.*max_array_size"),
    (GOOD.replace("max_running: 20", "max_running: -1"), "max_running must be an integer >= 0"),
    (GOOD.replace("max_running: 20", "max_running: yes"), "max_running must be an integer"),
    (GOOD.replace('"24:00:00"', '"24h"'), "max_walltime: bad walltime"),
    (GOOD.replace('"04:00:00"', '"25:00:00"'), "default_walltime exceeds max_walltime"),
    (GOOD.replace("period: week", "period: fortnight"), "node_hours.period must be one of"),
    (GOOD.replace("allowed_queues: [normal, long]", "allowed_queues: {a: 1}"),
     "allowed_queues must be a list"),
])
def test_bad_caps_have_clear_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CapsError, match=message) as info:
        load_caps(path)
    assert str(path) in str(info.value)


CAPS = Caps(max_array_size=10, max_running=4, max_queued=6, max_walltime_s=3600,
            default_walltime_s=1800, allowed_queues=("normal", "long"),
            allowed_accounts=("proj1",), node_hours_budget=20.0)


def test_defaults_queue_account_walltime():
    a = clamp(Request(2), Usage(), CAPS)
    assert (a.tasks, a.walltime_s, a.queue, a.account, a.reasons) == (2, 1800, "normal", "proj1", ())


def test_walltime_capped_in_one_line():
    a = clamp(Request(1, walltime_s=7200), Usage(), CAPS)
    assert a.walltime_s == 3600
    assert a.reasons == ("capped: walltime 02:00:00 requested, max_walltime is 01:00:00",)


@pytest.mark.parametrize("req,line", [
    (Request(1, queue="debug"), "refused: queue 'debug' is not allowed (allowed: normal, long)"),
    (Request(1, account="other"), "refused: account 'other' is not allowed (allowed: proj1)"),
])
def test_queue_and_account_refused(req, line):
    a = clamp(req, Usage(), CAPS)
    assert a.refused and a.reasons[-1] == line


def test_no_allowed_queues_means_scheduler_default_only():
    import dataclasses
    caps = dataclasses.replace(CAPS, allowed_queues=())
    assert clamp(Request(1), Usage(), caps).queue is None
    assert clamp(Request(1, queue="x"), Usage(), caps).refused


def test_refusal_names_the_binding_cap():
    a = clamp(Request(3), Usage(queued=6, run_slots_claimed=4), CAPS)
    assert a.refused and a.reasons[-1].startswith("refused: 3 task(s) requested, none allowed by"
                                                  " max_queued=6")


def test_budget_period_start():
    # 2025-11-26 (a Wednesday) 12:00 UTC
    now = 1764158400.0
    assert period_start(now, "day") == 1764115200.0
    assert period_start(now, "week") == 1764115200.0 - 2 * 86400
    assert period_start(now, "month") == 1761955200.0


@settings(max_examples=300, deadline=None)
@given(tasks=st.integers(1, 10_000), wall=st.integers(60, 100_000), queued=st.integers(0, 10),
       claimed=st.integers(0, 6), committed=st.floats(0, 30))
def test_clamp_never_exceeds_a_cap(tasks, wall, queued, claimed, committed):
    a = clamp(Request(tasks, wall), Usage(queued, 0, claimed, committed), CAPS)
    assert a.tasks <= CAPS.max_array_size
    assert queued + a.tasks <= max(CAPS.max_queued, queued)
    assert a.walltime_s <= CAPS.max_walltime_s
    if not a.refused:
        assert claimed + a.max_running <= CAPS.max_running
        assert committed + a.tasks * CAPS.task_node_hours(a.walltime_s) <= CAPS.node_hours_budget
        assert 1 <= a.max_running <= a.tasks
