"""Fixtures for tests that need the local services (scripts/services.sh brings them up).

Only tests that request these fixtures need the services; nothing here is autouse.

    rabbitmq    (session) AMQP URL of a broker that answers
    chaos_rabbitmq  (session) (AMQP URL, node name) of the second broker node, the only one a
                test may stop or restart (`rabbitmqctl -n NODE stop_app`); tests using it share
                the xdist group "chaos-broker", so they never overlap each other
    slurm       (session) the local single-node Slurm answers (sinfo, sbatch, qsub)
    mpi         (session) path of the venv's mpiexec; mpi4py imports
    charliecloud  (session) path of the Charliecloud test image (scripts/build_test_image.sh);
                ch-run starts it and its python3 imports pyclowder
    amqp_queue  (function) a fresh durable queue `test-<uuid8>` plus `error.<name>`, deleted after

Missing services fail the test with CI=true and skip it otherwise (see tests/helpers/services.py).
"""
from __future__ import annotations

import uuid

import pytest

from devtools.amqp_queues import companion_queues, delete_queues
from helpers import services


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
def pbs() -> None:
    services.require_pbs()


@pytest.fixture(scope="session")
def mpi():
    return services.require_mpi()


@pytest.fixture(scope="session")
def charliecloud() -> str:
    return services.require_charliecloud()


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
                delete_queues(conn.channel(), companion_queues(name))
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - best effort
            print(f"amqp_queue: could not delete the queues of {name}: {exc}")


# -- pytest-xdist groups ------------------------------------------------------------------------
# scripts/test.sh runs the suite with `-n N --dist loadgroup`: tests marked `xdist_group("name")`
# go to one worker, one after another. Groups: chaos-broker (stop the second broker node),
# chaos-waiting (three scenarios run at once by one module fixture), slurm-cpus (jobs that fill
# the node's 4 CPUs), slurm-walltime (one-minute tasks holding one CPU for minutes), pbs-node,
# pbs-launcher and pbs-walltime (OpenPBS jobs: one test of each at a time on the one PBS node).
# pytest-xdist 3.8 tags a grouped test by assigning `item._nodeid`, which pytest 9 no longer reads
# (the id lives in `item._id`), so the groups would silently not apply and two broker restarts
# could overlap. Apply the same tag here, and refuse to run if it does not take.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under loadgroup
        return
    # Long tests first (stable, the same order on every worker): a minutes-long test that starts
    # last would hold the whole run up after the other workers are done.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if not groups:
            continue
        tag = "@" + "_".join(groups)
        if not item.nodeid.endswith(tag):
            from _pytest.nodeid import coerce_node_id  # pytest 9's node id type

            item._id = coerce_node_id(item.nodeid + tag)
        if not item.nodeid.endswith(tag):
            raise pytest.UsageError(f"cannot tag {item.nodeid} with its xdist group {tag}")
