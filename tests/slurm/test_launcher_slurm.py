"""The launcher against the real single-node Slurm (and RabbitMQ for scaling).

Run by CI after scripts/services.sh. The fixtures come from tests/conftest.py: with CI=true a
missing Slurm or broker is a failure, not a skip. Every job a test submits is scancel'ed in a
finally block.
"""
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.slurm_jobs import cleanup, squeue, tasks_of, wait_for

# Their jobs take up to 4 of the node's 4 CPUs (caps test; its assertions allow pending tasks):
# one test at a time (xdist group slurm-cpus), beside the walltime cases' one CPU.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm-cpus")]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture
def amqp_url(rabbitmq):
    """tests/conftest.py's broker (fails with CI=true when it is missing, skips elsewhere)."""
    return rabbitmq


@pytest.fixture
def queue_name(amqp_queue):
    return amqp_queue


def publish(url, queue, n):
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for i in range(n):
        ch.basic_publish("", queue, json.dumps({"id": f"file-{i}"}).encode(),
                         pika.BasicProperties(delivery_mode=2))
    conn.close()


def purge(url, queue):
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_purge(queue)
    conn.close()


CAPS = """\
max_array_size: 5
max_running: 4
max_queued: 6
max_walltime: "00:05:00"
default_walltime: "00:03:00"
cores_per_task: 1
allowed_queues: [debug]
node_hours: {budget: 10, period: day}
"""


@pytest.fixture
def env(tmp_path, slurm):
    """Environment for launcher subprocesses: own caps, state dir and a tiny job script."""
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    caps.chmod(0o644)
    script = tmp_path / "sleep.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\nsleep 120\n")
    e = dict(os.environ, LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"),
             LAUNCHER_SCRIPT=str(script), LAUNCHER_SCHEDULER="slurm")
    e.pop("RABBITMQ_URI", None)
    e.pop("RABBITMQ_QUEUE", None)
    yield e
    cleanup(tmp_path / "state")


def launcher(env, *args, timeout=60, check=True):
    proc = subprocess.run([PY, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher {args} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_submit_status_cancel(env):
    job = launcher(env, "submit", "--tasks", "3", "--walltime", "00:02:00").stdout.strip()
    assert job.isdigit()
    assert wait_for(lambda: len(tasks_of(job)) == 3)
    status = json.loads(launcher(env, "status", "--json").stdout)
    assert status["scheduler"] == "slurm" and status["scheduler_refreshed"]
    assert status["tasks"]["queued"] + status["tasks"]["running"] == 3
    assert status["jobs"][0]["job_id"] == job
    text = launcher(env, "status").stdout
    assert "tasks now" in text and job in text
    assert launcher(env, "cancel", job).stdout.strip() == f"cancelled {job}"
    assert wait_for(lambda: all(s == "CANCELLED" for s in tasks_of(job).values()))
    status = json.loads(launcher(env, "status", "--json").stdout)
    assert status["tasks"]["queued"] == status["tasks"]["running"] == 0
    assert status["tasks_this_period"]["cancelled"] == 3


def test_caps_refuse_and_cap(env):
    proc = launcher(env, "submit", "--tasks", "2", "--queue", "gpu", check=False)
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.strip() == ("launcher: refused: queue 'gpu' is not allowed"
                                   " (allowed: debug)")
    proc = launcher(env, "submit", "--tasks", "50", "--walltime", "10:00:00")
    job = proc.stdout.strip()
    assert "capped: walltime 10:00:00 requested, max_walltime is 00:05:00" in proc.stderr
    assert "capped: 50 task(s) requested, 5 allowed by max_array_size=5" in proc.stderr
    assert wait_for(lambda: len(tasks_of(job)) == 5)
    running = [s for s in tasks_of(job).values() if s == "RUNNING"]
    assert len(running) <= 4
    # the array's throttle (%4) claims every run slot: a further request is refused
    proc = launcher(env, "submit", "--tasks", "1", check=False)
    assert proc.returncode == 3
    assert proc.stderr.strip() == ("launcher: refused: max_running=4 and all 4 run slots are"
                                   " claimed by queued or running tasks")


def test_bad_caps_file_is_refused(env, tmp_path):
    Path(env["LAUNCHER_CAPS"]).chmod(0o666)
    proc = launcher(env, "submit", "--tasks", "1", check=False)
    assert proc.returncode == 2 and "writable by group or others" in proc.stderr
    assert not (tmp_path / "state" / "ledger.sqlite").exists()


@pytest.mark.integration
def test_scale_up_from_backlog_then_to_zero(env, amqp_url, queue_name):
    env = dict(env, RABBITMQ_URI=amqp_url, RABBITMQ_QUEUE=queue_name)
    publish(amqp_url, queue_name, 25)
    out = launcher(env, "scale", "--once", "--files-per-task", "10", "--idle-grace", "0").stdout
    assert out.startswith("scale_up: submit 3: backlog 25"), out
    status = json.loads(launcher(env, "status", "--json").stdout)
    job = status["jobs"][0]["job_id"]
    assert status["broker"]["ready"] == 25 and status["broker"]["consumers"] == 0
    assert wait_for(lambda: len(tasks_of(job)) == 3)
    # same backlog again: nothing more (no oscillation, no double submission)
    out = launcher(env, "scale", "--once", "--files-per-task", "10", "--idle-grace", "0").stdout
    assert out.startswith("steady: no action"), out
    purge(amqp_url, queue_name)
    out = launcher(env, "scale", "--once", "--files-per-task", "10", "--idle-grace", "0").stdout
    assert out.startswith("scale_down: cancel 3"), out
    assert wait_for(lambda: all(s == "CANCELLED" for s in tasks_of(job).values()))
    out = launcher(env, "scale", "--once", "--idle-grace", "0").stdout
    assert out.startswith("idle: no action"), out
    text = launcher(env, "status").stdout
    assert "scale_down" in text and "scale_up" in text and "amqp://guest:***@" in text
    assert "guest:guest" not in text


@pytest.mark.integration
@pytest.mark.chaos
def test_killed_mid_submission_restarts_without_double_submit(env, amqp_url, queue_name,
                                                              tmp_path):
    """kill -9 the launcher after sbatch created the job, before it read the job id."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "sbatch").write_text('#!/bin/bash\nout=$(/usr/bin/sbatch "$@") || exit $?\n'
                                 'sleep 60\necho "$out"\n')
    (slow / "sbatch").chmod(0o755)
    env = dict(env, RABBITMQ_URI=amqp_url, RABBITMQ_QUEUE=queue_name)
    publish(amqp_url, queue_name, 20)
    crashed = dict(env, PATH=f"{slow}:{env['PATH']}")
    proc = subprocess.Popen([PY, "-m", "launcher", "scale", "--once", "--files-per-task", "10"],
                            cwd=REPO, env=crashed, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        db = tmp_path / "state" / "ledger.sqlite"

        def submitted_name():
            if not db.exists():
                return None
            con = sqlite3.connect(str(db))
            try:
                rows = con.execute("SELECT job_name FROM submissions").fetchall()
            except sqlite3.OperationalError:  # file made, schema not yet: the launcher is starting
                return None
            finally:
                con.close()
            names = {r[0] for r in rows}
            return [r for r in squeue() if r.get("name") in names]

        assert wait_for(submitted_name, timeout=30), "sbatch never created the job"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # restart with the real sbatch: the job is adopted, not submitted again
    out = launcher(env, "scale", "--once", "--files-per-task", "10").stdout
    assert out.startswith("steady: no action"), out
    con = sqlite3.connect(str(db))
    subs = con.execute("SELECT status, job_id FROM submissions").fetchall()
    con.close()
    assert len(subs) == 1 and subs[0][0] == "submitted"
    names = {r.get("name") for r in squeue() if str(r.get("array_job_id")) == subs[0][1]}
    assert len(names) == 1


def test_second_instance_is_refused(env):
    proc = subprocess.Popen([PY, "-m", "launcher", "scale", "-v", "--interval", "30"], cwd=REPO,
                            env=dict(env, RABBITMQ_URI="amqp://guest:secret@127.0.0.1:1/%2f",
                                     RABBITMQ_QUEUE="nothing"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    try:
        # Its first decision is printed once it holds the lock and handles SIGTERM (-v: every pass).
        assert select.select([proc.stdout], [], [], 30)[0], "the first launcher printed no decision"
        first = proc.stdout.readline()
        assert first.startswith("broker_unavailable"), first
        assert (Path(env["LAUNCHER_STATE_DIR"]) / "launcher.lock").exists()
        second = launcher(env, "submit", "--tasks", "1", check=False)
        assert second.returncode == 4 and "another launcher is running" in second.stderr
        # status still works (read-only view of the ledger)
        assert launcher(env, "status").returncode == 0
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    out = first + out
    assert proc.returncode == 0, err
    assert "secret" not in err and "secret" not in out
    assert "broker_unavailable" in out and "amqp://guest:***@127.0.0.1:1" in out + err


@pytest.mark.integration
def test_dispatch_one_job_per_message(env, amqp_url, queue_name, tmp_path):
    """Good messages end done; a failing one is requeued, then dead-lettered with the reason."""
    import pika
    script = tmp_path / "one.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\n"
                      'grep -q fail "$CLOWDER_MESSAGE_FILE" && exit 1\nexit 0\n')
    env = dict(env, RABBITMQ_URI=amqp_url, RABBITMQ_QUEUE=queue_name, LAUNCHER_SCRIPT=str(script))
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    for body in ({"id": "good-1"}, {"id": "fail-1"}, {"id": "good-2"}):
        ch.basic_publish("", queue_name, json.dumps(body).encode(),
                         pika.BasicProperties(delivery_mode=2, content_type="application/json"))
    conn.close()
    try:
        proc = launcher(env, "dispatch", "--until-empty", "--interval", "1", "--max-attempts",
                        "2", timeout=240)  # jobs may queue behind other tests
        db = sqlite3.connect(str(tmp_path / "state" / "ledger.sqlite"))
        rows = db.execute("SELECT file_id, state, job_id, attempts, reason FROM dispatch"
                          " ORDER BY id").fetchall()
        db.close()
        by_file = {}
        for file_id, state, job_id, attempts, reason in rows:
            assert job_id, rows
            by_file.setdefault(file_id, []).append((state, attempts, reason))
        assert [s for s, *_ in by_file["good-1"]] == ["done"]
        assert [s for s, *_ in by_file["good-2"]] == ["done"]
        assert [(s, a) for s, a, _ in by_file["fail-1"]] == [("requeued", 1), ("dead_lettered", 2)]
        assert "ended failed (exit 1)" in by_file["fail-1"][1][2]
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = conn.channel()
        assert ch.queue_declare(queue_name, passive=True).method.message_count == 0
        method, props, body = ch.basic_get(f"error.{queue_name}", auto_ack=True)
        assert json.loads(body) == {"id": "fail-1"}
        assert props.headers["x-dispatch-attempts"] == 2
        assert "exit 1" in props.headers["x-dispatch-reason"]
        conn.close()
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().queue_delete(f"error.{queue_name}")
        conn.close()
