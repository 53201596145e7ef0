#!/usr/bin/env python
"""One relay process under thousands of agent connections: the earlier relay vs this one, one run.

A load generator (aiohttp, its own process) runs `--agents` virtual agents, each on its own kept-
alive connection to the relay, speaking the agent's protocol for every file: POST /v1/lease (long
poll), GET the file and POST its metadata through the lease's Clowder path, POST /v1/extend every
`--extend-every` files, and the completion: carried by its next lease call where the relay offers
that (hello's features, as the agent does), else POST /v1/complete. Cases, in this order, each
with fresh messages:

  stand-in alone   the same agents GET + POST straight to the Clowder stand-in (its own rate:
                   it must be well above the relays' so that it is not what is measured)
  earlier relay    `python -m launcher relay` from git ref --old-ref (the stdlib thread-per-
                   connection server), extracted with `git archive` into a temporary folder
  this relay       `python -m launcher relay` from this tree (aiohttp)

The Clowder stand-in is devtools.bench_clowder (the lean one every benchmark uses). Files/s counts
completed files between the first and the last completion of a case (at most --seconds);
connections are the relay's ESTABLISHED sockets on its port, sampled every second (maximum).
Everything runs on this machine (broker, stand-in, relay, load generator), so they share its
cores; the load average is printed with the results. Writes benchmarks/results/relay_load.md.

  python benchmarks/relay_load.py [--agents 2000] [--seconds 30] [--old-ref 5710b70]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import drop_queue, AMQP_URL, REPO, fresh_queue, machine, publish, v1_message, write_report, BrokerChannel, \
    StandinProcess, OLD_RELAY_REF, old_tree, process_cpu  # noqa: E402

FLOOR_RATE = 5.0         # this relay / the earlier one
FLOOR_CONNECTIONS = 2000
FILE = b"lorem ipsum dolor sit amet\n" * 37  # 1 KB, as in the other benchmarks


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the load generator (runs in its own process: `relay_load.py _drive ...`) -------------------------
async def _agent(i: int, args: argparse.Namespace, all_in: asyncio.Event, done: list[float],
                 errors: dict[str, int], connected: list[int]) -> None:
    import aiohttp

    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=300)
    timeout = aiohttp.ClientTimeout(total=120)
    files = 0

    async def call(session: Any, method: str, url: str, **kw: Any) -> Optional[bytes]:
        try:
            async with session.request(method, url, **kw) as resp:
                data = await resp.read()
                if resp.status >= 300:
                    errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                    return None
                return data
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            errors[exc.__class__.__name__] = errors.get(exc.__class__.__name__, 0) + 1
            await asyncio.sleep(0.5)
            return None

    async with aiohttp.ClientSession(connector=connector, headers=auth, timeout=timeout) as s:
        # Open this agent's connection, then wait until every agent holds one: the clock starts then.
        hello = args.url + ("/v1/hello" if args.mode == "relay" else "_standin/ping")
        said = await call(s, "GET", hello)
        carry = args.mode == "relay" and said is not None and "lease_complete" in json.loads(said).get("features", [])
        carried: list[tuple[str, float]] = []  # (lease id, when its results were in) for the next lease call
        if said is not None:
            connected[0] += 1
            if connected[0] == args.agents:
                print("ready", flush=True)  # every agent of this process holds its connection
        await all_in.wait()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            if args.mode == "direct":
                fid = args.file_id
                key = "secret"
                host = args.url.rstrip("/") + "/"
                leases = [{"lease_id": None, "body": {"id": fid, "host": host, "secretKey": key}}]
            else:
                wait = max(0.0, min(20.0, end - time.monotonic()))  # the agent's own lease_wait
                ask: dict[str, Any] = {"agent": f"load-{i}", "max": 1, "wait": wait}
                if carried:
                    ask.update(complete=[lease_id for lease_id, _ in carried], wait=0)
                data = await call(s, "POST", args.url + "/v1/lease", json=ask)
                if data is None:
                    continue
                answer = json.loads(data)
                if carried:
                    settled = set(answer.get("done", []))
                    done.extend(t for lease_id, t in carried if lease_id in settled)
                    carried = []
                leases = [{"lease_id": x["lease_id"], "body": json.loads(base64.b64decode(x["body_b64"]))}
                          for x in answer["leases"]]
            for lease in leases:
                body = lease["body"]
                base, fid, key = body["host"], body["id"], body["secretKey"]
                if await call(s, "GET", f"{base}api/files/{fid}", params={"key": key}) is None:
                    continue
                md = {"@context": ["https://clowder.ncsa.illinois.edu/contexts/metadata.jsonld"],
                      "file_id": fid, "content": {"lines": 37, "words": 185},
                      "agent": {"@type": "cat:extractor", "extractor_id": base + "api/extractors/load"}}
                if await call(s, "POST", f"{base}api/files/{fid}/metadata.jsonld", params={"key": key},
                              json=md) is None:
                    continue
                files += 1
                if lease["lease_id"] is not None:
                    if files % args.extend_every == 0:
                        await call(s, "POST", args.url + "/v1/extend", json={"lease_ids": [lease["lease_id"]]})
                    if carry:
                        carried.append((lease["lease_id"], time.monotonic()))
                        continue
                    if await call(s, "POST", args.url + "/v1/complete", json={"lease_ids": [lease["lease_id"]]}) is None:
                        continue
                done.append(time.monotonic())
        if carried:  # the last file's completion: on its own, as the agent's completion thread sends it
            answer = await call(s, "POST", args.url + "/v1/complete", json={"lease_ids": [x for x, _ in carried]})
            if answer is not None:
                settled = set(json.loads(answer).get("done", []))
                done.extend(t for lease_id, t in carried if lease_id in settled)


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    done: list[float] = []
    errors: dict[str, int] = {}
    connected = [0]
    all_in = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def go() -> None:  # the orchestrator says "go" once every load process is ready
        await loop.run_in_executor(None, sys.stdin.readline)
        all_in.set()

    starter = loop.create_task(go())
    cpu0 = time.process_time()
    await asyncio.gather(*(_agent(i, args, all_in, done, errors, connected) for i in range(args.agents)))
    await starter
    done.sort()
    return {"files": len(done), "first": done[0] if done else 0.0, "last": done[-1] if done else 0.0,
            "errors": errors, "agents_connected": connected[0], "driver_cpu_s": time.process_time() - cpu0}


def drive_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("relay", "direct"))
    p.add_argument("url")
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--extend-every", type=int, default=10)
    p.add_argument("--file-id", default="", help="direct mode: the stand-in's file every call reads")
    args = p.parse_args(argv)
    args.token = os.environ.get("LOAD_TOKEN", "")  # the bearer token never goes on a command line
    raise_fd_limit()
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    print(json.dumps(loop.run_until_complete(_drive(args))), flush=True)
    return 0


# -- the orchestration ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayUnderTest:
    """`python -m launcher relay` from a source tree, for one queue, in its own process."""

    def __init__(self, tree: str, queue: str, workdir: str, max_connections: int) -> None:
        self.port = _free_port()
        self.token = secrets.token_urlsafe(32)
        token_file = os.path.join(workdir, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, self.token.encode())
        os.close(fd)
        env = dict(os.environ, RABBITMQ_URI=AMQP_URL, RABBITMQ_QUEUE=queue, PYTHONPATH=tree)
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "relay", "--bind", f"127.0.0.1:{self.port}",
                                      "--token-file", token_file, "--state-dir", os.path.join(workdir, "state"),
                                      "--buffer", "200", "--max-connections", str(max_connections)],
                                     cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert "relay listening" in line, line
        self.url = f"http://127.0.0.1:{self.port}"

    def established(self) -> int:
        try:
            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except (psutil.Error, AttributeError):
            return -1
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port)

    def cpu(self) -> float:
        """CPU seconds (user + system) the relay process has used so far, all its threads."""
        return process_cpu(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_driver(mode: str, url: str, token: str, args: argparse.Namespace,
               relay: Optional["RelayUnderTest"] = None, file_id: str = "") -> dict[str, Any]:
    """Run the load generator (in --drivers processes); sample the relay's connections and CPU."""
    share = [args.agents // args.drivers + (1 if i < args.agents % args.drivers else 0) for i in range(args.drivers)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_drive", mode, url, "--agents", str(n),
                               "--seconds", str(args.seconds), "--extend-every", str(args.extend_every),
                               "--file-id", file_id],
                              env=dict(os.environ, LOAD_TOKEN=token), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
             for n in share]
    deadline = time.monotonic() + args.connect_within
    for proc in procs:  # each prints "ready" when all its agents hold a connection (or we go anyway)
        while time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                proc.stdout.readline()
                break
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    peak = [0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(1.0):
            if relay is not None:
                peak[0] = max(peak[0], relay.established())

    cpu0 = relay.cpu() if relay is not None else 0.0
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    parts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 300)  # (stdin is closed here: no effect now)
        parts.append(json.loads(out.strip().splitlines()[-1]))
    stop.set()
    thread.join()
    files = sum(p["files"] for p in parts)
    first = min(p["first"] for p in parts if p["files"])
    last = max(p["last"] for p in parts if p["files"])
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    relay_cpu = relay.cpu() - cpu0 if relay is not None else 0.0
    return {"files": files, "rate": (files - 1) / (last - first) if files > 1 and last > first else 0.0,
            "errors": errors, "agents_connected": sum(p["agents_connected"] for p in parts),
            "connections": peak[0], "load": os.getloadavg()[0],
            "relay_cpu_ms": 1000 * relay_cpu / files if files else float("nan"),
            "driver_cpu_ms": 1000 * sum(p["driver_cpu_s"] for p in parts) / files if files else float("nan")}


def relay_case(tree: str, standin: StandinProcess, args: argparse.Namespace) -> dict[str, Any]:
    ids = standin.add_files(args.files, FILE)
    with BrokerChannel() as ch:
        queue = fresh_queue(ch, "bench-load")
        publish(ch, queue, [v1_message(fid, standin.url) for fid in ids],
                reply_to="bench-load-replies")
    workdir = tempfile.mkdtemp(prefix="bench-load-")
    relay = RelayUnderTest(tree, queue, workdir, max(4096, args.agents * 2))
    try:
        result = run_driver("relay", relay.url, relay.token, args, relay)
    finally:
        relay.close()
        shutil.rmtree(workdir, ignore_errors=True)
        with BrokerChannel() as ch:
            drop_queue(ch, queue)
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_drive":
        return drive_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2000, help="virtual agents, one connection each")
    parser.add_argument("--seconds", type=float, default=30, help="length of each case")
    parser.add_argument("--files", type=int, default=30000, help="messages published per relay case")
    parser.add_argument("--connect-within", type=float, default=90, help="seconds for every agent to connect")
    parser.add_argument("--drivers", type=int, default=4, help="load generator processes (agents split among them)")
    parser.add_argument("--extend-every", type=int, default=10, help="a heartbeat every this many files")
    parser.add_argument("--old-ref", default=OLD_RELAY_REF, help="git ref of the earlier relay")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "relay_load.md"))
    args = parser.parse_args()
    raise_fd_limit()
    standin = StandinProcess(lean=True)
    with BrokerChannel() as ch:
        ch.queue_declare("bench-load-replies", durable=False, auto_delete=False)
    old = old_tree(args.old_ref)
    rows = []
    try:
        load_before = os.getloadavg()
        direct = run_driver("direct", standin.url, "", args, file_id=standin.add_files(1, FILE)[0])
        rows.append(("Clowder stand-in alone (GET + POST per file)", direct))
        rows.append((f"earlier relay ({args.old_ref}, ThreadingHTTPServer)", relay_case(old, standin, args)))
        rows.append(("this relay (aiohttp)", relay_case(REPO, standin, args)))
    finally:
        standin.close()
        shutil.rmtree(old, ignore_errors=True)
        with BrokerChannel() as ch:
            ch.queue_delete("bench-load-replies")
    old_rate, new_rate = rows[1][1]["rate"], rows[2][1]["rate"]
    ratio = new_rate / old_rate if old_rate else float("inf")
    new_conns = rows[2][1]["connections"]
    lines = [f"# Relay under load ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Machine: {machine()}; load average before the run {load_before[0]:.1f} "
             f"(shared with other engineers).", "",
             f"{args.agents} virtual agents, one kept-alive connection each, for {args.seconds:.0f} s per case: "
             f"lease (long poll) -> GET the file -> POST metadata through the lease's Clowder path -> complete "
             f"(carried by the next lease call where the relay offers that, as agents do), an extend every {args.extend_every} files. Clowder stand-in: devtools.bench_clowder. "
             "Broker, stand-in, relay and load generator share this machine.", "",
             "| case | files/s | files | relay CPU ms/file | files/s per relay core | relay connections (max) "
             "| agents connected | errors | load avg at end |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label, r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
        conns = r["connections"] if label != rows[0][0] else "-"
        agents = r["agents_connected"] if label != rows[0][0] else "-"
        cpu = f"{r['relay_cpu_ms']:.2f}" if label != rows[0][0] else "-"
        per_core = f"{1000 / r['relay_cpu_ms']:.0f}" if label != rows[0][0] and r["relay_cpu_ms"] > 0 else "-"
        lines.append(f"| {label} | {r['rate']:.1f} | {r['files']} | {cpu} | {per_core} | {conns} | {agents} | "
                     f"{errors} | {r['load']:.1f} |")
    ok = ratio >= FLOOR_RATE and new_conns >= FLOOR_CONNECTIONS
    cpu_ratio = rows[1][1]["relay_cpu_ms"] / rows[2][1]["relay_cpu_ms"] if rows[2][1]["relay_cpu_ms"] else 0.0
    lines += ["", f"This relay / earlier relay: {ratio:.2f}x files/s (floor {FLOOR_RATE:.0f}x), {cpu_ratio:.2f}x files "
              f"per relay CPU second; this relay held "
              f"{new_conns} connections at once (floor {FLOOR_CONNECTIONS}); the stand-in alone served "
              f"{direct['rate'] / new_rate if new_rate else float('inf'):.1f}x this relay's rate. "
              f"{'Meets' if ok else 'BELOW'} the floors.", "",
              "Command: `python benchmarks/relay_load.py`"]
    write_report(lines, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
