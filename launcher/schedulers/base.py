"""The small base every scheduler adapter fills in: commands, job-id pattern, status parsing.

An adapter only builds argv lists and parses text; running them goes through a
:class:`launcher.runner.Runner` (local or SSH), so parsers are tested on captured outputs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from hpc_common.job_env import is_secret
from launcher.errors import RequestError, SchedulerError
from launcher.runner import CommandError, Runner
from launcher.states import JobState

# Names passed to jobs through -v/--export; values any printable text (each scheduler says what
# its list syntax can carry: Scheduler.env_list).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")
# What a comma-separated NAME=value list carries with no quoting at all.
_ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@+=-]*$")
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")


class SubmitFailed(SchedulerError):
    """qsub/sbatch failed or printed no job id."""


class QueryFailed(SchedulerError):
    """A status query failed, timed out or was unparseable: callers must change nothing."""


@dataclasses.dataclass(frozen=True)
class SubmitRequest:
    """Everything a submission needs; options override the script's own #PBS/#SBATCH lines."""

    script: str
    tasks: int
    walltime_s: int
    job_name: str
    queue: Optional[str] = None
    account: Optional[str] = None
    cores_per_task: Optional[int] = None
    max_running: Optional[int] = None  # array throttle (%M), None: no throttle
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # never secrets

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise RequestError("tasks must be >= 1")
        if self.walltime_s < 60:
            raise RequestError("walltime must be at least 00:01:00")
        for label, value in (("queue", self.queue), ("account", self.account),
                             ("job name", self.job_name)):
            if value is not None and not _PLAIN.match(value):
                raise RequestError(f"bad {label} {value!r}: letters, digits, _ . @ + - only")
        for name, value in self.env.items():
            if not _ENV_NAME.match(name) or not _ENV_PRINTABLE.match(value):
                raise RequestError(f"cannot pass {name!r} to the job: plain names and printable values only")
            if is_secret(name, value):
                raise RequestError(f"cannot pass {name!r} to the job: it is a secret (put it in"
                                   " ~/.clowder-hpc-agent/env)")


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """One array task as the scheduler reports it."""

    index: int
    state: JobState
    raw_state: str
    exit_status: Optional[int] = None
    start_time: Optional[float] = None  # epoch seconds
    end_time: Optional[float] = None
    output_path: Optional[str] = None  # the task's stdout (+stderr) file where the scheduler wrote it


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """A submitted job (array) and its tasks; ``missing`` when the scheduler does not know it."""

    job_id: str
    tasks: Mapping[int, TaskStatus]
    missing: bool = False

    def counts(self) -> Dict[JobState, int]:
        """Number of tasks per state."""
        out: Dict[JobState, int] = {}
        for task in self.tasks.values():
            out[task.state] = out.get(task.state, 0) + 1
        return out


def parse_ranges(text: str) -> List[int]:
    """Expand an index list such as ``"1-3,7,9-13:2"`` (a ``%N`` throttle is ignored)."""
    out: List[int] = []
    text = text.split("%", 1)[0].strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, _, s = part.partition(":")
            step = int(s)
        if "-" in part:
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b) + 1, max(step, 1)))
        else:
            out.append(int(part))
    return out


def format_ranges(indices: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    nums = sorted(set(indices))
    parts: List[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts)


class Scheduler:
    """Base adapter. Subclasses declare commands and parse outputs; the base runs them."""

    name = "base"
    #: commands whose presence on PATH identifies this scheduler (all must exist)
    detect_commands: Sequence[str] = ()
    #: matches the job id in the submit command's output
    job_id_pattern = re.compile(r"(\S+)")
    query_timeout = 60.0
    submit_timeout = 120.0
    #: True when a job inherits the submitter's environment (sbatch); False: the launcher must pass
    #: every agent setting itself (PBS, Torque: qsub -v)
    exports_submit_env = False

    def env_list(self, env: Mapping[str, str]) -> str:
        """``env`` as one comma-separated ``NAME=value`` list (qsub -v, sbatch --export).

        This base form cannot quote: a value with a comma, a space or a quote is a RequestError.
        """
        for name, value in env.items():
            if not _ENV_VALUE.match(value):
                raise RequestError(f"cannot pass {name}={value!r} to a {self.name} job: plain values"
                                   " only (no commas, spaces or quotes)")
        return ",".join(f"{k}={v}" for k, v in sorted(env.items()))

    # ---- to fill in
    def submit_argv(self, req: SubmitRequest) -> List[str]:
        raise NotImplementedError

    def status_argv(self, job_id: str) -> List[str]:
        raise NotImplementedError

    def parse_status(self, job_id: str, stdout: str) -> JobStatus:
        """Parse a status query's output; raise QueryFailed when it cannot be trusted."""
        raise NotImplementedError

    def is_unknown_job(self, err: CommandError) -> bool:
        """True when a failed status query means "no such job" rather than "query broken"."""
        return False

    def cancel_argv(self, job_id: str, indices: Optional[Sequence[int]] = None) -> List[str]:
        raise NotImplementedError

    def find_argv(self, job_name: str) -> List[str]:
        raise NotImplementedError

    def parse_find(self, job_name: str, stdout: str) -> List[str]:
        raise NotImplementedError

    # ---- shared behaviour
    def parse_submit(self, stdout: str) -> str:
        """Extract the job id from qsub/sbatch output (the last line that matches)."""
        for line in reversed(stdout.strip().splitlines()):
            m = self.job_id_pattern.match(line.strip())
            if m:
                return m.group(1)
        raise SubmitFailed(f"{self.name}: no job id in submit output {stdout.strip()[:200]!r}")

    def submit(self, runner: Runner, req: SubmitRequest) -> str:
        """Submit and return the job id; SubmitFailed carries the scheduler's own message."""
        try:
            result = runner.run(self.submit_argv(req), timeout=self.submit_timeout)
        except CommandError as exc:
            raise SubmitFailed(str(exc)) from exc
        return self.parse_submit(result.stdout)

    def status(self, runner: Runner, job_id: str) -> JobStatus:
        """Query one job. Unknown job: ``missing=True``. Anything else wrong: QueryFailed."""
        try:
            result = runner.run(self.status_argv(job_id), timeout=self.query_timeout)
        except CommandError as exc:
            if exc.returncode is not None and self.is_unknown_job(exc):
                return JobStatus(job_id, {}, missing=True)
            raise QueryFailed(str(exc)) from exc
        return self.parse_status(job_id, result.stdout)

    def status_many(self, runner: Runner, job_ids: Sequence[str]) -> Dict[str, JobStatus]:
        """Query several jobs (one command per job unless a subclass batches)."""
        return {job_id: self.status(runner, job_id) for job_id in job_ids}

    def cancel(self, runner: Runner, job_id: str, indices: Optional[Sequence[int]] = None) -> None:
        """Cancel a whole job, or only the given array task indices."""
        runner.run(self.cancel_argv(job_id, indices), timeout=self.query_timeout)

    def find(self, runner: Runner, job_name: str) -> List[str]:
        """Ids of the caller's jobs named ``job_name`` (used to adopt a submission after a crash)."""
        try:
            result = runner.run(self.find_argv(job_name), timeout=self.query_timeout)
        except CommandError as exc:
            raise QueryFailed(str(exc)) from exc
        return self.parse_find(job_name, result.stdout)
