"""The agent under real MPI ranks (the mpich wheel's mpiexec) against a real RabbitMQ.

Every rank runs one extractor; only the group leader holds a broker connection. Files must be
spread over the ranks, a killed or hung rank must lose nothing, a signal to any rank must drain
the whole group, and the plain command (no mpiexec) must not touch MPI at all.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.mpi_ranks import child_env, launched_by_mpi
from helpers.agent_harness import REPO
from helpers.mpi_harness import mpi_harness

pytestmark = [pytest.mark.integration, pytest.mark.mpi]


@pytest.fixture
def harness(rabbitmq, mpi, amqp_queue, tmp_path):
    with mpi_harness(rabbitmq, mpi, amqp_queue, tmp_path) as h:
        yield h


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_plain_command_does_not_use_mpi():
    assert not launched_by_mpi({})
    assert launched_by_mpi({"PMI_RANK": "0", "PMI_SIZE": "4"})
    assert launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not launched_by_mpi({"PMI_RANK": "0", "AGENT_MPI": "0"})
    assert launched_by_mpi({"AGENT_MPI": "1"})
    assert child_env({"PMI_FD": "9", "PMI_RANK": "1", "HOME": "/h"}) == {"HOME": "/h"}
    code = ("import sys, agent.cli, agent.mpi_ranks; agent.mpi_ranks.launched_by_mpi(); "
            "sys.exit(1 if 'mpi4py' in sys.modules else 0)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env).returncode == 0


def test_files_spread_over_ranks_with_one_broker_connection(harness):
    ids = [harness.publish_file(b"sleep 0.4\n") for _ in range(24)]
    proc = harness.start_mpi(4, "--idle-exit", "2")
    harness.wait_for(lambda: harness.consumers() > 0, 60, "the leader to consume")
    seen = set()
    while proc.poll() is None:
        seen.add(harness.consumers())
        time.sleep(0.2)
    assert proc.returncode == 0, harness.log_text()
    assert seen <= {0, 1}, f"more than one consumer on the queue: {seen}"
    assert harness.unprocessed(ids) == [] and harness.depth() == 0 and harness.errors() == []
    runs = harness.runs()
    assert len(runs) == 24  # each file once
    per_pid = collections.Counter(pid for _, pid, _ in runs)
    assert len(per_pid) == 4 and min(per_pid.values()) >= 3, per_pid
    text = harness.log_text()
    assert "4 of 4 rank(s) ready" in text
    assert len(harness.rank_pids()) == 4


def test_statuses_of_a_long_file_on_another_rank_arrive_while_it_runs(harness):
    """A rank holds its extractor's statuses for the file's outcome (one MPI message per file), but
    only briefly: a long file's start status reaches the broker while the file still runs."""
    ids = [harness.publish_file(b"sleep 6\n") for _ in range(2)]
    proc = harness.start_mpi(2, "--idle-exit", "2")
    harness.wait_for(lambda: len(harness.runs()) >= 2, 60, "both ranks to start a file")
    seen: dict[str, list[str]] = collections.defaultdict(list)

    def started_on_both() -> bool:
        for status in harness.statuses():
            seen[status["file_id"]].append(status["status"])
        return all(any(s.startswith("StatusMessage.start") for s in seen[fid]) for fid in ids)

    harness.wait_for(started_on_both, 5, "each file's start status")
    assert sorted(harness.unprocessed(ids)) == sorted(ids)  # both still running: statuses came first
    assert len({pid for _, pid, _ in harness.runs()}) == 2  # one file on each rank
    assert harness.wait_exit(proc) == 0, harness.log_text()
    assert harness.unprocessed(ids) == [] and harness.depth() == 0 and harness.errors() == []


def test_groups_hold_one_connection_each(harness):
    ids = [harness.publish_file(b"sleep 0.3\n") for _ in range(16)]
    proc = harness.start_mpi(4, "--idle-exit", "2", AGENT_MPI_LEADER="2")
    harness.wait_for(lambda: harness.consumers() == 2, 60, "two leaders to consume")
    assert harness.wait_exit(proc) == 0, harness.log_text()
    assert harness.unprocessed(ids) == [] and harness.depth() == 0
    assert len(collections.Counter(pid for _, pid, _ in harness.runs())) == 4


def test_killed_rank_loses_nothing(harness):
    """kill -9 of one rank's process: hydra ends the job; every file is processed by the next agent."""
    ids = [harness.publish_file(b"sleep 2\n") for _ in range(9)]
    proc = harness.start_mpi(3, "--idle-exit", "2")
    harness.wait_for(lambda: len(harness.runs()) >= 3, 60, "every rank to start a file")
    victim = harness.rank_pids()[1]
    os.kill(victim, signal.SIGKILL)
    code = harness.wait_exit(proc, 30)
    assert code != 0  # the launcher tore the job down
    done = len(ids) - len(harness.unprocessed(ids))
    # Every unfinished file is back in the queue; a file whose upload landed just before the job
    # was torn down may be back too (its ack died with the job): at-least-once, never lost.
    harness.wait_for(lambda: harness.depth() >= len(ids) - done, 10, "unfinished files back in the queue")
    assert harness.run_agent("--idle-exit", "2", timeout=90) == 0
    assert harness.unprocessed(ids) == [] and harness.depth() == 0 and harness.errors() == []


def test_hung_rank_is_given_up_and_the_others_carry_on(harness):
    """A rank that stops answering (SIGSTOP: the launcher sees nothing) is dropped after the timeout."""
    ids = [harness.publish_file(b"sleep 1\n") for _ in range(9)]
    # The ranks log straight to a file (flushed per line): MPI_Abort may kill mpiexec's stdio
    # forwarding before the leader's last lines reach the harness's log.
    rank_log = harness.tmp / "ranks.log"
    proc = harness.start_mpi(3, "--idle-exit", "2", AGENT_MPI_RANK_TIMEOUT="2", AGENT_LOG_FILE=str(rank_log))
    harness.wait_for(lambda: len(harness.runs()) >= 3, 60, "every rank to start a file")
    harness.logs.append(str(rank_log))
    victim = harness.rank_pids()[2]
    os.kill(victim, signal.SIGSTOP)
    try:
        code = harness.wait_exit(proc, 60)
        # MPI_Abort has Hydra SIGKILL every rank, the stopped one too; the kernel finishes that
        # exit when the victim is next scheduled, which on a loaded host can be after mpiexec is gone.
        killed_by_mpi = _gone_within(victim, 15)
    finally:
        if _alive(victim):
            os.kill(victim, signal.SIGKILL)
    text = harness.log_text()
    assert "MPI rank 2 lost" in text and "MPI_Abort" in text, text
    assert code == 0, text  # everything settled before the abort
    assert harness.unprocessed(ids) == [] and harness.depth() == 0 and harness.errors() == []
    assert killed_by_mpi, "the stopped rank outlived the MPI job"


def test_sigterm_to_one_rank_drains_the_whole_group(harness):
    ids = [harness.publish_file(b"sleep 1.5\n") for _ in range(12)]
    proc = harness.start_mpi(3, "--idle-exit", "30")
    harness.wait_for(lambda: len(harness.runs()) >= 3, 60, "every rank to start a file")
    os.kill(harness.rank_pids()[2], signal.SIGTERM)
    assert harness.wait_exit(proc, 40) == 0, harness.log_text()
    text = harness.log_text()
    assert "rank 2 received SIGTERM" in text and "stopping: received SIGTERM" in text, text
    done = len(ids) - len(harness.unprocessed(ids))
    assert 3 <= done < len(ids)
    assert harness.depth() == len(ids) - done and harness.errors() == []
    assert len(harness.runs()) == done  # nothing was started twice or lost in between


def test_stage_ahead_hands_the_extractor_its_downloaded_file(harness):
    contents = [f"sleep 0.2\n{'x' * (100 + i)}\n".encode() for i in range(10)]
    ids = [harness.publish_file(c, name=f"f{i}.txt") for i, c in enumerate(contents)]
    proc = harness.start_mpi(2, "--idle-exit", "2", AGENT_STAGE_AHEAD="1", AGENT_WORK_DIR=str(harness.tmp / "work"))
    assert harness.wait_exit(proc) == 0, harness.log_text()
    for fid, content in zip(ids, contents):
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1 and md[0]["content"]["bytes"] == len(content)
    counts = harness.standin.request_counts()
    blob_gets = sum(n for route, n in counts.items() if route.startswith("GET api/files/{") and route.endswith("}"))
    assert blob_gets == len(ids), counts  # downloaded once, by the stager
    assert "stage-ahead on" in harness.log_text()
    assert os.listdir(harness.tmp / "work") == []  # staged copies removed


def test_singleton_without_mpiexec(harness, mpi):
    """AGENT_MPI=1 without a launcher: an MPI singleton of one rank, same behaviour."""
    ids = [harness.publish_file(b"ok\n") for _ in range(3)]
    path = os.path.dirname(str(mpi)) + os.pathsep + os.environ.get("PATH", "")
    assert harness.run_agent("--idle-exit", "2", AGENT_MPI="1", PATH=path, timeout=60) == 0, harness.log_text()
    assert harness.unprocessed(ids) == []
    assert "1 of 1 rank(s) ready" in harness.log_text()
