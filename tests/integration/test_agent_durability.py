"""Long extractions past RabbitMQ's consumer_timeout, and broker restarts mid-run."""
from __future__ import annotations

import subprocess
import time

import pytest

from helpers.agent_harness import AgentHarness, chaos_harness, harness  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _consumer_timeout_ms() -> int:
    out = subprocess.run(["rabbitmqctl", "-q", "eval", "application:get_env(rabbit, consumer_timeout)."],
                         capture_output=True, text=True, timeout=60).stdout
    digits = "".join(c for c in out if c.isdigit())
    return int(digits) if digits else 30 * 60 * 1000


def test_extraction_longer_than_consumer_timeout_runs_exactly_once(harness):
    timeout_s = _consumer_timeout_ms() / 1000
    assert timeout_s <= 60, "CI's broker must run with consumer_timeout = 60000 (scripts/services.sh)"
    fid = harness.publish_file(b"sleep 130\n")
    first = harness.start_agent("--idle-exit", "170")
    harness.wait_for(lambda: harness.runs(), 30, "the extraction to start")
    # A second worker on the same queue must not be handed the message while the first works.
    second = harness.start_agent("--idle-exit", "170")
    harness.wait_for(lambda: len(harness.standin.metadata_for(fid)) == 1, 200, "the long extraction to finish")
    for proc in (first, second):
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    assert len(harness.runs()) == 1, harness.runs()
    assert len(harness.standin.metadata_for(fid)) == 1
    assert harness.depth() == 0 and harness.errors() == []
    assert "journaled and acknowledged" in harness.log_text()
    assert "PRECONDITION_FAILED" not in harness.log_text()


# Restarts a broker: the chaos node (scripts/services.sh), never the shared main broker.
@pytest.mark.xdist_group("chaos-broker")
def test_broker_restart_mid_run_recovers(chaos_harness):
    harness = chaos_harness
    ids = [harness.publish_file(b"sleep 0.3\n") for _ in range(30)]
    agent = harness.start_agent("--idle-exit", "10")
    harness.wait_for(lambda: len(harness.runs()) >= 5, 60, "some files processed")
    subprocess.run(["rabbitmqctl", "-n", harness.node, "-q", "stop_app"], check=True, timeout=120, capture_output=True)
    time.sleep(3)
    subprocess.run(["rabbitmqctl", "-n", harness.node, "-q", "start_app"], check=True, timeout=120, capture_output=True)
    harness.reconnect()
    assert agent.wait(timeout=240) == 0, harness.log_text()
    missing = [f for f in ids if not harness.standin.metadata_for(f)]
    assert missing == [], harness.log_text()
    assert harness.depth() == 0 and harness.errors() == []
    assert "reconnected" in harness.log_text()
