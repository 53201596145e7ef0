"""hpc_common.walltime: every form Slurm, PBS Pro, Torque and AGENT_WALLTIME write, in one table."""
from __future__ import annotations

import math

import pytest

from hpc_common.walltime import MINUTES, SECONDS, format_walltime, parse_walltime, walltime_seconds

H, D = 3600, 86400


@pytest.mark.parametrize("text, bare, seconds", [
    # Slurm (sbatch --time, squeue %l): a bare number is minutes
    ("90", MINUTES, 90 * 60), ("05:30", MINUTES, 5 * 60 + 30), ("02:03:04", MINUTES, 2 * H + 3 * 60 + 4),
    ("1-02", MINUTES, D + 2 * H), ("1-02:30", MINUTES, D + 2 * H + 30 * 60),
    ("1-02:30:15", MINUTES, D + 2 * H + 30 * 60 + 15), ("0-00:01:00", MINUTES, 60),
    ("7-00:00:00", MINUTES, 7 * D),
    # PBS Pro / Torque (-l walltime=): [[HH:]MM:]SS[.ms], a bare number is seconds
    ("90", SECONDS, 90), ("45", SECONDS, 45), ("01:30", SECONDS, 90), ("01:00:00", SECONDS, H),
    ("48:00:00", SECONDS, 48 * H), ("00:00:05.250", SECONDS, 5.25), ("10.5", SECONDS, 10.5),
    ("100:00:00", SECONDS, 100 * H),
    # AGENT_WALLTIME and --walltime extras: unit forms
    ("1h30m", SECONDS, 5400), ("90s", SECONDS, 90), ("1d", SECONDS, D), ("2d 3h", SECONDS, 2 * D + 3 * H),
    ("1H30M", SECONDS, 5400), (" 3600 ", SECONDS, 3600),
])
def test_forms(text, bare, seconds):
    assert parse_walltime(text, bare=bare) == pytest.approx(seconds)


def test_slurm_day_form_is_days_and_hours():
    # the disagreement that made one parser necessary: "1-02" is 1 day 2 hours, not 1 day 2 seconds
    assert parse_walltime("1-02") == D + 2 * H


@pytest.mark.parametrize("word", ["UNLIMITED", "INFINITE", "NOT_SET", "unlimited"])
def test_unlimited_words(word):
    assert parse_walltime(word, bare=MINUTES, unlimited=True) == math.inf
    with pytest.raises(ValueError, match="no limit"):
        parse_walltime(word)


@pytest.mark.parametrize("text", ["", " ", "abc", "1:2:3:4", "-5", "1x", "h", "00:61:00", "01:00:60",
                                  "1-02:61", "x-1:00:00", "1-", "1--2", "1:30:", ":30"])
def test_rejected(text):
    with pytest.raises(ValueError, match="walltime"):
        parse_walltime(text)


def test_bare_must_be_named():
    with pytest.raises(ValueError, match="bare"):
        parse_walltime("5", bare="hours")


def test_whole_seconds_and_format():
    assert walltime_seconds("00:00:05.2") == 6
    assert walltime_seconds("1-02:00:00") == D + 2 * H
    assert format_walltime(90061) == "25:01:01"
    assert format_walltime(walltime_seconds("1-00:00:01")) == "24:00:01"
    with pytest.raises(ValueError):
        walltime_seconds("UNLIMITED")
    with pytest.raises(ValueError, match="bad walltime"):  # scheduler forms only: caps files, --walltime
        walltime_seconds("24h")
