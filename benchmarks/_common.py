"""Shared plumbing for the benchmarks: a stand-in in its own process, queues, machine facts."""
from __future__ import annotations

import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import pika
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from devtools.amqp_queues import companion_queues, delete_queues  # noqa: E402
AMQP_URL = os.environ.get("RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")


def pin(pid: int, cpus: set[int]) -> None:
    """Put every thread of a running process on cpus (threads and processes it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended


class StandinProcess:
    """The Clowder stand-in as a separate process, driven through its control API.

    lean=True runs devtools.bench_clowder (the per-file routes only, on one event loop) instead of the
    full devtools.clowder_standin, so that the stand-in is not what limits the rates measured.
    """

    def __init__(self, lean: bool = False) -> None:
        self.lean = lean
        module = "devtools.bench_clowder" if lean else "devtools.clowder_standin"
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--port", "0"], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("standin: "), line
        self.url = line.split(" ", 1)[1]
        self.http = requests.Session()

    def add_files(self, n: int, content: bytes) -> list[str]:
        data = base64.b64encode(content).decode()
        if self.lean:
            return self.http.post(self.url + "_standin/files", json={"name": "f.txt", "content_b64": data,
                                                                      "count": n}).json()["ids"]
        return [self.http.post(self.url + "_standin/files", json={"name": f"f{i}.txt", "content_b64": data}).json()["id"]
                for i in range(n)]

    def metadata_times(self) -> list[float]:
        recs = self.http.get(self.url + "_standin/records", params={"kind": "metadata"}).json()
        return sorted(r["time"] for r in recs)

    def capacity(self, seconds: float = 3.0, runs: int = 3) -> float:
        """Median files/s (GET blob + POST metadata, as the bare loop) this stand-in serves with no broker."""
        from standin_load import files_per_second
        fid = self.add_files(1, b"lorem ipsum dolor sit amet\n" * 37)[0]
        rates = [files_per_second(self.url, fid, seconds=seconds) for _ in range(runs)]
        self.clear()
        return statistics.median(rates)

    def clear(self) -> None:
        self.http.post(self.url + "_standin/clear")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def agent_env() -> dict:
    """Environment of the agents a benchmark starts: examples as plugins, quiet logs, own journal."""
    return dict(os.environ, RABBITMQ_URI=AMQP_URL, PYTHONPATH=REPO, AGENT_LOG_LEVEL="WARNING",
                AGENT_PLUGIN_PATH=os.path.join(REPO, "examples"), AGENT_JOURNAL_DIR="/tmp/bench-journal")


def v1_message(file_id: str, host: str) -> bytes:
    return json.dumps({"id": file_id, "intermediateId": file_id, "jobid": uuid.uuid4().hex, "host": host,
                       "secretKey": "secret", "fileSize": "1024", "datasetId": "bench", "filename": "f.txt",
                       "routing_key": "clowder.file.text.plain", "flags": "", "parameters": {}}).encode()


def fresh_queue(ch: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    ch.queue_declare(name, durable=True)
    ch.queue_declare("error." + name, durable=True)
    return name


def drop_queue(ch: Any, queue: str) -> None:
    """Delete a benchmark's queue and the queues named after it (error., reports window, ...)."""
    delete_queues(ch, companion_queues(queue))


def publish(ch: Any, queue: str, bodies: list[bytes], reply_to: str) -> None:
    props = pika.BasicProperties(delivery_mode=2, reply_to=reply_to, correlation_id="bench",
                                 content_type="application/json")
    for body in bodies:
        ch.basic_publish("", queue, body, props)


def wait_count(standin: StandinProcess, n: int, timeout: float) -> list[float]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        times = standin.metadata_times()
        if len(times) >= n:
            return times
        time.sleep(0.2)
    raise RuntimeError(f"only {len(standin.metadata_times())} of {n} files done within {timeout}s")


def rate(times: list[float]) -> float:
    """Steady-state files per second: from the first result to the last."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rmq = subprocess.run(["rabbitmqctl", "-q", "eval", "rabbit_misc:version()."], capture_output=True,
                         text=True).stdout.strip().strip('"')
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, RabbitMQ {rmq or '?'}, "
            f"pika {pika.__version__}, {platform.system()} {platform.release()}; "
            f"CPU probe {cpu_probe_ms():.0f} ms (a fixed Python loop, benchmarks/_common.py)")


def cpu_probe_ms(rounds: int = 5) -> float:
    """CPU ms of a fixed pure-Python loop (best of rounds): how fast this host's core is right now.

    Per-file CPU figures move with the host (a VM on another machine, steal, a busy neighbour);
    runs on hosts whose probes differ are compared through it, not directly.
    """
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        total = 0
        for i in range(1_000_000):
            total += i & 7
        best = min(best, time.process_time() - started)
    return 1000 * best


def write_report(lines: list[str], out: str) -> None:
    """Print a benchmark's markdown report and write it to out (and its plot: see write_results)."""
    write_results(out, lines)


class BrokerChannel:
    """A channel opened afresh for each use: a case can outlast an idle connection's heartbeats."""

    def __enter__(self) -> Any:
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        return self.conn.channel()

    def __exit__(self, *exc: Any) -> None:
        self.conn.close()


OLD_RELAY_REF = "5710b70"  # the last commit with the stdlib ThreadingHTTPServer relay


def old_tree(ref: str) -> str:
    """A temporary folder holding `launcher` and `agent` as they were at git ref (caller removes it)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-old-relay-")
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "launcher", "agent"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder
def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, all its threads."""
    import psutil
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class CpuSampler:
    """Samples the user+system CPU of one process (and, apart, of its children) every 50 ms.

    cpu_between(t0, t1) interpolates the process's CPU seconds between two wall-clock times, so
    a benchmark can charge an agent only for its steady state (first result to last), not for its
    start-up (imports, spawning the extractor).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import threading
        import psutil
        self._proc = psutil.Process(pid)
        self._psutil = psutil
        self.samples: list[tuple[float, float, float]] = []  # (time, own cpu, children's cpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            t = self._proc.cpu_times()
            kids = 0.0
            for child in self._proc.children(recursive=True):
                try:
                    c = child.cpu_times()
                    kids += c.user + c.system
                except self._psutil.Error:
                    pass
            self.samples.append((time.time(), t.user + t.system, kids))
        except self._psutil.Error:
            self._stop.set()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(interval)

    def stop(self) -> None:
        """Take a last sample and stop sampling (call before the process is stopped)."""
        self._sample()
        self._stop.set()
        self._thread.join(timeout=2)

    def cpu_between(self, t0: float, t1: float, children: bool = False) -> float:
        """CPU seconds the process (or its children) used between wall-clock times t0 and t1."""
        k = 2 if children else 1

        def at(t: float) -> float:
            s = self.samples
            for (ta, *va), (tb, *vb) in zip(s, s[1:]):
                if ta <= t <= tb:
                    a, b = va[k - 1], vb[k - 1]
                    return a + (b - a) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
            return s[0][k] if t < s[0][0] else s[-1][k]
        return at(t1) - at(t0)


def mpi_leader(mpiexec_pid: int, timeout: float = 120) -> int:
    """The pid of the rank-0 agent process (the MPI leader) under an mpiexec process."""
    import psutil
    root = psutil.Process(mpiexec_pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in root.children(recursive=True):
            try:
                cmd = p.cmdline()
                if "agent" in cmd and "run" in cmd and p.environ().get("PMI_RANK") == "0":
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise RuntimeError("no MPI rank 0 agent process found")


def stop_group(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM a benchmark's process group (started with start_new_session), SIGKILL after grace seconds."""
    import signal
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_results(path: str, lines: list[str]) -> None:
    """Print a benchmark's markdown, write it to path and redraw its plot (when it has one)."""
    from plots import plot_results
    text = "\n".join(lines) + "\n"
    print(text)
    with open(path, "w") as fh:
        fh.write(text)
    try:
        print(f"plot: {plot_results(path)}")
    except KeyError:
        pass  # a results file outside benchmarks/results (--out elsewhere) has no plot
