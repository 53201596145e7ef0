"""`python -m agent plugins --show-env NAME`: what that plugin's extractor processes get, and from where.

The values come from the same computation that starts the processes (agent.extractor_env), for the
settings this command sees (run it with the job script's environment and config file to see
what its agents will do). Secrets are masked: values of names that look like secrets, and any
secret shape or broker secret inside other values (hpc_common.redact).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from hpc_common.redact import MASK, Redactor

from . import exitcodes, extractor_env, image_plugins
from .config import AgentConfig, parse_setting
from .errors import AgentError
from .plugin_settings import plugin_value
from .worker_settings import worker_env

_SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.I)


def _masker(cfg: AgentConfig, entries: dict[str, extractor_env.EnvValue]) -> Callable[[str, str], str]:
    """name, value -> the value as shown: masked whole for secret-looking names, else secrets inside masked.

    The values of secret-looking names are masked wherever else they turn up too (AGENT_PLUGINS holds
    the plugins table's).
    """
    redactor = Redactor([cfg.extractor_key or ""])
    try:
        redactor.add(urlsplit(cfg.rabbitmq_uri or "").password)
    except ValueError:
        pass
    for key, entry in entries.items():
        if _SECRET_NAME.search(key):
            for value in (entry.value, *(v for _, v in entry.overrides)):
                redactor.add(value)

    def shown(name: str, value: str) -> str:
        if value and _SECRET_NAME.search(name):
            return MASK
        return redactor(value)
    return shown


def _venv(cfg: AgentConfig, spec: Any) -> Optional[dict[str, str]]:
    """Where the plugin's own environment is and whether it is built (None: it runs in the agent's)."""
    from .plugin_env import EnvError, check

    if spec.requirements is None:
        return None
    try:
        penv, state = check(spec, cfg.env_dir, plugin_value(cfg, "env_python", spec.name, spec.folder_name))
    except EnvError as exc:
        return {"path": "", "state": str(exc)}
    return {"path": penv.path, "state": state}


def collect(cfg: AgentConfig, name: str) -> dict[str, Any]:
    """The report for one plugin: {plugin, folder, env: {K: {value, source, overrides}}, not_applied, venv}.

    PluginError for an unknown or broken plugin, ConfigError for settings it cannot run with.
    """
    from .plugin_set import plan_plugins

    plan = plan_plugins(dataclasses.replace(cfg, plugin=name),
                        lambda n: image_plugins.find(cfg, n), parse_setting)[0]
    own, spec = plan.cfg, plan.spec
    entries = extractor_env.resolve(own, spec, worker_env(own))
    venv = _venv(own, spec)
    if venv and venv["path"]:
        entries = extractor_env.in_venv(entries, venv["path"])
    shown = _masker(own, entries)
    env = {key: {"value": shown(key, e.value), "source": e.source,
                 "overrides": [{"source": s, "value": shown(key, v)} for s, v in e.overrides]}
           for key, e in sorted(entries.items())}
    return {"plugin": spec.name, "folder": spec.folder, "env": env,
            "not_applied": extractor_env.dockerfile_env(spec)[1], "venv": venv}


def _text(report: dict[str, Any]) -> str:
    lines = [f"# {report['plugin']} ({report['folder']}): the environment of its extractor processes",
             "# precedence: " + " > ".join(extractor_env.SOURCES)]
    for key, entry in report["env"].items():
        over = "; ".join(f"{o['source']} {json.dumps(o['value'])}" for o in entry["overrides"])
        lines.append(f"{key}={entry['value']}\t[{entry['source']}]" + (f" over {over}" if over else ""))
    if report["not_applied"]:
        lines.append("# Dockerfile ENV not applied (the agent's own settings or this host's): "
                     + ", ".join(report["not_applied"]))
    venv = report["venv"]
    if venv:
        lines.append(f"# own environment: {venv['path'] or '?'} ({venv['state']})")
    return "\n".join(lines)


def show_env(cfg: AgentConfig, name: str, as_json: bool) -> int:
    """Print the report (text, or JSON with --json); exit 3 with one line for an unknown plugin."""
    try:
        report = collect(cfg, name)
    except AgentError as exc:
        print(f"agent plugins: {exc}", file=sys.stderr)
        return exitcodes.for_error(exc)
    print(json.dumps(report, indent=2) if as_json else _text(report))
    return exitcodes.OK
