"""Plots of the benchmarks' results, drawn from their markdown files (no rerun needed).

Each benchmark calls its plot function after writing its results; ``python benchmarks/plots.py``
redraws every PNG from the committed results. A PNG sits next to its markdown file.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Dict, List

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402 - after choosing the backend

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DPI = 100


def read_table(md_path: str, first_column: str) -> List[Dict[str, str]]:
    """Rows of the markdown table whose header starts with ``first_column`` (cells as text)."""
    rows: List[Dict[str, str]] = []
    header: List[str] = []
    with open(md_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None
            if not header:
                if cells and cells[0] == first_column:
                    header = cells
            elif cells is None:
                break  # the table ended
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(dict(zip(header, cells)))
    if not rows:
        raise ValueError(f"{md_path}: no table starting with column {first_column!r}")
    return rows


def number(text: str) -> float:
    """The first number in a cell (``"230x"``, ``"0.83 / 0.72"``, ``"**69.0x**"``)."""
    m = re.search(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    if not m:
        raise ValueError(f"no number in {text!r}")
    return float(m.group(0))


def _figure(title: str, width: float = 8.0, height: float = 4.0):
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(True, axis="y", alpha=0.3)
    return fig, ax


def _save(fig: Figure, png: str) -> str:
    fig.tight_layout()
    fig.savefig(png, dpi=DPI, facecolor="white")
    return png


def _label_bars(ax, bars, fmt: str = "{:g}") -> None:
    for bar in bars:
        h = bar.get_height()
        ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")


def plot_agent_throughput(md: str, png: str) -> str:
    """Files/s of the bare loop, pyclowder's connector and the agent (log scale)."""
    rows = read_table(md, "case")
    names = [r["case"] for r in rows]
    rates = [number(r["files/s"]) for r in rows]
    colours = ["#969696" if "bare" in n else "#de2d26" if "pyclowder" in n else "#3182bd" for n in names]
    fig, ax = _figure("Agent throughput: trivial extractor, files/s (log scale)")
    bars = ax.bar(names, rates, color=colours)
    _label_bars(ax, bars)
    ax.set_yscale("log")
    ax.set_ylabel("files / s")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, png)


def plot_mpi_scaling(md: str, png: str) -> str:
    """Effective parallel ranks (files/s x seconds of work per file) against the ideal."""
    rows = read_table(md, "case")
    fig, ax = _figure("MPI file-per-rank scaling against ideal")
    series = {"sleep": ([], []), "CPU-bound": ([], [])}
    for r in rows:
        m = re.match(r"(sleep|CPU) ([\d.]+) s, (\d+) ranks?$", r["case"])
        if not m:
            continue
        kind = "sleep" if m.group(1) == "sleep" else "CPU-bound"
        ranks, work = int(r["ranks"]), float(m.group(2))
        series[kind][0].append(ranks)
        series[kind][1].append(number(r["files/s"]) * work)
    top = max(max(x) for x, _ in series.values() if x)
    ax.plot([1, top], [1, top], linestyle="--", color="#777777", label="ideal (speedup = ranks)")
    for (kind, (x, y)), marker, colour, dy in zip(series.items(), ("o", "s"), ("#3182bd", "#e6550d"), (-12, 6)):
        if x:
            x, y = zip(*sorted(zip(x, y)))  # cases of several work sizes: one line by ranks
            ax.plot(x, y, marker=marker, color=colour, linestyle="-", label=kind)
            for xi, yi in zip(x, y):  # parallel efficiency next to each point
                ax.annotate(f"{yi / xi:.0%}", (xi, yi), xytext=(4, dy), textcoords="offset points", fontsize=8,
                            color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("MPI ranks")
    ax.set_ylabel("speedup (files/s x s of work per file)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, png)


def plot_relay_throughput(md: str, png: str) -> str:
    """Direct AMQP against the relay, files/s per case (layout, agents), ratio on top."""
    rows = read_table(md, "layout")
    names = [f"{r['layout']}\n{r['agents']}" for r in rows]
    direct = [number(r["direct AMQP files/s"]) for r in rows]
    relay = [number(r["through the relay files/s"]) for r in rows]
    ratio = next(k for k in rows[0] if k.startswith("ratio"))  # "ratio" or "ratio (runs' range)"
    unstaged_col = "relay, no stage-ahead files/s"
    unstaged = [number(r[unstaged_col]) for r in rows] if unstaged_col in rows[0] else None
    fig, ax = _figure("Relay vs direct AMQP: files/s", width=10.0)
    xs = range(len(names))
    width = 0.27 if unstaged else 0.4
    b1 = ax.bar([x - width for x in xs] if unstaged else [x - 0.2 for x in xs], direct, width=width,
                color="#969696", label="direct AMQP")
    if unstaged:
        b3 = ax.bar([x + width for x in xs], unstaged, width=width, color="#9ecae1",
                    label="through the relay, no stage-ahead")
        _label_bars(ax, b3)
    b2 = ax.bar([x for x in xs] if unstaged else [x + 0.2 for x in xs], relay, width=width, color="#3182bd",
                label="through the relay")
    _label_bars(ax, b1)
    for bar, r in zip(b2, rows):
        ax.annotate(f"{bar.get_height():g}\n({number(r[ratio]):.2f}x)", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("files / s")
    ax.set_ylim(0, 1.3 * max(direct + relay + (unstaged or [])))  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    return _save(fig, png)


def plot_dispatch_vs_array(md: str, png: str) -> str:
    """Makespan of the resident array against one batch job per file."""
    rows = read_table(md, "mode")
    names = [re.sub(r"\s*\(.*\)", "", r["mode"]) for r in rows]
    spans = [number(r["makespan (s)"]) for r in rows]
    fig, ax = _figure(f"Dispatch vs resident array: makespan for {int(number(rows[0]['files']))} files (log scale)")
    bars = ax.bar(names, spans, color=["#3182bd", "#de2d26"][:len(rows)])
    _label_bars(ax, bars, "{:g} s")
    ax.set_yscale("log")
    ax.set_ylabel("makespan (s)")
    return _save(fig, png)


def plot_noop_overhead(md: str, png: str) -> str:
    """No-op extractor: files/s per case, with the agent's CPU ms per file on each bar."""
    rows = read_table(md, "case")
    names = [re.sub(r"\s*\(.*\)", "", r["case"]).replace("agent ", "").replace("agent, ", "") for r in rows]
    rates = [number(r["files/s"]) for r in rows]
    fig, ax = _figure("No-op extractor: files/s (agent CPU ms per file on the bars)", width=9.0)
    bars = ax.bar(names, rates, color=["#969696"] + ["#3182bd"] * (len(rows) - 1))
    for bar, r in zip(bars, rows):
        cpu = r["agent CPU ms/file"]
        label = f"{bar.get_height():g}" + (f"\n{cpu} ms" if cpu not in ("-", "") else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("files / s")
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, png)


#: results markdown (relative to benchmarks/) -> its plot function
PLOTS: Dict[str, Callable[[str, str], str]] = {
    os.path.join("results", "agent_throughput.md"): plot_agent_throughput,
    os.path.join("results", "mpi_scaling.md"): plot_mpi_scaling,
    os.path.join("results", "relay_throughput.md"): plot_relay_throughput,
    os.path.join("results", "noop_overhead.md"): plot_noop_overhead,
    "launcher_dispatch_vs_array.results.md": plot_dispatch_vs_array,
}


def plot_results(md_path: str) -> str:
    """Draw the PNG for one results file next to it; returns the PNG's path."""
    rel = os.path.relpath(os.path.abspath(md_path), HERE)
    func = PLOTS.get(rel)
    if func is None:
        func = {os.path.basename(k): v for k, v in PLOTS.items()}[os.path.basename(md_path)]
    return func(md_path, os.path.splitext(md_path)[0] + ".png")


def main() -> int:
    for rel in PLOTS:
        print(plot_results(os.path.join(HERE, rel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
