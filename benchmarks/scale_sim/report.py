"""Sweeps, the validation table, the limits table and the plots the scale model writes."""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .calibration import SOURCES, Costs
from .model import COMPONENTS, Config, Result, simulate
from .workload import Dist, fixed

NODES = (1, 10, 100, 1000)
RANKS = (1, 8, 32, 128)


@dataclass(frozen=True)
class Workload:
    """The projection's stated inputs (the same for array and dispatch)."""

    work: Dist
    queue_wait: Dist
    walltime: float
    files_per_rank: int
    seed: int

    def describe(self) -> str:
        return (f"file durations {self.work}, queue waits {self.queue_wait}, walltime {self.walltime:g} s per task, "
                f"{self.files_per_rank} files per rank waiting at t=0, seed {self.seed}")


def project(nodes: int, ranks: int, load: Workload, costs: Costs, mode: str = "array",
            source: str = "amqp") -> Result:
    """One cluster configuration of the sweep."""
    return simulate(Config(nodes=nodes, ranks=ranks, files=nodes * ranks * load.files_per_rank, work=load.work,
                           queue_wait=load.queue_wait, walltime=load.walltime, mode=mode, source=source,
                           seed=load.seed, costs=costs))


def capacities(costs: Costs) -> dict[str, float]:
    """Files/s at which each shared component is fully busy (the leader: per node)."""
    return {"leader (per node)": 1.0 / costs.leader_cpu_s,
            "broker": costs.broker_ops_per_s / costs.broker_ops_per_file,
            "clowder": costs.clowder_workers / (costs.clowder_requests_per_file * costs.clowder_service_s),
            "relay": costs.relay_files_per_s}


def num(value: float) -> str:
    """Three significant figures without exponents: 0.0123, 1.23, 12.3, 1,234."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{max(1, 2 - int(math.floor(math.log10(value))))}f}" if value > 0 else "0"


def _row(r: Result) -> str:
    c = r.config
    relay = f"{r.relay_load:.2f}" if c.source == "relay" else "–"
    return (f"| {c.nodes} | {c.ranks} | {c.mode} | {c.source} | {len(r.done):,} | {r.makespan:,.0f} | "
            f"{num(r.files_per_s)} | {num(r.steady_files_per_s)} | {r.utilization:.2f} | {r.peak_connections:,} | "
            f"{num(r.broker_ops_per_s)} | {num(r.clowder_requests_per_s)} | {relay} | {r.bottleneck} | "
            + " ".join(f"{k[0]}{r.load(k):.2f}" for k in COMPONENTS) + " |")


HEADER = ("| nodes | ranks | mode | source | files | makespan (s) | files/s | steady files/s | allocation "
          "utilization | broker connections (peak) | broker msgs/s | Clowder req/s | relay load | saturated | "
          "loads (l b c r) |\n|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")


def sweep(load: Workload, costs: Costs, log: Callable[[str], None], nodes: Iterable[int] = NODES,
          ranks: Iterable[int] = RANKS) -> list[Result]:
    """Array over AMQP for every (nodes, ranks); relay and dispatch for the same grid's corners."""
    out = []
    for n in nodes:
        for r in ranks:
            t = time.time()
            res = project(n, r, load, costs)
            out.append(res)
            log(f"array {n} x {r}: {num(res.files_per_s)} files/s, {res.bottleneck} ({time.time() - t:.1f} s)")
    for n in nodes:
        for mode, source in (("array", "relay"), ("dispatch", "amqp")):
            res = project(n, max(ranks), load, costs, mode=mode, source=source)
            out.append(res)
            log(f"{mode}/{source} {n} x {max(ranks)}: {num(res.files_per_s)} files/s")
    return out


def limits_table(costs: Costs, mean_work: float) -> list[str]:
    cap = capacities(costs)
    lines = ["| component | ceiling (files/s) | saturates at (busy ranks, for the stated mean file time) |",
             "|---|---:|---:|"]
    for name, files_s in cap.items():
        ranks = files_s * mean_work
        note = " per node" if name.startswith("leader") else ""
        lines.append(f"| {name} | {files_s:,.0f} | {ranks:,.0f}{note} |")
    return lines


def sources_lines(costs: Costs) -> list[str]:
    lines = ["| constant | value | where it came from |", "|---|---:|---|"]
    for name, source in SOURCES.items():
        lines.append(f"| {name} | {getattr(costs, name):g} | {source} |")
    return lines


def sweep_markdown(results: list[Result], load: Workload, costs: Costs, command: str) -> str:
    lines = [f"# Scale model: 1 to 1,000 nodes x 1 to 128 ranks ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             "A discrete-event simulation (SimPy, `benchmarks/scale_sim/`), not a measurement: one RabbitMQ and one "
             "Clowder serve every node; each node is one array task with one MPI leader. Its validation against "
             "real runs on this machine is in [scale_model_validation.md](scale_model_validation.md).", "",
             f"Workload (stated): {load.describe()}.", "",
             "Loads: steady files/s (10th to 90th percentile of completions) x the component's service time per "
             "file; l = busiest MPI leader, b = broker, c = Clowder, r = relay. A component at >= 0.85 is "
             "'saturated'; 'none' means the files' own work (or the queue waits) set the pace. Allocation "
             "utilization = extractor time of completed files / rank-time allocated (start-up, idle exit and "
             "hand-backs at walltime are the rest).", "", HEADER]
    lines += [_row(r) for r in results]
    lines += ["", "## Ceilings", "", *limits_table(costs, load.work.mean), "",
              "## Calibration", "", *sources_lines(costs), "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[Result], costs: Costs, path: str) -> None:
    """files/s against nodes, one line per ranks, with the shared ceilings; and array vs dispatch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    arrays = [r for r in results if r.config.mode == "array" and r.config.source == "amqp"]
    for ranks in sorted({r.config.ranks for r in arrays}):
        pts = sorted((r.config.nodes, r.steady_files_per_s) for r in arrays if r.config.ranks == ranks)
        ax.plot(*zip(*pts), marker="o", label=f"{ranks} ranks/node")
    relay = sorted((r.config.nodes, r.steady_files_per_s) for r in results if r.config.source == "relay")
    if relay:
        ax.plot(*zip(*relay), marker="s", linestyle="--", label="relay, max ranks")
    for name, value in capacities(costs).items():
        if not name.startswith("leader"):
            ax.axhline(value, color="grey", linewidth=0.8, linestyle=":")
            ax.text(1, value * 1.05, f"{name} ceiling", fontsize=8, color="grey")
    ax.set(xscale="log", yscale="log", xlabel="nodes (array tasks)", ylabel="files/s (steady: 10th-90th percentile)",
           title="Throughput, one RabbitMQ + one Clowder")
    ax.legend(fontsize=8)
    top = max(r.config.ranks for r in results)
    for mode in ("array", "dispatch"):
        pts = sorted((r.config.nodes, r.makespan) for r in results
                     if r.config.mode == mode and r.config.source == "amqp" and r.config.ranks == top)
        bx.plot(*zip(*pts), marker="o", label=f"{mode} ({top} ranks or job slots per node)")
    bx.set(xscale="log", yscale="log", xlabel="nodes", ylabel="makespan (s)",
           title="Resident array vs one job per file, same queue waits")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- validation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One real run on this machine and the model configuration that predicts it."""

    kind: str          # "mpi" or "array"
    size: int          # ranks, or array tasks
    files: int
    sleep: float

    @property
    def name(self) -> str:
        unit = "ranks" if self.kind == "mpi" else "array tasks"
        return f"{self.kind}: {self.size} {unit}, {self.files} files of {self.sleep:g} s"


MPI_CASES = (Case("mpi", 1, 16, 0.5), Case("mpi", 4, 64, 0.5), Case("mpi", 8, 128, 0.5),
             Case("mpi", 16, 256, 0.5), Case("mpi", 64, 384, 2.0))
ARRAY_CASES = tuple(Case("array", k, 48, 1.5) for k in (1, 2, 4, 8))
IDLE_EXIT = 5.0


def predict(case: Case, costs: Costs, host_cores: int, slurm_slots: int, cpu_share: float = 1.0,
            waits: tuple[float, ...] = ()) -> float:
    """The model's makespan for a validation case, with this machine's cores and Slurm slots (and, for
    an array, the queue wait each task had: an input, like the queue wait distribution at scale)."""
    if case.kind == "mpi":
        cfg = Config(nodes=1, ranks=case.size, files=case.files, work=fixed(case.sleep), include_startup=False,
                     host_cores=host_cores, cpu_share=cpu_share, costs=costs)
    else:
        cfg = Config(nodes=case.size, ranks=1, files=case.files, work=fixed(case.sleep), slots=slurm_slots,
                     host_cores=host_cores, cpu_share=cpu_share, idle_exit=IDLE_EXIT, task_waits=waits,
                     costs=costs)
    return simulate(cfg).makespan


def share(cores: int, foreign: float) -> float:
    """Our share of the cores while other work kept `foreign` cores busy: cores / (cores + foreign)."""
    return cores / (cores + max(0.0, foreign))


@dataclass
class Row:
    """A validation case: its real runs (makespan, other load) and the model's predictions."""

    case: Case
    runs: list[tuple[float, float]]   # (makespan, other load)
    predicted: list[float]     # one per run, with that run's measured other load
    predicted_idle: float      # the same case on an idle machine

    @property
    def measured(self) -> float:
        return statistics.median(m for m, _ in self.runs)

    @property
    def prediction(self) -> float:
        return statistics.median(self.predicted)

    @property
    def error(self) -> float:
        return (self.prediction - self.measured) / self.measured


def validation_markdown(rows: list[Row], notes: list[str], costs: Costs, command: str) -> str:
    lines = [f"# Scale model validation ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             "Each case was run for real on this machine, several times (median shown), and predicted by the "
             "model with this machine's cores shared by the broker, the Clowder stand-in and every rank, and "
             "the local Slurm's slots. Sleep-bound extractor (examples/sleepy) because the machine is shared. "
             "Other load = cores other users' processes kept busy during the run (mpi_scaling's CpuMeter); the "
             "model is given our share of the cores, cores / (cores + other load), for that run, and the "
             "idle-machine prediction is shown beside it.", "",
             "- mpi: `mpiexec -n R python -m agent run` through benchmarks/mpi_scaling.py's own runner: ranks "
             "ready first, timed from the first publish to the last metadata upload.",
             "- array: `sbatch --array=1-K pbs/agent_array.slurm` (one CPU per task) over files already "
             f"waiting, AGENT_IDLE_EXIT={IDLE_EXIT:g}; timed from sbatch to the last metadata upload (scheduler "
             "start, job script, agent start-up included).", "",
             "| case | measured makespan (s), median | runs (s) | other load (cores) | predicted (s) | error | "
             "within 15% | predicted, idle machine and no queue wait (s) |",
             "|---|---:|---|---|---:|---:|---|---:|"]
    worst = 0.0
    per_run = max(abs(p - m) / m for row in rows for p, (m, _) in zip(row.predicted, row.runs))
    for row in rows:
        worst = max(worst, abs(row.error))
        lines.append(f"| {row.case.name} | {row.measured:.2f} | {', '.join(f'{m:.2f}' for m, _ in row.runs)} | "
                     f"{', '.join(f'{f:.2f}' for _, f in row.runs)} | {row.prediction:.2f} | {row.error:+.1%} | "
                     f"{'yes' if abs(row.error) <= 0.15 else 'NO'} | {row.predicted_idle:.2f} |")
    lines += ["", f"Largest error: {worst:.1%} (bound 15%), medians of the runs against the median of the "
              f"per-run predictions; largest error of a single run against its own prediction: {per_run:.1%}.", "", *[f"- {n}" for n in notes], "",
              "## Calibration used", "", *sources_lines(costs), "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def _run_case(measure, case: Case, log: Callable[[str], None], attempts: int = 5) -> dict:
    """One real run; a run broken by the shared services (a broker restart by someone else) is redone."""
    for attempt in range(1, attempts + 1):
        try:
            if case.kind == "mpi":
                got = measure.mpi_case(case.size, case.files, case.sleep)
            else:
                got = measure.array_case(case.size, case.files, case.sleep, IDLE_EXIT)
            log(f"{case.name}: {got['makespan']:.2f} s, other load {got['foreign']:.2f} cores")
            return got
        except Exception as exc:  # noqa: BLE001 - any failure of the shared machine; retried, then raised
            if attempt == attempts:
                raise
            log(f"{case.name}: attempt {attempt} failed ({type(exc).__name__}: {exc}); again in 20 s")
            time.sleep(20)
    raise AssertionError("unreachable")


def validate(costs: Costs, runs: int, log: Callable[[str], None], raw_path: str, resume: bool = False,
             cases: Optional[tuple[Case, ...]] = None) -> tuple[list[Row], list[str]]:
    """Run every case `runs` times (rounds interleaved, so slow moments of the machine spread out).

    Every real run is appended to `raw_path` (JSON) as soon as it ends; with `resume`, the runs
    already there are kept and only the missing ones are made.
    """
    from . import measure

    cases = cases or MPI_CASES + ARRAY_CASES
    slots, cores = measure.slurm_cpus(), os.cpu_count() or 1
    raw: dict = {"notes": [], "runs": {}}
    if resume and os.path.exists(raw_path):
        with open(raw_path) as fh:
            raw = json.load(fh)
    missing = any(len(raw["runs"].get(c.name, [])) < runs for c in cases)
    if missing:
        raw["notes"].append(f"Start of a session: {measure.machine_state()}; local Slurm offers {slots} CPUs "
                            "(array tasks at once).")
    for round_no in range(runs):
        for case in cases:
            done = raw["runs"].setdefault(case.name, [])
            if len(done) > round_no:
                continue
            done.append(_run_case(measure, case, log))
            with open(raw_path, "w") as fh:
                json.dump(raw, fh, indent=1)
    if missing:
        raw["notes"].append(f"End of a session: {measure.machine_state()}.")
        with open(raw_path, "w") as fh:
            json.dump(raw, fh, indent=1)
    measured = {c: raw["runs"][c.name][:runs] for c in cases}
    per_file = [g["requests_per_file"] for c in cases for g in measured[c] if "requests_per_file" in g]
    notes = list(raw["notes"])
    if per_file:
        notes.append(f"Clowder API requests per file counted on the stand-in: {statistics.median(per_file):g} "
                     f"(model: {costs.clowder_requests_per_file}).")
    waits = [w for c in cases for got in measured[c] for w in got.get("waits", [])[:slots]]
    if waits:
        started = [w for w in waits if w == w]
        notes.append(f"Array tasks' queue wait (sbatch to the job script's first line), the first {slots} tasks "
                     f"of each run: median {statistics.median(started):.2f} s, max {max(started):.2f} s; "
                     f"{len(waits) - len(started)} of them had not started when the run ended (other users' jobs "
                     "held the local Slurm's CPUs). Given to the model per task, as the queue wait distribution "
                     "is at scale.")
    rows = [Row(c, [(g["makespan"], g["foreign"]) for g in measured[c]],
                [predict(c, costs, cores, slots, share(cores, g["foreign"]), _waits(g)) for g in measured[c]],
                predict(c, costs, cores, slots)) for c in cases]
    return rows, notes


def _waits(got: dict) -> tuple[float, ...]:
    """Each task's measured queue wait; a task that had not started when the last file was done
    (other users held the slots; NaN) starts after the run's end in the model too."""
    return tuple(got["makespan"] if w != w else max(0.0, w) for w in got.get("waits", []))
