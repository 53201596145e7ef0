"""Ledger (SQLite WAL) and the operations over it, with a scripted fake scheduler."""
import sqlite3

import pytest

from launcher.caps import Caps, Request
from launcher.ledger import Ledger, LedgerError
from launcher.operations import Launcher, Refused
from launcher.runner import CommandError, CommandTimeout
from launcher.schedulers.base import (
    JobStatus, QueryFailed, Scheduler, SubmitFailed, TaskStatus,
)
from launcher.states import JobState
from launcher.strategy import Case, Policy

Q, R, C, T, X, M = (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, JobState.TIMEOUT,
                    JobState.CANCELLED, JobState.MISSING)
CAPS = Caps(max_array_size=10, max_running=6, max_queued=6, max_walltime_s=3600,
            default_walltime_s=3600, node_hours_budget=100.0, budget_period="month")


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class FakeScheduler(Scheduler):
    """Scripted scheduler: jobs is {job_id: {index: TaskStatus}}; failures on demand."""

    name = "fake"

    def __init__(self):
        self.jobs, self.names, self.calls = {}, {}, []
        self.next_id, self.fail_query, self.fail_find, self.submit_error = 100, False, False, None

    def submit(self, runner, req):
        self.calls.append(("submit", req.tasks, req.max_running))
        if self.submit_error:
            raise SubmitFailed("qsub failed") from self.submit_error
        job = str(self.next_id)
        self.next_id += 1
        self.jobs[job] = {i: TaskStatus(i, Q, "PENDING") for i in range(1, req.tasks + 1)}
        self.names[req.job_name] = job
        return job

    def status_many(self, runner, job_ids):
        self.calls.append(("status", tuple(job_ids)))
        if self.fail_query:
            raise QueryFailed("squeue: timed out")
        return {j: JobStatus(j, dict(self.jobs[j])) if j in self.jobs else
                JobStatus(j, {}, missing=True) for j in job_ids}

    def cancel(self, runner, job_id, indices=None):
        self.calls.append(("cancel", job_id, tuple(indices) if indices else None))
        for i in list(indices or self.jobs[job_id]):
            self.jobs[job_id].pop(i, None)  # Slurm: cancelled tasks vanish

    def find(self, runner, job_name):
        if self.fail_find:
            raise QueryFailed("squeue: timed out")
        return [self.names[job_name]] if job_name in self.names else []


@pytest.fixture
def parts(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "ledger.sqlite", missing_grace_s=600)
    sched = FakeScheduler()
    stats = {"ready": 0, "consumers": 0}

    def broker():
        from launcher.broker import QueueStats
        return QueueStats(stats["ready"], stats["consumers"])

    from launcher.runner import LocalRunner
    launcher = Launcher(runner=LocalRunner(), scheduler=sched, ledger=ledger, caps=CAPS, script="s.sh",
                        broker=broker, clock=clock)
    return launcher, sched, clock, stats


def test_wal_and_schema_version(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    ledger.close()
    with pytest.raises(LedgerError, match="schema 99"):
        Ledger(tmp_path / "l.sqlite")


def test_submit_records_tasks_and_states(parts):
    launcher, sched, clock, _ = parts
    job, allowed = launcher.submit(Request(3))
    assert [r["state"] for r in launcher.ledger.tasks(job)] == ["queued"] * 3
    sched.jobs[job][1] = TaskStatus(1, R, "RUNNING", start_time=clock.t)
    sched.jobs[job][2] = TaskStatus(2, T, "TIMEOUT", -29, clock.t - 3600, clock.t)
    clock.t += 60
    assert launcher.refresh()
    assert launcher.ledger.counts()["running"] == 1
    rows = {r["idx"]: r for r in launcher.ledger.tasks(job)}
    assert rows[2]["state"] == "timeout" and rows[2]["final"] == 1
    # a terminal state is final even if the scheduler later says something else
    sched.jobs[job][2] = TaskStatus(2, R, "RUNNING")
    launcher.refresh()
    assert {r["idx"]: r["state"] for r in launcher.ledger.tasks(job)}[2] == "timeout"


def test_vanished_task_is_missing_then_settled(parts):
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(2))
    del sched.jobs[job][2]
    launcher.refresh()
    row = launcher.ledger.tasks(job)[1]
    assert row["state"] == "missing" and row["final"] == 0
    assert launcher.ledger.counts()["missing"] == 1  # still present for scaling
    clock.t += 601
    launcher.refresh()
    row = launcher.ledger.tasks(job)[1]
    assert row["state"] == "missing" and row["final"] == 1  # settled: never "completed"
    assert launcher.ledger.counts()["missing"] == 0


def test_missing_task_that_reappears_is_tracked_again(parts):
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(1))
    saved = sched.jobs.pop(job)
    launcher.refresh()
    assert launcher.ledger.tasks(job)[0]["state"] == "missing"
    sched.jobs[job] = {1: TaskStatus(1, R, "RUNNING")}
    launcher.refresh()
    assert launcher.ledger.tasks(job)[0]["state"] == "running"


def test_failed_query_changes_nothing(parts):
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(2))
    before = [dict(r) for r in launcher.ledger.tasks(job)]
    sched.fail_query = True
    sched.jobs.clear()
    clock.t += 10_000
    assert launcher.refresh() is False
    assert [dict(r) for r in launcher.ledger.tasks(job)] == before


def test_cancelled_tasks_that_vanish_are_cancelled(parts):
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(3))
    launcher.cancel(job, [2, 3])
    launcher.refresh()
    assert {r["idx"]: r["state"] for r in launcher.ledger.tasks(job)} == {
        1: "queued", 2: "cancelled", 3: "cancelled"}


def test_submit_failure_is_recorded(parts):
    launcher, sched, clock, _ = parts
    sched.submit_error = CommandError(["sbatch"], 1, "", "sbatch: error: invalid partition")
    with pytest.raises(SubmitFailed):
        launcher.submit(Request(2))
    assert [s["status"] for s in launcher.ledger.submissions()] == ["failed"]
    assert launcher.ledger.counts()["missing"] == 0


def test_submit_timeout_leaves_the_intent_for_reconcile(parts):
    launcher, sched, clock, _ = parts
    sched.submit_error = CommandTimeout(["sbatch"], None, "", "", "timed out after 120 s")
    with pytest.raises(SubmitFailed):
        launcher.submit(Request(2))
    assert [s["status"] for s in launcher.ledger.submissions()] == ["intent"]
    assert launcher.ledger.counts()["missing"] == 2  # counted as present until resolved


def test_refused_request(parts):
    launcher, *_ = parts
    with pytest.raises(Refused, match="queue 'gpu' is not allowed"):
        launcher.submit(Request(1, queue="gpu"))


def test_crash_after_qsub_before_record_is_adopted_not_resubmitted(parts):
    """The launcher died after the scheduler created the job but before the ledger knew."""
    launcher, sched, clock, stats = parts
    sub_id, name = launcher.ledger.begin_submission("fake", 2, 3600, None, None, 2, 1.0, "s.sh",
                                                    clock.t)
    sched.names[name] = "555"
    sched.jobs["555"] = {1: TaskStatus(1, R, "RUNNING"), 2: TaskStatus(2, Q, "PENDING")}
    # restart: a backlog that two tasks cover must not trigger a second submission
    stats["ready"] = 80
    decision = launcher.scale_once(Policy(walltime_s=3600, files_per_task=50))
    assert decision.case == Case.STEADY
    assert not [c for c in sched.calls if c[0] == "submit"]
    assert launcher.ledger.submissions()[0]["job_id"] == "555"
    assert launcher.ledger.counts() | {} == {**launcher.ledger.counts(), "running": 1, "queued": 1}


def test_intent_never_submitted_is_failed_on_restart(parts):
    launcher, sched, clock, _ = parts
    launcher.ledger.begin_submission("fake", 2, 3600, None, None, 2, 1.0, "s.sh", clock.t)
    assert launcher.reconcile()
    assert launcher.ledger.submissions()[0]["status"] == "failed"


def test_unresolvable_intent_blocks_scale_up(parts):
    launcher, sched, clock, stats = parts
    launcher.ledger.begin_submission("fake", 2, 3600, None, None, 2, 1.0, "s.sh", clock.t)
    sched.fail_find = True
    stats["ready"] = 80
    decision = launcher.scale_once(Policy(walltime_s=3600, files_per_task=50))
    assert decision.case == Case.SCHEDULER_UNAVAILABLE and decision.submit == 0
    assert launcher.ledger.submissions()[0]["status"] == "intent"


def test_scale_up_then_down(parts):
    launcher, sched, clock, stats = parts
    policy = Policy(walltime_s=3600, files_per_task=10, idle_grace_s=120)
    stats["ready"] = 25
    d = launcher.scale_once(policy)
    assert d.case == Case.SCALE_UP and d.submit == 3
    job = launcher.ledger.last_decisions(1)[0]["job_id"]
    assert job == "100"
    stats["ready"] = 0
    clock.t += 60
    assert launcher.scale_once(policy).case == Case.IDLE_WAIT  # the idle clock starts now
    clock.t += 119
    assert launcher.scale_once(policy).case == Case.IDLE_WAIT
    clock.t += 1
    d = launcher.scale_once(policy)
    assert d.case == Case.SCALE_DOWN and d.cancel_queued == 3
    assert ("cancel", "100", None) in sched.calls
    launcher.refresh()
    assert launcher.ledger.counts()["queued"] == 0
    reasons = [r["case_name"] for r in launcher.ledger.last_decisions(5)]
    assert reasons == ["scale_down", "idle_wait", "idle_wait", "scale_up"]


def test_node_hours_used_and_committed(parts):
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(2))  # 2 x 1 h reserved
    used, committed = launcher.ledger.node_hours(0, clock.t)
    assert (used, committed) == (0.0, 2.0)
    sched.jobs[job][1] = TaskStatus(1, C, "COMPLETED", 0, clock.t, clock.t + 1800)
    sched.jobs[job][2] = TaskStatus(2, R, "RUNNING", None, clock.t)
    clock.t += 1800
    launcher.refresh()
    used, committed = launcher.ledger.node_hours(0, clock.t)
    assert used == pytest.approx(1.0) and committed == pytest.approx(1.5)


def test_status_collect_and_render(parts):
    from launcher.status import collect, render
    launcher, sched, clock, stats = parts
    stats["ready"] = 25
    launcher.scale_once(Policy(walltime_s=3600, files_per_task=10))
    data = collect(launcher, "wordcount", "amqp://u:***@h/", True)
    text = render(data)
    assert "ready 25" in text and "queued 3" in text and "scale_up" in text
    assert len(text.splitlines()) < 25


def test_failed_task_says_why_from_its_output(parts, tmp_path):
    """A failed task's last output line is kept (read once) and shown by status, redacted."""
    from launcher.status import collect, render
    launcher, sched, clock, _ = parts
    job, _ = launcher.submit(Request(2))
    out = tmp_path / "job.o1"
    out.write_text("agent_task: task 1 on n1\nagent: cannot reach amqp://u:hunter2@mq/ (refused)\n\n")
    sched.jobs[job][1] = TaskStatus(1, JobState.FAILED, "F", 4, clock.t, clock.t, output_path=str(out))
    sched.jobs[job][2] = TaskStatus(2, JobState.FAILED, "F", 2, clock.t, clock.t,
                                    output_path=str(tmp_path / "absent"))
    clock.t += 10
    assert launcher.refresh()
    out.write_text("changed later\n")  # settled: not read again
    launcher.refresh()
    data = collect(launcher, "q", "amqp://u:***@h/", True)
    why = {f["index"]: f["why"] for f in data["failed_tasks"]}
    assert why == {1: "agent: cannot reach amqp://u:***@mq/ (refused)", 2: "exit 2"}
    assert f"failed     {job} task 1: agent: cannot reach" in render(data) and "hunter2" not in render(data)


def test_schema_3_ledger_gains_the_why_column(tmp_path):
    path = tmp_path / "old.sqlite"
    ledger = Ledger(path)
    ledger.db.execute("ALTER TABLE tasks DROP COLUMN why")
    ledger.db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    ledger.close()
    ledger = Ledger(path)
    assert "why" in {r[1] for r in ledger.db.execute("PRAGMA table_info(tasks)")}
    assert ledger.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
