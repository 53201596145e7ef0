"""The run report's pieces without services: --since, binning, clamped clocks, empty data."""
import time

import pytest
from PIL import Image

from launcher.errors import ConfigError
from launcher.report import (bin_width, parse_since, plot_durations, plot_files_per_minute, plot_node_hours,
                             plot_tasks_by_state, plot_utilization, spread, state_at, task_spans, utilization)


def test_parse_since_forms():
    now = 1_800_000_000.0
    assert parse_since(None, now) == 0.0
    assert parse_since("90m", now) == now - 5400
    assert parse_since("2d", now) == now - 172800
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2026-12-01T10:00:00+00:00", now) == 1796119200.0
    with pytest.raises(ConfigError, match="--since"):
        parse_since("last tuesday", now)


def test_spread_keeps_the_total_and_points_land_in_their_bin():
    bins = [0.0] * 4
    spread(bins, 0.0, 10.0, 5.0, 25.0, 20.0)
    assert bins == [5.0, 10.0, 5.0, 0.0]
    spread(bins, 0.0, 10.0, 31.0, 31.0, 1.0)
    assert bins[3] == 1.0
    spread(bins, 0.0, 10.0, 99.0, 120.0, 5.0)  # outside: ignored, never an IndexError
    assert sum(bins) == 21.0
    assert bin_width(60) == 10 and bin_width(3600) == 120


def test_a_clock_that_went_backwards_is_clamped():
    rows = [{"first_seen": 100.0, "started_at": 90.0, "ended_at": 80.0, "state": "completed", "final": 1,
             "nodes": 1}]
    (span,) = task_spans(rows, now=200.0)
    assert span.seen == 90.0 and span.ended == 90.0
    assert state_at(span, 85.0) is None and state_at(span, 95.0) == "completed"
    reports = [{"at": 95.0, "interval_s": -30.0, "busy_seconds": 1.0, "done": 1, "durations": [-1.0, 0.5],
                "slots": 1}]
    assert utilization(reports, [span], 200.0) is None  # zero allocated time: unknown, not a division by zero


def test_every_plot_draws_with_no_data_and_with_odd_data(tmp_path):
    now = time.time()
    for name, draw in (("a", lambda p: plot_files_per_minute([], p)), ("b", lambda p: plot_tasks_by_state([], now, p)),
                       ("c", lambda p: plot_node_hours([], None, now, p)), ("d", lambda p: plot_durations([], p)),
                       ("e", lambda p: plot_utilization([], [], now, 1, p))):
        draw(tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as img:
            assert img.width >= 400
    rows = [{"first_seen": now - 50, "started_at": now - 40, "ended_at": None, "state": "running", "final": 0,
             "nodes": 2}]
    spans = task_spans(rows, now)
    reports = [{"at": now - 5, "interval_s": 30.0, "busy_seconds": 20.0, "done": 3, "durations": [5.0, 7.0, 8.0],
                "slots": 1}]
    plot_node_hours(spans, 0.0, now, tmp_path / "zero-budget.png")
    assert plot_utilization(reports, spans, now, 1, tmp_path / "u.png") == pytest.approx(0.5, abs=0.01)
