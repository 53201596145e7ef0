"""dispatch with a scripted broker and scheduler: ownership hand-over and crash windows."""
import hashlib
import json

import pytest

from launcher.broker import Delivery
from launcher.caps import Caps
from launcher.dispatch import Dispatcher
from launcher.ledger import Ledger
from launcher.operations import Launcher
from launcher.runner import LocalRunner
from launcher.schedulers.base import JobStatus, Scheduler, TaskStatus
from launcher.states import JobState

CAPS = Caps(max_array_size=10, max_running=4, max_queued=4, max_walltime_s=3600,
            default_walltime_s=3600)


class FakeBroker:
    def __init__(self, bodies):
        self.ready = [Delivery(i + 1, json.dumps(b).encode(), False, {"headers": {}})
                      for i, b in enumerate(bodies)]
        self.acked, self.published, self.closed = [], [], 0

    def __call__(self):
        return self

    def get(self, queue):
        return self.ready.pop(0) if self.ready else None

    def ack(self, tag):
        self.acked.append(tag)

    def publish(self, queue, body, props, headers, declare=False):
        self.published.append((queue, json.loads(body), headers))

    def close(self):
        self.closed += 1


class FakeSlurm(Scheduler):
    name = "fake"

    def __init__(self):
        self.jobs, self.envs, self.n = {}, {}, 0

    def submit(self, runner, req):
        self.n += 1
        job = str(self.n)
        self.jobs[job] = {1: TaskStatus(1, JobState.QUEUED, "PENDING")}
        self.envs[job] = dict(req.env)
        return job

    def status_many(self, runner, ids):
        return {j: JobStatus(j, dict(self.jobs.get(j, {})), missing=j not in self.jobs)
                for j in ids}

    def find(self, runner, name):
        return []


@pytest.fixture
def setup(tmp_path):
    sched = FakeSlurm()
    launcher = Launcher(runner=LocalRunner(), scheduler=sched,
                        ledger=Ledger(tmp_path / "l.sqlite"), caps=CAPS, script="one.sh")

    def make(bodies, **kw):
        broker = FakeBroker(bodies)
        return Dispatcher(launcher, broker, "q", tmp_path / "msgs", 600, **kw), broker
    return launcher, sched, make


def test_each_message_becomes_one_job_and_is_acked_after_the_ledger_commit(setup, tmp_path):
    launcher, sched, make = setup
    d, broker = make([{"id": "f1", "secretKey": "s3cret"}, {"id": "f2"}])
    assert d.step()["taken"] == 2
    assert broker.acked == [1, 2]
    rows = launcher.ledger.dispatch_rows("submitted")
    assert [(r["file_id"], r["job_id"]) for r in rows] == [("f1", "1"), ("f2", "2")]
    msg_file = sched.envs["1"]["CLOWDER_MESSAGE_FILE"]
    record = json.loads(open(msg_file).read())
    assert json.loads(record["body"])["id"] == "f1"
    assert record["queue"] == "q"  # an agent serving several plugins runs the one consuming it
    import os
    assert os.stat(msg_file).st_mode & 0o077 == 0  # holds the secretKey: owner only


def test_max_jobs_and_caps_limit_what_is_taken(setup):
    launcher, sched, make = setup
    d, broker = make([{"id": f"f{i}"} for i in range(10)], max_jobs=3)
    assert d.step()["taken"] == 3
    assert len(broker.ready) == 7  # the rest stays in the broker, not held unacked


def test_done_requeued_dead_lettered(setup):
    launcher, sched, make = setup
    d, broker = make([{"id": "ok"}, {"id": "bad"}], max_attempts=2)
    d.step()
    sched.jobs["1"][1] = TaskStatus(1, JobState.COMPLETED, "COMPLETED", 0)
    sched.jobs["2"][1] = TaskStatus(1, JobState.TIMEOUT, "TIMEOUT", 143)
    s = d.step()
    assert (s["done"], s["requeued"]) == (1, 1)
    queue, body, headers = broker.published[0]
    assert queue == "q" and body == {"id": "bad"} and headers["x-dispatch-attempts"] == 1
    assert headers["x-dispatch-reason"] == "job 2 ended timeout (exit 143)"
    # the broker gives it back with the attempts header; it fails again: dead-lettered
    broker.ready.append(Delivery(9, b'{"id": "bad"}', False,
                                 {"headers": {"x-dispatch-attempts": 1}}))
    d.step()
    sched.jobs["3"][1] = TaskStatus(1, JobState.FAILED, "FAILED", 2)
    assert d.step()["dead_lettered"] == 1
    assert broker.published[-1][0] == "error.q"


def test_redelivered_duplicate_after_a_crash_before_the_ack(setup):
    launcher, sched, make = setup
    body = b'{"id": "f1"}'
    # the previous run committed the message and died before acking it
    launcher.ledger.dispatch_receive(hashlib.sha256(body).hexdigest(), "f1", body, {}, 0)
    d, broker = make([])
    broker.ready.append(Delivery(5, body, True, {"headers": {}}))
    s = d.step()
    assert s["duplicates"] == 1 and broker.acked == [5]
    assert len(sched.jobs) == 1  # the owned row was submitted once, the copy not at all
