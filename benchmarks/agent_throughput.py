#!/usr/bin/env python
"""Throughput of one agent vs pyclowder's own RabbitMQ connector vs a bare loop, same run.

All three consume v1 messages from the same broker and download from / post metadata to the
same Clowder stand-in (its own process), with the unchanged wordcount extractor for pyclowder
and the agent. Rates are steady state: files per second from the first result to the last.
Writes benchmarks/results/agent_throughput.md (and prints it).

  python benchmarks/agent_throughput.py [--files 2000] [--pyclowder-files 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (agent_env, AMQP_URL, REPO, StandinProcess, fresh_queue, machine, publish, rate, v1_message,  # noqa: E402
                     wait_count)
from plots import plot_results  # noqa: E402

WORDCOUNT = os.path.join(REPO, "examples", "wordcount")


def run_case(name: str, standin: StandinProcess, ch, n: int, start_cmd, timeout: float) -> dict:
    standin.clear()
    queue = fresh_queue(ch, "bench-" + name)
    files = standin.add_files(n, b"lorem ipsum dolor sit amet\n" * 37)
    publish(ch, queue, [v1_message(f, standin.url) for f in files], reply_to="bench-replies")
    started = time.time()
    proc = start_cmd(queue)
    try:
        times = wait_count(standin, n, timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ch.queue_delete(queue)
    ch.queue_delete("error." + queue)
    return {"name": name, "files": n, "rate": rate(times), "first": times[0] - started,
            "wall": times[-1] - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--pyclowder-files", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "agent_throughput.md"))
    args = parser.parse_args()
    env = agent_env()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ch.queue_declare("bench-replies", durable=False, auto_delete=False)
    standin = StandinProcess()
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

    try:
        results = [run_case("bare loop", standin, ch, args.files, bare, 600),
                   run_case("pyclowder RabbitMQConnector", standin, ch, args.pyclowder_files, pyclowder, 600),
                   run_case("agent, 1 slot", standin, ch, args.files, agent(1), 600),
                   run_case("agent, 2 slots", standin, ch, args.files, agent(2), 600)]
    finally:
        standin.close()
        ch.queue_delete("bench-replies")
        conn.close()
    bare_rate, py_rate = results[0]["rate"], results[1]["rate"]
    lines = [f"# Agent throughput ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}", "",
             "Trivial extractor (unchanged wordcount, 1 KB text files), v1 messages, one broker and one Clowder "
             "stand-in process for all cases. Steady state = files/s from the first result to the last.", "",
             "| case | files | files/s | vs bare loop | vs pyclowder | first result after start (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['files']} | {r['rate']:.1f} | {r['rate'] / bare_rate:.2f}x | "
                     f"{r['rate'] / py_rate:.0f}x | {r['first']:.2f} |")
    lines += ["", "Command: `python benchmarks/agent_throughput.py`"]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"plot: {plot_results(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
