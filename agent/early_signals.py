"""Signals that arrive while the agent is still starting.

A batch system may send SIGTERM (the walltime signal, which Slurm can send up to a minute early,
or a qdel) before the agent has installed its own handlers. Python's default action would kill
the process and the scheduler would mark the task FAILED. `hold()` records SIGTERM, SIGINT and
SIGUSR1 from the first line of `python -m agent`; whoever installs the real handlers calls
`take()` and acts on what came early.
"""
from __future__ import annotations

import os
import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_pending: list[int] = []  # process-wide, as signal dispositions are


def _record(signum: int, _frame: Any) -> None:
    _pending.append(signum)


def hold() -> None:
    """Record the stop signals instead of dying of them (until real handlers replace this one)."""
    for signum in SIGNALS:
        signal.signal(signum, _record)


def take() -> list[int]:
    """The signals recorded so far, oldest first; forgets them."""
    out = list(_pending)
    _pending.clear()
    return out


def release() -> None:
    """Back to Python's defaults (commands that install no handlers of their own), re-raising what came."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    for signum in take():
        os.kill(os.getpid(), signum)
