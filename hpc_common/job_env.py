"""Which of the submitter's environment variables a batch job's agent needs, and which never leave.

PBS and Torque do not export the submitter's environment to a job (sbatch does): the launcher passes
the agent's settings with ``qsub -v``. It passes exactly the names the agent reads (``AGENT_*`` and
pyclowder's own names) and never a secret: those reach the job from the private file
``~/.clowder-hpc-agent/env`` that pbs/agent_task.sh sources, never from a command line or the
scheduler's job record (``qstat -f`` shows ``Variable_List`` to every user).
"""
from __future__ import annotations

import os
import stat
from typing import Dict, Mapping, Optional
from urllib.parse import urlsplit

#: every agent setting's own name starts with this (agent/config.py: "AGENT_" + the setting's name)
AGENT_PREFIX = "AGENT_"

#: pyclowder's names for agent settings, read when the AGENT_ name is unset (agent/config.py)
PYCLOWDER_NAMES = frozenset({
    "RABBITMQ_URI", "RABBITMQ_QUEUE", "CLOWDER_URL", "CLOWDER_VERSION", "CLOWDER_EMAIL",
    "MOUNTED_PATHS", "MAX_RETRY", "HEARTBEAT", "EXTRACTION_FUNC", "EXTRACTION_MODULE",
    "EXTRACTOR_KEY", "CLOWDER_MESSAGE_FILE",
})

#: never passed to a job, whatever their value
SECRET_NAMES = frozenset({"EXTRACTOR_KEY", "AGENT_EXTRACTOR_KEY"})

#: the private file pbs/agent_task.sh sources in every task (AGENT_ENV_FILE overrides it)
SECRETS_FILE = os.path.join("~", ".clowder-hpc-agent", "env")

#: passed only when the value carries no password (amqp://host/vhost, not amqp://u:p@host)
URI_NAMES = frozenset({"RABBITMQ_URI", "AGENT_RABBITMQ_URI"})


def _has_password(uri: str) -> bool:
    try:
        return urlsplit(uri).password is not None
    except ValueError:  # unparseable: treat it as secret
        return True


def is_secret(name: str, value: str) -> bool:
    """True when ``name=value`` must not appear on a command line or in a job record."""
    if name in SECRET_NAMES:
        return True
    return name in URI_NAMES and _has_password(value)


def agent_settings_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The agent settings in ``environ`` that a job may carry: AGENT_* and pyclowder names, no secrets."""
    out: Dict[str, str] = {}
    for name, value in environ.items():
        if not (name.startswith(AGENT_PREFIX) or name in PYCLOWDER_NAMES):
            continue
        if is_secret(name, value):
            continue
        out[name] = value
    return out


def secrets_file_value(name: str, environ: Mapping[str, str]) -> Optional[str]:
    """``name``'s value in the user's secrets file (``NAME=value`` lines, as the job script sources
    it); None when the file is absent, unreadable or readable by others (the job refuses it then)."""
    path = os.path.expanduser(environ.get("AGENT_ENV_FILE") or SECRETS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) & 0o077:
                return None
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            return value or None
    return None
