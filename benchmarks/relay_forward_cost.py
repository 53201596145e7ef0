#!/usr/bin/env python
"""What one forwarded Clowder call costs: through the relay vs straight to the stand-in, same run.

One client (http.client, one kept-alive connection, one call at a time) sends the extractor's
three calls for a file -- GET the file info, GET the file, POST metadata -- over and over, first
through a lease's Clowder path on `python -m launcher relay`, then straight to the Clowder
stand-in (devtools.bench_clowder), the reference; and through the relay as it was at --old-ref
(before its lean upstream client: aiohttp's ClientSession for every call). Reported per call: the client's wall time, the
serving process's CPU (relay, or stand-in alone), and the difference: what the relay adds to
each of the three calls a file's extractor makes in its slot. The relay runs alone on the last
CPU (as on a login node); the client and the stand-in on the others. Medians of --runs.
Writes benchmarks/results/relay_forward_cost.md (and prints it).

  python benchmarks/relay_forward_cost.py [--calls 3000] [--runs 3] [--old-ref c9dae6b]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from urllib.parse import urlsplit

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, BrokerChannel, StandinProcess, drop_queue, fresh_queue, machine, old_tree,  # noqa: E402
                     pin, process_cpu, publish, v1_message, write_report)
from relay_throughput import Relay  # noqa: E402

BEFORE_LEAN_CLIENT = "c9dae6b"  # the last commit whose relay sent every forwarded call with aiohttp's client


def _calls(host: str, key: str, fid: str) -> list[tuple[str, str, bytes]]:
    """The three calls pyclowder makes for a v1 file message, as (method, target, body)."""
    base = urlsplit(host).path.rstrip("/")
    metadata = json.dumps({"@context": ["https://clowder.ncsa.illinois.edu/contexts/metadata.jsonld"],
                           "file_id": fid, "content": {"lines": 37},
                           "agent": {"@type": "cat:extractor", "extractor_id": host + "api/extractors/bench"}}).encode()
    return [("GET", f"{base}/api/files/{fid}/metadata?key={key}", b""),
            ("GET", f"{base}/api/files/{fid}?key={key}", b""),
            ("POST", f"{base}/api/files/{fid}/metadata.jsonld?key={key}", metadata)]


def measure(host: str, key: str, fid: str, server_pid: int, calls: int) -> dict[str, float]:
    """Sequential calls on one kept-alive connection: wall ms and the server's CPU ms per call."""
    parts = urlsplit(host)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    plan = _calls(host, key, fid)

    def one(i: int) -> None:
        method, target, body = plan[i % 3]
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, target, body=body or None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise SystemExit(f"{method} {target.split('?')[0]} answered {resp.status}")

    for i in range(150):  # warm up the connections (ours and the relay's upstream pool)
        one(i)
    cpu0, t0 = process_cpu(server_pid), time.perf_counter()
    for i in range(calls):
        one(i)
    wall, cpu = time.perf_counter() - t0, process_cpu(server_pid) - cpu0
    conn.close()
    return {"wall_ms": 1000 * wall / calls, "cpu_ms": 1000 * cpu / calls}


def _lease(relay: Relay) -> dict:
    """Lease the relay's one message; its body as the agent sees it (host and key of the relay)."""
    token = open(relay.token_file).read().strip()
    lease = requests.post(relay.url + "/v1/lease", json={"agent": "bench", "max": 1, "wait": 10},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["leases"][0]
    return json.loads(base64.b64decode(lease["body_b64"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per case and run (a multiple of 3)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--old-ref", default=BEFORE_LEAN_CLIENT, help="git ref of the relay to compare with")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "relay_forward_cost.md"))
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    relay_cpus = {cpus[-1]} if len(cpus) > 1 else set(cpus)
    others = set(cpus[:-1]) or set(cpus)
    os.sched_setaffinity(0, others)
    standin = StandinProcess(lean=True)
    pin(standin.proc.pid, others)
    fid = standin.add_files(1, b"lorem ipsum dolor sit amet\n" * 37)[0]
    workdir = tempfile.mkdtemp(prefix="bench-forward-")
    old = old_tree(args.old_ref)
    relays, queues = [], []
    try:
        leased = []
        for tree in (REPO, old):
            with BrokerChannel() as ch:
                queues.append(fresh_queue(ch, "bench-forward"))
                publish(ch, queues[-1], [v1_message(fid, standin.url)], reply_to="bench-replies")
            relays.append(Relay(queues[-1], tempfile.mkdtemp(dir=workdir), tree, cpus=relay_cpus))
            leased.append(_lease(relays[-1]))
        through, earlier, direct = [], [], []
        for _ in range(args.runs):  # alternate, so that all see the same host
            for rows, relay, body in ((through, relays[0], leased[0]), (earlier, relays[1], leased[1])):
                rows.append(measure(body["host"], body["secretKey"], fid, relay.proc.pid, args.calls))
            direct.append(measure(standin.url, "secret", fid, standin.proc.pid, args.calls))
    finally:
        for relay in relays:
            relay.close()
        standin.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        with BrokerChannel() as ch:
            for queue in queues:
                drop_queue(ch, queue)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    added = med(through, "wall_ms") - med(direct, "wall_ms")
    lines = [f"# Relay forwarding cost per Clowder call ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}.", "",
             "One client, one kept-alive connection, one call at a time, cycling through the three calls an "
             f"extractor makes per file (GET file info, GET file, POST metadata); {args.calls} calls per case, "
             f"medians of {args.runs} runs, the cases alternating. The relay alone on CPU "
             f"{sorted(relay_cpus)}, the client and the stand-in on {sorted(others)}.", "",
             "| case | wall ms per call | server CPU ms per call |",
             "|---|---:|---:|",
             f"| straight to the Clowder stand-in (reference) | {med(direct, 'wall_ms'):.3f} | "
             f"{med(direct, 'cpu_ms'):.3f} (stand-in) |",
             f"| through the relay (aiohttp server, lean upstream client) | {med(through, 'wall_ms'):.3f} | "
             f"{med(through, 'cpu_ms'):.3f} (relay) |",
             f"| through the relay at {args.old_ref} (aiohttp server, aiohttp's client) | {med(earlier, 'wall_ms'):.3f} | "
             f"{med(earlier, 'cpu_ms'):.3f} (relay) |", "",
             f"The relay adds {added:.3f} ms to each forwarded call, {3 * added:.2f} ms to a file's three "
             f"(at {args.old_ref}: {med(earlier, 'wall_ms') - med(direct, 'wall_ms'):.3f} ms); relay CPU per call "
             f"{med(through, 'cpu_ms') / med(earlier, 'cpu_ms'):.2f}x of {args.old_ref}'s; "
             f"the stand-in alone answers a call in {med(direct, 'wall_ms'):.3f} ms, "
             f"{med(through, 'wall_ms') / med(direct, 'wall_ms'):.1f}x faster than the path through the relay.", "",
             "Command: `python benchmarks/relay_forward_cost.py`"]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
