"""Scheduler adapters (one module each) and how one is chosen."""
from __future__ import annotations

from typing import Optional

from launcher.errors import ConfigError
from launcher.runner import CommandError, Runner
from launcher.schedulers.base import Scheduler
from launcher.schedulers.pbs import PBSPro
from launcher.schedulers.slurm import Slurm
from launcher.schedulers.torque import Torque

SCHEDULERS = {"pbs": PBSPro, "torque": Torque, "slurm": Slurm}


def make_scheduler(name: str) -> Scheduler:
    """The adapter for ``name`` (pbs, torque or slurm)."""
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ConfigError(f"unknown scheduler {name!r}: choose pbs, torque or slurm") from None


def detect_scheduler(runner: Runner) -> Optional[str]:
    """Guess the scheduler from the commands on the target's PATH.

    Slurm first (its PBS wrappers would otherwise look like PBS), then PBS Pro (``qstat
    --version`` prints ``pbs_version``), then Torque. None when no scheduler command exists.
    """
    if runner.which("sbatch") and runner.which("squeue"):
        return "slurm"
    if not runner.which("qstat"):
        return None
    try:
        out = runner.run(["qstat", "--version"], timeout=30, check=False)
    except CommandError:
        return None
    return "pbs" if "pbs_version" in (out.stdout + out.stderr).lower() else "torque"
