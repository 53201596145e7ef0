"""The launcher on a real OpenPBS server, run as an ordinary user (LAUNCHER_SCHEDULER=pbs).

What reaches the job is only what the launcher passes with `qsub -v` (PBS does not export the
submitter's environment); the broker's password only in the user's ~/.clowder-hpc-agent/env.
The user's PATH lists /usr/bin (Slurm's qsub wrappers) before /opt/pbs/bin, as on this machine.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest

from helpers import pbs_jobs
from helpers.agent_harness import EXAMPLES, REPO, TEST_PLUGINS, AgentHarness
from helpers.services import PBS_BIN

pytestmark = [pytest.mark.integration, pytest.mark.pbs, pytest.mark.usefixtures("pbs"),
              pytest.mark.xdist_group("pbs-launcher")]

PY = os.path.join(REPO, ".venv", "bin", "python")

CAPS = """\
max_array_size: 2
max_running: 4
max_queued: 6
max_walltime: "00:05:00"
default_walltime: "00:03:00"
cores_per_task: 1
node_hours: {budget: 10, period: day}
"""


@pytest.fixture
def h(rabbitmq, amqp_queue):
    """An AgentHarness in a folder the user owns, plus the launcher's caps and state there."""
    from devtools.clowder_standin import ClowderStandin

    pbs_jobs.make_reachable()
    pbs_jobs.write_secrets(rabbitmq)
    folder = pbs_jobs.work_dir("launcher")
    (folder / "caps.yaml").write_text(CAPS)
    (folder / "caps.yaml").chmod(0o644)
    with ClowderStandin() as standin:
        harness = AgentHarness(rabbitmq, amqp_queue, standin, folder)
        try:
            yield harness
        finally:
            harness.close()
            pbs_jobs.cleanup(folder, names=pbs_jobs.ledger_names(folder / "state"))


def launcher_env(h: AgentHarness, **extra: str) -> dict:
    """The user's environment for `python -m launcher`, as the issue's contract has it: no
    RABBITMQ_URI (the launcher, like the jobs, reads it from ~/.clowder-hpc-agent/env)."""
    env = pbs_jobs.user_env(
        LAUNCHER_SCHEDULER="pbs", LAUNCHER_CAPS=str(h.tmp / "caps.yaml"),
        LAUNCHER_STATE_DIR=str(h.tmp / "state"), RABBITMQ_QUEUE=h.queue,
        AGENT_PLUGIN="test.directive", AGENT_PLUGIN_PATH=f"{TEST_PLUGINS}:{EXAMPLES}",
        AGENT_JOURNAL_DIR=h.journal_dir, DIRECTIVE_LOG=h.directive_log,
        AGENT_LOG_DIR=str(h.tmp / "logs"), AGENT_IDLE_EXIT="5")
    env.update(extra)
    return env


def launcher(h: AgentHarness, env: dict, *args: str, check: bool = True):
    """`python -m launcher ARGS` as the user, from its work folder (job output lands there)."""
    return pbs_jobs.run_as_user([PY, "-m", "launcher", *args], h.tmp, env, timeout=120, check=check)


def status(h: AgentHarness, env: dict) -> dict:
    return json.loads(launcher(h, env, "status", "--json").stdout)


def test_scale_once_drains_the_queue_and_status_shows_the_tasks(h):
    ids = [h.publish_file(b"sleep 0.2\n") for _ in range(25)]
    env = launcher_env(h)
    out = launcher(h, env, "scale", "--once", "--files-per-task", "10").stdout
    # 25 files at 10 per task: 3 tasks needed, max_array_size caps them at 2
    assert out.startswith("scale_up: submit 2: backlog 25, 10 file(s) per task: 3 task(s) needed"), out
    assert "capped: 3 task(s) requested, 2 allowed by max_array_size=2" in out, out
    job = status(h, env)["jobs"][0]["job_id"]
    assert job.endswith("[].pbshost"), job
    done = pbs_jobs.wait_finished(job, 120)
    assert done["substate"] == 92, (done, pbs_jobs.read_output(h.tmp))
    assert all(h.standin.metadata_for(f) for f in ids), pbs_jobs.read_output(h.tmp)
    assert h.depth() == 0 and h.errors() == []
    # the job got the agent's settings through -v (never the password), and its home
    variables = done["Variable_List"]
    assert variables["AGENT_PLUGIN"] == "test.directive" and variables["RABBITMQ_QUEUE"] == h.queue
    assert variables["AGENT_HOME"] == str(REPO)
    assert "RABBITMQ_URI" not in variables and "guest:guest" not in json.dumps(done)
    seen = status(h, env)
    assert seen["scheduler"] == "pbs" and seen["scheduler_refreshed"]
    assert seen["tasks_this_period"]["completed"] == 2 and seen["failed_tasks"] == []


def test_one_task_submit_status_cancel(h):
    script = h.tmp / "sleep.pbs"
    script.write_text("#!/bin/bash\n#PBS -J 1-4\n#PBS -j oe\nsleep 120\n")
    script.chmod(0o755)
    env = launcher_env(h, LAUNCHER_SCRIPT=str(script))
    job = launcher(h, env, "submit", "--tasks", "1", "--walltime", "00:02:00").stdout.strip()
    assert job.endswith("[].pbshost"), job
    # one task, whatever the script's own #PBS -J says (PBS rejects -J 1-1)
    assert pbs_jobs.parent(job)["array_indices_submitted"] == "1-2:2"
    assert pbs_jobs.wait_for(lambda: pbs_jobs.subjobs(job).get(1, {}).get("job_state") == "R", 30)
    seen = status(h, env)
    assert seen["tasks"]["running"] == 1 and seen["tasks"]["queued"] == 0
    assert [j["job_id"] for j in seen["jobs"]] == [job]
    assert launcher(h, env, "cancel", job).stdout.strip() == f"cancelled {job}"
    pbs_jobs.wait_finished(job, 60)
    assert pbs_jobs.wait_for(lambda: status(h, env)["tasks_this_period"]["cancelled"] == 1, 30)
    assert status(h, env)["tasks"]["running"] == 0


def test_tasks_that_cannot_start_say_why(h):
    """No plugin chosen: the subjobs fail at once (the parent's substate 93; its Exit_status says 0
    when only some subjobs fail, 1 here); status names each failure in the task's own words."""
    h.publish_file(b"sleep 0.1\n")
    env = launcher_env(h)
    del env["AGENT_PLUGIN"]
    job = launcher(h, env, "submit", "--tasks", "2", "--walltime", "00:02:00").stdout.strip()
    done = pbs_jobs.wait_finished(job, 90)
    assert done["substate"] == 93, done
    seen = pbs_jobs.wait_for(lambda: (lambda s: s if len(s["failed_tasks"]) == 2 else None)(status(h, env)), 30)
    assert seen, status(h, env)
    assert {f["index"] for f in seen["failed_tasks"]} == {1, 2}
    assert all("no plugin chosen" in f["why"] for f in seen["failed_tasks"]), seen["failed_tasks"]
    text = launcher(h, env, "status").stdout
    assert f"failed     {job} task 1:" in text and "no plugin chosen" in text
    assert h.depth() == 1  # nothing was taken


def test_reconcile_after_a_kill_around_qsub(h):
    """Killed after writing its intent: before qsub ran (the intent is closed as never submitted)
    and after qsub created the job but before the id was recorded (the job is adopted by name)."""
    bin_dir = h.tmp / "pbs" / "bin"
    bin_dir.mkdir(parents=True)
    # PBS_EXEC (read by the launcher to find qsub) points here; PBS's own tools must not see it
    for tool in ("qstat", "qdel", "qselect"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nunset PBS_EXEC\nexec {PBS_BIN}/{tool} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    qsub = bin_dir / "qsub"
    marker = h.tmp / "qsub-reached"
    env = launcher_env(h, PBS_EXEC=str(h.tmp / "pbs"),
                       LAUNCHER_SCRIPT=str(h.tmp / "sleep.pbs"))
    (h.tmp / "sleep.pbs").write_text("#!/bin/bash\n#PBS -j oe\nsleep 120\n")
    db = h.tmp / "state" / "ledger.sqlite"

    def crash(body: str) -> None:
        marker.unlink(missing_ok=True)
        qsub.write_text(f"#!/bin/bash\nunset PBS_EXEC\n{body}\n")
        qsub.chmod(0o755)
        proc = pbs_jobs.popen_as_user([PY, "-m", "launcher", "submit", "--tasks", "2"], h.tmp, env)
        try:
            assert pbs_jobs.wait_for(marker.exists, 60), proc.communicate(timeout=5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def submissions() -> list:
        con = sqlite3.connect(str(db))
        try:
            return con.execute("SELECT job_name, status, job_id, error FROM submissions ORDER BY id").fetchall()
        finally:
            con.close()

    # 1. killed before qsub ran
    crash(f"touch {marker}\nsleep 60\nexec {PBS_BIN}/qsub \"$@\"")
    (name, state, job_id, _), = submissions()
    assert (state, job_id) == ("intent", None)
    launcher(h, env, "reconcile")
    (_, state, job_id, error), = submissions()
    assert state == "failed" and job_id is None and "never happened" in error
    assert pbs_jobs.names_to_ids([name]) == []
    # 2. killed after qsub created the job, before the launcher read its id
    crash(f"{PBS_BIN}/qsub \"$@\" > {h.tmp}/qsub.out || exit $?\ntouch {marker}\nsleep 60")
    name, state, job_id, _ = submissions()[1]
    assert (state, job_id) == ("intent", None)
    created = (h.tmp / "qsub.out").read_text().strip()
    seen = status(h, env)  # status reconciles first: the job is adopted, not submitted again
    name2, state, job_id, _ = submissions()[1]
    assert (name2, state, job_id) == (name, "submitted", created)
    assert [j["job_id"] for j in seen["jobs"]] == [created]
    assert len(submissions()) == 2
