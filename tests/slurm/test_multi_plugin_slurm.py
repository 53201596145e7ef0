"""Agents serving two plugins, as Slurm array tasks that `launcher scale` sized from both queues' backlog."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.agent_harness import REPO, TEST_PLUGINS, harness, second_harness  # noqa: F401 (fixtures)
from helpers.slurm_jobs import cleanup, tasks_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.xdist_group("slurm-cpus"),
              pytest.mark.usefixtures("slurm")]
A, B = "test.directive", "test.simple.wc"
CAPS = 'max_array_size: 5\nmax_running: 4\nmax_queued: 6\nmax_walltime: "00:05:00"\n' \
       'default_walltime: "00:03:00"\ncores_per_task: 1\n'


def test_scale_sizes_from_both_queues_and_each_task_serves_both_plugins(harness, second_harness, tmp_path):
    a_ids = [harness.publish_file(b"sleep 0.2\n", name=f"a{i}.txt") for i in range(6)]
    b_ids = [second_harness.publish_file(b"one two\n", name=f"b{i}.txt") for i in range(4)]
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    state = tmp_path / "state"
    env = harness.env(LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(state), LAUNCHER_SCHEDULER="slurm",
                      LAUNCHER_SCRIPT=str(os.path.join(REPO, "pbs", "agent_array.slurm")),
                      RABBITMQ_QUEUE=f"{harness.queue},{second_harness.queue}",
                      AGENT_PLUGIN=f"{A} {B}", AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_IDLE_EXIT="5",
                      AGENT_LOG_DIR=str(tmp_path / "logs"), AGENT_HOME=REPO,
                      AGENT_PLUGINS=json.dumps({A: {"rabbitmq_queue": harness.queue},
                                                B: {"rabbitmq_queue": second_harness.queue}}))
    try:
        out = subprocess.run([sys.executable, "-m", "launcher", "scale", "--once", "--files-per-task", "5",
                              "--idle-grace", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("scale_up: submit 2: backlog 10"), out.stdout  # 6 + 4 files, 5 per task
        status = json.loads(subprocess.run([sys.executable, "-m", "launcher", "status", "--json"], cwd=REPO,
                                           env=env, capture_output=True, text=True, timeout=120, check=True).stdout)
        job = status["jobs"][0]["job_id"]
        def finished() -> bool:
            states = [str(s) for s in tasks_of(job).values()]
            return len(states) == 2 and all("COMPLETED" in s for s in states)

        done = wait_for(finished, timeout=240, step=1)
        logs = "\n".join(p.read_text() for p in (tmp_path / "logs").iterdir()) if (tmp_path / "logs").exists() else ""
        assert done, f"{tasks_of(job)}\n{logs}"
        assert all(harness.standin.metadata_for(f) for f in a_ids + b_ids), logs
    finally:
        cleanup(state)
    assert harness.depth() == 0 and second_harness.depth() == 0 and harness.errors() == []
    assert sorted(r[0] for r in harness.runs()) == sorted(a_ids)  # a's queue went to a's extractor only
    assert all(second_harness.standin.metadata_for(f)[0]["content"]["words"] == "2" for f in b_ids)
    assert "idle for 5s (every queue)" in logs and "names one queue" not in logs
