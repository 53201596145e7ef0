"""Drive a real agent process against a real RabbitMQ queue and a Clowder stand-in.

Used by the agent's integration tests: publish v1/v2 messages for files registered in the
stand-in, run `python -m agent run` as a subprocess (or several), then read what reached
Clowder (stand-in records), the reply_to queue (status messages) and error.<queue>.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Optional

import pika
import pytest

from devtools.amqp_queues import companion_queues, delete_queues

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_PLUGINS = os.path.join(REPO, "tests", "plugins")
EXAMPLES = os.path.join(REPO, "examples")


class AgentHarness:
    """One queue, one stand-in, any number of agent processes."""

    def __init__(self, amqp_url: str, queue: str, standin: Any, tmp_path: Any, key: str = "secret") -> None:
        self.url = amqp_url
        self.queue = queue
        self.reply_queue = "reply." + queue
        self.standin = standin
        self.tmp = tmp_path
        self.key = key
        self.journal_dir = str(tmp_path / "journal")
        self.directive_log = str(tmp_path / "directive.log")
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)open the harness's own broker connection, e.g. after a broker restart."""
        params = pika.URLParameters(self.url)
        params.heartbeat = 0  # the test may wait minutes without pika I/O: no heartbeat to miss
        self._conn = pika.BlockingConnection(params)
        self.ch = self._conn.channel()
        queue = self.queue
        self.ch.queue_declare(queue, durable=True)
        self.ch.queue_declare("error." + queue, durable=True)
        self.ch.queue_declare(self.reply_queue, durable=True)

    # -- messages --------------------------------------------------------------------------------
    def add_file(self, content: bytes, name: str = "input.txt") -> str:
        return self.standin.add_file(name=name, content=content, dataset_id="ds-" + self.queue)

    def v1_body(self, file_id: str, name: str = "input.txt", **extra: Any) -> dict[str, Any]:
        body = {"notifies": [], "msgid": uuid.uuid4().hex, "id": file_id, "jobid": "job-" + file_id,
                "intermediateId": file_id, "fileSize": "10", "host": self.standin.url,
                "datasetId": "ds-" + self.queue, "flags": "", "secretKey": self.key,
                "routing_key": "clowder.file.text.plain", "source": {}, "activity": "created",
                "target": {}, "filename": name, "parameters": {}}
        body.update(extra)
        return body

    def v2_body(self, file_id: str, name: str = "input.txt", size: int = 10) -> dict[str, Any]:
        return {"host": self.standin.url, "secretKey": self.key, "retry_count": 0, "resource_type": "file",
                "flags": "", "filename": name, "fileSize": size, "id": file_id, "datasetId": "ds-" + self.queue,
                "job_id": "job-" + file_id, "parameters": {}}

    def publish(self, body: Any, v2: bool = False, raw: Optional[bytes] = None, headers: Optional[dict] = None) -> None:
        if v2:
            props = pika.BasicProperties(content_type="application/json", reply_to=self.reply_queue,
                                         delivery_mode=1, headers=headers)
        else:
            props = pika.BasicProperties(content_type="application/json", correlation_id=str(uuid.uuid4()),
                                         reply_to=self.reply_queue, delivery_mode=2, headers=headers)
        data = raw if raw is not None else json.dumps(body).encode()
        self.ch.basic_publish("", self.queue, data, props)

    def publish_file(self, content: bytes, name: str = "input.txt", v2: bool = False) -> str:
        file_id = self.add_file(content, name)
        size = len(content)  # as Clowder sends it: v1 a string, v2 a number
        self.publish(self.v2_body(file_id, name, size) if v2 else self.v1_body(file_id, name, fileSize=str(size)), v2=v2)
        return file_id

    # -- agents ----------------------------------------------------------------------------------
    def env(self, **extra: Any) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RABBITMQ_URI": self.url, "RABBITMQ_QUEUE": self.queue,
                    "AGENT_PLUGIN_PATH": f"{TEST_PLUGINS}:{EXAMPLES}", "AGENT_PLUGIN": "test.directive",
                    "AGENT_JOURNAL_DIR": self.journal_dir, "DIRECTIVE_LOG": self.directive_log,
                    "AGENT_RETRY_BACKOFF": "0.2", "PYTHONPATH": REPO})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start_agent(self, *args: str, **env: Any) -> subprocess.Popen:
        log_path = str(self.tmp / f"agent-{len(self.procs)}.log")
        self.logs.append(log_path)
        out = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args], env=self.env(**env), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def run_agent(self, *args: str, timeout: float = 120, **env: Any) -> int:
        proc = self.start_agent(*args, **env)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"agent did not exit within {timeout}s; log:\n{self.log_text()}")

    def log_text(self) -> str:
        parts = []
        for path in self.logs:
            with open(path, "rb") as fh:
                parts.append(fh.read().decode("utf-8", "replace"))
        return "\n".join(parts)

    def runs(self) -> list[list[str]]:
        """Lines the directive extractor logged: [file id, pid, verb] per extraction started."""
        if not os.path.exists(self.directive_log):
            return []
        with open(self.directive_log) as fh:
            return [line.split() for line in fh if line.strip()]

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; log:\n{self.log_text()}")

    # -- what came out ---------------------------------------------------------------------------
    def drain(self, queue: str) -> list[tuple[Any, bytes]]:
        out = []
        while True:
            method, props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))

    def statuses(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.drain(self.reply_queue)]

    def errors(self) -> list[tuple[Any, bytes]]:
        return self.drain("error." + self.queue)

    def registrations(self) -> Any:
        """Listen on the `extractors` fanout; the returned function gives the times this queue's
        registrations were seen since its last call (other engineers' agents share the exchange)."""
        ch = self._conn.channel()
        ch.exchange_declare("extractors", exchange_type="fanout", durable=True)
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "extractors")

        def seen() -> list[float]:
            out = []
            while True:
                method, _props, body = ch.basic_get(q, auto_ack=True)
                if method is None:
                    return out
                if json.loads(body).get("queue") == self.queue:
                    out.append(time.monotonic())
        return seen

    def depth(self) -> int:
        return self.ch.queue_declare(self.queue, durable=True, passive=True).method.message_count

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        try:
            self.ch.queue_delete(self.reply_queue)
            self._conn.close()
        except pika.exceptions.AMQPError:
            pass


def assert_each_to_its_plugin(standin: Any, directive_ids: list[str], word_ids: list[str], directive: str) -> None:
    """Two plugins in one agent: the directive extractor's files (tests/plugins/directive) carry only its
    metadata, the word counter's (tests/plugins/simple_wc, three words each) only its own."""
    for fid in directive_ids:
        (md,) = standin.metadata_for(fid)
        assert md["content"]["directive"] == directive and "words" not in md["content"]
    for fid in word_ids:
        (md,) = standin.metadata_for(fid)
        assert md["content"]["words"] == "3" and "directive" not in md["content"]


@pytest.fixture
def harness(rabbitmq: str, amqp_queue: str, tmp_path: Any):
    """An AgentHarness on a fresh queue with its own Clowder stand-in (import it into a test module)."""
    from devtools.clowder_standin import ClowderStandin

    with ClowderStandin() as standin:
        h = AgentHarness(rabbitmq, amqp_queue, standin, tmp_path)
        try:
            yield h
        finally:
            h.close()


@pytest.fixture
def second_harness(harness: AgentHarness, rabbitmq: str):
    """A harness on a second fresh queue with the first one's stand-in and folder (two plugins in one agent)."""
    h = AgentHarness(rabbitmq, f"test-{uuid.uuid4().hex[:8]}", harness.standin, harness.tmp)
    try:
        yield h
    finally:
        try:
            delete_queues(h.ch, companion_queues(h.queue))
        except pika.exceptions.AMQPError:
            pass
        h.close()


@pytest.fixture
def chaos_harness(chaos_rabbitmq: tuple[str, str], tmp_path: Any):
    """An AgentHarness on the restartable broker node (conftest's chaos_rabbitmq), fresh queue.

    ``harness.node`` is the node name for ``rabbitmqctl -n``. Mark the test
    ``xdist_group("chaos-broker")``: only one test at a time may stop that node.
    """
    from devtools.clowder_standin import ClowderStandin

    url, node = chaos_rabbitmq
    with ClowderStandin() as standin:
        h = AgentHarness(url, f"test-{uuid.uuid4().hex[:8]}", standin, tmp_path)
        h.node = node
        try:
            yield h
        finally:
            h.close()
            try:
                h.reconnect()
                delete_queues(h.ch, companion_queues(h.queue))
                h._conn.close()
            except pika.exceptions.AMQPError as exc:
                print(f"chaos_harness: could not delete {h.queue}: {exc!r}")
