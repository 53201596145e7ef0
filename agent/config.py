"""Agent settings: one table, three sources.

Precedence, highest first: command-line flag > environment > YAML file > default.
The YAML file comes from `--config FILE` or AGENT_CONFIG; its keys are the setting names
below (e.g. `idle_exit: 60`). Every setting also has an environment variable AGENT_<NAME>
(AGENT_IDLE_EXIT), and pyclowder's own variable names are honoured where pyclowder has one
(RABBITMQ_URI, RABBITMQ_QUEUE, CLOWDER_URL, ...); when both are set, AGENT_<NAME> wins.
Job scripts pass settings through the environment, so the environment alone is enough.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml


class ConfigError(ValueError):
    """A setting has a value the agent cannot use; the message says which and why."""


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _to_path_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    return [p for p in str(value).split(":") if p]


def _to_mapping(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    parsed = json.loads(str(value) or "{}")
    if not isinstance(parsed, dict):
        raise ValueError("expected a JSON object like {\"/remote\": \"/local\"}")
    return {str(k): str(v) for k, v in parsed.items()}


def _to_optional_str(value: Any) -> Optional[str]:
    return None if value is None or str(value) == "" else str(value)


@dataclass(frozen=True)
class Setting:
    """One setting: its name, how to parse it, its default and the environment names it reads."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    pyclowder_env: tuple[str, ...] = ()
    secret: bool = False

    @property
    def env(self) -> tuple[str, ...]:
        """Environment variables for this setting, the first set one wins."""
        return ("AGENT_" + self.name.upper(),) + self.pyclowder_env

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("plugin", _to_optional_str, None, "extractor to run: its extractor_info name or folder name"),
    Setting("plugin_path", _to_path_list, [], "extra folders holding plugin folders (colon-separated)"),
    Setting("source", str, "amqp", "where work comes from: amqp (RabbitMQ), relay or spool (python -m launcher relay|spool), or file "
            "(one message, for python -m launcher dispatch)"),
    Setting("relay_url", _to_optional_str, None, "source relay: the relay's URL, e.g. https://login1:8765"),
    Setting("relay_token_file", _to_optional_str, None, "source relay: file holding the relay's bearer token (mode 0600)"),
    Setting("relay_ca", _to_optional_str, None, "source relay: CA bundle to verify the relay's TLS certificate"),
    Setting("message_file", _to_optional_str, None,
            "source file: the one message to process (written by python -m launcher dispatch)",
            ("CLOWDER_MESSAGE_FILE",)),
    Setting("spool_dir", _to_optional_str, None, "source spool: the spool folder (python -m launcher spool --dir)"),
    Setting("rabbitmq_uri", str, "amqp://guest:guest@127.0.0.1:5672/%2f", "broker URI",
            ("RABBITMQ_URI",), secret=True),
    Setting("rabbitmq_queue", _to_optional_str, None, "queue to consume (default: the extractor's name)",
            ("RABBITMQ_QUEUE",)),
    Setting("extractor_key", _to_optional_str, None, "private extractor key: queue becomes private.<key>.<queue>",
            ("EXTRACTOR_KEY",), secret=True),
    Setting("clowder_url", _to_optional_str, None, "Clowder URL to use instead of the message's host",
            ("CLOWDER_URL",)),
    Setting("clowder_version", int, 1, "Clowder API version the extractor speaks (1 or 2)", ("CLOWDER_VERSION",)),
    Setting("clowder_email", _to_optional_str, None, "owner announced at registration", ("CLOWDER_EMAIL",)),
    Setting("mounted_paths", _to_mapping, {}, "JSON {remote path: local path} for files Clowder stores on a shared disk",
            ("MOUNTED_PATHS",)),
    Setting("ssl_verify", _to_bool, True, "verify Clowder's TLS certificate"),
    Setting("max_retries", int, 3, "retries after a failed attempt before the message is dead-lettered",
            ("MAX_RETRY",)),
    Setting("retry_backoff", float, 2.0, "seconds before the first retry; doubles each retry (capped at 60)"),
    Setting("heartbeat", float, 60.0, "seconds between registrations on the 'extractors' exchange (Clowder v2 "
            "forgets an extractor unheard for 300 s; pyclowder's 300 s sits on that edge)", ("HEARTBEAT",)),
    Setting("slots", int, 1, "extractor processes this agent runs at once"),
    Setting("time_limit", float, 0.0, "seconds one file may take before its extractor is killed (0: no limit)"),
    Setting("memory_limit", float, 0.0, "MB one extractor process tree may use before it is killed (0: no limit)"),
    Setting("recycle_after", int, 0, "replace an extractor process after this many files (0: never)"),
    Setting("prefetch", int, 0, "deliveries held at once (0: twice the slots)"),
    Setting("idle_exit", float, 0.0, "exit 0 after this many seconds without work (0: never)"),
    Setting("max_messages", int, 0, "exit 0 after this many messages (0: no limit)"),
    Setting("stop_grace", float, 5.0, "seconds in-flight work may finish after SIGTERM before it is handed back"),
    Setting("walltime", _to_optional_str, None,
            "this task's time limit (HH:MM:SS); default: asked of the scheduler (Slurm, PBS, Torque)"),
    Setting("walltime_margin", float, 0.0,
            "seconds kept free at the end of the allocation (0: 5%% of the walltime, 20 s to 5 min)"),
    Setting("journal_dir", str, os.path.join("~", ".clowder-hpc-agent", "journal"),
            "in-flight journal (on a filesystem every node sees) for extractions longer than journal_after"),
    Setting("journal_after", float, 20.0,
            "seconds a delivery may stay unacknowledged before it is journaled and acknowledged"),
    Setting("connect_timeout", float, 60.0, "seconds to keep trying the broker at start before giving up"),
    Setting("reconnect_timeout", float, 300.0, "seconds to keep trying the broker after losing it mid-run"),
    Setting("work_dir", _to_optional_str, None, "scratch folder for downloads (default: TMPDIR)"),
    Setting("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("log_file", _to_optional_str, None, "append logs to this file instead of stderr"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class AgentConfig:
    """Resolved settings of one agent process (see SETTINGS for meanings)."""

    plugin: Optional[str] = None
    plugin_path: list[str] = field(default_factory=list)
    source: str = "amqp"
    relay_url: Optional[str] = None
    relay_token_file: Optional[str] = None
    relay_ca: Optional[str] = None
    message_file: Optional[str] = None
    spool_dir: Optional[str] = None
    rabbitmq_uri: str = "amqp://guest:guest@127.0.0.1:5672/%2f"
    rabbitmq_queue: Optional[str] = None
    extractor_key: Optional[str] = None
    clowder_url: Optional[str] = None
    clowder_version: int = 1
    clowder_email: Optional[str] = None
    mounted_paths: dict[str, str] = field(default_factory=dict)
    ssl_verify: bool = True
    max_retries: int = 3
    retry_backoff: float = 2.0
    heartbeat: float = 60.0
    slots: int = 1
    time_limit: float = 0.0
    memory_limit: float = 0.0
    recycle_after: int = 0
    prefetch: int = 0
    idle_exit: float = 0.0
    max_messages: int = 0
    stop_grace: float = 5.0
    walltime: Optional[str] = None
    walltime_margin: float = 0.0
    journal_dir: str = os.path.join("~", ".clowder-hpc-agent", "journal")
    journal_after: float = 20.0
    connect_timeout: float = 60.0
    reconnect_timeout: float = 300.0
    work_dir: Optional[str] = None
    log_level: str = "INFO"
    log_file: Optional[str] = None

    def effective_prefetch(self) -> int:
        """Deliveries held at once: enough to keep every slot busy without hoarding."""
        return self.prefetch if self.prefetch > 0 else 2 * self.slots

    def validate(self) -> None:
        """Raise ConfigError for values no agent can run with."""
        if self.source not in ("amqp", "relay", "spool", "file"):
            raise ConfigError(f"source: unknown work source {self.source!r} (known: amqp, relay, spool, file)")
        if self.source == "file" and not self.message_file:
            raise ConfigError("source file needs message_file (AGENT_MESSAGE_FILE or CLOWDER_MESSAGE_FILE)")
        if self.source == "spool" and not self.spool_dir:
            raise ConfigError("source spool needs spool_dir (AGENT_SPOOL_DIR)")
        if self.source == "relay":
            if not self.relay_url or not self.relay_token_file:
                raise ConfigError("source relay needs relay_url and relay_token_file (AGENT_RELAY_URL, "
                                  "AGENT_RELAY_TOKEN_FILE)")
            if not self.relay_url.startswith(("http://", "https://")):
                raise ConfigError(f"relay_url: {self.relay_url!r} is not an http(s) URL")
            if self.clowder_url:
                raise ConfigError("clowder_url cannot be used with source relay: the relay forwards Clowder calls "
                                  "(give the relay --clowder-url instead)")
        if self.clowder_version not in (1, 2):
            raise ConfigError(f"clowder_version: must be 1 or 2, not {self.clowder_version}")
        if self.slots < 1:
            raise ConfigError("slots: must be at least 1")
        for name in ("max_retries", "prefetch", "max_messages", "recycle_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        for name in ("idle_exit", "stop_grace", "walltime_margin", "time_limit", "memory_limit", "journal_after", "retry_backoff", "heartbeat",
                     "connect_timeout", "reconnect_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        if self.journal_after <= 0:
            raise ConfigError("journal_after: must be positive (RabbitMQ closes channels holding old deliveries)")
        if self.walltime is not None:
            from .walltime import parse_walltime
            try:
                parse_walltime(self.walltime)
            except ValueError as exc:
                raise ConfigError(f"walltime: {exc}") from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")


assert {f.name for f in dataclasses.fields(AgentConfig)} == set(_BY_NAME), "SETTINGS and AgentConfig disagree"


def add_setting_flags(parser: argparse.ArgumentParser, names: Optional[list[str]] = None) -> None:
    """Add one flag per setting (all of them unless names is given); absent flags stay None."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        if setting.secret:
            continue  # secrets never on a command line: environment or config file only
        if setting.parse is _to_bool:
            parser.add_argument(setting.flag, dest=setting.name, default=None,
                                action=argparse.BooleanOptionalAction, help=setting.help)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None, metavar=setting.name.upper(),
                                help=setting.help)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of setting: value")
    unknown = sorted(set(map(str, data)) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    try:
        return setting.parse(raw)
    except (TypeError, ValueError) as exc:
        shown = "(hidden)" if setting.secret else repr(raw)
        raise ConfigError(f"{setting.name} from {origin}: cannot use {shown}: {exc}") from None


def load_config(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
                config_file: Optional[str] = None) -> AgentConfig:
    """Resolve every setting from flags, environment, YAML file and defaults, then validate."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("AGENT_CONFIG") or None
    file_values = _read_yaml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if flags.get(setting.name) is not None:
            values[setting.name] = _parse(setting, flags[setting.name], setting.flag)
            continue
        env_name = next((e for e in setting.env if environ.get(e) not in (None, "")), None)
        if env_name is not None:
            values[setting.name] = _parse(setting, environ[env_name], env_name)
        elif setting.name in file_values:
            values[setting.name] = _parse(setting, file_values[setting.name], config_file or "config")
        else:
            values[setting.name] = setting.default
    cfg = AgentConfig(**values)
    cfg.validate()
    return cfg
