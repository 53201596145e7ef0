"""PBS adapter, states and the agent's end-time lookup fed real OpenPBS 23.06.06 outputs.

The outputs were captured on a real server (tests/data/openpbs/README.md says where each comes from).
"""
from __future__ import annotations

import json
import time

import pytest

from agent.jobenv import parse_pbs_end
from helpers import datafiles
from hpc_common.job_env import agent_settings_env, is_secret, secrets_file_value
from hpc_common.pbs_conf import pbs_bin_dir, pbs_command
from launcher.errors import RequestError
from launcher.runner import CommandError
from launcher.schedulers.base import SubmitRequest
from launcher.schedulers.pbs import PBSPro
from launcher.schedulers.slurm import Slurm
from launcher.schedulers.torque import Torque
from launcher.states import JobState

Q, R, C, F, T, X = (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, JobState.FAILED,
                    JobState.TIMEOUT, JobState.CANCELLED)


def read(name: str) -> str:
    return datafiles.read(f"openpbs/{name}")


def states(status):
    return {i: t.state for i, t in sorted(status.tasks.items())}


def test_running_array_with_subjobs_and_remaining_as_number():
    status = PBSPro().parse_status("2[].pbshost", read("array-qstat-tf-json-running.txt"))
    assert states(status) == {1: R, 2: R, 3: Q}
    assert status.tasks[1].start_time is not None
    assert status.tasks[1].output_path == "/home/pbsuser/t/arrjob.o2.1"


def test_finished_array_remaining_dash():
    status = PBSPro().parse_status("2[].pbshost", read("array-qstat-xtf-json-finished.txt"))
    assert states(status) == {1: C, 2: C, 3: C}
    assert all(t.end_time for t in status.tasks.values())


def test_failed_subjob_under_a_parent_with_exit_status_0():
    doc = json.loads(read("failed-subjob-xtf-json.txt"), strict=False)
    parent = doc["Jobs"]["1[].pbshost"]
    assert (parent["Exit_status"], parent["substate"]) == (0, 93)  # the trap: the parent says 0
    status = PBSPro().parse_status("1[].pbshost", read("failed-subjob-xtf-json.txt"))
    assert states(status) == {1: C, 2: F, 3: C}
    assert status.tasks[2].exit_status == 3


def test_walltime_killed_plain_job_with_numeric_name():
    status = PBSPro().parse_status("2.pbshost", read("walltime-killed-numeric-name-xf-json.txt"))
    assert states(status) == {1: T}
    assert status.tasks[1].exit_status == -29


def test_deleted_running_array_is_cancelled():
    status = PBSPro().parse_status("3[].pbshost", read("qdel-array-qstat-xtf-json-after.txt"))
    # 1 and 3: Exit_status 271 (SIGTERM by qdel); 2: deleted first, Exit_status 1 but substate 91
    assert states(status) == {1: X, 2: X, 3: X}


def test_held_array_remaining_as_string_is_queued():
    status = PBSPro().parse_status("4[].pbshost", read("held-array-f-json.txt"))
    assert states(status) == {1: Q, 2: Q}


def test_stepped_array_queued_indices():
    status = PBSPro().parse_status("3[].pbshost", read("stepped-array-f-json-early.txt"))
    assert sorted(status.tasks) == [1, 3, 5, 7] and set(states(status).values()) == {Q}


def test_qsub_output_is_the_array_id():
    assert PBSPro().parse_submit(read("array-qsub-stdout.txt")) == "2[].pbshost"


def _failing_runner(rc: int, stdout: str, stderr: str):
    class Fake:
        description = "fake"

        def run(self, argv, timeout=0, **kw):
            raise CommandError(argv, rc, stdout, stderr)
    return Fake()


def _case(text: str, command: str):
    """(rc, stdout, stderr line) of one command in error-cases.txt / qdel-array-again-and-unknown.txt."""
    block = text.split(f"$ {command}", 1)[1].split("\n$ ", 1)[0]
    rc = int(block.rsplit("rc=", 1)[1].split()[0])
    lines = block.splitlines()[1:]
    err = next(line for line in lines if line.startswith("qstat:"))
    out = "\n".join(line for line in lines if not line.startswith("qstat:")).rsplit("rc=", 1)[0]
    return rc, out, err


def test_unknown_job_exit_153_is_missing():
    rc, out, err = _case(read("error-cases.txt"), "qstat -x -f -F json 99999.pbshost")
    assert rc == 153
    assert PBSPro().status(_failing_runner(rc, out, err), "99999.pbshost").missing


def test_finished_job_without_history_exit_35_is_missing():
    rc, out, err = _case(read("qdel-array-again-and-unknown.txt"), "qstat -f -F json 3[].pbshost")
    assert rc == 35
    assert PBSPro(history=False).status(_failing_runner(rc, out, err), "3[].pbshost").missing


def test_agent_end_time_from_real_qstat_f_text():
    text = read("subjob-qstat-f-running.txt")
    stime = next(line.split(" = ", 1)[1] for line in text.splitlines() if "stime = " in line)
    start = time.mktime(time.strptime(" ".join(stime.split()), "%a %b %d %H:%M:%S %Y"))
    assert parse_pbs_end(text) == start + 90  # Resource_List.walltime = 00:01:30


# ------------------------------------------------------------------ what reaches the job
REQ = SubmitRequest(script="/s/agent_array.pbs", tasks=3, walltime_s=600, job_name="clowder-1",
                    env={"AGENT_PLUGIN": "ext.a ext.b", "MOUNTED_PATHS": '{"/a":"/b"}'.replace('"', ""),
                         "AGENT_PLUGIN_PATH": "/p/one,/p/two", "RABBITMQ_QUEUE": "q"})


def test_pbs_v_list_quotes_values_with_commas():
    argv = PBSPro(bin_dir="/opt/pbs/bin").submit_argv(REQ)
    assert argv[0] == "/opt/pbs/bin/qsub"
    assert argv[argv.index("-v") + 1] == (
        "AGENT_PLUGIN=ext.a ext.b,AGENT_PLUGIN_PATH='/p/one,/p/two',MOUNTED_PATHS={/a:/b},RABBITMQ_QUEUE=q")


@pytest.mark.parametrize("sched", [Torque(), Slurm()])
def test_schedulers_without_quoting_refuse_commas(sched):
    with pytest.raises(RequestError, match="plain values"):
        sched.submit_argv(REQ)


@pytest.mark.parametrize("env", [{"RABBITMQ_URI": "amqp://u:secret@h/%2f"}, {"EXTRACTOR_KEY": "k1234"},
                                 {"AGENT_RABBITMQ_URI": "amqp://u:p@h"}, {"AGENT_PLUGIN": "a\nb"}])
def test_submit_request_refuses_secrets_and_control_characters(env):
    with pytest.raises(RequestError):
        SubmitRequest(script="s", tasks=1, walltime_s=60, job_name="j", env=env)


def test_agent_settings_env_keeps_agent_names_and_drops_secrets():
    environ = {"AGENT_PLUGIN": "p", "AGENT_PLUGIN_PATH": "/x", "RABBITMQ_QUEUE": "q", "CLOWDER_URL": "http://c",
               "RABBITMQ_URI": "amqp://guest:guest@h/%2f", "EXTRACTOR_KEY": "k", "AGENT_EXTRACTOR_KEY": "k",
               "PATH": "/bin", "HOME": "/root", "LAUNCHER_CAPS": "/c.yaml"}
    assert agent_settings_env(environ) == {"AGENT_PLUGIN": "p", "AGENT_PLUGIN_PATH": "/x",
                                           "RABBITMQ_QUEUE": "q", "CLOWDER_URL": "http://c"}
    assert agent_settings_env({"RABBITMQ_URI": "amqp://h/%2f"}) == {"RABBITMQ_URI": "amqp://h/%2f"}
    assert is_secret("RABBITMQ_URI", "amqp://u:p@h") and not is_secret("AGENT_PLUGIN", "amqp://u:p@h")


def test_every_agent_environment_name_is_forwarded_or_secret():
    """The launcher's list (hpc_common.job_env) covers every name agent/config.py reads."""
    from agent.config import SETTINGS
    for setting in SETTINGS:
        for name in setting.env:
            forwarded = agent_settings_env({name: "plain"}) == {name: "plain"}
            assert forwarded or is_secret(name, "amqp://u:p@h"), name
            if getattr(setting, "secret", False):
                assert is_secret(name, "amqp://u:p@h/"), name


def test_pbs_commands_come_from_pbs_conf(tmp_path):
    (tmp_path / "bin").mkdir()
    qstat = tmp_path / "bin" / "qstat"
    qstat.write_text("#!/bin/sh\n")
    qstat.chmod(0o755)
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_SERVER=pbshost\nPBS_EXEC={tmp_path}\n")
    assert pbs_command("qstat", {"PBS_CONF_FILE": str(conf)}) == str(qstat)
    assert pbs_bin_dir({"PBS_CONF_FILE": str(tmp_path / "absent.conf")}) is None
    assert pbs_command("qstat", {"PBS_CONF_FILE": str(tmp_path / "absent.conf")}) == "qstat"


def test_secrets_file_value(tmp_path):
    path = tmp_path / "env"
    path.write_text("# mine\nexport EXTRACTOR_KEY='k 1'\nRABBITMQ_URI=amqp://u:p@h/%2f\n")
    path.chmod(0o600)
    env = {"AGENT_ENV_FILE": str(path)}
    assert secrets_file_value("RABBITMQ_URI", env) == "amqp://u:p@h/%2f"
    assert secrets_file_value("EXTRACTOR_KEY", env) == "k 1"
    assert secrets_file_value("CLOWDER_URL", env) is None
    path.chmod(0o644)  # readable by others: refused, as the job script refuses it
    assert secrets_file_value("RABBITMQ_URI", env) is None
    assert secrets_file_value("RABBITMQ_URI", {"AGENT_ENV_FILE": str(tmp_path / "absent")}) is None
