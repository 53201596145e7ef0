"""Torque: qsub -t, ``qstat -x -t`` (XML), ``qdel [-t indices]``, qselect."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence

from hpc_common.walltime import format_walltime
from launcher.runner import CommandError
from launcher.schedulers.base import (
    JobStatus, QueryFailed, Scheduler, SubmitRequest, TaskStatus, format_ranges,
)
from launcher.schedulers.pbs import _task_from_entry, parse_qselect, split_job_id
from launcher.states import TORQUE_FINISHED, TORQUE_STATES, JobState, torque_finished_state


class Torque(Scheduler):
    """Torque (PBS_ARRAYID arrays, XML qstat)."""

    name = "torque"
    detect_commands = ("qsub", "qstat", "qdel")
    job_id_pattern = re.compile(r"^(\d+(?:\[\])?(?:\.[\w.-]+)?)$")

    def submit_argv(self, req: SubmitRequest) -> List[str]:
        spec = f"1-{req.tasks}"
        if req.max_running:
            spec += f"%{req.max_running}"
        argv = ["qsub", "-N", req.job_name, "-t", spec,
                "-l", f"walltime={format_walltime(req.walltime_s)}"]
        if req.queue:
            argv += ["-q", req.queue]
        if req.account:
            argv += ["-A", req.account]
        if req.cores_per_task:
            argv += ["-l", f"nodes=1:ppn={req.cores_per_task}"]
        if req.env:
            argv += ["-v", self.env_list(req.env)]
        argv.append(req.script)
        return argv

    def status_argv(self, job_id: str) -> List[str]:
        return ["qstat", "-x", "-t", job_id]

    def is_unknown_job(self, err: CommandError) -> bool:
        return "Unknown Job Id" in f"{err.stderr}\n{err.stdout}"

    def parse_status(self, job_id: str, stdout: str) -> JobStatus:
        text = stdout.strip()
        if not text:
            return JobStatus(job_id, {}, missing=True)
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise QueryFailed(f"qstat printed unparseable XML ({exc})") from None
        if root.tag != "Data":
            raise QueryFailed(f"qstat XML: unexpected root <{root.tag}>")
        try:
            want_seq, _, _ = split_job_id(job_id)
        except ValueError as exc:
            raise QueryFailed(str(exc)) from None
        tasks: Dict[int, TaskStatus] = {}
        plain: Optional[dict] = None
        for job in root.findall("Job"):
            entry = {child.tag: (child.text or "").strip() for child in job}
            key = entry.get("Job_Id", "")
            try:
                seq, index, _ = split_job_id(key)
            except ValueError:
                raise QueryFailed(f"qstat XML: unexpected Job_Id {key!r}") from None
            if seq != want_seq:
                continue
            if index:  # array task
                tasks[int(index)] = _task_from_entry(
                    int(index), entry, TORQUE_STATES, TORQUE_FINISHED, _finished)
            elif index is None:
                plain = entry
            # index == "": an array summary line (qstat without -t): tasks carry the details
        if not tasks and plain is not None:
            tasks[1] = _task_from_entry(1, plain, TORQUE_STATES, TORQUE_FINISHED,
                                        _finished)
        if not tasks:
            return JobStatus(job_id, {}, missing=True)
        return JobStatus(job_id, tasks)

    def cancel_argv(self, job_id: str, indices: Optional[Sequence[int]] = None) -> List[str]:
        if not indices:
            return ["qdel", job_id]
        return ["qdel", "-t", format_ranges(indices), job_id]

    def find_argv(self, job_name: str) -> List[str]:
        return ["qselect", "-N", job_name]

    def parse_find(self, job_name: str, stdout: str) -> List[str]:
        return parse_qselect(stdout)


def _finished(exit_status: Optional[int], _substate: Optional[int]) -> JobState:
    """Torque's finished state depends on the exit status alone."""
    return torque_finished_state(exit_status)
