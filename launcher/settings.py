"""Launcher settings: one table, four sources.

Precedence, highest first: command-line flag > environment > YAML settings file > default.
The YAML file comes from `--config FILE` or LAUNCHER_CONFIG; its keys are the setting names below
(e.g. `scheduler: slurm`), unknown keys are refused. The site's caps file is separate (launcher.caps):
it holds limits, not settings. Every bad value, from any source, is one ConfigError naming the
setting and where the value came from; a secret's value is never shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from hpc_common.job_env import secrets_file_value
from hpc_common.settings_files import first_set, parse_bool as _flag_bool, parse_value, read_settings_file
from launcher.errors import ConfigError

SCHEDULER_NAMES = ("pbs", "torque", "slurm")


def _text(value: Any) -> Optional[str]:
    return None if value is None or str(value) == "" else str(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected {', '.join(choices[:-1])} or {choices[-1]}")
        return text
    return parse


def _non_negative(kind: Callable[[str], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(str(value).strip())
        if number < 0:
            raise ValueError("expected a number >= 0")
        return number
    return parse


def _clowder_version(value: Any) -> int:
    number = int(str(value).strip())
    if number not in (1, 2):
        raise ValueError("expected 1 or 2")
    return number


def _queues(value: Any) -> Optional[str]:
    """One queue or several (a YAML list, repeated --rabbitmq-queue, or a,b), kept comma-separated."""
    items = value if isinstance(value, (list, tuple)) else [value]
    names = [n for item in items if item is not None for n in str(item).replace(",", " ").split()]
    return ",".join(dict.fromkeys(names)) or None


def queue_names(value: Optional[str]) -> list[str]:
    """The queues of the rabbitmq_queue setting, in order ([] when unset)."""
    return [n for n in (value or "").split(",") if n]


def _url(value: Any) -> Optional[str]:
    text = _text(value)
    if text is not None and not text.startswith(("http://", "https://")):
        raise ValueError("expected an http(s) URL")
    return text


def _default_state_dir(environ: Mapping[str, str]) -> str:
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return os.path.join(base, "clowder-launcher")


@dataclass(frozen=True)
class Setting:
    """One launcher setting: name, environment names (first set wins), parser, default, flag."""

    name: str
    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: Optional[str] = None         # None: environment or settings file only (secrets)
    secret: bool = False
    default_from_env: Optional[Callable[[Mapping[str, str]], Any]] = None

    def default_value(self, environ: Mapping[str, str]) -> Any:
        """The default, which for some settings depends on other environment variables (XDG_STATE_HOME)."""
        return self.default_from_env(environ) if self.default_from_env else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting("caps", ("LAUNCHER_CAPS",), _text, None,
            "site caps YAML (default /etc/clowder-hpc-agent/caps.yaml if it exists)", "--caps"),
    Setting("scheduler", ("LAUNCHER_SCHEDULER",), _choice(*SCHEDULER_NAMES), None,
            "pbs, torque or slurm (default: detected from the commands on PATH)", "--scheduler"),
    Setting("ssh", ("LAUNCHER_SSH",), _text, None,
            "run scheduler commands on this login node (default: locally)", "--ssh"),
    Setting("ssh_config", ("LAUNCHER_SSH_CONFIG",), _text, None, "ssh -F file (default ~/.ssh/config)",
            "--ssh-config"),
    Setting("script", ("LAUNCHER_SCRIPT",), _text, None,
            "job script (default pbs/agent_array.slurm on Slurm, else pbs/agent_array.pbs)", "--script"),
    Setting("state_dir", ("LAUNCHER_STATE_DIR",), _text, None,
            "ledger, lock and dispatch messages (default $XDG_STATE_HOME/clowder-launcher, "
            "~/.local/state/clowder-launcher)", "--state-dir", default_from_env=_default_state_dir),
    Setting("rabbitmq_uri", ("RABBITMQ_URI",), _text, None, "broker URI with credentials (default: the"
            " RABBITMQ_URI line of ~/.clowder-hpc-agent/env, the jobs' own secrets file)", secret=True,
            default_from_env=functools.partial(secrets_file_value, "RABBITMQ_URI")),
    Setting("rabbitmq_queue", ("RABBITMQ_QUEUE",), _queues, None,
            "the extractor's queue; several (a,b, or --rabbitmq-queue repeated) for agents serving several plugins",
            "--rabbitmq-queue"),
    Setting("rabbitmq_management", ("RABBITMQ_MANAGEMENT_URL",), _url, None,
            "RabbitMQ management API, for unacked counts", "--rabbitmq-management"),
    Setting("clowder_url", ("CLOWDER_URL",), _url, None,
            "relay: reach Clowder here instead of the message's host", "--clowder-url"),
    Setting("clowder_version", ("CLOWDER_VERSION",), _clowder_version, 1,
            "spool: Clowder API version of the extractor (1 or 2)", "--clowder-version"),
    Setting("relay_debug", ("RELAY_DEBUG",), _flag_bool, False, "relay: log every request (1 or 0)"),
    Setting("relay_url", ("LAUNCHER_RELAY_URL",), _url, None,
            "backlog: a relay on another host, asked for its counts (GET /v1/backlog)"),
    Setting("relay_token_file", ("LAUNCHER_RELAY_TOKEN_FILE",), _text, None,
            "backlog: that relay's bearer-token file (mode 0600)"),
    Setting("relay_ca", ("LAUNCHER_RELAY_CA",), _text, None, "backlog: CA bundle for that relay's TLS"),
    Setting("spool_dir", ("LAUNCHER_SPOOL_DIR",), _text, None,
            "backlog: a spool folder to count (spools started here are found in the state folder)"),
    Setting("journal_dir", ("AGENT_JOURNAL_DIR",), _text, os.path.join("~", ".clowder-hpc-agent", "journal"),
            "backlog: the agents' in-flight journal, for work of dead agents"),
    # The agents' retry settings say which retry queues (retry.<queue>.<s>) can hold parked retries.
    Setting("retry_backoff", ("AGENT_RETRY_BACKOFF",), _non_negative(float), 2.0,
            "backlog: the agents' first retry backoff in seconds (their retry queues are counted)"),
    Setting("max_retries", ("AGENT_MAX_RETRIES", "MAX_RETRY"), _non_negative(int), 3,
            "backlog: the agents' retries per file"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _field(setting: Setting) -> tuple[str, Any, Any]:
    return setting.name, Any, field(default=setting.default, repr=not setting.secret)


LauncherSettings = dataclasses.make_dataclass("LauncherSettings", [_field(s) for s in SETTINGS], frozen=True)
LauncherSettings.__module__ = __name__
LauncherSettings.__doc__ = "Resolved settings of one launcher command (see SETTINGS for meanings)."


def _read_yaml(path: str) -> dict[str, Any]:
    return read_settings_file(path, _BY_NAME, ConfigError, "settings file", yaml.safe_load, (yaml.YAMLError,))


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    return parse_value(setting.name, setting.parse, raw, origin, setting.secret, ConfigError)


def resolve(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
            config_file: Optional[str] = None) -> Any:
    """Resolve every setting (flag > environment > settings file > default); returns LauncherSettings."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("LAUNCHER_CONFIG") or None
    file_values = _read_yaml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        env_name = first_set(setting.env, environ)
        if setting.flag and flags.get(setting.name) is not None:
            values[setting.name] = _parse(setting, flags[setting.name], setting.flag)
        elif env_name is not None:
            values[setting.name] = _parse(setting, environ[env_name], env_name)
        elif setting.name in file_values:
            values[setting.name] = _parse(setting, file_values[setting.name], f"settings file {config_file}")
        else:
            values[setting.name] = setting.default_value(environ)
    return LauncherSettings(**values)


def from_args(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The settings of one command line, resolved once and kept on the namespace."""
    cached = getattr(args, "_settings", None)
    if cached is None:
        flags = {s.name: getattr(args, s.name, None) for s in SETTINGS if s.flag}
        cached = resolve(flags, environ, getattr(args, "config", None))
        args._settings = cached
    return cached
