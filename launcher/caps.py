"""Site caps: a YAML file a sysadmin owns, loaded strictly, and the clamp that enforces it.

Example (every key shown; the four ``max_*`` keys are required)::

    max_array_size: 100          # tasks in one submission
    max_running: 20              # tasks running at once, all launcher jobs together
    max_queued: 50               # tasks waiting in the scheduler queue at once
    max_walltime: "24:00:00"
    default_walltime: "04:00:00" # optional, default max_walltime
    allowed_queues: [normal]     # optional; the first is the default; absent: scheduler default only
    allowed_accounts: [proj1]    # optional; the first is the default; absent: no account option
    cores_per_task: 4            # what each task requests
    cores_per_node: 4            # optional (default: cores_per_task, one task = one node)
    node_hours:                  # optional budget
      budget: 1000
      period: month              # day | week | month (calendar, UTC)
"""
from __future__ import annotations

import calendar
import dataclasses
import math
import os
import stat
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from hpc_common.walltime import format_walltime, walltime_seconds
from launcher.errors import ConfigError

PERIODS = ("day", "week", "month")
_KEYS = {
    "max_array_size", "max_running", "max_queued", "max_walltime", "default_walltime",
    "allowed_queues", "allowed_accounts", "cores_per_task", "cores_per_node", "node_hours",
}
_REQUIRED = ("max_array_size", "max_running", "max_queued", "max_walltime")


class CapsError(ConfigError):
    """The caps file is missing, unsafe or invalid (the launcher refuses to start)."""


@dataclasses.dataclass(frozen=True)
class Caps:
    """What the site allows the launcher to ask for."""

    max_array_size: int
    max_running: int
    max_queued: int
    max_walltime_s: int
    default_walltime_s: int
    allowed_queues: Tuple[str, ...] = ()
    allowed_accounts: Tuple[str, ...] = ()
    cores_per_task: int = 1
    cores_per_node: int = 1
    node_hours_budget: Optional[float] = None
    budget_period: str = "month"
    source: str = ""

    @property
    def nodes_per_task(self) -> float:
        """Node fraction one task is charged (whole nodes: a task never shares its node's bill)."""
        return float(math.ceil(self.cores_per_task / self.cores_per_node))

    def task_node_hours(self, walltime_s: int) -> float:
        """Node-hours one task may consume with this walltime."""
        return walltime_s / 3600.0 * self.nodes_per_task


def check_file_safety(path: Path) -> None:
    """Refuse a caps file that someone other than its owner could change."""
    try:
        st = path.stat()
    except OSError as exc:
        raise CapsError(f"caps file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CapsError(f"caps file {path} is not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CapsError(
            f"caps file {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o});"
            f" refusing to start: run `chmod go-w {path}`")
    parent = path.resolve().parent
    pst = parent.stat()
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise CapsError(
            f"caps file {path} is in {parent}, which anyone can write to (the file could be"
            f" replaced); refusing to start")


def _int(data: dict, key: str, path: Path, minimum: int = 0) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CapsError(f"caps file {path}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _walltime(data: dict, key: str, path: Path) -> int:
    try:
        seconds = walltime_seconds(str(data[key]))
    except ValueError as exc:
        raise CapsError(f"caps file {path}: {key}: {exc}") from None
    if seconds < 60:
        raise CapsError(f"caps file {path}: {key} must be at least 00:01:00")
    return seconds


def _names(data: dict, key: str, path: Path) -> Tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CapsError(f"caps file {path}: {key} must be a list of names")
    return tuple(value)


def parse_caps(text: str, path: Path) -> Caps:
    """Validate caps YAML; every problem is reported with the file name and the key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CapsError(f"caps file {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise CapsError(f"caps file {path}: expected a mapping of cap names to values")
    unknown = sorted(set(map(str, data)) - _KEYS)
    if unknown:
        raise CapsError(f"caps file {path}: unknown key(s) {', '.join(unknown)}"
                        f" (known: {', '.join(sorted(_KEYS))})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CapsError(f"caps file {path}: missing required key(s) {', '.join(missing)}")
    max_wall = _walltime(data, "max_walltime", path)
    default_wall = _walltime(data, "default_walltime", path) if "default_walltime" in data \
        else max_wall
    if default_wall > max_wall:
        raise CapsError(f"caps file {path}: default_walltime exceeds max_walltime")
    cores = _int(data, "cores_per_task", path, 1) if "cores_per_task" in data else 1
    per_node = _int(data, "cores_per_node", path, 1) if "cores_per_node" in data else cores
    budget = None
    period = "month"
    if data.get("node_hours") is not None:
        nh = data["node_hours"]
        if not isinstance(nh, dict) or "budget" not in nh:
            raise CapsError(f"caps file {path}: node_hours needs 'budget' (and 'period')")
        extra = set(nh) - {"budget", "period"}
        if extra:
            raise CapsError(f"caps file {path}: node_hours: unknown key(s) {sorted(extra)}")
        b = nh["budget"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b < 0:
            raise CapsError(f"caps file {path}: node_hours.budget must be a number >= 0")
        budget = float(b)
        period = str(nh.get("period", "month"))
        if period not in PERIODS:
            raise CapsError(f"caps file {path}: node_hours.period must be one of {PERIODS}")
    return Caps(
        max_array_size=_int(data, "max_array_size", path, 1),
        max_running=_int(data, "max_running", path, 0),
        max_queued=_int(data, "max_queued", path, 0),
        max_walltime_s=max_wall,
        default_walltime_s=default_wall,
        allowed_queues=_names(data, "allowed_queues", path),
        allowed_accounts=_names(data, "allowed_accounts", path),
        cores_per_task=cores,
        cores_per_node=per_node,
        node_hours_budget=budget,
        budget_period=period,
        source=str(path),
    )


def load_caps(path) -> Caps:
    """Load and validate a caps file, refusing one that others can write."""
    path = Path(path)
    check_file_safety(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CapsError(f"caps file {path}: {exc.strerror}") from None
    return parse_caps(text, path)


def period_start(now: float, period: str) -> float:
    """Epoch seconds at which the current budget period began (calendar periods, UTC)."""
    t = _utc(now)
    day0 = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    if period == "day":
        return float(day0)
    if period == "week":
        return float(day0 - t.tm_wday * 86400)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


def _utc(now: float):
    import time
    return time.gmtime(now)


@dataclasses.dataclass(frozen=True)
class Request:
    """What someone (a user or the scaling strategy) asks to submit."""

    tasks: int
    walltime_s: Optional[int] = None
    queue: Optional[str] = None
    account: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Usage:
    """What the launcher's jobs hold right now."""

    queued: int = 0
    running: int = 0
    #: tasks that may run at once given every active array's throttle (>= running)
    run_slots_claimed: int = 0
    #: node-hours used in this period plus those reserved by active tasks
    node_hours_committed: float = 0.0


@dataclasses.dataclass(frozen=True)
class Allowance:
    """The request as the caps allow it, and one line per cap that cut it."""

    tasks: int
    walltime_s: int
    queue: Optional[str]
    account: Optional[str]
    #: array throttle (%M) so that all arrays together never run more than max_running
    max_running: int
    reasons: Tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.tasks <= 0


def clamp(request: Request, usage: Usage, caps: Caps) -> Allowance:
    """Cut ``request`` down to what ``caps`` allow given ``usage``. Pure; never raises."""
    reasons: List[str] = []
    wall = request.walltime_s if request.walltime_s is not None else caps.default_walltime_s
    if wall > caps.max_walltime_s:
        reasons.append(f"capped: walltime {format_walltime(wall)} requested,"
                       f" max_walltime is {format_walltime(caps.max_walltime_s)}")
        wall = caps.max_walltime_s

    def refuse(line: str) -> Allowance:
        return Allowance(0, wall, request.queue, request.account, 0, tuple(reasons + [line]))

    queue = request.queue
    if queue is None:
        queue = caps.allowed_queues[0] if caps.allowed_queues else None
    elif queue not in caps.allowed_queues:
        allowed = ", ".join(caps.allowed_queues) or "none: the scheduler's default queue only"
        return refuse(f"refused: queue {queue!r} is not allowed (allowed: {allowed})")
    account = request.account
    if account is None:
        account = caps.allowed_accounts[0] if caps.allowed_accounts else None
    elif account not in caps.allowed_accounts:
        allowed = ", ".join(caps.allowed_accounts) or "none"
        return refuse(f"refused: account {account!r} is not allowed (allowed: {allowed})")

    want = request.tasks
    tasks = want
    limits = [
        (caps.max_array_size, f"max_array_size={caps.max_array_size}"),
        (caps.max_queued - usage.queued,
         f"max_queued={caps.max_queued} ({usage.queued} already queued)"),
    ]
    if caps.node_hours_budget is not None:
        per_task = caps.task_node_hours(wall)
        left = caps.node_hours_budget - usage.node_hours_committed
        affordable = int(max(left, 0.0) // per_task) if per_task > 0 else want
        limits.append((affordable,
                       f"node-hour budget {caps.node_hours_budget:g}/{caps.budget_period}"
                       f" ({max(left, 0.0):.1f} left, {per_task:.2f} per task)"))
    binding = None
    for limit, label in limits:
        if limit < tasks:
            tasks, binding = max(limit, 0), label
    if binding is not None:
        if tasks <= 0:
            return refuse(f"refused: {want} task(s) requested, none allowed by {binding}")
        reasons.append(f"capped: {want} task(s) requested, {tasks} allowed by {binding}")
    free_slots = caps.max_running - usage.run_slots_claimed
    if free_slots <= 0:
        return refuse(f"refused: max_running={caps.max_running} and all {usage.run_slots_claimed}"
                      f" run slots are claimed by queued or running tasks")
    throttle = min(tasks, free_slots)
    if throttle < tasks:
        reasons.append(f"throttled: at most {throttle} of these {tasks} tasks run at once"
                       f" (max_running={caps.max_running}, {usage.run_slots_claimed} slots claimed)")
    return Allowance(tasks, wall, queue, account, throttle, tuple(reasons))
