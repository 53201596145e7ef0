"""Walltime limits as Slurm, PBS Pro, Torque and the agent's AGENT_WALLTIME write them.

One parser for the whole product. The forms disagree on one point: a bare number is minutes to
Slurm (`--time=90`, `squeue -o %l`) and seconds to PBS/Torque (`walltime=90`) and to the agent's
`AGENT_WALLTIME=90`, so callers say which they mean with `bare=`.
"""
from __future__ import annotations

import math
import re

SECONDS, MINUTES = "seconds", "minutes"
UNLIMITED_WORDS = frozenset({"UNLIMITED", "INFINITE", "NOT_SET"})

_UNITS = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.I)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SLURM_DAYS = re.compile(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?")
_CLOCK = re.compile(r"\d+(?::\d+){0,2}(?:\.\d+)?")
_SCHEDULER_FORMS = "HH:MM:SS, D-HH:MM:SS, MM:SS or seconds"
_FORMS = _SCHEDULER_FORMS + ", or 1h30m"


def parse_walltime(text: str, bare: str = SECONDS, units: bool = True, unlimited: bool = False) -> float:
    """Seconds in a walltime; raises ValueError naming the text and the accepted forms.

    Accepted: Slurm `MM` (with bare=MINUTES), `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
    `D-HH:MM:SS`; PBS/Torque `[[HH:]MM:]SS[.ms]` and bare seconds (bare=SECONDS, the default);
    with units=True (AGENT_WALLTIME), also `1d2h30m`, `90s`. Slurm's `UNLIMITED`/`INFINITE`/`NOT_SET` give math.inf when
    unlimited=True and are refused otherwise. Minutes and seconds fields after the first must
    be below 60.
    """
    if bare not in (SECONDS, MINUTES):
        raise ValueError(f"bare must be {SECONDS!r} or {MINUTES!r}, not {bare!r}")
    value = str(text).strip()
    if not value:
        raise ValueError("empty walltime")
    if value.upper() in UNLIMITED_WORDS:
        if unlimited:
            return math.inf
        raise ValueError(f"walltime {text!r} has no limit: give one ({_SCHEDULER_FORMS})")
    days = _SLURM_DAYS.fullmatch(value)
    if days:
        d, h, m, s = (int(g) if g else 0 for g in days.groups())
        _check_sexagesimal(text, [m, s])
        return float(d * 86400 + h * 3600 + m * 60 + s)
    if _CLOCK.fullmatch(value):
        fields = [float(f) for f in value.split(":")]
        if len(fields) == 1:
            return fields[0] * (60.0 if bare == MINUTES else 1.0)
        _check_sexagesimal(text, fields[1:])
        fields = [0.0] * (3 - len(fields)) + fields
        hours, minutes, seconds = fields
        return hours * 3600 + minutes * 60 + seconds
    found = _UNITS.findall(value) if units else []
    if found and _UNITS.sub("", value).strip() == "":
        return float(sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in found))
    raise ValueError(f"bad walltime {text!r}: use {_FORMS if units else _SCHEDULER_FORMS}")


def _check_sexagesimal(text: str, fields: list) -> None:
    if any(f >= 60 for f in fields):
        raise ValueError(f"bad walltime {text!r}: minutes and seconds must be < 60")


def format_walltime(seconds: float) -> str:
    """``5400`` -> ``"01:30:00"``: the HH:MM:SS form every scheduler takes (hours may exceed 24)."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def walltime_seconds(text: str, bare: str = SECONDS) -> int:
    """A limit in the forms schedulers take (no unit forms, no unlimited), in whole seconds rounded up."""
    return int(math.ceil(parse_walltime(text, bare=bare, units=False)))
