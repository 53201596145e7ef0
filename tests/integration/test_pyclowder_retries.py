"""Files an extractor fails on end as under pyclowder (issue 22): pyclowder's own RabbitMQConnector and
the agent run the same extractor on the same messages, one after the other, on one real queue.

Compared: every status Clowder receives (retry numbers included: "(#1)" ... "(#10)", then the
extractor's own message as ERROR), the number of attempts with default settings (pyclowder's
MAX_RETRY default: 11), the message in error.<queue> (with the agent's reason in its headers), and
for a good file the metadata uploaded. One extractor is pinned to an old pyclowder (2.5.1, as
extractors-zip pins it) and runs in its own prepared venv, under both; the other runs on the
agent's pyclowder. The agent's backoff is set to 0 (1 s retry queues) only to keep this fast:
max_retries stays at its default.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from typing import Any

import pytest

from helpers.agent_harness import REPO, TEST_PLUGINS, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

ATTEMPTS = 11  # pyclowder's default MAX_RETRY (10) retries after the first attempt


@pytest.fixture(scope="module")
def zip_env_dir(tmp_path_factory) -> str:
    """The zip extractor's own venv (pyclowder 2.5.1 from its requirements.txt), made by `agent prepare`."""
    env_dir = str(tmp_path_factory.mktemp("plugin-envs"))
    env = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_ENV_DIR=env_dir)
    done = subprocess.run([sys.executable, "-m", "agent", "prepare", "--plugin", "test.zip.listing"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir


def _venv_python(env_dir: str) -> str:
    (python,) = [os.path.join(env_dir, d, "bin", "python") for d in os.listdir(env_dir)
                 if d.startswith("test.zip.listing-") and os.path.isfile(os.path.join(env_dir, d, "bin", "python"))]
    return python


def _zip_bytes(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return buf.getvalue()


def _by_file(statuses: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in statuses:
        out.setdefault(s["file_id"], []).append(s["status"])
    return out


def _run_pyclowder(h, python: str, script: str, bodies: list[dict], bad: str, good: str) -> tuple[dict, list]:
    """Publish bodies, run the unchanged extractor under pyclowder's RabbitMQConnector until the bad file
    is in error.<queue> and the good one is done; return (statuses by file, error queue messages)."""
    for body in bodies:
        h.publish(body)
    env = dict(os.environ, RABBITMQ_URI=h.url, RABBITMQ_QUEUE=h.queue)
    for name in ("PYTHONPATH", "MAX_RETRY", "CLOWDER_MAX_RETRY", "CLOWDER_URL", "REGISTRATION_ENDPOINTS"):
        env.pop(name, None)
    log_path = h.tmp / "pyclowder.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([python, script], env=env, cwd=os.path.dirname(script), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    statuses: list[dict] = []
    errors: list = []

    def finished() -> bool:
        statuses.extend(h.statuses())
        errors.extend(h.errors())
        seen = _by_file(statuses)
        return bool(errors) and any("StatusMessage.error" in s for s in seen.get(bad, [])) \
            and any("StatusMessage.done" in s for s in seen.get(good, []))

    try:
        deadline = time.monotonic() + 120
        while not finished():
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    statuses.extend(h.statuses())
    return _by_file(statuses), errors


_IDENTITY = re.compile(r"^(StatusMessage\.start: .*) \[[^\]]+\]$")


def _run_agent(h, bodies: list[dict], **env: str) -> tuple[dict, list]:
    for body in bodies:
        h.publish(body)
    code = h.run_agent("--idle-exit", "3", AGENT_RETRY_BACKOFF="0", timeout=180, **env)
    assert code == 0, h.log_text()
    # The one documented addition: the agent names the task that has the file in its STARTED status.
    statuses = h.statuses()
    assert statuses and all(_IDENTITY.match(s["status"]) for s in statuses if s["status"].startswith(
        "StatusMessage.start"))
    for s in statuses:
        s["status"] = _IDENTITY.sub(r"\1", s["status"])
    return _by_file(statuses), h.errors()


def _compare(h, plugin_dir: str, python: str, bad_content: bytes, good_content: bytes, name: str,
             expected_error: str, **agent_env: str) -> str:
    """Run both on one bad and one good file; assert they agree; return the good file's id."""
    bad, good = h.add_file(bad_content, name), h.add_file(good_content, name)
    bodies = [h.v1_body(fid, name, fileSize=str(len(c))) for fid, c in ((bad, bad_content), (good, good_content))]
    script = next(os.path.join(plugin_dir, f) for f in os.listdir(plugin_dir) if f.endswith(".py"))

    theirs, their_errors = _run_pyclowder(h, python, script, bodies, bad, good)
    assert h.depth() == 0
    ours, our_errors = _run_agent(h, bodies, **agent_env)

    # The statuses Clowder saw, the same under both, retry numbers included.
    started = "StatusMessage.start: Started processing."
    expected_bad = [s for n in range(1, ATTEMPTS) for s in (started, f"StatusMessage.retry: (#{n}) {expected_error}")]
    expected_bad += [started, f"StatusMessage.error: {expected_error}"]
    outline = [s for s in theirs[bad] if not s.startswith("StatusMessage.processing")]  # pyclowder 3's downloads
    assert outline == expected_bad, theirs[bad]
    assert ours[bad] == theirs[bad]
    assert ours[good] == theirs[good] and ours[good][-1] == "StatusMessage.done: Done processing."
    # Both put the bad message, unchanged apart from pyclowder's retry_count, in error.<queue>.
    assert [json.loads(b)["id"] for _, b in their_errors] == [bad]
    assert [json.loads(b)["id"] for _, b in our_errors] == [bad]
    assert json.loads(their_errors[0][1])["retry_count"] == ATTEMPTS - 1
    headers = our_errors[0][0].headers
    assert headers["x-agent-attempts"] == ATTEMPTS
    assert headers["x-error-reason"] == f"gave up after {ATTEMPTS} attempt(s): {expected_error}"
    assert "Traceback" in headers["x-error-traceback"]
    # The good file's results: one upload each, the same.
    theirs_md, ours_md = h.standin.metadata_for(good)
    assert ours_md == theirs_md and h.standin.metadata_for(bad) == []
    return good


def test_old_pyclowder_pinned_extractor_fails_as_under_pyclowder(harness, zip_env_dir):
    """The zip listing on pyclowder 2.5.1 in its own venv: a file that is not a zip archive."""
    h = harness
    plugin_dir = os.path.join(TEST_PLUGINS, "zip_listing")
    good = _compare(h, plugin_dir, _venv_python(zip_env_dir), b"not a zip archive\n", _zip_bytes("a.txt", "b/c.csv"),
             "input.zip", "File is not a zip file", AGENT_PLUGIN="test.zip.listing", AGENT_ENV_DIR=zip_env_dir,
             AGENT_ENV_BUILD="no")
    assert '"members": ["a.txt", "b/c.csv"]' in json.dumps(h.standin.metadata_for(good)[0])
    assert "extractor processes run in " + zip_env_dir in h.log_text()  # the agent ran it in that venv
    pinned = subprocess.run([_venv_python(zip_env_dir), "-c", "from importlib.metadata import version; "
                             "print(version('pyclowder'))"], capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "2.5.1"


def test_extractor_on_the_agents_pyclowder_fails_as_under_pyclowder(harness):
    """The CSV columns extractor on the agent's own pyclowder: a file that is not UTF-8."""
    h = harness
    plugin_dir = os.path.join(TEST_PLUGINS, "csv_columns")
    error = "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    good = _compare(h, plugin_dir, sys.executable, b"\xff\xfe\x00binary", b"id,name,size\n1,a,2\n", "input.csv",
             error, AGENT_PLUGIN="test.csv.columns")
    assert '"columns": ["id", "name", "size"]' in json.dumps(h.standin.metadata_for(good)[0])


def test_a_message_pyclowder_republished_continues_its_count(harness):
    """Moving a queue from pyclowder to the agent: a message pyclowder already retried 9 times carries
    its count only in its body. The agent goes on from there: one retry "(#10)", then the error queue."""
    h = harness
    fid = h.add_file(b"raise\n")
    h.publish(h.v1_body(fid, fileSize="6", retry_count=9))
    assert h.run_agent("--idle-exit", "2", AGENT_RETRY_BACKOFF="0") == 0, h.log_text()
    assert [r[2] for r in h.runs()] == ["raise", "raise"]
    statuses = [s["status"] for s in h.statuses() if s["status"].startswith(("StatusMessage.retry",
                                                                            "StatusMessage.error"))]
    (error,) = h.errors()
    assert [s.split(":")[0] for s in statuses] == ["StatusMessage.retry", "StatusMessage.error"]
    assert statuses[0].startswith("StatusMessage.retry: (#10) ")
    assert statuses[1] == "StatusMessage.error: " + statuses[0][len("StatusMessage.retry: (#10) "):]
    assert error[0].headers["x-agent-attempts"] == 11
