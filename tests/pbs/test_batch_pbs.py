"""The job script on a real OpenPBS server, submitted as an ordinary user as its header documents.

`qsub -v AGENT_PLUGIN=...,RABBITMQ_QUEUE=... pbs/agent_array.pbs` from the checkout, the broker's
password only in ~/.clowder-hpc-agent/env; MPI ranks from `mpiprocs=N`; the walltime drain (the
agent asks PBS for its end time from inside its subjob). Fixtures: tests/conftest.py (`pbs` fails
under CI=true when the server is missing), helpers/pbs_jobs.py (running as the user).
"""
from __future__ import annotations

import re

import pytest

from helpers import pbs_jobs
from helpers.agent_harness import EXAMPLES, REPO, TEST_PLUGINS, AgentHarness
from helpers.services import PBS_BIN

pytestmark = [pytest.mark.integration, pytest.mark.pbs, pytest.mark.usefixtures("pbs")]


@pytest.fixture
def h(rabbitmq, amqp_queue):
    """An AgentHarness whose folder (journal, extractor log, job logs) the PBS user owns."""
    from devtools.clowder_standin import ClowderStandin

    pbs_jobs.make_reachable()
    pbs_jobs.write_secrets(rabbitmq)
    folder = pbs_jobs.work_dir("batch")
    jobs: list = []
    with ClowderStandin() as standin:
        harness = AgentHarness(rabbitmq, amqp_queue, standin, folder)
        harness.jobs = jobs
        try:
            yield harness
        finally:
            harness.close()
            pbs_jobs.cleanup(folder, jobs)


def qsub(h: AgentHarness, *options: str, **settings: str) -> str:
    """`qsub [options] -v NAME=value,... pbs/agent_array.pbs` as the user, from the checkout."""
    values = {"AGENT_PLUGIN": "test.directive", "RABBITMQ_QUEUE": h.queue,
              "AGENT_PLUGIN_PATH": f"{TEST_PLUGINS}:{EXAMPLES}", "AGENT_JOURNAL_DIR": h.journal_dir,
              "DIRECTIVE_LOG": h.directive_log, "AGENT_LOG_DIR": str(h.tmp / "logs"),
              "AGENT_IDLE_EXIT": "5"}
    values.update(settings)
    argv = [str(PBS_BIN / "qsub"), *options, "-o", f"{h.tmp}/job.^array_index^.out",
            "-v", ",".join(f"{k}={v}" for k, v in values.items()), "pbs/agent_array.pbs"]
    assert not any("guest:guest" in part for part in argv)  # the secret stays in the env file
    job = pbs_jobs.run_as_user(argv, REPO, pbs_jobs.user_env()).stdout.strip()
    assert re.fullmatch(r"\d+\[\]\.pbshost", job), job
    h.jobs.append(job)
    return job


def exit_statuses(job: str) -> dict:
    return {i: (s["job_state"], s.get("Exit_status")) for i, s in pbs_jobs.subjobs(job).items()}


@pytest.mark.xdist_group("pbs-node")
def test_qsub_as_documented_drains_the_queue(h):
    ids = [h.publish_file(b"sleep 0.2\n") for _ in range(12)]
    job = qsub(h, "-J", "1-2")
    done = pbs_jobs.wait_finished(job, 120)
    assert done["substate"] == 92, done  # 93 would mean a subjob failed (Exit_status stays 0)
    assert exit_statuses(job) == {1: ("F", 0), 2: ("F", 0)}, pbs_jobs.read_output(h.tmp)
    assert all(h.standin.metadata_for(f) for f in ids), pbs_jobs.read_output(h.tmp)
    assert h.depth() == 0 and h.errors() == []
    tag = pbs_jobs.pbs_file_tag(job)
    logs = sorted(p.name for p in (h.tmp / "logs").iterdir())
    assert logs == [f"agent-{tag}_1.log", f"agent-{tag}_2.log"], logs
    text = (h.tmp / "logs" / logs[0]).read_text()
    assert f"pbs {tag}[1].pbshost@" in text  # the agent knew its PBS subjob


@pytest.mark.mpi
@pytest.mark.xdist_group("pbs-node")
def test_qsub_with_mpiprocs_runs_ranks(h, mpi):
    ids = [h.publish_file(b"sleep 0.5\n") for _ in range(8)]
    job = qsub(h, "-J", "1-2", "-l", "select=1:ncpus=2:mpiprocs=2")
    pbs_jobs.wait_finished(job, 150)
    assert exit_statuses(job) == {1: ("F", 0), 2: ("F", 0)}, pbs_jobs.read_output(h.tmp)
    assert all(h.standin.metadata_for(f) for f in ids), pbs_jobs.read_output(h.tmp)
    assert h.depth() == 0 and h.errors() == []
    # each subjob ran mpiexec -n 2 (PBS_NODEFILE has mpiprocs lines); the group's leader says so
    tag = pbs_jobs.pbs_file_tag(job)
    for index in (1, 2):
        text = (h.tmp / "logs" / f"agent-{tag}_{index}.log").read_text()
        assert "MPI group of 2 rank(s)" in text, text


@pytest.mark.slow
@pytest.mark.xdist_group("pbs-walltime")
def test_walltime_drain_from_pbs_end_time(h):
    # 40 s subjobs, 15 s files, 20 s margin: a subjob takes one file (unknown length: admitted
    # while more than the margin is left), then with about 23 s left (< 15 + 20) it stops and hands
    # back the file it prefetched, long before PBS's SIGTERM; the third subjob (two run at a time)
    # takes what was handed back. Wide edges on both sides: timing noise does not change the count.
    ids = [h.publish_file(b"sleep 15\n") for _ in range(3)]
    job = qsub(h, "-J", "1-3%2", "-l", "walltime=00:00:40")
    pbs_jobs.wait_finished(job, 150)
    statuses = exit_statuses(job)
    logs = "\n".join(p.read_text() for p in sorted((h.tmp / "logs").iterdir()))
    assert statuses == {1: ("F", 0), 2: ("F", 0), 3: ("F", 0)}, (statuses, logs)
    assert all(h.standin.metadata_for(f) for f in ids), logs
    assert h.depth() == 0 and h.errors() == []
    assert "task ends at" in logs and "stopping: walltime drain" in logs, logs
    assert re.search(r"[1-9]\d* handed back", logs), "a draining agent handed its prefetched file back"
    assert "did not say when this task ends" not in logs and "exited 153" not in logs
    # every file ran once, none was killed at the limit and run again
    assert sorted(r[0] for r in h.runs()) == sorted(ids), h.runs()
