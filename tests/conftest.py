"""Fixtures for tests that need the local services (scripts/services.sh brings them up).

Only tests that request these fixtures need the services; nothing here is autouse.

    rabbitmq    (session) AMQP URL of a broker that answers
    chaos_rabbitmq  (session) (AMQP URL, node name) of the second broker node, the only one a
                test may stop or restart (`rabbitmqctl -n NODE stop_app`); tests using it share
                the xdist group "chaos-broker", so they never overlap each other
    slurm       (session) the local single-node Slurm answers (sinfo, sbatch, qsub)
    mpi         (session) path of the venv's mpiexec; mpi4py imports
    amqp_queue  (function) a fresh durable queue `test-<uuid8>` plus `error.<name>`, deleted after

Missing services fail the test with CI=true and skip it otherwise (see tests/services.py).
"""
from __future__ import annotations

import uuid

import pytest

import services


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    return services.require_rabbitmq()


@pytest.fixture(scope="session")
def chaos_rabbitmq() -> tuple[str, str]:
    return services.require_chaos_rabbitmq()


@pytest.fixture(scope="session")
def slurm() -> None:
    services.require_slurm()


@pytest.fixture(scope="session")
def mpi():
    return services.require_mpi()


@pytest.fixture
def amqp_queue(rabbitmq):
    import pika

    name = f"test-{uuid.uuid4().hex[:8]}"
    params = pika.URLParameters(rabbitmq)
    params.socket_timeout = 10
    conn = pika.BlockingConnection(params)
    try:
        channel = conn.channel()
        channel.queue_declare(name, durable=True)
        channel.queue_declare(f"error.{name}", durable=True)
    finally:
        conn.close()
    try:
        yield name
    finally:
        # A test may have stopped or broken the broker; cleanup must not hide the test's result.
        try:
            conn = pika.BlockingConnection(params)
            try:
                channel = conn.channel()
                channel.queue_delete(name)
                channel.queue_delete(f"error.{name}")
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - best effort
            print(f"amqp_queue: could not delete {name} / error.{name}: {exc}")
