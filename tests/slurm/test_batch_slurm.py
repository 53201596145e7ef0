"""The job scripts on the real single-node Slurm: `qsub pbs/agent_array.pbs` and the sbatch twin."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from helpers.agent_harness import REPO, AgentHarness, harness  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.usefixtures("slurm")]



SETTINGS = ("RABBITMQ_QUEUE", "AGENT_PLUGIN_PATH", "AGENT_PLUGIN", "AGENT_JOURNAL_DIR", "DIRECTIVE_LOG",
            "AGENT_RETRY_BACKOFF", "AGENT_LOG_DIR", "AGENT_IDLE_EXIT", "AGENT_ENV_FILE")


def _job_env(h: AgentHarness, **extra: str) -> dict[str, str]:
    """Settings for the job; the broker URI (a secret) only in a private env file, never in argv."""
    env_file = h.tmp / "agent.env"
    env_file.write_text(f"RABBITMQ_URI={h.url}\n")
    env_file.chmod(0o600)
    env = h.env(AGENT_LOG_DIR=str(h.tmp / "logs"), AGENT_ENV_FILE=str(env_file), **extra)
    del env["RABBITMQ_URI"]
    return env


def _qsub(h: AgentHarness, env: dict[str, str], *options: str) -> list[str]:
    """A qsub command passing the settings with -v, as a user on a PBS system would."""
    settings = ",".join(f"{k}={env[k]}" for k in SETTINGS)
    return ["qsub", *options, "-o", str(h.tmp / "job.out"), "-v", settings, "pbs/agent_array.pbs"]


def _submit(cmd: list[str], env: dict[str, str]) -> str:
    assert not any("guest:guest" in part for part in cmd)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    match = re.search(r"(\d+)", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _tasks(job: str) -> dict[str, tuple[str, str]]:
    """Array task id -> (state, exit code) from scontrol, which keeps finished jobs for MinJobAge."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = fields.get("ArrayTaskId") or fields.get("JobId")
        tasks[task] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
    return tasks


def _wait_done(job: str, n: int, timeout: float) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    tasks: dict[str, tuple[str, str]] = {}
    while time.monotonic() < deadline:
        tasks = _tasks(job)
        if len(tasks) >= n and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
                                   for s, _ in tasks.values()):
            return tasks
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} not finished within {timeout}s: {tasks}")


def _worker_pids(h: AgentHarness) -> set[str]:
    return {pid for _, pid, _ in h.runs()}


# Three 1-CPU tasks that must all run at once: with the launcher tests (group slurm-cpus), while
# the walltime cases (group slurm-walltime, one at a time) hold one CPU: 3 + 1 fit the node's 4.
@pytest.mark.xdist_group("slurm-cpus")
def test_qsub_pbs_array_drains_the_queue_and_completes(harness):
    ids = [harness.publish_file(b"sleep 0.4\n") for _ in range(60)]
    env = _job_env(harness, AGENT_IDLE_EXIT="5")
    job = _submit(_qsub(harness, env, "-J", "1-3"), env)
    try:
        tasks = _wait_done(job, 3, 240)
    finally:
        subprocess.run(["scancel", job])
    assert len(tasks) == 3 and all(t == ("COMPLETED", "0:0") for t in tasks.values()), tasks
    assert all(harness.standin.metadata_for(f) for f in ids)
    assert harness.depth() == 0 and harness.errors() == []
    assert len(_worker_pids(harness)) == 3, "all three tasks took work"
    logs = sorted(os.listdir(harness.tmp / "logs"))
    assert len(logs) == 3 and all(re.fullmatch(rf"agent-{job}_[123]\.log", name) for name in logs), logs
    text = (harness.tmp / "logs" / logs[0]).read_text()
    assert f"slurm {job}_" in text and "idle for 5s" in text


def _walltime_case(harness, options: list[str], native: bool) -> None:
    # 15-second files, one-minute tasks, one task at a time: a task fits two files before the
    # end-of-allocation margin, so five files need three tasks; the fourth is slack for a slow start.
    # The native script's --signal SIGTERM may come up to a minute early (Slurm's granularity),
    # leaving room for one file per task: three files there, so four tasks are still enough.
    ids = [harness.publish_file(b"sleep 15\n") for _ in range(3 if native else 5)]
    env = _job_env(harness, AGENT_IDLE_EXIT="5")
    if native:
        cmd = ["sbatch", *options, "-o", str(harness.tmp / "job-%A_%a.out"), "pbs/agent_array.slurm"]
    else:
        cmd = _qsub(harness, env, *options)
    job = _submit(cmd, env)
    try:
        tasks = _wait_done(job, 4, 420)
    finally:
        subprocess.run(["scancel", job])
    assert all(state == "COMPLETED" and code == "0:0" for state, code in tasks.values()), tasks
    assert len(_worker_pids(harness)) >= 2, "later tasks finished what the first could not fit"
    assert all(harness.standin.metadata_for(f) for f in ids), harness.log_text()
    assert harness.depth() == 0 and harness.errors() == []
    logs = [p.read_text() for p in (harness.tmp / "logs").iterdir()]
    if native:
        # Slurm may send the --signal SIGTERM up to a minute early: in-flight work is handed back.
        assert any("walltime drain" in t or "received SIGTERM" in t for t in logs)
    else:
        assert any("walltime drain" in t for t in logs), "a task stopped taking files the next would not fit in"
    # Nothing was killed at the limit and retried: each file ran to completion once or was handed
    # back before starting; no failed attempts were recorded.
    assert "failed (attempt" not in "".join(logs)


@pytest.mark.slow  # minutes of one-minute tasks, one at a time
@pytest.mark.xdist_group("slurm-walltime")
def test_qsub_walltime_one_minute_completes_and_a_later_task_finishes(harness):
    _walltime_case(harness, ["-J", "1-4%1", "-l", "walltime=00:01:00"], native=False)


@pytest.mark.slow  # minutes of one-minute tasks, one at a time
@pytest.mark.xdist_group("slurm-walltime")
def test_sbatch_native_script_walltime(harness):
    _walltime_case(harness, ["--array=1-4%1", "--time=00:01:00"], native=True)
