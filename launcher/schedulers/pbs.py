"""PBS Pro / OpenPBS: qsub -J, ``qstat -f -F json -t [-x]`` one id at a time, qdel, qselect."""
from __future__ import annotations

import json
import re
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hpc_common.walltime import format_walltime
from launcher.errors import RequestError
from launcher.runner import CommandError
from launcher.schedulers.base import (
    JobStatus, QueryFailed, Scheduler, SubmitRequest, TaskStatus, parse_ranges,
)
from launcher.states import PBS_FINISHED, PBS_STATES, JobState, pbs_finished_state

# 1234[].server, 1234[7].server, 1234.server, 1234 (server suffix optional)
PBS_JOB_ID = re.compile(r"^(?P<seq>\d+)(?:\[(?P<index>\d*)\])?(?:\.(?P<server>[\w.-]+))?$")
_CTIME_FORMAT = "%a %b %d %H:%M:%S %Y"


def split_job_id(job_id: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``"1234[7].srv"`` -> ``("1234", "7", "srv")``; index ``""`` for an array, None for a job."""
    m = PBS_JOB_ID.match(job_id.strip())
    if not m:
        raise RequestError(f"not a PBS job id: {job_id!r}")
    return m.group("seq"), m.group("index"), m.group("server")


def subjob_id(job_id: str, index: int) -> str:
    """``("1234[].srv", 7)`` -> ``"1234[7].srv"``."""
    seq, _, server = split_job_id(job_id)
    return f"{seq}[{index}]" + (f".{server}" if server else "")


def parse_ctime(value) -> Optional[float]:
    """PBS time attributes: ctime-style text (``"Tue Nov 25 04:00:00 2025"``) or epoch."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text.isdigit():
        return float(text)
    try:
        return time.mktime(time.strptime(" ".join(text.split()), _CTIME_FORMAT))
    except ValueError:
        return None


def _exit_status(entry: dict) -> Optional[int]:
    value = entry.get("Exit_status", entry.get("exit_status"))
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise QueryFailed(f"PBS: bad Exit_status {value!r}") from None


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _task_from_entry(index: int, entry: dict, letter_table: Dict[str, JobState],
                     finished: frozenset, finished_state) -> TaskStatus:
    if not isinstance(entry, dict):
        raise QueryFailed(f"job entry for index {index} is not an object")
    raw = str(entry.get("job_state", "")).strip()
    exit_status = _exit_status(entry)
    if raw in finished:
        state = finished_state(exit_status, _int_or_none(entry.get("substate")))
    elif raw in letter_table:
        state = letter_table[raw]
    else:
        raise QueryFailed(f"unknown job_state {raw!r} for task {index}")
    start = parse_ctime(entry.get("stime", entry.get("start_time")))
    end = None
    if state.terminal:
        end = parse_ctime(entry.get("obittime") or entry.get("comp_time") or entry.get("mtime"))
    return TaskStatus(index, state, raw, exit_status, start, end, _output_path(entry))


def _output_path(entry: dict) -> Optional[str]:
    """The file the task's output was copied to: ``Output_Path`` is ``host:/path``."""
    value = entry.get("Output_Path")
    if not isinstance(value, str) or ":" not in value:
        return None
    path = value.split(":", 1)[1]
    return path if path.startswith("/") else None


class PBSPro(Scheduler):
    """PBS Professional and OpenPBS."""

    name = "pbs"
    detect_commands = ("qsub", "qstat", "qdel")
    job_id_pattern = re.compile(r"^(\d+(?:\[\])?(?:\.[\w.-]+)?)$")

    def __init__(self, history: bool = True, bin_dir: Optional[str] = None) -> None:
        #: use ``qstat -x`` (only useful where the server keeps job history)
        self.history = history
        #: PBS's own bin folder (hpc_common.pbs_conf): Slurm's wrappers of the same names may
        #: come first on PATH. None: the names as they are, found on the target's PATH.
        self.bin_dir = bin_dir

    def _cmd(self, name: str) -> str:
        return f"{self.bin_dir}/{name}" if self.bin_dir else name

    def submit_argv(self, req: SubmitRequest) -> List[str]:
        argv = [self._cmd("qsub"), "-N", req.job_name, "-l", f"walltime={format_walltime(req.walltime_s)}"]
        # PBS rejects a one-element array (-J 1-1), and with no -J the script's own `#PBS -J 1-4`
        # would apply: one task is the one-subjob array 1-2:2 (index 1 only).
        spec = f"1-{req.tasks}" if req.tasks > 1 else "1-2:2"
        if req.max_running and req.tasks > 1:
            spec += f"%{req.max_running}"
        argv += ["-J", spec]
        if req.queue:
            argv += ["-q", req.queue]
        if req.account:
            argv += ["-A", req.account]
        if req.cores_per_task:
            c = req.cores_per_task
            argv += ["-l", f"select=1:ncpus={c}:mpiprocs={c}"]
        if req.env:
            argv += ["-v", self.env_list(req.env)]
        argv.append(req.script)
        return argv

    def env_list(self, env: Mapping[str, str]) -> str:
        """``qsub -v`` list: a value holding a comma is single-quoted (qsub keeps it whole and
        strips the quotes); a value holding a quote cannot be carried."""
        parts = []
        for name, value in sorted(env.items()):
            if "'" in value or '"' in value:
                raise RequestError(f"cannot pass {name}={value!r} to a PBS job: qsub -v cannot carry quotes")
            parts.append(f"{name}='{value}'" if "," in value else f"{name}={value}")
        return ",".join(parts)

    def status_argv(self, job_id: str) -> List[str]:
        # One id per call: several ids in one qstat -F json can print invalid JSON (openpbs#2672).
        argv = [self._cmd("qstat"), "-f", "-F", "json", "-t"]
        if self.history:
            argv.append("-x")
        return argv + [job_id]

    def is_unknown_job(self, err: CommandError) -> bool:
        text = f"{err.stderr}\n{err.stdout}"
        return "Unknown Job Id" in text or "Job has finished" in text

    def parse_status(self, job_id: str, stdout: str) -> JobStatus:
        try:
            data = json.loads(stdout, strict=False)
        except ValueError as exc:
            raise QueryFailed(f"qstat printed unparseable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise QueryFailed("qstat JSON is not an object")
        jobs = data.get("Jobs")
        if jobs is None:
            return JobStatus(job_id, {}, missing=True)
        if not isinstance(jobs, dict):
            raise QueryFailed("qstat JSON: 'Jobs' is not an object")
        try:
            want_seq, _, _ = split_job_id(job_id)
        except ValueError as exc:
            raise QueryFailed(str(exc)) from None
        parent: Optional[dict] = None
        tasks: Dict[int, TaskStatus] = {}
        for key, entry in jobs.items():
            try:
                seq, index, _ = split_job_id(key)
            except ValueError:
                raise QueryFailed(f"qstat JSON: unexpected job id {key!r}") from None
            if seq != want_seq:
                continue
            if index == "":
                parent = entry if isinstance(entry, dict) else None
                if parent is None:
                    raise QueryFailed(f"qstat JSON: entry {key!r} is not an object")
            elif index is None:  # a plain job: our one-task submission
                tasks[1] = _task_from_entry(1, entry, PBS_STATES, PBS_FINISHED, pbs_finished_state)
            else:
                tasks[int(index)] = _task_from_entry(
                    int(index), entry, PBS_STATES, PBS_FINISHED, pbs_finished_state)
        if parent is not None:
            self._fill_from_parent(parent, tasks)
        if parent is None and not tasks:
            return JobStatus(job_id, {}, missing=True)
        return JobStatus(job_id, tasks)

    @staticmethod
    def _fill_from_parent(parent: dict, tasks: Dict[int, TaskStatus]) -> None:
        """Subjobs not listed: queued if still 'remaining', else unknown (MISSING)."""
        try:
            submitted = parse_ranges(str(parent.get("array_indices_submitted", "")))
            remaining_text = str(parent.get("array_indices_remaining", "")).strip()
            remaining = set() if remaining_text in ("", "-") else set(parse_ranges(remaining_text))
        except ValueError as exc:
            raise QueryFailed(f"qstat JSON: bad array index list ({exc})") from None
        for index in submitted:
            if index in tasks:
                continue
            if index in remaining:
                tasks[index] = TaskStatus(index, JobState.QUEUED, "Q")
            else:
                tasks[index] = TaskStatus(index, JobState.MISSING, "?")

    def cancel_argv(self, job_id: str, indices: Optional[Sequence[int]] = None) -> List[str]:
        if not indices:
            return [self._cmd("qdel"), job_id]
        _, index, _ = split_job_id(job_id)
        if index is None:  # a one-task plain job
            return [self._cmd("qdel"), job_id]
        return [self._cmd("qdel"), *(subjob_id(job_id, i) for i in sorted(set(indices)))]

    def find_argv(self, job_name: str) -> List[str]:
        return [self._cmd("qselect"), "-N", job_name] + (["-x"] if self.history else [])

    def parse_find(self, job_name: str, stdout: str) -> List[str]:
        return parse_qselect(stdout)


def parse_qselect(stdout: str) -> List[str]:
    """Job ids from `qselect` output (PBS Pro and Torque), subjobs folded into their array id."""
    ids: List[str] = []
    for line in stdout.split():
        try:
            seq, index, server = split_job_id(line)
        except ValueError:
            continue
        job = seq + ("[]" if index is not None else "") + (f".{server}" if server else "")
        if job not in ids:
            ids.append(job)
    return ids
