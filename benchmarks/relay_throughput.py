#!/usr/bin/env python
"""Throughput through the relay vs direct AMQP, with the same agents, same run.

Each case publishes the same number of v1 messages for 1 KB files held by one Clowder stand-in
process, runs agents with the unchanged wordcount extractor until every file has its metadata,
and reports steady-state files/s (first result to last). "direct" agents consume RabbitMQ and
call the stand-in themselves; "relay" agents lease from `python -m launcher relay` (its own
process, on loopback), staging ahead as they do by default there (small files inline with their
lease, the rest fetched ahead through the relay) and every other Clowder call of theirs is
forwarded by the relay; the same agents with AGENT_STAGE_AHEAD=0 (each call forwarded as pyclowder
makes it), through this relay on pika's public API only (RELAY_AMQP_INTERNALS=0: what its private
one-send path for status replies is worth), and through the earlier relay (stdlib, thread per connection, from git ref --old-ref,
which offers no inline files) are the references.
The stand-in's own rate for the agents' two calls per file is measured and printed first.

Two layouts, every case in both, in the same run:
- co-located: the relay shares the 2 cores with the agents, the broker and the stand-in, so every
  millisecond of relay CPU is taken from the agents;
- login node: the relay alone on one core (the login node it has to itself on a cluster), the
  agents and the stand-in on the other, in the direct cases too (that core is then idle); RabbitMQ
  (a system service) is not pinned. The ratio then says what the relay in the path costs the
  agents' node, which is what a site pays for it.
Writes benchmarks/results/relay_throughput.md (and prints it).

Each case runs --runs times (default 3), the runs interleaved (direct, relay, relay without stage-ahead,
relay on pika's public API, earlier relay, then the next case) so the host's drift reaches all three alike; the table gives medians and the range
of the run-by-run ratios.

  python benchmarks/relay_throughput.py [--files 1000] [--runs 3] [--old-ref 5710b70]
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import functools
import statistics
from typing import Optional


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CpuSampler, drop_queue, agent_env, AMQP_URL, REPO, StandinProcess, fresh_queue, machine, publish, rate, v1_message,  # noqa: E402
                     wait_count, write_report, BrokerChannel, OLD_RELAY_REF, old_tree, pin)
from plots import plot_results  # noqa: E402

FLOOR = 0.8
CASES = (("1 agent, 1 slot", 1, 1), ("1 agent, 2 slots", 1, 2), ("2 agents, 1 slot each", 2, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """The relay as a subprocess for one queue."""

    def __init__(self, queue: str, workdir: str, tree: str = REPO, cpus: Optional[set[int]] = None,
                 extra_env: Optional[dict] = None) -> None:
        self.port = _free_port()
        self.token_file = os.path.join(workdir, "token")
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, secrets.token_urlsafe(32).encode())
        os.close(fd)
        env = dict(os.environ, RABBITMQ_URI=AMQP_URL, RABBITMQ_QUEUE=queue, PYTHONPATH=tree, **(extra_env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "relay", "--bind", f"127.0.0.1:{self.port}",
                                      "--token-file", self.token_file, "--state-dir", os.path.join(workdir, "state"),
                                      "--buffer", "40"], cwd=tree, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, preexec_fn=_on(cpus))
        line = self.proc.stdout.readline()
        assert "relay listening" in line, line
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _on(cpus: Optional[set[int]]):
    """preexec_fn putting a new process on cpus (None: wherever the scheduler likes)."""
    return None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)


def run_case(name: str, standin: StandinProcess, n: int, agents: int, slots: int, via_relay: Optional[str],
             env: dict, timeout: float = 600, layout: Optional[tuple[set[int], set[int]]] = None,
             relay_env: Optional[dict] = None) -> dict:
    """One case; via_relay is the source tree of the relay to run (None: direct AMQP); layout is
    (the agents' cpus, the relay's cpus), None for co-located; relay_env: more of the relay's environment."""
    agent_cpus, relay_cpus = layout if layout else (None, None)
    standin.clear()
    files = standin.add_files(n, b"lorem ipsum dolor sit amet\n" * 37)
    with BrokerChannel() as ch:
        queue = fresh_queue(ch, "bench-relay")
        publish(ch, queue, [v1_message(f, standin.url) for f in files], reply_to="bench-replies")
    workdir = tempfile.mkdtemp(prefix="bench-relay-")
    relay = Relay(queue, workdir, via_relay, relay_cpus, relay_env) if via_relay else None
    agent_env = dict(env, RABBITMQ_QUEUE=queue)
    if relay is not None:
        agent_env.update(AGENT_SOURCE="relay", AGENT_RELAY_URL=relay.url, AGENT_RELAY_TOKEN_FILE=relay.token_file)
    started = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "agent", "run", "--plugin", "ncsa.wordcount.hpc",
                               "--slots", str(slots)], cwd=REPO, env=agent_env, stderr=subprocess.DEVNULL,
                              preexec_fn=_on(agent_cpus))
             for _ in range(agents)]
    sampler = CpuSampler(relay.proc.pid) if relay is not None else None
    try:
        times = wait_count(standin, n, timeout)
        if sampler is not None:
            sampler.stop()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if relay is not None:
            relay.close()
        shutil.rmtree(workdir, ignore_errors=True)
    with BrokerChannel() as ch:
        drop_queue(ch, queue)
    relay_ms = 1000 * sampler.cpu_between(times[0], times[-1]) / max(len(times) - 1, 1) if sampler else None
    return {"name": name, "files": n, "rate": rate(times), "first": times[0] - started, "relay_ms": relay_ms}


def added_ms(direct: dict, relayed: dict, slots: int) -> float:
    """What the relay adds to each file's time in a slot: slots / rate, relay minus direct (ms).

    A file that takes T ms in a slot then runs at about T / (T + this) of direct AMQP's rate
    through the relay, as long as the relay's core is not saturated.
    """
    return 1000.0 * slots * (1.0 / relayed["rate"] - 1.0 / direct["rate"])


def _median_of(results: list[dict]) -> dict:
    """Each numeric field's median over the runs of one case."""
    out = dict(results[0])
    for key in ("rate", "first", "relay_ms"):
        values = [r[key] for r in results if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "relay_throughput.md"))
    parser.add_argument("--old-ref", default=OLD_RELAY_REF, help="git ref of the earlier relay, run as a reference")
    parser.add_argument("--runs", type=int, default=3, help="runs of every case; the table gives medians")
    args = parser.parse_args()
    env = agent_env()
    with BrokerChannel() as ch:
        ch.queue_declare("bench-replies", durable=False, auto_delete=False)
    standin = StandinProcess(lean=True)  # devtools.bench_clowder: far faster than what is measured through it
    runs: dict[tuple[str, str], list[tuple[dict, dict, dict, dict, dict]]] = {}
    load_before = os.getloadavg()[0]
    old = old_tree(args.old_ref)
    cpus = sorted(os.sched_getaffinity(0))
    layouts: list[tuple[str, Optional[tuple[set[int], set[int]]]]] = [("co-located", None)]
    if len(cpus) >= 2:
        layouts.append(("login node", (set(cpus[:-1]), {cpus[-1]})))
    try:
        alone = standin.capacity()
        for _ in range(max(1, args.runs)):
            for layout_name, layout in layouts:
                pin(standin.proc.pid, layout[0] if layout else set(cpus))
                for label, agents, slots in CASES:
                    one = functools.partial(run_case, standin=standin, n=args.files, agents=agents, slots=slots,
                                            env=env, layout=layout)
                    direct = one(f"direct AMQP, {label}", via_relay=None)
                    relayed = one(f"through the relay, {label}", via_relay=REPO)
                    unstaged = one(f"through the relay, no stage-ahead, {label}", via_relay=REPO,
                                   env=dict(env, AGENT_STAGE_AHEAD="0"))
                    public = one(f"through the relay, pika's public API only, {label}", via_relay=REPO,
                                 relay_env={"RELAY_AMQP_INTERNALS": "0"})
                    earlier = one(f"through the earlier relay, {label}", via_relay=old)
                    runs.setdefault((layout_name, label), []).append((direct, relayed, earlier, unstaged, public))
    finally:
        shutil.rmtree(old, ignore_errors=True)
        standin.close()
        with BrokerChannel() as ch:
            ch.queue_delete("bench-replies")
    lines = [f"# Relay throughput ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}; load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} "
             "after it (the machine is shared with other engineers).", "",
             "Unchanged wordcount extractor, 1 KB text files, v1 messages; one broker and one Clowder stand-in "
             "process for all cases; the relay on loopback, on the same machine. Steady state = files/s from the "
             "first result to the last. Ratio = relay / direct (floor {:.1f}). Layouts: **co-located** = the relay "
             "shares both cores with the agents, the broker and the stand-in; **login node** = the relay alone on "
             "core {}, the agents and the stand-in on the other core in every case (direct too), RabbitMQ "
             "unpinned.".format(FLOOR, cpus[-1]), "",
             f"| layout | agents | direct AMQP files/s | through the relay files/s | ratio (runs' range) | "
             "relay, no stage-ahead files/s | its ratio | relay on pika's public API only files/s | its ratio | "
             "its relay CPU ms/file | earlier "
             f"relay ({args.old_ref}) files/s | its ratio | first result, direct / relay (s) | "
             "relay CPU ms/file (this / earlier) | time the relay adds per file and slot (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst: dict[str, float] = {}
    agents_slots = {label: agents * slots for label, agents, slots in CASES}
    for (layout_name, label), results in runs.items():
        d, r, e, u, p = (_median_of([res[i] for res in results]) for i in range(5))
        ratio = r["rate"] / d["rate"]
        each = sorted(res[1]["rate"] / res[0]["rate"] for res in results)
        worst[layout_name] = min(worst.get(layout_name, float("inf")), ratio)
        lines.append(f"| {layout_name} | {label} | {d['rate']:.1f} | {r['rate']:.1f} | {ratio:.2f} "
                     f"({each[0]:.2f}-{each[-1]:.2f}) | {u['rate']:.1f} | {u['rate'] / d['rate']:.2f} | {p['rate']:.1f} | "
                     f"{p['rate'] / d['rate']:.2f} | {p['relay_ms']:.2f} | {e['rate']:.1f} | "
                     f"{e['rate'] / d['rate']:.2f} | {d['first']:.2f} / {r['first']:.2f} | "
                     f"{r['relay_ms']:.2f} / {e['relay_ms']:.2f} | {added_ms(d, r, agents_slots[label]):.2f} |")
    verdicts = "; ".join(f"{name}: {w:.2f} ({'meets' if w >= FLOOR else 'BELOW'} the {FLOOR} floor)"
                         for name, w in worst.items())
    lines += ["", f"{args.files} files per case and run, {max(1, args.runs)} runs; medians (the ratio is of the "
              f"median rates). Lowest ratio by layout: {verdicts}. The time added per file and "
              "slot is slots x (1/relay rate - 1/direct rate): a file that takes T ms in a slot runs at about "
              "T / (T + that) of direct AMQP's rate through the relay. The Clowder stand-in alone "
              f"(devtools.bench_clowder; GET + POST per file over 4 kept-alive connections, benchmarks/standin_load.py, "
              f"same run): {alone:.0f} files/s.", "",
              "Command: `python benchmarks/relay_throughput.py`"]
    write_report(lines, args.out)
    print(f"plot: {plot_results(args.out)}")
    return 0 if max(worst.values()) >= FLOOR else 1


if __name__ == "__main__":
    sys.exit(main())
