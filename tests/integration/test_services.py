"""The local services that CI brings up (scripts/services.sh) work as the other tests assume."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from helpers import services


def test_rabbitmq_url_default_and_override(monkeypatch):
    monkeypatch.delenv("RABBITMQ_TEST_URI", raising=False)
    assert services.rabbitmq_url() == "amqp://guest:guest@127.0.0.1:5672/%2f"
    monkeypatch.setenv("RABBITMQ_TEST_URI", "amqp://u:p@127.0.0.1:5673/v")
    assert services.rabbitmq_url() == "amqp://u:p@127.0.0.1:5673/v"


def test_unavailable_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        services.unavailable("thing is down")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="thing is down"):
        services.unavailable("thing is down")


@pytest.mark.integration
def test_publish_and_get_on_the_broker(rabbitmq, amqp_queue):
    import pika

    body = f"hello {uuid.uuid4()}".encode()
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", amqp_queue, body, pika.BasicProperties(delivery_mode=2))
        method, _props, got = ch.basic_get(amqp_queue, auto_ack=True)
        assert method is not None and got == body
        # The companion error queue exists (passive declare raises if it does not).
        assert ch.queue_declare(f"error.{amqp_queue}", passive=True).method.message_count == 0
    finally:
        conn.close()


@pytest.mark.integration
def test_broker_consumer_timeout_is_60s(rabbitmq):
    out = subprocess.run(
        ["rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout)."],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{ok,60000}"


@pytest.mark.integration
def test_chaos_broker_is_a_separate_node_with_the_same_consumer_timeout(rabbitmq, chaos_rabbitmq):
    """The broker-restart tests' node (scripts/services.sh) is not the one the other tests use."""
    import pika

    url, node = chaos_rabbitmq
    assert url != rabbitmq
    out = subprocess.run(["rabbitmqctl", "-n", node, "-q", "eval",
                          "{node(), application:get_env(rabbit, consumer_timeout)}."],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{%s,{ok,60000}}" % node
    main = subprocess.run(["rabbitmqctl", "-q", "eval", "node()."], capture_output=True, text=True, timeout=60)
    assert main.returncode == 0 and main.stdout.strip() not in (node, f"'{node}'")
    # A queue declared on one node does not exist on the other: two brokers, not one.
    name = f"test-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(name, durable=False, auto_delete=True)
        other = pika.BlockingConnection(pika.URLParameters(rabbitmq))
        try:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                other.channel().queue_declare(name, passive=True)
        finally:
            other.close()
    finally:
        conn.close()


@pytest.mark.slurm
def test_sbatch_wait_true_exits_zero(slurm, tmp_path):
    out = subprocess.run(
        ["sbatch", "--wait", "--parsable", "-t", "2", "-o", str(tmp_path / "out"), "--wrap", "true"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm-cpus")  # three tasks at once: see tests/slurm/test_batch_slurm.py
def test_qsub_pbs_array_runs_every_task_with_the_variable(slurm, tmp_path):
    """`qsub -v` passes variables and `#PBS -J` makes an array on the local Slurm."""
    script = tmp_path / "arr.pbs"
    script.write_text(
        "#!/bin/bash\n"
        "#PBS -J 1-3\n"
        "#PBS -l walltime=00:02:00\n"
        "#PBS -N svc-test\n"
        'echo "$SLURM_ARRAY_TASK_ID $FOO" > "$SLURM_SUBMIT_DIR/task.$SLURM_ARRAY_TASK_ID"\n'
    )
    out = subprocess.run(["qsub", "-v", "FOO=bar", str(script)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    assert job.isdigit(), out.stdout
    try:
        deadline = time.monotonic() + 120
        files = []
        while time.monotonic() < deadline:
            files = sorted(p.name for p in tmp_path.glob("task.*"))
            if len(files) == 3:
                break
            time.sleep(1)
        assert files == ["task.1", "task.2", "task.3"]
        for i in (1, 2, 3):
            # Written last thing by the task; wait for the content, not just the file.
            path = tmp_path / f"task.{i}"
            while time.monotonic() < deadline and not path.read_text().strip():
                time.sleep(0.5)
            assert path.read_text().split() == [str(i), "bar"]
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.mark.mpi
def test_venv_mpiexec_runs_two_ranks(mpi):
    env = dict(os.environ, PATH=f"{mpi.parent}:{os.environ.get('PATH', '')}")
    out = subprocess.run(
        [str(mpi), "-n", "2", str(mpi.parent / "python"), "-c",
         "from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.gather(c.Get_rank())\n"
         "if c.Get_rank() == 0: print('ranks', sorted(r))"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ranks [0, 1]"
