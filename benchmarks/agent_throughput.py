#!/usr/bin/env python
"""Throughput of one agent vs pyclowder's own RabbitMQ connector vs a bare loop, same run.

All three consume v1 messages from the same broker and download from / post metadata to the
same Clowder stand-in (its own process: the lean devtools.bench_clowder, whose own capacity with
no broker is measured and printed in the same run), with the unchanged wordcount extractor for
pyclowder and the agent. Rates are steady state: files per second from the first result to the
last; agent CPU is the user+system CPU of the agent process alone over the same span, per file
(its extractor children apart). Each case runs --runs times; the table gives medians.
Writes benchmarks/results/agent_throughput.md (and prints it).

  python benchmarks/agent_throughput.py [--files 1000] [--pyclowder-files 20] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (drop_queue, agent_env, AMQP_URL, REPO, CpuSampler, StandinProcess, fresh_queue, machine, mpi_leader,  # noqa: E402
                     publish, rate, stop_group, v1_message, wait_count, write_results)

WORDCOUNT = os.path.join(REPO, "examples", "wordcount")


def run_case(name: str, standin: StandinProcess, ch, n: int, start_cmd, timeout: float, mpi: bool = False) -> dict:
    standin.clear()
    queue = fresh_queue(ch, "bench-" + name)
    files = standin.add_files(n, b"lorem ipsum dolor sit amet\n" * 37)
    publish(ch, queue, [v1_message(f, standin.url) for f in files], reply_to="bench-replies")
    started = time.time()
    proc = start_cmd(queue)
    try:
        sampler = CpuSampler(mpi_leader(proc.pid) if mpi else proc.pid)  # MPI: the leader, rank 0
        times = wait_count(standin, n, timeout)
        sampler.stop()
    finally:
        if mpi:
            stop_group(proc, grace=30)
        else:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    drop_queue(ch, queue)
    files = max(len(times) - 1, 1)
    return {"name": name, "files": n, "rate": rate(times), "first": times[0] - started,
            "wall": times[-1] - started,
            "cpu_ms": 1000 * sampler.cpu_between(times[0], times[-1]) / files,
            "child_ms": 1000 * sampler.cpu_between(times[0], times[-1], children=True) / files}


def median_case(runs: list[dict]) -> dict:
    """One row from several runs of a case: the median of every figure."""
    out = dict(runs[0])
    for key in ("rate", "first", "wall", "cpu_ms", "child_ms"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = len(runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--pyclowder-files", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (medians are reported)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "agent_throughput.md"))
    args = parser.parse_args()
    env = agent_env()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ch.queue_declare("bench-replies", durable=False, auto_delete=False)
    standin = StandinProcess(lean=True)
    quiet = subprocess.DEVNULL

    def bare(queue):
        return subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "bare_loop.py"), AMQP_URL, queue,
                                 str(args.files)], env=env)

    def pyclowder(queue):
        return subprocess.Popen([sys.executable, "wordcount.py"], cwd=WORDCOUNT, stdout=quiet, stderr=quiet,
                                env=dict(env, RABBITMQ_QUEUE=queue))

    def agent(slots):
        def start(queue):
            return subprocess.Popen([sys.executable, "-m", "agent", "run", "--plugin", "ncsa.wordcount.hpc",
                                     "--slots", str(slots)], cwd=REPO, env=dict(env, RABBITMQ_QUEUE=queue),
                                    stderr=quiet)
        return start

    def mpi(queue):
        return subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-m", "agent", "run", "--plugin",
                                 "ncsa.wordcount.hpc"], cwd=REPO, stderr=quiet, start_new_session=True,
                                env=dict(env, RABBITMQ_QUEUE=queue,
                                         PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")))

    cases = [("bare loop", args.files, bare), ("pyclowder RabbitMQConnector", args.pyclowder_files, pyclowder),
             ("agent, 1 slot", args.files, agent(1)), ("agent, 2 slots", args.files, agent(2)),
             ("agent under MPI, 2 ranks (leader CPU)", args.files, mpi)]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    capacities = []
    try:
        for _ in range(args.runs):
            capacities.append(standin.capacity())
            for name, n, start in cases:
                if name.startswith("pyclowder") and runs[name]:
                    continue  # one second per file whatever happens: one run says it
                runs[name].append(run_case(name, standin, ch, n, start, 600, mpi=start is mpi))
    finally:
        standin.close()
        ch.queue_delete("bench-replies")
        conn.close()
    results = [median_case(runs[name]) for name, _, _ in cases]
    bare_rate, py_rate = results[0]["rate"], results[1]["rate"]
    # the ratio of each run to the bare loop of the same run, then their median: the load of a
    # shared machine changes between runs, much less within one
    bare_runs = [r["rate"] for r in runs[cases[0][0]]]
    for r in results:
        ratios = sorted(x["rate"] / b for x, b in zip(runs[r["name"]], bare_runs))
        r["ratio"], r["ratios"] = statistics.median(ratios), ratios
    capacity = statistics.median(capacities)
    lines = [f"# Agent throughput ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}", "",
             "Trivial extractor (unchanged wordcount, 1 KB text files), v1 messages, one broker and one Clowder "
             "stand-in process (devtools.bench_clowder) for all cases. Steady state = files/s from the first "
             "result to the last; each ratio is taken within one run (same load), the table gives their median. "
             "Agent CPU = user+system CPU of the agent process alone over that span, per file "
             "(MPI: the leader, rank 0, which also runs one extractor process); extractor CPU = the agent's (the "
             f"leader's) extractor process(es). Medians of {args.runs} runs "
             "(pyclowder's connector: one run).", "",
             f"Reference: the stand-in alone (no broker; GET blob + POST metadata over 4 kept-alive connections, "
             f"benchmarks/standin_load.py) served **{capacity:.0f} files/s = {capacity / bare_rate:.1f}x the bare "
             f"loop** (median of {len(capacities)}: {', '.join(f'{c:.0f}' for c in capacities)}).", "",
             "| case | files | files/s | vs bare loop (median of runs; range) | vs pyclowder | agent CPU ms/file "
             "| extractor CPU ms/file | first result after start (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        agentish = r["name"].startswith("agent")
        cpu = f"{r['cpu_ms']:.2f}" if agentish else "-"
        child = f"{r['child_ms']:.2f}" if agentish else "-"
        spread = f" ({r['ratios'][0]:.2f}-{r['ratios'][-1]:.2f})" if len(r["ratios"]) > 1 else ""
        lines.append(f"| {r['name']} | {r['files']} | {r['rate']:.1f} | {r['ratio']:.2f}x{spread} | "
                     f"{r['rate'] / py_rate:.0f}x | {cpu} | {child} | {r['first']:.2f} |")
    lines += ["", "Command: `python benchmarks/agent_throughput.py`"]
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
