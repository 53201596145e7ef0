#!/usr/bin/env python
"""Reliability report: run every chaos scenario and write the counts up.

    python benchmarks/reliability_report.py [--only NAME ...] [--out FILE] [--json FILE]

Runs the scenarios of tests/helpers/chaos_scenarios.py (the same code tests/chaos/test_chaos.py asserts on)
against the local RabbitMQ and a Clowder stand-in, and writes benchmarks/results/reliability.md:
per scenario, messages sent, processed, dead-lettered, lost (must be 0), duplicate runs and
duplicate metadata (at-least-once), time to recover, and the rules any scenario saw broken.
Needs root and the services of scripts/services.sh (tmpfs, rabbitmqctl). Exit 1 when a file
was lost or a scenario found a problem.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from helpers import chaos_scenarios as cs  # noqa: E402
from _common import machine  # noqa: E402

from helpers import services  # noqa: E402

# The restartable second node of scripts/services.sh (RABBITMQ_CHAOS_URI / RABBITMQ_CHAOS_NODE):
# scenarios that restart the broker never touch the one everything else uses.
AMQP_URL, cs.BROKER_NODE = services.chaos_rabbitmq()
DEFAULT_OUT = REPO / "benchmarks" / "results" / "reliability.md"


def _consumer_timeout() -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout)."],
                         capture_output=True, text=True).stdout
    digits = "".join(c for c in out if c.isdigit())
    return f"{int(digits) / 1000:g} s" if digits else "default (30 min)"


def run_all(names: list[str]) -> list[cs.Result]:
    results = []
    for fn in cs.ALL:
        if names and fn.__name__ not in names:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"chaos-{fn.__name__}-"))
        print(f"== {fn.scenario_name} ...", flush=True)
        t0 = time.monotonic()
        try:
            r = fn(AMQP_URL, tmp)
        except Exception as exc:  # noqa: BLE001 - the report records it and goes on
            r = cs.Result(scenario=fn.scenario_name, fault="(did not run to the end)")
            r.problems.append(f"scenario raised {exc.__class__.__name__}: {exc}")
            r.notes.append(traceback.format_exc(limit=3).strip().splitlines()[-1])
            r.seconds = round(time.monotonic() - t0, 1)
        finally:
            cs.ensure_broker_app()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"   sent {r.sent}, processed {r.processed}, dead-lettered {r.dead_lettered}, lost {r.lost}, "
              f"duplicate runs {r.duplicates}, duplicate metadata {r.duplicate_metadata}, recover "
              f"{r.recover_seconds}, {r.seconds}s, problems {len(r.problems)}", flush=True)
        results.append(r)
    return results


def _cell(value) -> str:
    return "–" if value is None else str(value)


def render(results: list[cs.Result], started: str, wall: float) -> str:
    lines = [
        f"# Agent reliability under faults ({started})",
        "",
        f"Machine: {machine()}; RabbitMQ consumer_timeout {_consumer_timeout()}.",
        "",
        "Each row is one automated scenario of `tests/helpers/chaos_scenarios.py` (the same code "
        "`tests/chaos/test_chaos.py` runs in CI, which fails on any lost file or broken rule): real "
        "`python -m agent run` processes, the real RabbitMQ, the Clowder stand-in, and the directive "
        "test extractor. Command: `python benchmarks/reliability_report.py` "
        f"(kill -9 seed {os.environ.get('CHAOS_SEED', '20')}, `CHAOS_SEED` to change). "
        f"Wall time of all scenarios: {wall:.0f} s.",
        "",
        "| scenario | sent | processed | dead-lettered | lost | duplicate runs | duplicate metadata "
        "| time to recover (s) | agents (exit codes) | wall (s) | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        exits = ", ".join(str(c) for c in r.agent_exits)
        if len(r.agent_exits) > 6:
            counts: dict = {}
            for c in r.agent_exits:
                counts[c] = counts.get(c, 0) + 1
            exits = ", ".join(f"{n}x {c}" for c, n in counts.items())
        lines.append(f"| {r.scenario} | {r.sent} | {r.processed} | {r.dead_lettered} | **{r.lost}** | "
                     f"{r.duplicates} | {r.duplicate_metadata} | {_cell(r.recover_seconds)} | {exits} | "
                     f"{r.seconds:g} | {len(r.problems)} |")
    lines += [
        "",
        "Definitions:",
        "",
        "- **processed**: files with metadata in Clowder; **dead-lettered**: files whose message is in "
        "`error.<queue>` with an `x-error-reason` header; **lost**: files with neither once the agents "
        "ended (a message still in the queue or in a journal counts as lost).",
        "- **duplicate runs**: extractions beyond what the file needed (for a processed file, runs - 1; "
        "for a dead-lettered one, runs - the attempts counted), from the extractor's own log. "
        "**duplicate metadata**: metadata records beyond one per file, i.e. what Clowder saw twice. "
        "Both are the price of at-least-once: work whose acknowledgement died with a connection or an "
        "agent is done again, never dropped.",
        "- **time to recover**: from the moment the fault was cleared (broker back, Clowder healthy, a "
        "replacement agent started) to the first file whose extraction started after it and whose "
        "metadata reached Clowder. – where no fault is cleared (faults per request, poison, secrets).",
        "- Every metadata record is checked against the file's length (the extractor reports the bytes "
        "it read): no truncated download reached an extractor in any scenario with 0 problems.",
        "- Exit codes: 0 ended on purpose, 4 broker unreachable (here: a wrong password, on purpose), "
        "6 scratch disk too small (work handed back), -9 killed by the scenario.",
        "",
        "## Scenarios",
        "",
    ]
    for r in results:
        lines.append(f"### {r.scenario}")
        lines.append("")
        lines.append(f"Fault: {r.fault}.")
        lines.append("")
        for note in r.notes:
            lines.append(f"- {note}")
        for problem in r.problems:
            lines.append(f"- **problem**: {problem}")
        if not r.problems:
            lines.append("- every file accounted for; agents exited exactly as expected")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], metavar="NAME",
                        help="scenario function names: " + ", ".join(fn.__name__ for fn in cs.ALL))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (default: %(default)s)")
    parser.add_argument("--json", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    results = run_all(args.only)
    wall = time.monotonic() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(results, started, wall) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({wall:.0f} s)")
    bad = [r.scenario for r in results if r.lost or r.problems]
    if bad:
        print("problems in: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
