"""Batch-lifecycle pure parts: walltime parsing, the admission rule, scheduler environments."""
from __future__ import annotations

import time

import pytest

from agent.jobenv import detect, parse_pbs_end, parse_slurm_end
from agent.walltime import DurationEstimate, admit, default_margin
from hpc_common.walltime import parse_walltime


@pytest.mark.parametrize("text, seconds", [
    ("01:00:00", 3600), ("00:01:00", 60), ("1:30", 90), ("90", 90), ("0:0:5.5", 5.5),
    ("2-03:00:00", 2 * 86400 + 3 * 3600), ("2-03:00", 2 * 86400 + 3 * 3600), ("2-03", 2 * 86400 + 3 * 3600),
    ("1h30m", 5400), ("45s", 45), ("1d", 86400), ("48:00:00", 172800),
])
def test_walltime_forms(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1x", "h"])
def test_walltime_errors(text):
    with pytest.raises(ValueError):
        parse_walltime(text)


@pytest.mark.parametrize("remaining, estimate, margin, expected", [
    (None, 100.0, 10.0, True),      # no end time: always
    (60.0, None, 10.0, True),       # duration unknown yet: while more than the margin is left
    (9.0, None, 10.0, False),
    (30.0, 15.0, 10.0, True),       # 15 s file + 10 s margin fits in 30 s
    (25.0, 15.0, 10.0, False),      # exactly at the edge: not admitted
    (3600.0, 4000.0, 60.0, False),  # a file longer than what is left
])
def test_admission_rule(remaining, estimate, margin, expected):
    assert admit(remaining, estimate, margin) is expected


def test_estimate_is_the_longest_recent_duration():
    est = DurationEstimate(window=3, initial=5.0)
    assert est.value() == 5.0
    for d in (1.0, 9.0, 2.0):
        est.add(d)
    assert est.value() == 9.0
    for d in (1.0, 1.0, 1.0):
        est.add(d)
    assert est.value() == 1.0  # the window forgets old outliers


def test_default_margin():
    assert default_margin(None) == 20.0
    assert default_margin(60) == 20.0
    assert default_margin(3600) == 180.0
    assert default_margin(86400) == 300.0


def test_detect_pbs_pro_array_subjob():
    ident = detect({"PBS_JOBID": "1234[7].pbs01", "PBS_ARRAY_INDEX": "7", "PBS_ARRAY_ID": "1234[].pbs01",
                    "PBS_O_WORKDIR": "/home/u"})
    assert (ident.scheduler, ident.job_id, ident.array_id, ident.index) == ("pbs", "1234[7].pbs01", "1234[].pbs01",
                                                                            "7")
    assert ident.file_tag() == "1234_7" and "1234[7].pbs01" in ident.label()


def test_detect_torque_array_task():
    ident = detect({"PBS_JOBID": "189[3].torque01", "PBS_ARRAYID": "3"})
    assert (ident.scheduler, ident.index) == ("torque", "3") and ident.file_tag() == "189_3"


def test_detect_slurm_before_pbs_names():
    ident = detect({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3",
                    "SLURMD_NODENAME": "n07.cluster", "PBS_JOBID": "should-not-win"})
    assert (ident.scheduler, ident.job_id, ident.label(), ident.file_tag()) == ("slurm", "815", "slurm 812_3@n07",
                                                                                "812_3")


def test_detect_outside_a_batch_job():
    ident = detect({})
    assert ident.scheduler is None and ident.index is None


def test_parse_slurm_end():
    expected = time.mktime(time.strptime("2026-11-25T05:20:04", "%Y-%m-%dT%H:%M:%S"))
    assert parse_slurm_end("2026-11-25T05:20:04\n") == expected
    assert parse_slurm_end("N/A\n") is None and parse_slurm_end("") is None


def test_parse_pbs_pro_and_torque_end():
    pro = ("Job Id: 1234[7].pbs01\n    job_state = R\n    stime = Wed Nov 25 04:00:00 2026\n"
           "    Resource_List.walltime = 01:00:00\n")
    start = time.mktime(time.strptime("Wed Nov 25 04:00:00 2026", "%a %b %d %H:%M:%S %Y"))
    assert parse_pbs_end(pro) == start + 3600
    torque = "Job Id: 189[3].t\n    Walltime.Remaining = 120\n    start_time = 1700000000\n"
    assert abs(parse_pbs_end(torque) - (time.time() + 120)) < 5
    assert parse_pbs_end("garbage") is None
