"""Where PBS's own commands are: ``$PBS_EXEC/bin``, PBS_EXEC from the environment or pbs.conf.

On a machine that also has Slurm, /usr/bin/qsub, qstat and qdel are Slurm's Torque wrappers, and a
PBS job's PATH (and often a user's) lists /usr/bin before /opt/pbs/bin: asked about a PBS subjob
id, Slurm's qstat fails (exit 153). PBS's tools are therefore called by their full path when
pbs.conf says where they are.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

PBS_CONF = "/etc/pbs.conf"


def read_pbs_conf(path: str) -> Dict[str, str]:
    """``NAME=value`` lines of a pbs.conf; empty when it cannot be read."""
    out: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def pbs_bin_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``$PBS_EXEC/bin`` when it holds qstat; None when this machine has no PBS configuration."""
    env = os.environ if environ is None else environ
    exec_dir = env.get("PBS_EXEC") or read_pbs_conf(env.get("PBS_CONF_FILE") or PBS_CONF).get("PBS_EXEC")
    if not exec_dir:
        return None
    bin_dir = os.path.join(exec_dir, "bin")
    return bin_dir if os.access(os.path.join(bin_dir, "qstat"), os.X_OK) else None


def pbs_command(name: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """PBS's own ``name`` by full path when pbs.conf says where it is, else ``name`` (PATH)."""
    bin_dir = pbs_bin_dir(environ)
    return os.path.join(bin_dir, name) if bin_dir else name
