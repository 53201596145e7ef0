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
from _common import AMQP_URL, REPO, StandinProcess, fresh_queue, publish  # noqa: E402


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
def broker_ops_per_s(messages: int = 3000) -> float:
    """Persistent publish, delivery and ack of `messages` on one fresh queue: operations per second."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    queue = fresh_queue(ch, "scale-cal")
    try:
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
    finally:
        ch.queue_delete(queue)
        ch.queue_delete("error." + queue)
        conn.close()
    return 3 * messages / elapsed


def clowder_probe(requests_per_client: int = 300, clients: int = 4) -> tuple[float, float]:
    """The stand-in's (one-client median latency s, requests/s under `clients` concurrent clients)."""
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
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rate = clients * requests_per_client / (time.perf_counter() - started)
    finally:
        standin.close()
    return statistics.median(latencies), rate


def task_start_s(agent_start_s: float, tries: int = 3) -> float:
    """Median time from sbatch to the first result of a 0 s file (a one-task array), minus the agent's
    own start-up: the scheduler's start latency plus the job script's work."""
    return statistics.median(array_case(1, 1, 0.0, idle_exit=1)["makespan"] for _ in range(tries)) - agent_start_s


def calibrate(agent_start_s: float, log: Callable[[str], None] = print) -> dict[str, float]:
    """Measure the machine-dependent constants (medians of three) and return them by Costs name."""
    log(f"machine: {machine_state()}")
    broker = statistics.median(broker_ops_per_s() for _ in range(3))
    probes = [clowder_probe() for _ in range(3)]
    latency = statistics.median(p[0] for p in probes)
    rate = statistics.median(p[1] for p in probes)
    start = task_start_s(agent_start_s)
    service = 1.0 / rate
    return {"broker_ops_per_s": round(broker), "clowder_service_s": round(service, 6),
            "clowder_rtt_s": round(max(0.0, latency - service), 6), "task_start_s": round(start, 2)}


# -- validation cases ------------------------------------------------------------------------------
def _agent_env(queue: str, sleep: float, tmp: str) -> dict[str, str]:
    return dict(os.environ, RABBITMQ_URI=AMQP_URL, RABBITMQ_QUEUE=queue, PYTHONPATH=REPO,
                AGENT_PLUGIN="ncsa.sleepy", AGENT_PLUGIN_PATH=os.path.join(REPO, "examples"),
                SLEEP_SECONDS=str(sleep), AGENT_LOG_LEVEL="WARNING", AGENT_JOURNAL_DIR=os.path.join(tmp, "journal"),
                AGENT_LOG_DIR=os.path.join(tmp, "logs"), AGENT_HOME=REPO,
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def array_case(tasks: int, files: int, sleep: float, idle_exit: float, timeout: float = 600) -> dict:
    """`sbatch --array=1-K pbs/agent_array.slurm` over `files` waiting sleep-extractor files.

    Makespan = sbatch to the last metadata upload (queue wait and start-up included). Also returns
    the stand-in's API requests per file.
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
        counts = standin.http.get(standin.url + "_standin/counts").json()["requests"]
        shutil.rmtree(tmp, ignore_errors=True)
        return {"makespan": times[-1] - t0, "requests_per_file": sum(counts.values()) / files}
    finally:
        if job:
            subprocess.run(["scancel", job], capture_output=True)
        ch.queue_delete(queue)
        ch.queue_delete("error." + queue)
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
