"""``python -m launcher report --out DIR``: a self-contained HTML run report with PNG plots.

Everything comes from the ledger: array tasks (first seen, started, ended, state), the agents'
activity reports the launcher kept (launcher.ledger.record_reports) and the scaling decisions.
Plots are drawn with matplotlib's Agg canvas (no display, no pyplot global state) and saved next
to index.html, which refers to them by relative path: the folder opens from disk, offline.
Missing data gives an empty plot saying "no data yet", never an error.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402 - after choosing the backend
import matplotlib.dates as mdates  # noqa: E402

from launcher.errors import ConfigError  # noqa: E402
from launcher.states import JobState  # noqa: E402

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 3.4, 100  # 800 x 340 px
NICE_BINS = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
STATE_COLOURS = {"queued": "#9ecae1", "running": "#3182bd", "completed": "#31a354", "timeout": "#fdae6b",
                 "failed": "#de2d26", "cancelled": "#969696", "missing": "#756bb1"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_since(text: Optional[str], now: float) -> float:
    """``--since``: ISO time (local unless it has an offset), epoch seconds, or an age (90m, 6h, 2d)."""
    if not text:
        return 0.0
    m = _AGE.match(text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"--since {text!r}: expected an ISO time (2026-12-01T10:00), epoch seconds"
                         " or an age such as 90m, 6h, 2d") from None


# ------------------------------------------------------------------------------------ series
@dataclass(frozen=True)
class TaskSpan:
    """One array task's life as the ledger knows it (times already made monotonic)."""

    seen: float
    started: Optional[float]
    ended: Optional[float]
    state: str
    nodes: float


def task_spans(rows: Iterable, now: float) -> List[TaskSpan]:
    """Tasks from ledger rows; a clock that went backwards is clamped (end never before start)."""
    out = []
    for r in rows:
        seen = float(r["first_seen"])
        started = float(r["started_at"]) if r["started_at"] is not None else None
        if started is not None:
            seen = min(seen, started)
        ended = float(r["ended_at"]) if r["ended_at"] is not None else None
        if ended is not None:
            ended = max(ended, started if started is not None else seen)
        state = r["state"]
        if not r["final"] and ended is not None:
            ended = None
        out.append(TaskSpan(seen, started, ended, state, float(r["nodes"] or 1.0)))
    return out


def state_at(task: TaskSpan, t: float) -> Optional[str]:
    """The normalized state of ``task`` at time ``t`` (None before the launcher knew it)."""
    if t < task.seen:
        return None
    if task.ended is not None and t >= task.ended:
        return task.state
    if task.started is not None and t >= task.started:
        return JobState.RUNNING.value
    if task.state == JobState.MISSING.value and task.ended is None and task.started is None:
        return JobState.MISSING.value
    return JobState.QUEUED.value


def _run_end(spans: Sequence[TaskSpan], now: float) -> float:
    """Where time axes end: now while a task is open, else when the last one ended (plus a margin)."""
    if any(s.ended is None for s in spans):
        return now
    last = max(s.ended for s in spans)
    first = min(s.seen for s in spans)
    return min(now, last + max(0.05 * (last - first), 1.0))


def _time_grid(starts: Sequence[float], spans: Sequence[TaskSpan], now: float, n: int) -> List[float]:
    """``n`` evenly spaced times from the earliest start to the run's end (at least one second)."""
    lo = min(starts)
    hi = max(_run_end(spans, now), lo + 1.0)
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def bin_width(span: float) -> int:
    """A round bin width giving about 30 bins over ``span`` seconds."""
    for width in NICE_BINS:
        if span / width <= 40:
            return width
    return NICE_BINS[-1]


def spread(bins: List[float], origin: float, width: float, start: float, end: float, value: float) -> None:
    """Add ``value`` to ``bins`` spread evenly over [start, end] (a point when end <= start)."""
    if end <= start:
        i = int((start - origin) // width)
        if 0 <= i < len(bins):
            bins[i] += value
        return
    i = max(0, int((start - origin) // width))
    while i < len(bins):
        lo, hi = origin + i * width, origin + (i + 1) * width
        if lo >= end:
            break
        overlap = min(hi, end) - max(lo, start)
        if overlap > 0:
            bins[i] += value * overlap / (end - start)
        i += 1


def _report_span(r: dict) -> Tuple[float, float]:
    interval = max(float(r.get("interval_s") or 0.0), 0.0)  # negative: the agent's clock jumped
    return r["at"] - interval, r["at"]


def utilization(reports: Sequence[dict], spans: Sequence[TaskSpan], now: float,
                default_slots: int = 1) -> Optional[float]:
    """Busy extractor-seconds / allocated slot-seconds over the whole run (None without both)."""
    busy = sum(float(r["busy_seconds"]) for r in reports)
    slots = _slots(reports, default_slots)
    allocated = sum(max((s.ended if s.ended is not None else now) - s.started, 0.0)
                    for s in spans if s.started is not None) * slots
    if allocated <= 0 or not reports:
        return None
    return busy / allocated


def _slots(reports: Sequence[dict], default: int) -> int:
    seen = [int(r["slots"]) for r in reports if r.get("slots")]
    return int(statistics.median(seen)) if seen else max(1, default)


# ------------------------------------------------------------------------------------ plots
def _figure(title: str) -> Tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax, why: str = "no data yet") -> None:
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _time_axis(ax) -> None:
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.tick_params(axis="x", labelsize=8)


def _dates(times: Iterable[float]) -> list:
    return [dt.datetime.fromtimestamp(t) for t in times]


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(str(path), dpi=DPI, facecolor="white")


def plot_files_per_minute(reports: Sequence[dict], path: Path) -> None:
    fig, ax = _figure("Files done per minute")
    if not reports or not any(r["done"] for r in reports):
        _no_data(ax, "no data yet (no agent reports)")
        return _save(fig, path)
    lo = min(_report_span(r)[0] for r in reports)
    hi = max(r["at"] for r in reports)
    width = bin_width(hi - lo)
    origin = math.floor(lo / width) * width
    bins = [0.0] * max(1, int(math.ceil((hi - origin) / width)) + 1)
    for r in reports:
        start, end = _report_span(r)
        spread(bins, origin, width, start, end, float(r["done"]))
    rates = [b * 60.0 / width for b in bins]
    ax.bar(_dates(origin + i * width for i in range(len(bins))), rates, width=width / 86400.0, align="edge",
           color="#3182bd", edgecolor="#08519c")
    ax.set_ylabel("files / min")
    ax.set_xlabel(f"time ({width:g} s bins)")
    _time_axis(ax)
    _save(fig, path)


def plot_tasks_by_state(spans: Sequence[TaskSpan], now: float, path: Path) -> None:
    fig, ax = _figure("Array tasks by state")
    if not spans:
        _no_data(ax, "no data yet (no array task recorded)")
        return _save(fig, path)
    times = _time_grid([s.seen for s in spans], spans, now, 300)
    states = [s.value for s in JobState]
    counts = {st: [0] * len(times) for st in states}
    for i, t in enumerate(times):
        for s in spans:
            st = state_at(s, t)
            if st is not None:
                counts[st][i] += 1
    shown = [st for st in states if any(counts[st])]
    ax.stackplot(_dates(times), *[counts[st] for st in shown], labels=shown,
                 colors=[STATE_COLOURS.get(st, "#cccccc") for st in shown], step="post")
    ax.set_ylabel("tasks")
    ax.legend(loc="upper left", fontsize=8, ncol=len(shown))
    ax.set_ylim(0, max(1, len(spans)) * 1.25)
    _time_axis(ax)
    _save(fig, path)


def plot_node_hours(spans: Sequence[TaskSpan], budget: Optional[float], now: float, path: Path) -> None:
    fig, ax = _figure("Node-hours used against the budget")
    ran = [s for s in spans if s.started is not None]
    if not ran:
        _no_data(ax, "no data yet (no task has run)")
        return _save(fig, path)
    times = _time_grid([s.started for s in ran], ran, now, 200)
    used = [sum(max(min(t, s.ended if s.ended is not None else now) - s.started, 0.0) * s.nodes for s in ran)
            / 3600.0 for t in times]
    ax.plot(_dates(times), used, color="#3182bd", linewidth=2, label="used")
    top = max(used[-1] * 1.3, 1e-3)
    if budget is not None:
        # A budget far above this run's use would flatten the curve: then it is stated, not drawn.
        if budget <= top * 3:
            ax.axhline(budget, color="#de2d26", linestyle="--", label=f"budget {budget:g}")
            top = max(top, budget * 1.1)
        note = f"used {used[-1]:.3g} of the {budget:g} node-hour budget ({used[-1] / budget:.2%})" \
            if budget > 0 else "budget 0 node-hours"
    else:
        note = f"used {used[-1]:.3g} node-hours; no budget set in the caps"
    ax.text(0.99, 0.05, note, transform=ax.transAxes, ha="right", fontsize=9, color="#de2d26")
    ax.set_ylim(0, top)
    ax.set_ylabel("node-hours")
    ax.legend(loc="upper left", fontsize=8)
    _time_axis(ax)
    _save(fig, path)


def plot_durations(reports: Sequence[dict], path: Path) -> None:
    fig, ax = _figure("Per-file duration")
    durations = [d for r in reports for d in r["durations"] if d >= 0]
    if not durations:
        _no_data(ax, "no data yet (no per-file times reported)")
        return _save(fig, path)
    ax.hist(durations, bins=min(40, max(5, len(durations) // 3)), color="#31a354", edgecolor="#006d2c")
    median = statistics.median(durations)
    ax.axvline(median, color="#333333", linestyle="--", label=f"median {median:.2f} s")
    ax.set_xlabel("seconds per file")
    ax.set_ylabel("files")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_utilization(reports: Sequence[dict], spans: Sequence[TaskSpan], now: float, slots: int,
                     path: Path) -> Optional[float]:
    overall = utilization(reports, spans, now, slots)
    title = "Allocation utilization (busy extractor-seconds / allocated slot-seconds)"
    fig, ax = _figure(title if overall is None else f"{title}: {overall:.0%} overall")
    ran = [s for s in spans if s.started is not None]
    if overall is None or not ran:
        _no_data(ax, "no data yet (needs agent reports and tasks that ran)")
        _save(fig, path)
        return None
    lo = min(s.started for s in ran)
    hi = max([s.ended if s.ended is not None else now for s in ran] + [r["at"] for r in reports])
    width = bin_width(max(hi - lo, 1.0))
    origin = math.floor(lo / width) * width
    n = max(1, int(math.ceil((hi - origin) / width)))
    busy, alloc = [0.0] * n, [0.0] * n
    per_task = _slots(reports, slots)
    for r in reports:
        start, end = _report_span(r)
        spread(busy, origin, width, start, end, float(r["busy_seconds"]))
    for s in ran:
        end = s.ended if s.ended is not None else now
        spread(alloc, origin, width, s.started, end, (end - s.started) * per_task)
    ratio = [min(b / a, 1.0) if a > 0 else 0.0 for b, a in zip(busy, alloc)]
    ax.bar(_dates(origin + i * width for i in range(n)), [100 * x for x in ratio], width=width / 86400.0,
           align="edge", color="#fd8d3c", edgecolor="#a63603")
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of slot time busy")
    ax.set_xlabel(f"time ({width:g} s bins, {per_task} slot(s) per task)")
    _time_axis(ax)
    _save(fig, path)
    return overall


# ------------------------------------------------------------------------------------ report
PLOTS = (("files_per_minute.png", "Files done per minute"), ("tasks_by_state.png", "Array tasks by state"),
         ("node_hours.png", "Node-hours used against the budget"), ("durations.png", "Per-file duration"),
         ("utilization.png", "Allocation utilization"))


def write_report(launcher, data: dict, out: Path, since: Optional[str] = None) -> Path:
    """Write ``out``/index.html and its PNGs from the launcher's ledger; returns the index path."""
    from launcher.status import render

    now = launcher.clock()
    start = parse_since(since, now)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    ledger = launcher.ledger
    reports = ledger.agent_reports(start, queue=data["broker"].get("queue") or None)
    rows = [r for r in ledger.db.execute(
        "SELECT t.*, COALESCE(s.nodes_per_task, 1) AS nodes FROM tasks t"
        " LEFT JOIN submissions s ON s.job_id=t.job_id"
        " WHERE t.ended_at IS NULL OR t.ended_at>=? ORDER BY t.first_seen", (start,))]
    spans = task_spans(rows, now)
    slots = int(launcher.caps.cores_per_task or 1)
    plot_files_per_minute(reports, out / PLOTS[0][0])
    plot_tasks_by_state(spans, now, out / PLOTS[1][0])
    plot_node_hours(spans, data["node_hours"].get("budget"), now, out / PLOTS[2][0])
    plot_durations(reports, out / PLOTS[3][0])
    overall = plot_utilization(reports, spans, now, slots, out / PLOTS[4][0])
    decisions = [dict(r) for r in ledger.last_decisions(10)]
    index = out / "index.html"
    index.write_text(_html(data, render(data), reports, spans, overall, decisions, start, now), encoding="utf-8")
    return index


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _html(data: dict, status_text: str, reports: Sequence[dict], spans: Sequence[TaskSpan],
          overall: Optional[float], decisions: Sequence[dict], start: float, now: float) -> str:
    done = sum(r["done"] for r in reports)
    failed = sum(r["failed"] for r in reports)
    dead = sum(r["dead_lettered"] for r in reports)
    nh = data["node_hours"]
    budget = "no budget" if nh.get("budget") is None else f"{nh['budget']:g} per {nh['period']}"
    summary = [("files done", str(done)), ("failed attempts", str(failed)), ("dead-lettered", str(dead)),
               ("array tasks", str(len(spans))),
               ("allocation utilization", "unknown" if overall is None else f"{overall:.1%}"),
               ("node-hours used", f"{nh['used']:.3f} ({budget})"),
               ("agent reports", str(len(reports)))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    imgs = "".join(f'<figure><img src="{name}" width="{int(WIDTH_IN * DPI)}" alt="{html.escape(alt)}"></figure>'
                   for name, alt in PLOTS)
    drows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(_when(d["at"])), html.escape(d["case_name"]), html.escape(_action(d)),
            "<br>".join(html.escape(x) for x in json.loads(d["reasons"] or "[]")))
        for d in decisions) or '<tr><td colspan="4">none recorded</td></tr>'
    since = "the first record" if start <= 0 else _when(start)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clowder-hpc-agent run report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 60em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; font-size: 0.9em; }}
th {{ background: #f0f0f0; }}
figure {{ margin: 0 0 1.2em; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }}
</style></head><body>
<h1>Run report</h1>
<p>Queue <b>{html.escape(str(data['broker'].get('queue') or '?'))}</b>, scheduler
{html.escape(data['scheduler'])}; from {html.escape(since)} to {html.escape(_when(now))}.</p>
<table>{rows}</table>
{imgs}
<h2>Last scaling decisions</h2>
<table><tr><th>at</th><th>case</th><th>action</th><th>reasons</th></tr>{drows}</table>
<h2>Status</h2>
<pre>{html.escape(status_text)}</pre>
</body></html>
"""


def _action(d: dict) -> str:
    parts = []
    if d["submit"]:
        parts.append(f"submit {d['submit']}" + (f" ({d['job_id']})" if d["job_id"] else ""))
    if d["cancel_queued"] or d["cancel_running"]:
        parts.append(f"cancel {d['cancel_queued'] + d['cancel_running']}")
    return ", ".join(parts) or "none"
