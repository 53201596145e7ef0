"""Slurm: ``sbatch --parsable --array``, ``squeue --json``, ``scancel``.

Slurm 22.05's ``squeue --json`` ignores job filters (``--jobs``, ``--name``) and lists every job
it holds, so jobs are always selected here, in Python. Array tasks still pending come as one
record with ``array_task_string`` (``"3-4%2"``); started tasks as one record each. Tasks that
ended (or were cancelled) more than MinJobAge ago vanish: they are absent, not completed.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence

from hpc_common.walltime import format_walltime
from launcher.runner import CommandError, Runner
from launcher.schedulers.base import (
    JobStatus, QueryFailed, Scheduler, SubmitRequest, TaskStatus, parse_ranges,
)
from launcher.states import JobState, slurm_state


def _number(value) -> Optional[int]:
    """Slurm numbers: plain ints (22.05) or ``{"set": true, "number": n}`` (23.02+)."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _state_name(value) -> str:
    if isinstance(value, list):  # 23.02+: ["PENDING"] or ["CANCELLED", "..."]
        return str(value[0]) if value else ""
    return str(value or "")


def _exit_code(value) -> Optional[int]:
    """22.05: the raw wait status (exit 3 -> 768). 23.02+: {"return_code": {...}, "signal": ...}."""
    if isinstance(value, dict):
        rc = _number(value.get("return_code"))
        sig = value.get("signal", {})
        signo = _number(sig.get("id")) if isinstance(sig, dict) else None
        return 128 + signo if signo else rc
    raw = _number(value)
    if raw is None:
        return None
    if raw & 0x7F:
        return 128 + (raw & 0x7F)
    return raw >> 8


class Slurm(Scheduler):
    """Slurm (native commands; the PBS wrappers are not used)."""

    name = "slurm"
    detect_commands = ("sbatch", "squeue", "scancel")
    job_id_pattern = re.compile(r"^(\d+)(?:;\S+)?$")
    exports_submit_env = True  # --export=ALL: the job sees the submitter's environment

    def submit_argv(self, req: SubmitRequest) -> List[str]:
        spec = f"1-{req.tasks}"
        if req.max_running:
            spec += f"%{req.max_running}"
        argv = ["sbatch", "--parsable", f"--job-name={req.job_name}", f"--array={spec}",
                f"--time={format_walltime(req.walltime_s)}"]
        if req.queue:
            argv.append(f"--partition={req.queue}")
        if req.account:
            argv.append(f"--account={req.account}")
        if req.cores_per_task:
            argv += ["--nodes=1", f"--ntasks={req.cores_per_task}"]
        if req.env:
            argv.append("--export=ALL," + self.env_list(req.env))
        argv.append(req.script)
        return argv

    def status_argv(self, job_id: str) -> List[str]:
        return ["squeue", "--json", "--me"]

    def status(self, runner: Runner, job_id: str) -> JobStatus:
        return self.status_many(runner, [job_id])[job_id]

    def status_many(self, runner: Runner, job_ids: Sequence[str]) -> Dict[str, JobStatus]:
        """One squeue for all jobs."""
        if not job_ids:
            return {}
        try:
            result = runner.run(self.status_argv(job_ids[0]), timeout=self.query_timeout)
        except CommandError as exc:
            raise QueryFailed(str(exc)) from exc
        records = self._records(result.stdout)
        return {job_id: self._job_from_records(job_id, records) for job_id in job_ids}

    def parse_status(self, job_id: str, stdout: str) -> JobStatus:
        return self._job_from_records(job_id, self._records(stdout))

    @staticmethod
    def _records(stdout: str) -> List[dict]:
        try:
            data = json.loads(stdout)
        except ValueError as exc:
            raise QueryFailed(f"squeue printed unparseable JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            raise QueryFailed("squeue JSON has no 'jobs' list")
        errors = data.get("errors") or []
        if errors:
            raise QueryFailed(f"squeue reported errors: {errors!r}"[:300])
        for rec in data["jobs"]:
            if not isinstance(rec, dict):
                raise QueryFailed("squeue JSON: a job record is not an object")
        return data["jobs"]

    def _job_from_records(self, job_id: str, records: List[dict]) -> JobStatus:
        m = self.job_id_pattern.match(str(job_id))
        if not m:
            raise QueryFailed(f"not a Slurm job id: {job_id!r}")
        want = int(m.group(1))
        tasks: Dict[int, TaskStatus] = {}
        for rec in records:
            array_id = _number(rec.get("array_job_id")) or 0
            own_id = _number(rec.get("job_id"))
            if array_id != want and not (array_id == 0 and own_id == want):
                continue
            raw = _state_name(rec.get("job_state"))
            state = slurm_state(raw)
            if state is None:
                raise QueryFailed(f"unknown Slurm job_state {raw!r} in job {own_id}")
            start = _number(rec.get("start_time")) or None
            end = _number(rec.get("end_time")) or None
            exit_code = _exit_code(rec.get("exit_code")) if state.terminal else None
            task_id = _number(rec.get("array_task_id"))
            if task_id is not None:
                indices = [task_id]
            elif rec.get("array_task_string"):
                try:
                    indices = parse_ranges(str(rec["array_task_string"]))
                except ValueError:
                    raise QueryFailed(
                        f"bad array_task_string {rec['array_task_string']!r}") from None
                start = end = None  # a pending block: its times are placeholders
            else:
                indices = [1]  # a plain job
            for index in indices:
                tasks[index] = TaskStatus(
                    index, state, raw, exit_code,
                    float(start) if start and state != JobState.QUEUED else None,
                    float(end) if end and state.terminal else None,
                )
        if not tasks:
            return JobStatus(str(job_id), {}, missing=True)
        return JobStatus(str(job_id), tasks)

    def cancel_argv(self, job_id: str, indices: Optional[Sequence[int]] = None) -> List[str]:
        if not indices:
            return ["scancel", str(job_id)]
        return ["scancel", *(f"{job_id}_{i}" for i in sorted(set(indices)))]

    def find_argv(self, job_name: str) -> List[str]:
        return ["squeue", "--json", "--me"]

    def parse_find(self, job_name: str, stdout: str) -> List[str]:
        ids: List[str] = []
        for rec in self._records(stdout):
            if rec.get("name") != job_name:
                continue
            jid = _number(rec.get("array_job_id")) or _number(rec.get("job_id"))
            if jid is not None and str(jid) not in ids:
                ids.append(str(jid))
        return ids
