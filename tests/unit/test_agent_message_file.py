"""`AGENT_SOURCE=file`: the agent as the one-message job of `python -m launcher dispatch`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from devtools.clowder_standin import ClowderStandin
from helpers.agent_harness import EXAMPLES, REPO, TEST_PLUGINS


def _run(tmp_path, standin, content: bytes, queue=None, **env):
    fid = standin.add_file(name="in.txt", content=content)
    body = {"id": fid, "host": standin.url, "secretKey": "secret", "filename": "in.txt", "fileSize": "3",
            "routing_key": "clowder.file.text.plain", "datasetId": "ds", "jobid": "j1"}
    path = tmp_path / "message.json"
    record = {"body": json.dumps(body), "properties": {"correlation_id": "c1"}}
    if queue is not None:  # what `launcher dispatch` writes since agents serve several plugins from a file
        record["queue"] = queue
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    full = dict(os.environ, CLOWDER_MESSAGE_FILE=str(path), AGENT_SOURCE="file", AGENT_PLUGIN="test.directive",
                AGENT_PLUGIN_PATH=f"{TEST_PLUGINS}:{EXAMPLES}", AGENT_RETRY_BACKOFF="0.1", PYTHONPATH=REPO,
                RABBITMQ_URI="amqp://nobody:nothing@127.0.0.1:1/%2f")
    full.update(env)
    out = subprocess.run([sys.executable, "-m", "agent", "run"], cwd=REPO, env=full, capture_output=True, text=True,
                         timeout=120)
    return fid, out


def test_one_message_processed_exit_0(tmp_path):
    with ClowderStandin() as standin:
        fid, out = _run(tmp_path, standin, b"ok\n")
        assert out.returncode == 0, out.stderr
        assert len(standin.metadata_for(fid)) == 1


@pytest.mark.parametrize("content", [b"raise\n", b"abort\n"])
def test_failed_message_exits_7_for_the_launcher_to_settle(tmp_path, content):
    with ClowderStandin() as standin:
        fid, out = _run(tmp_path, standin, content, AGENT_MAX_RETRIES="0")
        assert out.returncode == 7, out.stderr
        assert "message not processed" in out.stderr and standin.metadata_for(fid) == []
        assert "secret" not in out.stderr.replace("secretKey", "")


def test_bad_message_file_is_a_configuration_error(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    env = dict(os.environ, AGENT_SOURCE="file", CLOWDER_MESSAGE_FILE=str(bad), AGENT_PLUGIN="test.directive",
               AGENT_PLUGIN_PATH=TEST_PLUGINS, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "agent", "run"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "not a dispatch message" in out.stderr


TWO = {"AGENT_PLUGIN": "test.directive,test.simple.wc", "AGENT_PLUGIN_PATH": TEST_PLUGINS}


@pytest.mark.parametrize("queue, content, expected", [
    ("test.simple.wc", b"one two three\n", {"words": "3"}),
    ("test.directive", b"ok\n", {"directive": "ok"}),
])
def test_with_two_plugins_the_message_goes_to_the_one_consuming_its_queue(tmp_path, queue, content, expected):
    with ClowderStandin() as standin:
        fid, out = _run(tmp_path, standin, content, queue=queue, **TWO)
        assert out.returncode == 0, out.stderr
        (md,) = standin.metadata_for(fid)
        assert {k: md["content"].get(k) for k in ("words", "directive") if k in md["content"]} == expected


def test_with_two_plugins_a_queue_neither_consumes_is_refused(tmp_path):
    with ClowderStandin() as standin:
        fid, out = _run(tmp_path, standin, b"ok\n", queue="other", **TWO)
        assert out.returncode == 2, out.stderr
        errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "is for queue other" in errors[0] and "test.simple.wc" in errors[0]
        assert standin.metadata_for(fid) == []
