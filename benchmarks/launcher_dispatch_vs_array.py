#!/usr/bin/env python
"""Makespan of N small files through `launcher dispatch` (one Slurm job per file) vs a resident
array submitted with `launcher submit`, same machine, same run, same per-file worker.

  python benchmarks/launcher_dispatch_vs_array.py [--files 200] [--tasks 2] [--work 0.05]

Needs the local Slurm and RabbitMQ (scripts/services.sh). Writes
benchmarks/launcher_dispatch_vs_array.results.md and prints it.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import drop_queue  # noqa: E402
from plots import plot_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMQP = os.environ.get("RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
WORKER = os.path.join(REPO, "benchmarks", "launcher_worker.py")


def launcher(env, *args, timeout=3600):
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=timeout)


def wait_done(queue, n, timeout):
    """Collect n done records (durable: they survive a broker restart); returns their times."""
    times, deadline, seen = [], time.time() + timeout, set()
    conn = None
    while len(seen) < n and time.time() < deadline:
        try:
            if conn is None or not conn.is_open:
                conn = pika.BlockingConnection(pika.URLParameters(AMQP))
                ch = conn.channel()
            method, _, body = ch.basic_get(queue, auto_ack=True)
        except pika.exceptions.AMQPError:
            conn = None
            time.sleep(1)
            continue
        if method is None:
            time.sleep(0.2)
            continue
        rec = json.loads(body)
        if rec["id"] not in seen:  # a file redone after a broker restart counts once
            seen.add(rec["id"])
            times.append(rec["t"])
    if conn is not None and conn.is_open:
        conn.close()
    return times


def run(mode, n, tasks, work, tmp):
    conn = pika.BlockingConnection(pika.URLParameters(AMQP))
    ch = conn.channel()
    queue, done_q = f"bench-launcher-{mode}-{uuid.uuid4().hex[:6]}", None
    done_q = queue + ".done"
    for q in (queue, done_q):
        ch.queue_declare(q, durable=True)
    for i in range(n):
        ch.basic_publish("", queue, json.dumps({"id": f"file-{i}"}).encode(),
                         pika.BasicProperties(delivery_mode=2))
    state = os.path.join(tmp, mode)
    caps = os.path.join(tmp, f"caps-{mode}.yaml")
    with open(caps, "w") as fh:
        fh.write(f'max_array_size: {max(tasks, 1)}\nmax_running: {tasks}\nmax_queued: {tasks * 4}\n'
                 'max_walltime: "00:30:00"\ncores_per_task: 1\n')
    os.chmod(caps, 0o644)
    script = os.path.join(tmp, f"{mode}.sh")
    with open(script, "w") as fh:
        fh.write("#!/bin/bash\n#SBATCH --output=/dev/null\n"
                 f"exec {sys.executable} {WORKER} {'one' if mode == 'dispatch' else 'resident'}\n")
    env = dict(os.environ, LAUNCHER_CAPS=caps, LAUNCHER_STATE_DIR=state, LAUNCHER_SCRIPT=script,
               LAUNCHER_SCHEDULER="slurm", RABBITMQ_URI=AMQP, RABBITMQ_QUEUE=queue,
               BENCH_DONE_QUEUE=done_q, WORK_SECONDS=str(work))
    t0 = time.time()
    try:
        if mode == "dispatch":
            proc = subprocess.Popen([sys.executable, "-m", "launcher", "dispatch", "--until-empty",
                                     "--interval", "0.5", "--max-jobs", str(tasks * 4)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        else:
            job = launcher(env, "submit", "--tasks", str(tasks)).stdout.strip()
        conn.close()
        times = wait_done(done_q, n, timeout=1800)
        if mode == "dispatch":
            err = proc.communicate(timeout=600)[1]
            if proc.returncode:
                raise RuntimeError(f"launcher dispatch failed: {err}")
    finally:
        if mode != "dispatch":
            subprocess.run(["scancel", job], capture_output=True)
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        drop_queue(conn.channel(), queue)
        conn.channel().queue_delete(done_q)
        conn.close()
    assert len(times) == n, f"{mode}: only {len(times)} of {n} files done"
    return max(times) - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=2, help="array size / concurrent jobs (CPUs)")
    ap.add_argument("--work", type=float, default=0.05, help="seconds of work per file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        array = run("array", args.files, args.tasks, args.work, tmp)
        dispatch = run("dispatch", args.files, args.tasks, args.work, tmp)
    slurm = subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip()
    text = (
        "# launcher: dispatch (one job per file) vs resident array\n\n"
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, {slurm},"
        f" single-node Slurm (scripts/services.sh).\n"
        f"Run: {time.strftime('%Y-%m-%d %H:%M:%S')}; `python benchmarks/launcher_dispatch_vs_array.py"
        f" --files {args.files} --tasks {args.tasks} --work {args.work}`.\n\n"
        f"Same worker code both ways ({args.work} s of work per file, then a done record to"
        " RabbitMQ); makespan is from the launcher command's start to the last file's done"
        " record.\n\n"
        "| mode | files | concurrency | makespan (s) | files/s |\n|---|---|---|---|---|\n"
        f"| resident array (`launcher submit --tasks {args.tasks}`) | {args.files} | {args.tasks}"
        f" tasks | {array:.1f} | {args.files / array:.2f} |\n"
        f"| dispatch (`launcher dispatch`, one job per file) | {args.files} | {args.tasks} CPUs,"
        f" {args.tasks * 4} jobs open | {dispatch:.1f} | {args.files / dispatch:.2f} |\n\n"
        f"Ratio dispatch / array makespan: **{dispatch / array:.1f}x**.\n")
    out = os.path.join(REPO, "benchmarks", "launcher_dispatch_vs_array.results.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    print(text)
    print(f"plot: {plot_results(out)}")


if __name__ == "__main__":
    main()
