#!/usr/bin/env python
"""No-op overhead: what the agent itself costs per file, the way HyperQueue and Parsl state theirs.

The extractor (benchmarks/plugins/noop) does nothing: check_message returns CheckMessage.bypass,
so pyclowder neither fetches the file info nor downloads the file, and process_message returns
at once. What is left is the agent's own work per file: the delivery, pyclowder's STARTED and
DONE statuses, the IPC with the extractor process, the ack. Cases, in one run:

- reference loop: one process that consumes (prefetch 20), publishes the two statuses to the
  message's reply_to and acks: the broker work any worker must do, with nothing else;
- the agent on direct AMQP with 1 and 2 slots, and with 1 slot on pika's public API only
  (AGENT_AMQP_INTERNALS=0): what the agent's private pika fast paths are worth;
- the agent through the relay (`python -m launcher relay` on loopback), 1 slot;
- the agent under MPI (`mpiexec -n 2`: the leader, rank 0, owns the broker connection).

Completion is what Clowder sees: DONE statuses arriving on the reply queue. Files/s is steady
state (first DONE to last); agent CPU is the user+system CPU of the agent process alone (the MPI
leader for MPI; the relay's own CPU apart) over the same span, per file. Medians of --runs runs.
Writes benchmarks/results/noop_overhead.md (and prints it).

  python benchmarks/noop_overhead.py [--files 1000] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (drop_queue, AMQP_URL, REPO, CpuSampler, agent_env, fresh_queue, machine, mpi_leader, publish,  # noqa: E402
                     rate, stop_group, write_results)
from bare_loop import consume  # noqa: E402
from relay_throughput import Relay  # noqa: E402

PLUGINS = os.path.join(REPO, "benchmarks", "plugins")
HOST = "http://127.0.0.1:9/"  # never called: the no-op extractor bypasses every Clowder request


def reference_loop(url: str, queue: str, count: int) -> None:
    """Consume, publish STARTED and DONE to reply_to, ack: the least a worker does per file."""
    def handle(ch, props, body: bytes) -> None:
        msg = json.loads(body)
        out = pika.BasicProperties(delivery_mode=2, correlation_id=props.correlation_id,
                                   content_type="application/json")
        for kind, text in (("start", "Started processing."), ("done", "Done processing.")):
            ch.basic_publish("", props.reply_to, json.dumps({
                "file_id": msg["id"], "extractor_id": "bench.noop", "job_id": msg.get("jobid"),
                "status": f"StatusMessage.{kind}: {text}", "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "message_type": f"StatusMessage.{kind}", "message": text}), out)

    consume(url, queue, count, handle)


class DoneWatcher:
    """Arrival times of DONE statuses on one reply queue (its own connection and thread)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        ch.queue_declare(self.queue, durable=False, auto_delete=False)
        ch.basic_qos(prefetch_count=500)

        def on_message(_ch, method, _props, body) -> None:
            if b"StatusMessage.done" in body:
                self.times.append(time.time())
            _ch.basic_ack(method.delivery_tag, multiple=False)

        ch.basic_consume(self.queue, on_message)
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.1)
        ch.queue_delete(self.queue)
        conn.close()

    def wait(self, n: int, timeout: float, proc: subprocess.Popen) -> list[float]:
        deadline = time.time() + timeout
        while len(self.times) < n:
            if proc.poll() is not None:
                # The reference loop exits after its last ack: its last statuses may still be on their way here.
                deadline = min(deadline, time.time() + 10.0)
            if time.time() > deadline:
                raise RuntimeError(f"{len(self.times)} of {n} files done (process exit code {proc.poll()})")
            time.sleep(0.1)
        return list(self.times)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_case(kind: str, ch, n: int, slots: int = 1, timeout: float = 600) -> dict:
    queue = fresh_queue(ch, "bench-noop")
    replies = f"bench-noop-replies-{uuid.uuid4().hex[:6]}"
    ch.queue_declare(replies, durable=False, auto_delete=False)
    watcher = DoneWatcher(replies)
    bodies = [json.dumps({"id": uuid.uuid4().hex[:24], "intermediateId": "x", "jobid": uuid.uuid4().hex,
                          "host": HOST, "secretKey": "secret", "fileSize": "0", "datasetId": "bench",
                          "filename": "f.bin", "routing_key": "clowder.file.application.octet-stream",
                          "flags": "", "parameters": {}}).encode() for _ in range(n)]
    publish(ch, queue, bodies, reply_to=replies)
    workdir = tempfile.mkdtemp(prefix="bench-noop-")
    env = dict(agent_env(), RABBITMQ_QUEUE=queue, AGENT_PLUGIN_PATH=PLUGINS,
               AGENT_JOURNAL_DIR=os.path.join(workdir, "journal"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    relay = None
    agent = [sys.executable, "-m", "agent", "run", "--plugin", "bench.noop", "--slots", str(slots)]
    if kind == "reference":
        argv = [sys.executable, os.path.abspath(__file__), "--reference-loop", queue, str(n)]
    elif kind == "relay":
        relay = Relay(queue, workdir)
        env.update(AGENT_SOURCE="relay", AGENT_RELAY_URL=relay.url, AGENT_RELAY_TOKEN_FILE=relay.token_file)
        argv = agent
    elif kind == "mpi":
        argv = ["mpiexec", "-n", "2"] + agent[:-2]
    elif kind == "public":
        env.update(AGENT_AMQP_INTERNALS="0")
        argv = agent
    else:
        argv = agent
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        measured = mpi_leader(proc.pid) if kind == "mpi" else proc.pid
        sampler = CpuSampler(measured)
        relay_cpu = CpuSampler(relay.proc.pid) if relay else None
        times = watcher.wait(n, timeout, proc)
        sampler.stop()
        if relay_cpu:
            relay_cpu.stop()
    finally:
        stop_group(proc)
        if relay is not None:
            relay.close()
        watcher.close()
        drop_queue(ch, queue)
        shutil.rmtree(workdir, ignore_errors=True)
    span, files = (times[0], times[-1]), max(len(times) - 1, 1)
    return {"rate": rate(times), "cpu_ms": 1000 * sampler.cpu_between(*span) / files,
            "child_ms": 1000 * sampler.cpu_between(*span, children=True) / files,
            "relay_ms": 1000 * relay_cpu.cpu_between(*span) / files if relay_cpu else None}


CASES = [("reference loop (consume, 2 statuses, ack)", "reference", 1),
         ("agent, direct AMQP, 1 slot", "direct", 1),
         ("agent, direct AMQP, 2 slots", "direct", 2),
         ("agent, direct AMQP, 1 slot, pika public API only", "public", 1),
         ("agent through the relay, 1 slot", "relay", 1),
         ("agent under MPI, 2 ranks (leader CPU)", "mpi", 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default="", help="comma-separated case kinds to run (default: all)")
    parser.add_argument("--reference-loop", nargs=2, metavar=("QUEUE", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "noop_overhead.md"))
    args = parser.parse_args()
    if args.reference_loop:
        reference_loop(AMQP_URL, args.reference_loop[0], int(args.reference_loop[1]))
        return 0
    wanted = set(filter(None, args.cases.split(",")))
    cases = [c for c in CASES if not wanted or c[1] in wanted]
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    try:
        for _ in range(args.runs):
            for name, kind, slots in cases:
                runs[name].append(run_case(kind, ch, args.files, slots))
    finally:
        conn.close()

    def med(name: str, key: str):
        values = [r[key] for r in runs[name] if r[key] is not None]
        return statistics.median(values) if values else None

    ref = med(cases[0][0], "rate") if cases[0][1] == "reference" else None
    lines = [f"# No-op overhead ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}", "",
             "An extractor that does nothing (check_message returns CheckMessage.bypass: no file info, no download; "
             "process_message returns at once); pyclowder's STARTED and DONE statuses and the ack remain. "
             f"{args.files} v1 messages per case; files/s from the first DONE status on the reply queue to the last; "
             "agent CPU = user+system CPU of the agent process alone (MPI: the leader, rank 0) over that span, per "
             f"file. Medians of {args.runs} runs. The machine is shared (load average at the start: "
             f"{os.getloadavg()[0]:.1f}), so compare the rows of one run.", "",
             "| case | files/s | vs reference loop | agent CPU ms/file | extractor CPU ms/file | relay CPU ms/file |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, kind, _ in cases:
        r, cpu, child, relay = med(name, "rate"), med(name, "cpu_ms"), med(name, "child_ms"), med(name, "relay_ms")
        agentish = kind != "reference"
        lines.append(f"| {name} | {r:.1f} | {f'{r / ref:.2f}x' if ref else '-'} | "
                     f"{f'{cpu:.2f}' if agentish else '-'} | {f'{child:.2f}' if agentish else '-'} | "
                     f"{f'{relay:.2f}' if relay is not None else '-'} |")
    lines += ["", "Command: `python benchmarks/noop_overhead.py`"]
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
