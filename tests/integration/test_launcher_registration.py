"""`launcher scale` registers its extractors on Clowder's `extractors` exchange, with no agent running.

Against the real broker (tests/conftest.py: with CI=true a missing broker is a failure). Each test
binds its own exclusive queue to the shared `extractors` fanout exchange and keeps only the
messages for its own queue names (other tests' agents register there too).
"""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CAPS = """\
max_array_size: 2
max_running: 2
max_queued: 2
max_walltime: "00:05:00"
cores_per_task: 1
"""


class Listener:
    """An exclusive queue bound to `extractors` (declared as pyclowder declares it), read with basic_get."""

    def __init__(self, url):
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.ch.exchange_declare("extractors", exchange_type="fanout", durable=True)
        self.name = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.name, "extractors")
        self.seen = []

    def wait_for(self, predicate, what, timeout=60.0):
        """Poll until predicate(messages seen) holds; fail naming what was awaited."""
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; saw {self.seen}"
            method, _props, body = self.ch.basic_get(self.name, auto_ack=True)
            if method is None:
                self.conn.process_data_events(time_limit=0.2)
                continue
            self.seen.append(json.loads(body))
        return self.seen

    def close(self):
        self.conn.close()


def plugin(root: Path, folder: str, info: dict) -> dict:
    (root / folder).mkdir(parents=True)
    (root / folder / "extractor_info.json").write_text(json.dumps(info))
    return info


def extractor_info(name):
    return {"@context": "http://clowder.ncsa.illinois.edu/contexts/extractors.jsonld", "name": name,
            "version": "1.2.3", "description": "registration test", "author": "tests",
            "contexts": [], "repository": [], "process": {"file": ["text/*"]}, "dependencies": [], "bibtex": []}


@pytest.fixture
def env(tmp_path, rabbitmq):
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    base = {k: v for k, v in os.environ.items()
            if k not in ("AGENT_PLUGIN", "AGENT_PLUGIN_PATH", "EXTRACTOR_KEY", "AGENT_EXTRACTOR_KEY",
                         "CLOWDER_EMAIL", "AGENT_CLOWDER_EMAIL", "HEARTBEAT", "LAUNCHER_HEARTBEAT")}
    return dict(base, LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"),
                LAUNCHER_SCHEDULER="slurm", RABBITMQ_URI=rabbitmq, AGENT_PLUGIN_PATH=str(tmp_path / "plugins"),
                PYTHONPATH=str(REPO))


@pytest.fixture
def listener(rabbitmq):
    lst = Listener(rabbitmq)
    yield lst
    lst.close()


def launcher(env, *argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "launcher", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_scale_loop_registers_every_heartbeat_while_no_agent_runs(env, listener, amqp_queue, tmp_path):
    """One queue (RABBITMQ_QUEUE renames the plugin's queue), empty: no job, registrations repeat."""
    name = f"test.registration.{uuid.uuid4().hex[:6]}"
    info = plugin(tmp_path / "plugins", "ext", extractor_info(name))
    env = dict(env, RABBITMQ_QUEUE=amqp_queue, AGENT_PLUGIN=name, CLOWDER_EMAIL="owner@example.org",
               HEARTBEAT="0.5")
    proc = launcher(env, "scale", "--interval", "30", "--metrics-bind", "127.0.0.1:0")
    try:
        address = re.search(r"http://127\.0\.0\.1:\d+/metrics", proc.stderr.readline())
        assert address, "scale announced no metrics address"
        ours = lambda seen: [m for m in seen if m.get("queue") == amqp_queue]  # noqa: E731
        listener.wait_for(lambda seen: len(ours(seen)) >= 3, "three registrations of the queue")
        status = subprocess.run([sys.executable, "-m", "launcher", "status", "--json"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        with urllib.request.urlopen(address.group(0), timeout=30) as resp:
            scraped = {(s.name, tuple(s.labels.items())): s.value
                       for fam in text_string_to_metric_families(resp.read().decode()) for s in fam.samples}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    messages = ours(listener.seen)
    assert set(messages[0]) == {"id", "queue", "owner", "extractor_info"}
    assert all(m == messages[0] for m in messages)  # the same extractor, the same instance id
    assert messages[0]["owner"] == "owner@example.org"
    assert messages[0]["extractor_info"] == info  # the plugin's extractor_info.json as it is
    assert messages[0]["id"]
    assert status.returncode == 0, status.stderr
    registration = json.loads(status.stdout)["registration"]
    assert registration["queues"][amqp_queue]["extractor"] == name
    assert registration["last_at"] is not None and registration["last_error"] is None
    assert registration["interval_s"] == 0.5
    assert not registration["problems"]
    registered_at = scraped[("clowder_hpc_registration_timestamp_seconds", (("queue", amqp_queue),))]
    assert registered_at >= registration["last_at"]  # the gauge is read later than status was


def test_scale_once_registers_each_of_several_private_queues(env, listener, rabbitmq, tmp_path):
    """RABBITMQ_QUEUE=a,b with EXTRACTOR_KEY: each private.<key>.<name> queue registered, as pyclowder does."""
    key = uuid.uuid4().hex[:10]
    names = [f"test.reg.a{uuid.uuid4().hex[:6]}", f"test.reg.b{uuid.uuid4().hex[:6]}"]
    infos = [plugin(tmp_path / "plugins", f"folder{i}", extractor_info(n)) for i, n in enumerate(names)]
    plugin(tmp_path / "plugins", "other", extractor_info(f"test.reg.unused{uuid.uuid4().hex[:6]}"))
    queues = [f"private.{key}.{n}" for n in names]
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq))
    ch = conn.channel()
    try:
        for q in queues:
            ch.queue_declare(q, durable=True)
        env = dict(env, RABBITMQ_QUEUE=",".join(queues), AGENT_PLUGIN=f"{names[1]} folder0", EXTRACTOR_KEY=key)
        done = subprocess.run([sys.executable, "-m", "launcher", "scale", "--once"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        listener.wait_for(lambda seen: {m.get("queue") for m in seen} >= set(queues), "both queues registered")
    finally:
        for q in queues:
            ch.queue_delete(q)
        conn.close()
    by_queue = {m["queue"]: m for m in listener.seen if m.get("queue") in queues}
    for queue, info in zip(queues, infos):
        message = by_queue[queue]
        assert message["owner"] == ""  # no CLOWDER_EMAIL: pyclowder sends ""
        assert message["extractor_info"] == dict(info, unique_key=key)  # pyclowder's Connector adds it
    assert by_queue[queues[0]]["id"] != by_queue[queues[1]]["id"]
    assert not any(m.get("extractor_info", {}).get("name", "").startswith("test.reg.unused")
                   for m in listener.seen)


def test_queue_without_a_plugin_is_said_and_not_registered(env, amqp_queue, tmp_path):
    """Two queues, no plugin named like either: one line each on stderr and in status, nothing sent."""
    plugin(tmp_path / "plugins", "a", extractor_info(f"test.reg.x{uuid.uuid4().hex[:6]}"))
    env = dict(env, RABBITMQ_QUEUE=f"{amqp_queue},error.{amqp_queue}")
    done = subprocess.run([sys.executable, "-m", "launcher", "scale", "--once"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"registration: queue {amqp_queue!r}: no plugin's extractor_info names it" in done.stderr
    status = subprocess.run([sys.executable, "-m", "launcher", "status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "registered never (none; every 60 s)" in status.stdout
    assert f"queue 'error.{amqp_queue}': no plugin's extractor_info names it" in status.stdout
