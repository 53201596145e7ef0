"""Where this agent runs: the batch task it belongs to, and when that task must end.

PBS Pro/OpenPBS set PBS_JOBID ("1234[7].server"), PBS_ARRAY_INDEX and PBS_ARRAY_ID; Torque sets
PBS_JOBID and PBS_ARRAYID; Slurm sets SLURM_JOB_ID, SLURM_ARRAY_JOB_ID and SLURM_ARRAY_TASK_ID
(also when a PBS script was submitted through Slurm's qsub wrapper, which sets no PBS_* names).
The end time is asked of the scheduler, never computed from what the user typed: Slurm's qsub
rounds walltimes up to whole minutes, and PBS counts from the start, not the submission.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from hpc_common.pbs_conf import pbs_command
from hpc_common.walltime import parse_walltime

log = logging.getLogger("agent.jobenv")
QUERY_TIMEOUT = 20.0


@dataclass(frozen=True)
class TaskIdentity:
    """The batch task this process runs in (all None outside a batch job)."""

    scheduler: Optional[str] = None   # "slurm", "pbs", "torque" or None
    job_id: Optional[str] = None      # the task's own job id, as the scheduler's tools take it
    array_id: Optional[str] = None    # the array's id, shared by its tasks
    index: Optional[str] = None       # the task's index in its array
    node: str = ""

    def label(self) -> str:
        """Short text for log lines and status messages, e.g. "slurm 812_3@node07"."""
        if self.scheduler is None:
            return self.node
        if self.scheduler == "slurm" and self.array_id and self.index is not None:
            task = f"{self.array_id}_{self.index}"
        else:
            task = self.job_id or "?"
        return f"{self.scheduler} {task}@{self.node}"

    def file_tag(self) -> str:
        """A name fragment for per-task files: "<array or job id>_<index>" with no odd characters."""
        base = self.array_id or self.job_id or f"pid{os.getpid()}"
        base = re.sub(r"\[\]|\..*$", "", base)
        tag = f"{base}_{self.index}" if self.index is not None else base
        return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def detect(environ: Optional[Mapping[str, str]] = None) -> TaskIdentity:
    """Read the scheduler's variables (Slurm first: it also runs PBS scripts)."""
    env = os.environ if environ is None else environ
    node = (env.get("SLURMD_NODENAME") or socket.gethostname()).split(".")[0]
    if env.get("SLURM_JOB_ID"):
        array = env.get("SLURM_ARRAY_JOB_ID")
        return TaskIdentity("slurm", env["SLURM_JOB_ID"], array, env.get("SLURM_ARRAY_TASK_ID") if array else None,
                            node)
    if env.get("PBS_JOBID"):
        job = env["PBS_JOBID"]
        if env.get("PBS_ARRAYID") is not None and env.get("PBS_ARRAY_INDEX") is None:
            array = re.sub(r"-\d+(?=\.|$)|\[\d+\]", "[]", job) if ("[" in job or "-" in job) else None
            return TaskIdentity("torque", job, array, env["PBS_ARRAYID"], node)
        index = env.get("PBS_ARRAY_INDEX")
        array = env.get("PBS_ARRAY_ID") or (re.sub(r"\[\d+\]", "[]", job) if index is not None else None)
        return TaskIdentity("pbs", job, array, index, node)
    return TaskIdentity(None, None, None, None, node)


def _run(argv: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask the scheduler for the end time (%s): %s", argv[0], exc)
        return None
    if out.returncode != 0:
        log.warning("%s exited %d: %s", " ".join(argv), out.returncode, out.stderr.strip()[:200])
        return None
    return out.stdout


def parse_slurm_end(text: str) -> Optional[float]:
    """Epoch seconds from `squeue -h -o %e` output (local time); None for N/A or UNLIMITED."""
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_pbs_end(text: str) -> Optional[float]:
    """Epoch seconds from `qstat -f` output (PBS Pro or Torque): start time plus walltime limit."""
    fields: dict[str, str] = {}
    for line in text.replace("\n\t", "").splitlines():
        if " = " in line:
            key, value = line.strip().split(" = ", 1)
            fields[key.strip()] = value.strip()
    if "Walltime.Remaining" in fields:  # Torque says it outright
        try:
            return time.time() + float(fields["Walltime.Remaining"])
        except ValueError:
            pass
    start_text = fields.get("stime") or fields.get("start_time")
    limit_text = fields.get("Resource_List.walltime")
    if not start_text or not limit_text:
        return None
    try:
        limit = parse_walltime(limit_text)
        if start_text.isdigit():
            start = float(start_text)
        else:
            start = time.mktime(time.strptime(" ".join(start_text.split()), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None
    return start + limit


def scheduler_end_time(identity: TaskIdentity) -> Optional[float]:
    """The task's end time (epoch seconds) as its scheduler knows it; None if unknown or unlimited."""
    if identity.scheduler == "slurm" and identity.job_id:
        out = _run(["squeue", "-h", "-j", identity.job_id, "-o", "%e"])
        return parse_slurm_end(out) if out else None
    if identity.scheduler in ("pbs", "torque") and identity.job_id:
        qstat = pbs_command("qstat") if identity.scheduler == "pbs" else "qstat"
        out = _run([qstat, "-f", identity.job_id])
        return parse_pbs_end(out) if out else None
    return None

