"""Several plugins in one agent (`--plugin a,b`), against a real RabbitMQ and the Clowder stand-in.

Plugin a is tests/plugins/directive (a class extractor), plugin b tests/plugins/simple_wc (a
function extractor); each consumes a fresh queue of this test, named in the `plugins:` table.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.agent_harness import (REPO, TEST_PLUGINS, AgentHarness, assert_each_to_its_plugin,  # noqa: F401
                                   harness, second_harness)

pytestmark = pytest.mark.integration
A, B = "test.directive", "test.simple.wc"


@pytest.fixture
def second(second_harness):
    """Plugin b's queue: a second fresh queue, same stand-in."""
    return second_harness


def _table(a: AgentHarness, b: AgentHarness, **extra_a: object) -> str:
    return json.dumps({A: {"rabbitmq_queue": a.queue, **extra_a}, B: {"rabbitmq_queue": b.queue}})


def _env(a: AgentHarness, b: AgentHarness, **extra_a: object) -> dict[str, str]:
    # RABBITMQ_QUEUE names one queue: with two plugins each one's queue comes from the table.
    return {"RABBITMQ_QUEUE": "", "AGENT_PLUGIN_PATH": TEST_PLUGINS, "AGENT_PLUGINS": _table(a, b, **extra_a)}


def _consumers(h: AgentHarness, queue: str) -> int:
    return h.ch.queue_declare(queue, durable=True, passive=True).method.consumer_count


def _agent_connections(pid: int) -> int:
    """Broker connections whose name is an agent of this process id (agent ids hold the pid)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "client_properties"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return sum(1 for line in out.splitlines() if "clowder-hpc-agent" in line and f"-{pid}-" in line)


def test_each_queue_goes_to_its_own_extractor_over_one_connection(harness, second):
    a_ids = [harness.publish_file(b"sleep 0.5\n", name=f"a{i}.txt") for i in range(6)]
    b_ids = [second.publish_file(b"one two three\n", name=f"b{i}.txt") for i in range(4)]
    proc = harness.start_agent("--plugin", f"{A},{B}", "--idle-exit", "3", **_env(harness, second, slots=2))
    harness.wait_for(lambda: _consumers(harness, harness.queue) == 1 and _consumers(harness, second.queue) == 1,
                     90, "both queues consumed")
    assert _agent_connections(proc.pid) == 1
    assert proc.wait(timeout=120) == 0, harness.log_text()
    assert_each_to_its_plugin(harness.standin, a_ids, b_ids, "sleep")  # queue a's went to the directive one only
    runs = harness.runs()  # what the directive extractor was given: a's files, each once
    assert sorted(r[0] for r in runs) == sorted(a_ids)
    assert len(collections.Counter(pid for _, pid, _ in runs)) == 2  # plugin a's two slots
    assert harness.depth() == 0 and second.depth() == 0
    done = {s["file_id"]: s["status"] for s in harness.statuses() + second.statuses()}
    assert all(done[f] == "StatusMessage.done: Done processing." for f in a_ids + b_ids)
    text = harness.log_text()
    assert f"queue {harness.queue}, 2 slot(s)" in text and f"queue {second.queue}, 1 slot(s)" in text
    assert "idle for 3s (every queue)" in text


def test_poison_goes_to_the_error_queue_of_its_own_plugin(harness, second):
    bad = harness.publish_file(b"abort\n")
    good = second.publish_file(b"a b\n")
    code = harness.run_agent("--plugin", f"{A},{B}", "--idle-exit", "2", **_env(harness, second))
    assert code == 0, harness.log_text()
    errors = harness.errors()
    assert len(errors) == 1 and json.loads(errors[0][1])["id"] == bad
    assert second.errors() == [] and second.depth() == 0
    assert harness.standin.metadata_for(good)[0]["content"]["words"] == "2"


def _registrations(h: AgentHarness):
    """Listen on the `extractors` fanout: the returned function gives {queue: extractor_info name} seen."""
    ch = h._conn.channel()
    ch.exchange_declare("extractors", exchange_type="fanout", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "extractors")

    def seen() -> dict:
        out = {}
        while True:
            method, _props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                return out
            message = json.loads(body)
            out[message.get("queue")] = message.get("extractor_info", {}).get("description")
    return seen


def test_each_plugin_has_its_own_retries_time_limit_and_registration(harness, second):
    seen = _registrations(harness)
    failing = harness.publish_file(b"raise\n")
    slow = harness.publish_file(b"sleep 30\n")
    words = second.publish_file(b"three more words\n")
    # a: no retries and a 2 s limit; b: the agent-wide defaults (3 retries, no limit)
    code = harness.run_agent("--plugin", f"{A},{B}", "--idle-exit", "2",
                             **_env(harness, second, max_retries=0, time_limit=2))
    assert code == 0, harness.log_text()
    dead = sorted(json.loads(body)["id"] for _, body in harness.errors())
    assert dead == sorted([failing, slow])  # one attempt each: a's max_retries 0; the slow one killed at 2 s
    assert [r[0] for r in harness.runs()].count(failing) == 1
    assert second.errors() == [] and second.standin.metadata_for(words)
    assert harness.log_text().count("gave up after 1 attempt(s)") == 2
    registered = seen()
    assert registered.get(harness.queue, "").startswith("Test extractor: the file's first line")
    assert registered.get(second.queue, "").startswith("Test function extractor")


def test_idle_exit_waits_for_every_queue(harness, second):
    """Plugin b idles for longer than idle_exit while a works: the agent stays, and b still takes work."""
    slow = harness.publish_file(b"sleep 6\n")
    proc = harness.start_agent("--plugin", f"{A},{B}", "--idle-exit", "2", **_env(harness, second))
    harness.wait_for(lambda: len(harness.runs()) == 1, 90, "plugin a to start its file")
    # a's file takes 6 s: by its results, b has been idle for three times idle_exit. An agent that
    # left on b's idleness would have killed a's extraction and these results would never come.
    harness.wait_for(lambda: harness.standin.metadata_for(slow), 90, "plugin a's results")
    assert proc.poll() is None, harness.log_text()
    late = second.publish_file(b"late words here\n")  # a's own idle_exit has just begun: b takes this
    assert proc.wait(timeout=120) == 0, harness.log_text()
    assert harness.standin.metadata_for(slow) and harness.standin.metadata_for(late)[0]["content"]["words"] == "3"


def test_slot_split_from_the_environment(harness, second):
    ids = [harness.publish_file(b"sleep 0.5\n", name=f"s{i}.txt") for i in range(4)]
    code = harness.run_agent("--plugin", f"{A},{B}", "--idle-exit", "2", AGENT_SLOTS=f"{A}:2,{B}:1",
                             **_env(harness, second))
    assert code == 0, harness.log_text()
    assert len(collections.Counter(pid for _, pid, _ in harness.runs())) == 2
    assert all(harness.standin.metadata_for(f) for f in ids)


@pytest.mark.parametrize("case, expected", [
    ("same-queue", "both consume queue"),
    ("unknown-in-split", "slots: nope is not a plugin this agent serves"),
    ("rabbitmq-queue", "rabbitmq_queue (RABBITMQ_QUEUE) names one queue but the agent serves 2 plugins"),
    ("spool", "both claim from spool dir"),
])
def test_bad_combinations_are_refused_before_any_message(harness, second, tmp_path, case, expected):
    fid = harness.publish_file(b"ok\n")
    env = _env(harness, second)
    if case == "same-queue":
        env["AGENT_PLUGINS"] = json.dumps({A: {"rabbitmq_queue": harness.queue},
                                           B: {"rabbitmq_queue": harness.queue}})
    elif case == "unknown-in-split":
        env["AGENT_SLOTS"] = f"{A}:2,nope:1"
    elif case == "rabbitmq-queue":
        env.update(RABBITMQ_QUEUE=harness.queue, AGENT_PLUGINS="{}")
    else:
        env.update(AGENT_SOURCE="spool", AGENT_SPOOL_DIR=str(tmp_path))
    code = harness.run_agent("--plugin", f"{A},{B}", "--idle-exit", "2", **env)
    log = harness.log_text()
    assert code == 2, log
    assert expected in log and "Traceback" not in log
    assert len([line for line in log.splitlines() if "ERROR" in line]) == 1
    assert harness.depth() == 1 and not harness.standin.metadata_for(fid)


def test_yaml_list_of_plugins(harness, second, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(f"plugin: [{A}, {B}]\nplugins:\n  {A}: {{rabbitmq_queue: {harness.queue}}}\n"
                      f"  {B}: {{rabbitmq_queue: {second.queue}, slots: 2}}\n")
    a, b = harness.publish_file(b"ok\n"), second.publish_file(b"x y\n")
    code = harness.run_agent("--idle-exit", "2", AGENT_CONFIG=str(config), RABBITMQ_QUEUE="",
                             AGENT_PLUGIN="", AGENT_PLUGIN_PATH=TEST_PLUGINS)
    assert code == 0, harness.log_text()
    assert harness.standin.metadata_for(a) and harness.standin.metadata_for(b)
    assert f"queue {second.queue}, 2 slot(s)" in harness.log_text()


# -- the launcher, for agents serving several plugins ------------------------------------------------
def test_launcher_status_shows_each_queue_and_their_sum(harness, second, tmp_path):
    for _ in range(3):
        harness.publish_file(b"ok\n")
    for _ in range(2):
        second.publish_file(b"x\n")
    caps = tmp_path / "caps.yaml"
    caps.write_text("max_array_size: 5\nmax_running: 4\nmax_queued: 6\nmax_walltime: \"00:05:00\"\ncores_per_task: 1\n")
    env = dict(os.environ, LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"),
               LAUNCHER_SCHEDULER="slurm", RABBITMQ_URI=harness.url, PYTHONPATH=REPO,
               AGENT_JOURNAL_DIR=str(tmp_path / "journal"))
    env.pop("RABBITMQ_QUEUE", None)
    argv = [sys.executable, "-m", "launcher", "status", "--rabbitmq-queue", harness.queue,
            "--rabbitmq-queue", second.queue]
    out = subprocess.run(argv + ["--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["broker"]["ready"] == 5 and data["backlog"]["total"] == 5  # today's keys: the total
    assert {q: v["ready"] for q, v in data["queues"].items()} == {harness.queue: 3, second.queue: 2}
    assert data["queues"][second.queue]["backlog"]["total"] == 2
    text = subprocess.run(argv, env=dict(env, RABBITMQ_QUEUE=f"{harness.queue},{second.queue}"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert f"{second.queue}  ready 2" in text.stdout and "backlog    5 waiting" in text.stdout


def _agent_connection_pid(pid: int) -> str:
    """The broker's (Erlang) id of the agent process's connection, for rabbitmqctl close_connection."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    (name,) = [line.split("\t")[0] for line in out.splitlines() if "clowder-hpc-agent" in line and f"-{pid}-" in line]
    return name


def test_sigterm_hands_back_both_plugins_work(harness, second):
    a_ids = [harness.publish_file(b"sleep 30\n", name=f"a{i}.txt") for i in range(2)]
    proc = harness.start_agent("--plugin", f"{A},{B}", "--stop-grace", "1", **_env(harness, second))
    harness.wait_for(lambda: len(harness.runs()) == 1, 90, "plugin a to start a file")
    b_id = second.publish_file(b"words\n")
    harness.wait_for(lambda: bool(harness.standin.metadata_for(b_id)), 60, "plugin b to process its file")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, harness.log_text()
    # the running file and the one waiting for a slot are back in a's queue, not failed
    harness.wait_for(lambda: harness.depth() == 2, 10, "a's files back in its queue")
    assert harness.errors() == [] and second.depth() == 0 and not any(harness.standin.metadata_for(f) for f in a_ids)


def test_a_lost_connection_comes_back_for_every_queue(harness, second):
    """The broker closes the agent's one connection: both queues are consumed again after the reconnect."""
    # idle_exit well above what rabbitmqctl takes on a loaded machine: the agent must still be there
    proc = harness.start_agent("--plugin", f"{A},{B}", "--idle-exit", "15", **_env(harness, second))
    harness.wait_for(lambda: _consumers(harness, harness.queue) == 1 and _consumers(harness, second.queue) == 1,
                     90, "both queues consumed")
    subprocess.run(["rabbitmqctl", "-q", "close_connection", _agent_connection_pid(proc.pid), "test"],
                   check=True, capture_output=True, timeout=30)
    harness.wait_for(lambda: "reconnected" in harness.log_text(), 60, "the agent to reconnect")
    harness.wait_for(lambda: _consumers(harness, harness.queue) == 1 and _consumers(harness, second.queue) == 1,
                     30, "both queues consumed again")
    assert _agent_connections(proc.pid) == 1
    a, b = harness.publish_file(b"ok\n"), second.publish_file(b"one two\n")
    assert proc.wait(timeout=120) == 0, harness.log_text()
    assert harness.standin.metadata_for(a) and harness.standin.metadata_for(b)[0]["content"]["words"] == "2"
    assert "Traceback" not in harness.log_text()


@pytest.mark.mpi
def test_two_plugins_under_mpi_one_connection_per_group(harness, second, mpi):
    """mpiexec -n 2: every rank runs both plugins' extractors; only the leader consumes, once per queue."""
    a_ids = [harness.publish_file(b"sleep 0.4\n", name=f"a{i}.txt") for i in range(8)]
    b_ids = [second.publish_file(b"one two three four\n", name=f"b{i}.txt") for i in range(4)]
    env = harness.env(**_env(harness, second))
    env["PATH"] = os.path.dirname(str(mpi)) + os.pathsep + env.get("PATH", "")
    log_path = harness.tmp / "mpi.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(mpi), "-n", "2", sys.executable, "-m", "agent", "run", "--plugin", f"{A},{B}",
                                 "--idle-exit", "3"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    seen = set()
    try:
        while proc.poll() is None:
            seen.add((_consumers(harness, harness.queue), _consumers(harness, second.queue)))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert proc.returncode == 0, text
    assert {a for a, _ in seen} <= {0, 1} and {b for _, b in seen} <= {0, 1}, seen  # one consumer per queue
    assert (1, 1) in seen
    for fid in a_ids:
        assert harness.standin.metadata_for(fid)[0]["content"]["directive"] == "sleep", text
    assert all(second.standin.metadata_for(f)[0]["content"]["words"] == "4" for f in b_ids), text
    runs = harness.runs()
    assert sorted(r[0] for r in runs) == sorted(a_ids)
    assert len(collections.Counter(pid for _, pid, _ in runs)) == 2, runs  # a's files spread over both ranks
    assert harness.depth() == 0 and second.depth() == 0 and "Traceback" not in text
