"""Launcher settings: one table, four sources.

Precedence, highest first: command-line flag > environment > YAML settings file > default.
The YAML file comes from `--config FILE` or LAUNCHER_CONFIG; its keys are the setting names below
(e.g. `scheduler: slurm`), unknown keys are refused. The site's caps file is separate (launcher.caps):
it holds limits, not settings. Every bad value, from any source, is one ConfigError naming the
setting and where the value came from; a secret's value is never shown. The table is declared into
hpc_common.settings_table, the engine the agent's table uses too.
"""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from hpc_common.job_env import secrets_file_value
from hpc_common.retry_queues import DEFAULT_MAX_RETRIES
from hpc_common.settings_files import parse_bool as _flag_bool
from hpc_common.settings_table import Setting, SettingsTable
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


def _setting(name: str, env: tuple[str, ...], parse: Callable[[Any], Any], default: Any, help: str,
             flag: Optional[str] = None, secret: bool = False,
             default_from_env: Optional[Callable[[Mapping[str, str]], Any]] = None) -> Setting:
    """One launcher setting: name, environment names (first set wins), parser, default, help and flag
    (None: environment or settings file only, as for secrets)."""
    return Setting(name, parse, default, help, env=env, flag=flag, secret=secret,
                   default_from_env=default_from_env)


_TABLE: tuple[Setting, ...] = (
    _setting("caps", ("LAUNCHER_CAPS",), _text, None,
             "site caps YAML (default /etc/clowder-hpc-agent/caps.yaml if it exists)", "--caps"),
    _setting("scheduler", ("LAUNCHER_SCHEDULER",), _choice(*SCHEDULER_NAMES), None,
             "pbs, torque or slurm (default: detected from the commands on PATH)", "--scheduler"),
    _setting("ssh", ("LAUNCHER_SSH",), _text, None,
             "run scheduler commands on this login node (default: locally)", "--ssh"),
    _setting("ssh_config", ("LAUNCHER_SSH_CONFIG",), _text, None, "ssh -F file (default ~/.ssh/config)",
             "--ssh-config"),
    _setting("script", ("LAUNCHER_SCRIPT",), _text, None,
             "job script (default pbs/agent_array.slurm on Slurm, else pbs/agent_array.pbs)", "--script"),
    _setting("state_dir", ("LAUNCHER_STATE_DIR",), _text, None,
             "ledger, lock and dispatch messages (default $XDG_STATE_HOME/clowder-launcher, "
             "~/.local/state/clowder-launcher)", "--state-dir", default_from_env=_default_state_dir),
    _setting("rabbitmq_uri", ("RABBITMQ_URI",), _text, None, "broker URI with credentials (default: the"
             " RABBITMQ_URI line of ~/.clowder-hpc-agent/env, the jobs' own secrets file)", secret=True,
             default_from_env=functools.partial(secrets_file_value, "RABBITMQ_URI")),
    _setting("rabbitmq_queue", ("RABBITMQ_QUEUE",), _queues, None,
             "the extractor's queue; several (a,b, or --rabbitmq-queue repeated) for agents serving several plugins",
             "--rabbitmq-queue"),
    _setting("rabbitmq_management", ("RABBITMQ_MANAGEMENT_URL",), _url, None,
             "RabbitMQ management API, for unacked counts", "--rabbitmq-management"),
    _setting("clowder_url", ("CLOWDER_URL",), _url, None,
             "relay: reach Clowder here instead of the message's host", "--clowder-url"),
    _setting("clowder_version", ("CLOWDER_VERSION",), _clowder_version, 1,
             "spool: Clowder API version of the extractor (1 or 2)", "--clowder-version"),
    _setting("relay_debug", ("RELAY_DEBUG",), _flag_bool, False, "relay: log every request (1 or 0)"),
    _setting("relay_amqp_internals", ("RELAY_AMQP_INTERNALS",), _flag_bool, True,
             "relay: its status replies leave in one socket send per batch, on pika's private path (1 or 0: "
             "pika's public API only)"),
    _setting("relay_url", ("LAUNCHER_RELAY_URL",), _url, None,
             "backlog: a relay on another host, asked for its counts (GET /v1/backlog)"),
    _setting("relay_token_file", ("LAUNCHER_RELAY_TOKEN_FILE",), _text, None,
             "backlog: that relay's bearer-token file (mode 0600)"),
    _setting("relay_ca", ("LAUNCHER_RELAY_CA",), _text, None, "backlog: CA bundle for that relay's TLS"),
    _setting("spool_dir", ("LAUNCHER_SPOOL_DIR",), _text, None,
             "backlog: a spool folder to count (spools started here are found in the state folder)"),
    _setting("journal_dir", ("AGENT_JOURNAL_DIR",), _text, os.path.join("~", ".clowder-hpc-agent", "journal"),
             "backlog: the agents' in-flight journal, for work of dead agents"),
    # The agents' retry settings say which retry queues (retry.<queue>.<s>) can hold parked retries.
    _setting("retry_backoff", ("AGENT_RETRY_BACKOFF",), _non_negative(float), 2.0,
             "backlog: the agents' first retry backoff in seconds (their retry queues are counted)"),
    _setting("max_retries", ("AGENT_MAX_RETRIES", "MAX_RETRY"), _non_negative(int), DEFAULT_MAX_RETRIES,
             "backlog: the agents' retries per file"),
    # scale registers the extractors on Clowder's `extractors` exchange (launcher.registration),
    # finding them in the plugin folders as the agents do: the agents' own settings' names
    _setting("heartbeat", ("LAUNCHER_HEARTBEAT", "HEARTBEAT"), _non_negative(float), 60.0,
             "scale: seconds between registrations of the extractors on the 'extractors' exchange (0: none)",
             "--heartbeat"),
    _setting("plugin", ("AGENT_PLUGIN",), _queues, None,
             "scale: the agents' plugin(s) (extractor_info or folder names), whose extractor_info is registered"),
    _setting("plugin_path", ("AGENT_PLUGIN_PATH",), _text, None,
             "scale: the agents' extra plugin folders (colon-separated), searched after agent/plugins/"),
    _setting("extractor_key", ("AGENT_EXTRACTOR_KEY", "EXTRACTOR_KEY"), _text, None,
             "scale: the agents' private extractor key (queues private.<key>.<name>)", secret=True),
    _setting("clowder_email", ("AGENT_CLOWDER_EMAIL", "CLOWDER_EMAIL"), _text, None,
             "scale: owner announced at registration, as pyclowder's CLOWDER_EMAIL"),
)

TABLE = SettingsTable(_TABLE, ConfigError, "settings file", "LAUNCHER_CONFIG", yaml.safe_load, (yaml.YAMLError,))
SETTINGS = TABLE.settings

LauncherSettings = TABLE.make_dataclass("LauncherSettings", __name__, "Resolved settings of one launcher command "
                                        "(see SETTINGS for meanings).", frozen=True)


def resolve(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
            config_file: Optional[str] = None) -> Any:
    """Resolve every setting (flag > environment > settings file > default); returns LauncherSettings."""
    return LauncherSettings(**TABLE.resolve(flags, environ, config_file))


def from_args(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The settings of one command line, resolved once and kept on the namespace."""
    cached = getattr(args, "_settings", None)
    if cached is None:
        flags = {s.name: getattr(args, s.name, None) for s in SETTINGS if s.flag}
        cached = resolve(flags, environ, getattr(args, "config", None))
        args._settings = cached
    return cached
