"""`python -m launcher metrics` against the real broker and a real ledger, scraped over HTTP.

The fixtures come from tests/conftest.py (with CI=true a missing broker is a failure).
"""
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpc_common.reports import EXCHANGE, report, window_queue
from launcher.ledger import Ledger
from launcher.states import JobState
from launcher.strategy import Case

REPO = Path(__file__).resolve().parents[2]
CAPS = """\
max_array_size: 5
max_running: 4
max_queued: 6
max_walltime: "00:05:00"
cores_per_task: 1
node_hours: {budget: 12, period: day}
"""


@pytest.fixture
def env(tmp_path, rabbitmq, amqp_queue):
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    e = dict(os.environ, LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"),
             LAUNCHER_SCHEDULER="slurm", RABBITMQ_URI=rabbitmq, RABBITMQ_QUEUE=amqp_queue,
             PYTHONPATH=str(REPO))
    yield e
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq))
    try:
        conn.channel().queue_delete(window_queue(amqp_queue))
    finally:
        conn.close()


@contextlib.contextmanager
def confirmed_channel(url):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        yield ch
    finally:
        conn.close()


def publish(url, queue, n):
    with confirmed_channel(url) as ch:
        for i in range(n):
            ch.basic_publish("", queue, json.dumps({"id": f"file-{i}"}).encode(),
                             pika.BasicProperties(delivery_mode=2))


def publish_reports(url, queue, reports):
    """As agents do (agent.sources.amqp): to the reports exchange, routing key = queue."""
    from hpc_common.reports import WINDOW_QUEUE_ARGUMENTS

    with confirmed_channel(url) as ch:
        ch.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
        ch.queue_declare(window_queue(queue), durable=True, arguments=WINDOW_QUEUE_ARGUMENTS)
        ch.queue_bind(window_queue(queue), EXCHANGE, routing_key=queue)
        for r in reports:
            ch.basic_publish(EXCHANGE, queue, json.dumps(r).encode())


class Server:
    """`python -m launcher metrics --bind 127.0.0.1:0`; the bound port is read from its stderr."""

    def __init__(self, env, *argv):
        argv = argv or ("metrics", "--bind", "127.0.0.1:0")
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", *argv],
                                     cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, f"no address announced: {line!r} (exit {self.proc.poll()})"
        self.url = f"http://127.0.0.1:{m.group(1)}/metrics"

    def scrape(self):
        with urllib.request.urlopen(self.url, timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc.stderr.close()


def test_backlog_and_task_states_with_no_agent(env, rabbitmq, amqp_queue):
    """The issue's contract: N messages waiting, no agent."""
    publish(rabbitmq, amqp_queue, 7)
    server = Server(env)
    try:
        s = server.scrape()
    finally:
        server.close()
    q = (("queue", amqp_queue),)
    assert s[("clowder_hpc_backlog", q)] == 7
    assert s[("clowder_hpc_broker_ready", q)] == 7
    assert s[("clowder_hpc_broker_consumers", q)] == 0
    assert s[("clowder_hpc_broker_up", q)] == 1
    for state in JobState:
        assert s[("clowder_hpc_tasks", (("state", state.value),))] == 0
    assert s[("clowder_hpc_files_done_total", q)] == 0
    assert s[("clowder_hpc_node_hours_budget", ())] == 12
    assert s[("clowder_hpc_node_hours_used", ())] == 0
    for case in Case:
        assert s[("clowder_hpc_scale_decisions_total", (("case", case.value),))] == 0
    assert s[("clowder_hpc_scrape_ok", ())] == 1


def test_values_follow_the_ledger_and_agent_reports_at_each_scrape(env, rabbitmq, amqp_queue, tmp_path):
    """Scrapes read fresh data: a decision, tasks and agent reports added between two scrapes show up."""
    publish(rabbitmq, amqp_queue, 3)
    server = Server(env)
    try:
        first = server.scrape()
        ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
        now = time.time()
        sub, _name = ledger.begin_submission("slurm", 2, 300, None, None, 2, 1.0, "x.sh", now - 120)
        ledger.record_submitted(sub, "4242", now - 120)
        from launcher.schedulers.base import JobStatus, TaskStatus
        ledger.apply_status(JobStatus("4242", {
            1: TaskStatus(1, JobState.RUNNING, "RUNNING", start_time=now - 100),
            2: TaskStatus(2, JobState.COMPLETED, "COMPLETED", exit_status=0, start_time=now - 100,
                          end_time=now - 10)}), now)
        from launcher.strategy import Decision
        ledger.record_decision(Decision(Case.SCALE_UP, submit=2, reasons=("backlog 3",)), {}, "4242", now)
        ledger.close()
        publish_reports(rabbitmq, amqp_queue, [
            report("a1", amqp_queue, "4242[1]", 30, 5, 1, 10.0, now=now - 40, dead_lettered=1, slots=1),
            report("a1", amqp_queue, "4242[1]", 30, 4, 0, 8.0, now=now - 10, slots=1)])
        second = server.scrape()
        third = server.scrape()  # reports read twice are counted once
    finally:
        server.close()
    q = (("queue", amqp_queue),)
    assert first[("clowder_hpc_tasks", (("state", "running"),))] == 0
    assert second[("clowder_hpc_tasks", (("state", "running"),))] == 1
    assert second[("clowder_hpc_tasks", (("state", "completed"),))] == 1
    assert second[("clowder_hpc_scale_decisions_total", (("case", "scale_up"),))] == 1
    assert third[("clowder_hpc_files_done_total", q)] == 9
    assert third[("clowder_hpc_files_failed_total", q)] == 1
    assert third[("clowder_hpc_dead_lettered_total", q)] == 1
    assert third[("clowder_hpc_seconds_per_file", q)] == pytest.approx(18.0 / 10, abs=0.01)
    assert third[("clowder_hpc_node_hours_used", ())] > 0
    assert third[("clowder_hpc_backlog", q)] == 3


def test_scale_serves_the_same_metrics_while_it_runs(env):
    """`scale --metrics-bind`: an empty queue gives idle_wait decisions, counted as they are made."""
    server = Server(env, "scale", "--interval", "1", "--metrics-bind", "127.0.0.1:0")
    try:
        deadline = time.monotonic() + 60
        s = server.scrape()
        while s[("clowder_hpc_scale_decisions_total", (("case", "idle_wait"),))] < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            s = server.scrape()
    finally:
        server.close()
    assert server.proc.returncode == 0  # SIGTERM ends the loop cleanly
    assert s[("clowder_hpc_scale_decisions_total", (("case", "idle_wait"),))] >= 2
    assert s[("clowder_hpc_scale_decisions_total", (("case", "scale_up"),))] == 0
    assert s[("clowder_hpc_backlog", (("queue", env["RABBITMQ_QUEUE"]),))] == 0


def test_broker_down_still_answers(env):
    env = dict(env, RABBITMQ_URI="amqp://guest:guest@127.0.0.1:1/%2f")
    server = Server(env)
    try:
        s = server.scrape()
    finally:
        server.close()
    assert s[("clowder_hpc_broker_up", (("queue", env["RABBITMQ_QUEUE"]),))] == 0
    assert ("clowder_hpc_backlog", (("queue", env["RABBITMQ_QUEUE"]),)) not in s
    assert s[("clowder_hpc_tasks", (("state", "queued"),))] == 0


def test_port_in_use_is_one_clear_line(env):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        port = sock.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "launcher", "metrics", "--bind", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "launcher", "metrics", "--bind", "nonsense"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr



def _emitted_names(tmp_path):
    """Sample names the launcher's and the relay's collectors emit for a snapshot with every field."""
    import threading
    from launcher.metrics import families
    from launcher.relay.metrics import RelayMetrics

    ledger = Ledger(tmp_path / "ledger.sqlite")
    data = {"broker": {"queue": "q", "uri": "amqp://x", "ready": 1, "unacked": 0, "consumers": 0,
                       "per_file_seconds": 1.0},
            "backlog": {"total": 1, "broker_ready": 1}, "tasks": {}, "tasks_this_period": {},
            "files_per_minute": 1.0, "node_hours": {"used": 0.0, "committed": 0.0, "budget": 1.0},
            "registration": {"last_at": 1.0, "queues": {"q": {"extractor": "x"}}}}
    names = {s.name for fam in families(data, ledger) for s in fam.samples}
    ledger.close()

    class Store:
        def counts(self):
            return {"ready": 0, "leased": 0, "dead": 0}

    class Broker:
        connected = threading.Event()

    relay = RelayMetrics(Store(), Broker(), "q")
    relay.observe("/v1/lease", 200, forwarded=False)
    names |= {s.name for fam in relay.collect() for s in fam.samples}
    return names


def test_dashboard_and_readme_use_only_metrics_that_exist(tmp_path):
    """The Grafana dashboard and launcher/README.md name metrics the collectors really emit."""
    emitted = _emitted_names(tmp_path) | {"clowder_hpc_scrape_ok"}
    used = set(re.findall(r"clowder_hpc_\w+", (REPO / "launcher/monitoring/grafana-dashboard.json").read_text()))
    assert used and used <= emitted, used - emitted
    documented = set(re.findall(r"`(clowder_hpc_\w+)", (REPO / "launcher/README.md").read_text()))
    for name in ("clowder_hpc_backlog", "clowder_hpc_broker_ready", "clowder_hpc_tasks", "clowder_hpc_files_done_total",
                 "clowder_hpc_files_failed_total", "clowder_hpc_dead_lettered_total", "clowder_hpc_seconds_per_file",
                 "clowder_hpc_node_hours_used", "clowder_hpc_node_hours_budget", "clowder_hpc_scale_decisions_total"):
        assert name in emitted and name in documented, name
    assert documented <= emitted, documented - emitted
