#!/usr/bin/env python
"""The scale model's command line: simulate, sweep 1-1,000 nodes x 1-128 ranks, validate, calibrate.

  python benchmarks/scale_model.py run --nodes 100 --ranks 32 --files 50000 --work lognormal:median=60,sigma=1
  python benchmarks/scale_model.py sweep            # writes benchmarks/results/scale_model.md + scale_model.png
  python benchmarks/scale_model.py validate         # real runs here vs predictions: scale_model_validation.md
  python benchmarks/scale_model.py calibrate        # re-measures the machine-dependent constants

Distributions: fixed:S, uniform:A,B, exp:mean=M, lognormal:median=M,sigma=S (seconds).
`--set NAME=VALUE` replaces a calibration constant (benchmarks/scale_sim/calibration.py).
Bad input: one error line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_sim import report  # noqa: E402
from scale_sim.calibration import DEFAULT, Costs  # noqa: E402
from scale_sim.model import COMPONENTS, Config, SimulationStuck, simulate  # noqa: E402
from scale_sim.workload import DistError, parse_dist  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class UsageError(Exception):
    """Bad input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UsageError(message)


def _dist(text: str):
    try:
        return parse_dist(text)
    except DistError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()] or [_positive_int(text)]


def _costs(pairs: list[str]) -> Costs:
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set wants NAME=VALUE, got {pair!r}")
        try:
            changes[name] = float(value)
        except ValueError:
            raise UsageError(f"--set {name}: not a number: {value!r}") from None
        if not changes[name] > 0:
            raise UsageError(f"--set {name}: must be > 0")
    try:
        return DEFAULT.with_overrides(changes)
    except KeyError as exc:
        raise UsageError(f"--set: no calibration constant named {exc.args[0]!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scale_model.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def workload(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--work", type=_dist, default=parse_dist("lognormal:median=60,sigma=0.8"),
                        help="extractor time per file (default lognormal:median=60,sigma=0.8)")
        sp.add_argument("--queue-wait", type=_dist, default=parse_dist("lognormal:median=300,sigma=1"),
                        help="scheduler queue wait per task or job (default lognormal:median=300,sigma=1)")
        sp.add_argument("--walltime", type=_seconds, default=3600.0, help="per task, seconds (0 = none)")
        sp.add_argument("--seed", type=int, default=1)
        sp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="replace a calibration constant")

    run = sub.add_parser("run", help="simulate one configuration")
    run.add_argument("--nodes", type=_positive_int, default=1)
    run.add_argument("--ranks", type=_positive_int, default=1)
    run.add_argument("--files", type=_positive_int, default=1000)
    workload(run)
    run.add_argument("--work-cpu", action="store_true", help="the work burns CPU (with --host-cores)")
    run.add_argument("--mode", choices=("array", "dispatch"), default="array")
    run.add_argument("--source", choices=("amqp", "relay"), default="amqp")
    run.add_argument("--idle-exit", type=_seconds, default=60.0)
    run.add_argument("--slots", type=int, default=0, help="tasks/jobs running at once (0 = all)")
    run.add_argument("--host-cores", type=int, default=0, help="everything shares this many cores (this machine)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")

    sw = sub.add_parser("sweep", help="1-1,000 nodes x 1-128 ranks; writes the results page and plot")
    sw.add_argument("--nodes", type=_int_list, default=list(report.NODES), help="comma-separated")
    sw.add_argument("--ranks", type=_int_list, default=list(report.RANKS), help="comma-separated")
    sw.add_argument("--files-per-rank", type=_positive_int, default=3)
    workload(sw)
    sw.add_argument("--out", default=os.path.join(RESULTS, "scale_model.md"))
    sw.add_argument("--plot", default=os.path.join(RESULTS, "scale_model.png"))

    va = sub.add_parser("validate", help="real runs on this machine vs the model's predictions")
    va.add_argument("--runs", type=_positive_int, default=3, help="runs per case (median)")
    va.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    va.add_argument("--out", default=os.path.join(RESULTS, "scale_model_validation.md"))
    va.add_argument("--resume", action="store_true",
                    help="keep the runs already recorded in the .json beside --out; make only the missing ones")

    sub.add_parser("calibrate", help="re-measure the broker, the Clowder stand-in and the local Slurm")
    return p


def _summary(res) -> dict:
    return {"files_done": len(res.done), "handbacks": res.handbacks, "makespan_s": round(res.makespan, 3),
            "files_per_s": round(res.files_per_s, 3), "steady_files_per_s": round(res.steady_files_per_s, 3),
            "allocation_utilization": round(res.utilization, 4), "tasks_run": res.tasks_run,
            "broker_connections": res.peak_connections, "broker_msgs_per_s": round(res.broker_ops_per_s, 1),
            "clowder_requests_per_s": round(res.clowder_requests_per_s, 1), "relay_load": round(res.relay_load, 4),
            "loads": {k: round(res.load(k), 4) for k in COMPONENTS}, "saturated": res.bottleneck}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        costs = _costs(getattr(args, "set", []))
        if args.command == "run":
            cfg = Config(nodes=args.nodes, ranks=args.ranks, files=args.files, work=args.work,
                         work_cpu=args.work_cpu, queue_wait=args.queue_wait, walltime=args.walltime,
                         mode=args.mode, source=args.source, idle_exit=args.idle_exit, slots=args.slots,
                         host_cores=args.host_cores, seed=args.seed, costs=costs)
            try:
                cfg.check()
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            out = _summary(simulate(cfg))
            print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        elif args.command == "sweep":
            load = report.Workload(args.work, args.queue_wait, args.walltime, args.files_per_rank, args.seed)
            log = lambda line: print(line, file=sys.stderr)  # noqa: E731
            results = report.sweep(load, costs, log, args.nodes, args.ranks)
            text = report.sweep_markdown(results, load, costs, "python benchmarks/scale_model.py " + " ".join(argv))
            with open(args.out, "w") as fh:
                fh.write(text)
            report.plot_sweep(results, costs, args.plot)
            print(text)
        elif args.command == "validate":
            log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
            raw = os.path.splitext(args.out)[0] + ".json"  # every real run, written as it ends
            rows, notes = report.validate(costs, args.runs, log, raw, resume=args.resume)
            text = report.validation_markdown(rows, notes, costs,
                                              "python benchmarks/scale_model.py " + " ".join(argv))
            with open(args.out, "w") as fh:
                fh.write(text)
            print(text)
        else:
            from scale_sim import measure
            values = measure.calibrate(DEFAULT.agent_start_s, log=lambda line: print(line, file=sys.stderr))
            for name, value in values.items():
                print(f"{name} = {value:g}    (calibration.py now: {getattr(DEFAULT, name):g})")
    except UsageError as exc:
        print(f"scale_model.py: error: {exc}", file=sys.stderr)
        return 2
    except SimulationStuck as exc:
        print(f"scale_model.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
