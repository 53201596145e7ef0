"""Real runs on this machine: the calibration probes and the cases the model is validated against.

Needs the shared RabbitMQ and the local Slurm (scripts/services.sh). Everything here uses its own
queues and temporary folders; a case's logs are kept (and named in the error) only when it fails.
"""
from __future__ import annotations

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
from typing import Callable

import pika
import requests

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
from _common import drop_queue, AMQP_URL, REPO, StandinProcess, fresh_queue, publish  # noqa: E402


def machine_state() -> str:
    """nproc, load averages and other users' Slurm jobs: what shared the machine with a run."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    return f"nproc {os.cpu_count()}, load average {load}, {len(jobs)} Slurm job(s) queued or running"


def slurm_cpus() -> int:
    """CPUs the local Slurm node offers (array tasks of one CPU that can run at once)."""
    out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("CPUTot="):
            return int(word.split("=", 1)[1])
    raise RuntimeError("scontrol show node gave no CPUTot")


# -- calibration probes ----------------------------------------------------------------------------
def _meter(roots: list[int]):
    import mpi_scaling  # its CpuMeter: CPU used meanwhile by processes not ours (nor the broker)

    return mpi_scaling.CpuMeter(roots)


def share(foreign: float) -> float:
    """Our share of this machine's cores while other work kept `foreign` cores busy."""
    cores = os.cpu_count() or 1
    return cores / (cores + max(0.0, foreign))


def broker_ops_per_s(messages: int = 3000) -> tuple[float, float]:
    """Persistent publish, delivery and ack of `messages` on one fresh queue: (operations/s, other load)."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    queue = fresh_queue(ch, "scale-cal")
    try:
        meter = _meter([])
        started = time.perf_counter()
        publish(ch, queue, [b'{"id": "x"}'] * messages, reply_to="scale-cal-none")
        ch.basic_qos(prefetch_count=200)
        got = 0
        for method, _, _ in ch.consume(queue, inactivity_timeout=30):
            if method is None:
                raise RuntimeError(f"broker probe: {got} of {messages} messages came back")
            ch.basic_ack(method.delivery_tag)
            got += 1
            if got == messages:
                break
        ch.cancel()
        elapsed = time.perf_counter() - started
        foreign = meter.foreign_cores()
    finally:
        drop_queue(ch, queue)
        conn.close()
    return 3 * messages / elapsed, foreign


def clowder_probe(requests_per_client: int = 300, clients: int = 4) -> tuple[float, float, float]:
    """The stand-in's (one-client median latency s, requests/s under `clients` concurrent clients, other load)."""
    standin = StandinProcess()
    try:
        file_id = standin.add_files(1, b"lorem ipsum\n" * 80)[0]
        url = f"{standin.url}api/files/{file_id}/metadata?key=secret"
        one = requests.Session()
        latencies = []
        for _ in range(200):
            t = time.perf_counter()
            one.get(url).raise_for_status()
            latencies.append(time.perf_counter() - t)

        def client() -> None:
            session = requests.Session()
            for _ in range(requests_per_client):
                session.get(url).raise_for_status()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        meter = _meter([standin.proc.pid])
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rate = clients * requests_per_client / (time.perf_counter() - started)
        foreign = meter.foreign_cores()
    finally:
        standin.close()
    return statistics.median(latencies), rate, foreign


def task_start_s(agent_start_s: float, tries: int = 3) -> tuple[float, float]:
    """A one-task array over one 0 s file, median of `tries`: (queue wait = sbatch to the job script's
    first line, task start = from there to the first result, minus the agent's own start-up)."""
    runs = [array_case(1, 1, 0.0, idle_exit=1) for _ in range(tries)]
    wait = statistics.median(r["waits"][0] for r in runs)
    return wait, statistics.median(r["makespan"] - r["waits"][0] for r in runs) - agent_start_s


def calibrate(agent_start_s: float, log: Callable[[str], None] = print) -> dict[str, float]:
    """Measure the machine-dependent constants (medians of three), as idle-machine values by Costs name."""
    log(f"machine: {machine_state()}")
    brokers = [broker_ops_per_s() for _ in range(3)]
    probes = [clowder_probe() for _ in range(3)]
    for rate, foreign in brokers:
        log(f"broker: {rate:.0f} ops/s with {foreign:.2f} cores of other load")
    for latency, rate, foreign in probes:
        log(f"stand-in: {rate:.0f} requests/s, one client {latency * 1e3:.2f} ms, {foreign:.2f} cores of other load")
    broker = statistics.median(rate / share(foreign) for rate, foreign in brokers)
    service = statistics.median(share(foreign) / rate for _, rate, foreign in probes)
    latency = statistics.median(latency * share(foreign) for latency, _, foreign in probes)
    wait, start = task_start_s(agent_start_s)
    log(f"local Slurm: sbatch to the job script {wait:.2f} s (median), then {start:.2f} s + agent start-up")
    log(f"machine after: {machine_state()}")
    return {"broker_ops_per_s": round(broker), "clowder_service_s": round(service, 6),
            "clowder_rtt_s": round(max(0.0, latency - service), 6), "task_start_s": round(start, 2)}


# -- validation cases ------------------------------------------------------------------------------
def _wait_gone(job: str, timeout: float = 60.0) -> None:
    """Wait until Slurm lists no task of job (scancel only asks)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.5)


def _agent_env(queue: str, sleep: float, tmp: str) -> dict[str, str]:
    return dict(os.environ, RABBITMQ_URI=AMQP_URL, RABBITMQ_QUEUE=queue, PYTHONPATH=REPO,
                AGENT_PLUGIN="ncsa.sleepy", AGENT_PLUGIN_PATH=os.path.join(REPO, "examples"),
                SLEEP_SECONDS=str(sleep), AGENT_LOG_LEVEL="WARNING", AGENT_JOURNAL_DIR=os.path.join(tmp, "journal"),
                AGENT_LOG_DIR=os.path.join(tmp, "logs"), AGENT_HOME=REPO,
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


class _JobMeter:
    """mpi_scaling's CpuMeter, counting as ours also the processes Slurm started for our queue."""

    def __init__(self, marker: str, roots: list[int]) -> None:
        import mpi_scaling

        marker_bytes = marker.encode()

        class Meter(mpi_scaling.CpuMeter):
            def _sample(self):  # noqa: ANN202 - the base class's contract
                for name in os.listdir("/proc"):
                    if name.isdigit():
                        try:
                            with open(f"/proc/{name}/environ", "rb") as fh:
                                if marker_bytes in fh.read():
                                    self.roots.add(int(name))
                        except OSError:
                            pass
                return super()._sample()

        self.meter = Meter(roots)

    def foreign_cores(self) -> float:
        return self.meter.foreign_cores()


def array_case(tasks: int, files: int, sleep: float, idle_exit: float, timeout: float = 600) -> dict:
    """`sbatch --array=1-K pbs/agent_array.slurm` over `files` waiting sleep-extractor files.

    Makespan = sbatch to the last metadata upload (queue wait and start-up included). Also returns
    the stand-in's API requests per file, the cores other work used meanwhile ("foreign") and each
    task's queue wait, sbatch to its job script's first line ("waits", by array index).
    """
    standin = StandinProcess()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    queue = fresh_queue(ch, "scale-val")
    replies = f"scale-val-replies-{uuid.uuid4().hex[:6]}"
    ch.queue_declare(replies, auto_delete=False)
    job = None
    tmp = tempfile.mkdtemp(prefix="scale-val-")
    try:
        ids = standin.add_files(files, b"lorem ipsum\n" * 80)
        bodies = [json.dumps({"id": fid, "intermediateId": fid, "jobid": uuid.uuid4().hex, "host": standin.url,
                              "secretKey": "secret", "fileSize": "960", "datasetId": "bench",
                              "filename": f"{fid}.txt", "routing_key": "clowder.file.text.plain", "flags": "",
                              "parameters": {}}).encode() for fid in ids]
        publish(ch, queue, bodies, reply_to=replies)
        env = dict(_agent_env(queue, sleep, tmp), AGENT_IDLE_EXIT=str(idle_exit))
        meter = _JobMeter(f"RABBITMQ_QUEUE={queue}", [standin.proc.pid])
        t0 = time.time()
        job = subprocess.run(["sbatch", "--parsable", f"--array=1-{tasks}", f"--output={tmp}/slurm-%A_%a.out",
                              os.path.join(REPO, "pbs", "agent_array.slurm")], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout.strip().split(";")[0]
        deadline = t0 + timeout
        while True:
            times = standin.metadata_times()
            if len(times) >= files:
                break
            if time.time() > deadline:
                raise RuntimeError(f"array of {tasks}: {len(times)} of {files} files done; logs in {tmp}")
            time.sleep(0.2)
        foreign = meter.foreign_cores()
        counts = standin.http.get(standin.url + "_standin/counts").json()["requests"]
        # A task's start: its Slurm output file, written once by agent_task.sh's first echo.
        waits = {}
        for name in os.listdir(tmp):
            if name.startswith("slurm-") and name.endswith(".out"):
                index = int(name[:-4].rsplit("_", 1)[1])
                waits[index] = os.stat(os.path.join(tmp, name)).st_mtime - t0
        shutil.rmtree(tmp, ignore_errors=True)
        return {"makespan": times[-1] - t0, "requests_per_file": sum(counts.values()) / files, "foreign": foreign,
                "waits": [waits.get(i, float("nan")) for i in range(1, tasks + 1)]}
    finally:
        if job:
            subprocess.run(["scancel", job], capture_output=True)
            _wait_gone(job)  # a task still running would declare its report queue again after the drop
        drop_queue(ch, queue)
        ch.queue_delete(replies)
        conn.close()
        standin.close()


def mpi_case(ranks: int, files: int, sleep: float) -> dict:
    """One case of benchmarks/mpi_scaling.py (ranks ready first, timed from the first publish)."""
    import mpi_scaling  # the benchmark's own runner, so the validation measures what it measures

    log_dir = tempfile.mkdtemp(prefix="scale-val-mpi-")
    bench = mpi_scaling.Bench(log_dir, os.path.join(REPO, "examples"))
    try:
        case = bench.case(f"sleep {sleep:g} s, {ranks} ranks", ranks, files, "ncsa.sleepy",
                          {"SLEEP_SECONDS": str(sleep)})
    finally:
        bench.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    return {"makespan": case["makespan"], "foreign": case["foreign"]}
