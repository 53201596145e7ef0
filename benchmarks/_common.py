"""Shared plumbing for the benchmarks: a stand-in in its own process, queues, machine facts."""
from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from typing import Any

import pika
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMQP_URL = os.environ.get("RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")


class StandinProcess:
    """The Clowder stand-in as a separate process, driven through its control API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "devtools.clowder_standin", "--port", "0"], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("standin: "), line
        self.url = line.split(" ", 1)[1]
        self.http = requests.Session()

    def add_files(self, n: int, content: bytes) -> list[str]:
        data = base64.b64encode(content).decode()
        return [self.http.post(self.url + "_standin/files", json={"name": f"f{i}.txt", "content_b64": data}).json()["id"]
                for i in range(n)]

    def metadata_times(self) -> list[float]:
        recs = self.http.get(self.url + "_standin/records", params={"kind": "metadata"}).json()
        return sorted(r["time"] for r in recs)

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
            f"pika {pika.__version__}, {platform.system()} {platform.release()}")


def write_report(lines: list[str], out: str) -> None:
    """Print a benchmark's markdown report and write it to out."""
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out, "w") as fh:
        fh.write(text)


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
