"""Scheduler adapters: submit argv, job-id parsing, status parsing (real and broken outputs)."""
import json

import pytest

from helpers import datafiles
from launcher.runner import CommandError
from launcher.schedulers import make_scheduler
from hpc_common.walltime import format_walltime, parse_walltime
from launcher.schedulers.base import QueryFailed, SubmitFailed, SubmitRequest, format_ranges, parse_ranges
from launcher.schedulers.pbs import PBSPro
from launcher.schedulers.slurm import Slurm
from launcher.schedulers.torque import Torque
from launcher.states import JobState

Q, R, C, F, T, X, M = (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED, JobState.FAILED,
                       JobState.TIMEOUT, JobState.CANCELLED, JobState.MISSING)




def states(status):
    return {i: t.state for i, t in sorted(status.tasks.items())}


# ------------------------------------------------------------------ helpers
@pytest.mark.parametrize("text,seconds", [
    ("00:01:00", 60), ("1:30:00", 5400), ("30:00", 1800), ("48:00:00", 172800),
    ("1-00:00:00", 86400), ("90", 90)])
def test_parse_walltime(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("bad", ["", "1:2:3:4", "ab:00:00", "00:61:00", "x-1:00:00"])
def test_parse_walltime_rejects(bad):
    with pytest.raises(ValueError, match="walltime"):
        parse_walltime(bad)


def test_ranges_round_trip():
    assert parse_ranges("1-3,7,9-13:2%4") == [1, 2, 3, 7, 9, 11, 13]
    assert format_ranges([7, 1, 2, 3, 9]) == "1-3,7,9"
    assert format_walltime(90061) == "25:01:01"


# ------------------------------------------------------------------ submit argv
REQ = SubmitRequest(script="/s/agent_array.pbs", tasks=8, walltime_s=7200, job_name="clowder-ab12",
                    queue="workq", account="proj1", cores_per_task=4, max_running=3,
                    env={"RABBITMQ_QUEUE": "wordcount"})


def test_pbs_submit_argv():
    assert PBSPro().submit_argv(REQ) == [
        "qsub", "-N", "clowder-ab12", "-l", "walltime=02:00:00", "-J", "1-8%3", "-q", "workq",
        "-A", "proj1", "-l", "select=1:ncpus=4:mpiprocs=4", "-v", "RABBITMQ_QUEUE=wordcount",
        "/s/agent_array.pbs"]


def test_pbs_one_task_is_a_one_subjob_array():
    import dataclasses
    argv = PBSPro().submit_argv(dataclasses.replace(REQ, tasks=1, max_running=None))
    # -J 1-1 is illegal, and without -J the script's own #PBS -J would apply
    assert argv[argv.index("-J") + 1] == "1-2:2"


def test_torque_submit_argv():
    argv = Torque().submit_argv(REQ)
    assert argv[:6] == ["qsub", "-N", "clowder-ab12", "-t", "1-8%3", "-l"]
    assert "nodes=1:ppn=4" in argv and argv[-1] == "/s/agent_array.pbs"


def test_slurm_submit_argv():
    assert Slurm().submit_argv(REQ) == [
        "sbatch", "--parsable", "--job-name=clowder-ab12", "--array=1-8%3", "--time=02:00:00",
        "--partition=workq", "--account=proj1", "--nodes=1", "--ntasks=4",
        "--export=ALL,RABBITMQ_QUEUE=wordcount", "/s/agent_array.pbs"]


@pytest.mark.parametrize("field,value", [("queue", "a b"), ("account", "x;rm -rf"),
                                         ("job_name", "-N")])
def test_submit_request_rejects_odd_names(field, value):
    import dataclasses
    with pytest.raises(ValueError):
        dataclasses.replace(REQ, **{field: value})


def test_submit_request_rejects_secrets_in_env():
    import dataclasses
    with pytest.raises(ValueError, match="secret"):
        dataclasses.replace(REQ, env={"RABBITMQ_URI": "amqp://u:p@h/a,b"})


@pytest.mark.parametrize("sched,out,job", [
    ("pbs", "1234[].pbs-server\n", "1234[].pbs-server"),
    ("pbs", "1235.pbs-server\n", "1235.pbs-server"),
    ("torque", "189[].torque-head.cluster\n", "189[].torque-head.cluster"),
    ("slurm", "4711\n", "4711"),
    ("slurm", "4711;cluster2\n", "4711"),
    ("slurm", "sbatch: warning: something\n4712\n", "4712"),
])
def test_parse_submit(sched, out, job):
    assert make_scheduler(sched).parse_submit(out) == job


@pytest.mark.parametrize("sched", ["pbs", "torque", "slurm"])
@pytest.mark.parametrize("out", ["", "qsub: Job rejected by all possible destinations\n",
                                 "Submitted batch job\n"])
def test_parse_submit_without_id(sched, out):
    with pytest.raises(SubmitFailed, match="no job id"):
        make_scheduler(sched).parse_submit(out)


# ------------------------------------------------------------------ PBS Pro
def pbs_entry(state, index=None, exit_status=None, **extra):
    entry = {
        "Job_Name": "clowder-ab12", "Job_Owner": "alice@login1", "job_state": state,
        "queue": "workq", "server": "pbs-server", "Checkpoint": "u",
        "ctime": "Tue Nov 25 04:00:00 2025", "Hold_Types": "n", "Join_Path": "n",
        "mtime": "Tue Nov 25 04:10:00 2025", "Priority": 0, "qtime": "Tue Nov 25 04:00:00 2025",
        "Rerunable": "True",
        "Resource_List": {"mpiprocs": 4, "ncpus": 4, "nodect": 1, "place": "pack",
                          "select": "1:ncpus=4:mpiprocs=4", "walltime": "02:00:00"},
        "substate": 42, "euser": "alice", "egroup": "alice", "queue_type": "E",
        "Variable_List": {"PBS_O_HOME": "/home/alice", "PBS_O_WORKDIR": "/home/alice/run",
                          "RABBITMQ_QUEUE": "wordcount", "PBS_O_QUEUE": "workq"},
        "project": "_pbs_project_default", "Submit_Host": "login1",
    }
    if index is not None:
        entry.update(array_id="1234[].pbs-server", array_index=index)
    if state not in ("Q", "H"):
        entry["stime"] = "Tue Nov 25 04:01:00 2025"
        entry["exec_host"] = "node01/0*4"
    if exit_status is not None:
        entry["Exit_status"] = exit_status
        entry["obittime"] = "Tue Nov 25 04:09:00 2025"
    entry.update(extra)
    return entry


def pbs_doc(jobs):
    return json.dumps({"timestamp": 1764043800, "pbs_version": "2022.1.3",
                       "pbs_server": "pbs-server", "Jobs": jobs}, indent=4)


PBS_ARRAY = pbs_doc({
    "1234[].pbs-server": pbs_entry(
        "B", array="True", array_indices_submitted="1-8",
        array_indices_remaining="7-8", array_state_count="Queued:2 Running:1 Exiting:0 Expired:5 ",
        Submit_arguments="-N clowder-ab12 -J 1-8%3 agent_array.pbs"),
    "1234[1].pbs-server": pbs_entry("X", 1, 0),
    "1234[2].pbs-server": pbs_entry("X", 2, 1),
    "1234[3].pbs-server": pbs_entry("X", 3, -29),
    "1234[4].pbs-server": pbs_entry("X", 4, 271),
    "1234[5].pbs-server": pbs_entry("E", 5, 0),
    "1234[6].pbs-server": pbs_entry("R", 6),
    "1234[7].pbs-server": pbs_entry("Q", 7),
    "1234[8].pbs-server": pbs_entry("H", 8),
})


def test_pbs_array_with_subjobs():
    status = PBSPro().parse_status("1234[].pbs-server", PBS_ARRAY)
    assert not status.missing
    assert states(status) == {1: C, 2: F, 3: T, 4: X, 5: R, 6: R, 7: Q, 8: Q}
    assert status.tasks[3].exit_status == -29
    assert status.tasks[1].start_time is not None and status.tasks[1].end_time is not None
    assert status.tasks[6].end_time is None


def test_pbs_parent_only_fills_remaining_as_queued():
    doc = pbs_doc({"1234[].pbs-server": pbs_entry(
        "Q", array="True", array_indices_submitted="1-4", array_indices_remaining="1-4")})
    assert states(PBSPro().parse_status("1234[].pbs-server", doc)) == {1: Q, 2: Q, 3: Q, 4: Q}


def test_pbs_partial_listing_marks_unlisted_started_tasks_missing():
    doc = pbs_doc({
        "1234[].pbs-server": pbs_entry("B", array="True", array_indices_submitted="1-3",
                                       array_indices_remaining="3"),
        "1234[1].pbs-server": pbs_entry("R", 1)})
    assert states(PBSPro().parse_status("1234[].pbs-server", doc)) == {1: R, 2: M, 3: Q}


def test_pbs_finished_array_from_history():
    doc = pbs_doc({
        "1234[].pbs-server": pbs_entry("F", array="True", array_indices_submitted="1-2",
                                       array_indices_remaining="-", Exit_status=0),
        "1234[1].pbs-server": pbs_entry("F", 1, 0),
        "1234[2].pbs-server": pbs_entry("F", 2, -29)})
    assert states(PBSPro().parse_status("1234[].pbs-server", doc)) == {1: C, 2: T}


def test_pbs_plain_job_is_task_one():
    doc = pbs_doc({"1235.pbs-server": pbs_entry("R")})
    assert states(PBSPro().parse_status("1235.pbs-server", doc)) == {1: R}


def test_pbs_ignores_other_jobs_and_accepts_control_chars():
    doc = pbs_doc({"99.pbs-server": pbs_entry("R"),
                   "1235.pbs-server": pbs_entry("Q")}).replace("/home/alice/run", "/home/a\tb")
    assert states(PBSPro().parse_status("1235.pbs-server", doc)) == {1: Q}


def test_pbs_no_jobs_key_is_missing():
    out = json.dumps({"timestamp": 1, "pbs_version": "2022.1.3", "pbs_server": "s"})
    assert PBSPro().parse_status("1234[].s", out).missing


@pytest.mark.parametrize("out", [
    "", "{", PBS_ARRAY[: len(PBS_ARRAY) // 2], "[]", '{"Jobs": []}',
    pbs_doc({"1234[].s": pbs_entry("Z", array="True", array_indices_submitted="1-2",
                                   array_indices_remaining="1-2"),
             "1234[1].s": pbs_entry("Z", 1)}),
    pbs_doc({"1234[1].s": pbs_entry("X", 1, "zero")}),
    pbs_doc({"garbage id": {}}),
])
def test_pbs_malformed_output_fails_the_query(out):
    with pytest.raises(QueryFailed):
        PBSPro().parse_status("1234[].s", out)


@pytest.mark.parametrize("stderr,missing", [
    ("qstat: Unknown Job Id 1234[].pbs-server\n", True),
    ("qstat: 1234[].pbs-server Job has finished, use -x or -H to obtain historical job"
     " information\n", True),
    ("Connection refused\nqstat: cannot connect to server pbs-server (errno=15010)\n", False),
])
def test_pbs_failed_query(stderr, missing):
    class Fake:
        description = "fake"

        def run(self, argv, timeout=0, **kw):
            raise CommandError(argv, 153 if missing else 15010 % 256, "", stderr)

    if missing:
        assert PBSPro().status(Fake(), "1234[].pbs-server").missing
    else:
        with pytest.raises(QueryFailed, match="cannot connect"):
            PBSPro().status(Fake(), "1234[].pbs-server")


def test_pbs_status_argv_one_id_with_history():
    assert PBSPro().status_argv("1234[].s") == ["qstat", "-f", "-F", "json", "-t", "-x",
                                                "1234[].s"]
    assert "-x" not in PBSPro(history=False).status_argv("1234[].s")


def test_pbs_cancel_argv():
    assert PBSPro().cancel_argv("1234[].s") == ["qdel", "1234[].s"]
    assert PBSPro().cancel_argv("1234[].s", [5, 3]) == ["qdel", "1234[3].s", "1234[5].s"]


def test_pbs_find():
    assert PBSPro().parse_find("n", "1234[].pbs-server\n1235.pbs-server\n") == [
        "1234[].pbs-server", "1235.pbs-server"]


# ------------------------------------------------------------------ Torque
def torque_job(job_id, state, exit_status=None, start=1764043260, comp=None):
    parts = [f"<Job><Job_Id>{job_id}</Job_Id><Job_Name>clowder-ab12-{job_id.split('[')[1][0]}"
             f"</Job_Name><Job_Owner>alice@login1</Job_Owner><job_state>{state}</job_state>"
             "<queue>batch</queue><server>torque-head</server><Checkpoint>u</Checkpoint>"
             "<ctime>1764043200</ctime><Error_Path>login1:/home/alice/clowder-ab12.e189</Error_Path>"
             "<Resource_List><nodes>1:ppn=4</nodes><walltime>02:00:00</walltime></Resource_List>"
             "<job_array_request>1-4</job_array_request>"]
    if state != "Q":
        parts.append(f"<start_time>{start}</start_time><exec_host>node01/0-3</exec_host>")
    if exit_status is not None:
        parts.append(f"<exit_status>{exit_status}</exit_status>")
    if comp:
        parts.append(f"<comp_time>{comp}</comp_time>"
                     "<resources_used><walltime>00:08:00</walltime></resources_used>")
    parts.append("</Job>")
    return "".join(parts)


TORQUE_XML = ('<?xml version="1.0"?>\n<Data>'
              + torque_job("189[1].torque-head", "C", 0, comp=1764043740)
              + torque_job("189[2].torque-head", "C", -11, comp=1764050460)
              + torque_job("189[3].torque-head", "R")
              + torque_job("189[4].torque-head", "Q")
              + torque_job("190[1].torque-head", "R")
              + "</Data>\n")


def test_torque_array_xml():
    status = Torque().parse_status("189[].torque-head", TORQUE_XML)
    assert states(status) == {1: C, 2: T, 3: R, 4: Q}
    assert status.tasks[1].end_time == 1764043740
    assert status.tasks[3].start_time == 1764043260


def test_torque_plain_job():
    xml = ("<Data><Job><Job_Id>200.torque-head</Job_Id><job_state>C</job_state>"
           "<exit_status>271</exit_status></Job></Data>")
    assert states(Torque().parse_status("200.torque-head", xml)) == {1: X}


@pytest.mark.parametrize("out", [TORQUE_XML[:200], "<html>502</html>", "<Data><Job>",
                                 "<Data><Job><Job_Id>189[1].h</Job_Id><job_state>?</job_state>"
                                 "</Job></Data>"])
def test_torque_malformed_output_fails_the_query(out):
    with pytest.raises(QueryFailed):
        Torque().parse_status("189[].h", out)


def test_torque_empty_output_is_missing():
    assert Torque().parse_status("189[].h", "").missing
    assert Torque().parse_status("189[].h", "<Data></Data>").missing


def test_torque_cancel_argv():
    assert Torque().cancel_argv("189[].h", [4, 2, 3]) == ["qdel", "-t", "2-4", "189[].h"]


# ------------------------------------------------------------------ Slurm (real outputs)
def test_slurm_pending_block_and_running_tasks():
    status = Slurm().parse_status("1", datafiles.read("squeue_pending_block.json"))
    assert states(status) == {1: R, 2: R, 3: Q, 4: Q}
    assert status.tasks[1].start_time == 1795579373
    assert status.tasks[3].start_time is None


def test_slurm_all_states():
    out = datafiles.read("squeue_all_states.json")
    s = Slurm()
    assert states(s.parse_status("1", out)) == {1: C, 2: C, 3: C}
    mix = s.parse_status("4", out)
    assert states(mix) == {1: C, 2: F, 4: T, 5: T, 6: T}  # task 3: gone after its scancel
    assert mix.tasks[2].exit_status == 3
    assert states(s.parse_status("9", out)) == {1: X, 2: X, 3: X}
    assert states(s.parse_status("12", out)) == {i: X for i in range(1, 6)}
    assert s.parse_status("77", out).missing


def test_slurm_find_by_name():
    out = datafiles.read("squeue_all_states.json")
    assert Slurm().parse_find("clowder-3f4069d3", out) == ["9"]
    assert Slurm().parse_find("nope", out) == []


def test_slurm_newer_json_shapes():
    rec = {"job_id": 31, "array_job_id": {"set": True, "number": 30},
           "array_task_id": {"set": True, "number": 2}, "job_state": ["RUNNING"],
           "start_time": {"set": True, "number": 100}, "end_time": {"set": True, "number": 200},
           "exit_code": {"status": ["SUCCESS"], "return_code": {"set": True, "number": 0}}}
    pend = {"job_id": 30, "array_job_id": {"set": True, "number": 30},
            "array_task_id": {"set": False, "number": 0}, "array_task_string": "3-5",
            "job_state": ["PENDING"]}
    out = json.dumps({"jobs": [rec, pend], "errors": [], "warnings": []})
    assert states(Slurm().parse_status("30", out)) == {2: R, 3: Q, 4: Q, 5: Q}


@pytest.mark.parametrize("out", [
    "", "{", "[]", '{"jobs": {}}', '{"jobs": [1]}',
    '{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}',
    '{"jobs": [{"job_id": 5, "array_job_id": 5, "array_task_id": 1, "job_state": "WEIRD"}]}',
    '{"jobs": [{"job_id": 5, "array_job_id": 5, "array_task_string": "1-x",'
    ' "job_state": "PENDING"}]}',
])
def test_slurm_malformed_output_fails_the_query(out):
    with pytest.raises(QueryFailed):
        Slurm().parse_status("5", out)


def test_slurm_truncated_real_output_fails_the_query():
    out = datafiles.read("squeue_all_states.json")
    with pytest.raises(QueryFailed):
        Slurm().parse_status("4", out[: len(out) // 3])


def test_slurm_cancel_argv():
    assert Slurm().cancel_argv("12") == ["scancel", "12"]
    assert Slurm().cancel_argv("12", [3, 1]) == ["scancel", "12_1", "12_3"]
