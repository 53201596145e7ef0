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

from hpc_common.settings_files import first_set, parse_bool as _to_bool, parse_value, read_settings_file

from .errors import ConfigError
from .sources.registry import SOURCES, source_kind
from .plugin_settings import parse_plugin_table


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


def _to_plugins(value: Any) -> Optional[str]:
    """One plugin name or several: a YAML list or a string separated by commas or spaces (job scripts:
    qsub -v and sbatch --export split on commas), kept comma-separated."""
    items = value if isinstance(value, (list, tuple)) else [value]
    names = [n for item in items if item is not None for n in str(item).replace(",", " ").split()]
    return ",".join(names) or None


def _to_slots(value: Any) -> Any:
    """A slot count for every plugin (`2`) or a split by plugin (`a:2,b:1`, or a YAML mapping)."""
    if isinstance(value, Mapping):
        return {str(k): int(v) for k, v in value.items()}
    text = str(value).strip()
    if ":" not in text:
        return int(text)
    split: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.rpartition(":")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME:COUNT in a slot split, not {part!r}")
        split[name.strip()] = int(count)
    return split


def _slots_check(v: Any) -> Optional[str]:
    counts = v.values() if isinstance(v, dict) else [v]
    return None if all(c >= 1 for c in counts) else "must be at least 1"


def _to_source(value: Any) -> str:
    text = str(value).strip()
    if text not in SOURCES:
        raise ValueError(f"unknown work source (known: {', '.join(SOURCES)})")
    return text


def _to_optional_bool(value: Any) -> Optional[bool]:
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    return _to_bool(value)


def _to_group_mode(value: Any) -> str:
    text = str(value).strip().lower() or "node"
    if text in ("node", "allocation") or (text.isdigit() and int(text) > 0):
        return text
    raise ValueError("expected node, allocation or a positive number of ranks per group")


# Checks of one value: None when fine, else what is wrong (load_config adds the setting and its source).
Check = Callable[[Any], Optional[str]]


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def _not_negative(v: Any) -> Optional[str]:
    return None if v >= 0 else "must not be negative"


def _positive(v: Any) -> Optional[str]:
    return None if v > 0 else "must be positive"


def _one_of(*choices: Any) -> Check:
    shown = " or ".join(str(c) for c in choices)
    return lambda v: None if v in choices else f"must be {shown}, not {v!r}"


def _walltime_text(v: Any) -> Optional[str]:
    if v is None:
        return None
    from hpc_common.walltime import parse_walltime
    try:
        parse_walltime(v)
    except ValueError as exc:
        return str(exc)
    return None


def _log_level(v: Any) -> Optional[str]:
    return None if str(v).upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else \
        f"{v!r} is not DEBUG, INFO, WARNING or ERROR"


@dataclass(frozen=True)
class Setting:
    """One setting: its name, type, parser, default, check and the environment names it reads."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    pyclowder_env: tuple[str, ...] = ()
    secret: bool = False
    check: Optional[Check] = None
    type: Any = Any  # the AgentConfig field's annotation

    @property
    def env(self) -> tuple[str, ...]:
        """Environment variables for this setting, the first set one wins."""
        return ("AGENT_" + self.name.upper(),) + self.pyclowder_env

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with a parsed value, or None."""
        return self.check(value) if self.check is not None else None

    def fresh_default(self) -> Any:
        """The default value; a list or dict is copied so that no two configs share one."""
        return type(self.default)(self.default) if isinstance(self.default, (list, dict)) else self.default

    def field(self) -> tuple[str, Any, Any]:
        """This setting as a dataclass field of AgentConfig."""
        return self.name, self.type, field(default_factory=self.fresh_default, repr=not self.secret)


_OPT_STR = Optional[str]
SETTINGS: tuple[Setting, ...] = (
    Setting("plugin", _to_plugins, None, "extractor(s) to run: extractor_info name or folder name; several "
            "comma-separated (a,b) or a YAML list, served by one agent", type=_OPT_STR),
    Setting("plugin_path", _to_path_list, [], "extra folders holding plugin folders (colon-separated)",
            type=list[str]),
    Setting("source", _to_source, "amqp", "where work comes from: amqp (RabbitMQ), relay or spool (python -m launcher relay|spool), or file "
            "(one message, for python -m launcher dispatch)", type=str),
    Setting("relay_url", _to_optional_str, None, "source relay: the relay's URL, e.g. https://login1:8765",
            type=_OPT_STR),
    Setting("relay_token_file", _to_optional_str, None, "source relay: file holding the relay's bearer token (mode 0600)",
            type=_OPT_STR),
    Setting("relay_ca", _to_optional_str, None, "source relay: CA bundle to verify the relay's TLS certificate",
            type=_OPT_STR),
    Setting("relay_inline", int, 256 << 10, "source relay, staging ahead: files up to this many bytes come with "
            "their lease, with their file info (0: never)", check=_not_negative, type=int),
    Setting("message_file", _to_optional_str, None,
            "source file: the one message to process (written by python -m launcher dispatch)",
            ("CLOWDER_MESSAGE_FILE",), type=_OPT_STR),
    Setting("spool_dir", _to_optional_str, None, "source spool: the spool folder (python -m launcher spool --dir)",
            type=_OPT_STR),
    Setting("rabbitmq_uri", str, "amqp://guest:guest@127.0.0.1:5672/%2f", "broker URI",
            ("RABBITMQ_URI",), secret=True, type=str),
    Setting("rabbitmq_queue", _to_optional_str, None, "queue to consume (default: the extractor's name)",
            ("RABBITMQ_QUEUE",), type=_OPT_STR),
    Setting("extractor_key", _to_optional_str, None, "private extractor key: queue becomes private.<key>.<queue>",
            ("EXTRACTOR_KEY",), secret=True, type=_OPT_STR),
    Setting("clowder_url", _to_optional_str, None, "Clowder URL to use instead of the message's host",
            ("CLOWDER_URL",), type=_OPT_STR),
    Setting("clowder_version", int, 1, "Clowder API version the extractor speaks (1 or 2)", ("CLOWDER_VERSION",),
            check=_one_of(1, 2), type=int),
    Setting("clowder_email", _to_optional_str, None, "owner announced at registration", ("CLOWDER_EMAIL",),
            type=_OPT_STR),
    Setting("mounted_paths", _to_mapping, {}, "JSON {remote path: local path} for files Clowder stores on a shared disk",
            ("MOUNTED_PATHS",), type=dict[str, str]),
    Setting("ssl_verify", _to_bool, True, "verify Clowder's TLS certificate", type=bool),
    Setting("max_retries", int, 3, "retries after a failed attempt before the message is dead-lettered",
            ("MAX_RETRY",), check=_not_negative, type=int),
    Setting("retry_backoff", float, 2.0, "seconds before the first retry; doubles each retry (capped at 60)",
            check=_not_negative, type=float),
    Setting("heartbeat", float, 60.0, "seconds between registrations on the 'extractors' exchange (Clowder v2 "
            "forgets an extractor unheard for 300 s; pyclowder's 300 s sits on that edge)", ("HEARTBEAT",),
            check=_not_negative, type=float),
    Setting("slots", _to_slots, 1, "extractor processes this agent runs at once (per rank under MPI); with "
            "several plugins, for each, or split by plugin: a:2,b:1", check=_slots_check, type=Any),
    Setting("time_limit", float, 0.0, "seconds one file may take before its extractor is killed (0: no limit)",
            check=_not_negative, type=float),
    Setting("memory_limit", float, 0.0, "MB one extractor process tree may use before it is killed (0: no limit)",
            check=_not_negative, type=float),
    Setting("recycle_after", int, 0, "replace an extractor process after this many files (0: never)",
            check=_not_negative, type=int),
    Setting("prefetch", int, 0, "deliveries held at once (0: twice the slots)", check=_not_negative, type=int),
    Setting("idle_exit", float, 0.0, "exit 0 after this many seconds without work (0: never)",
            check=_not_negative, type=float),
    Setting("max_messages", int, 0, "exit 0 after this many messages (0: no limit)", check=_not_negative, type=int),
    Setting("stop_grace", float, 5.0, "seconds in-flight work may finish after SIGTERM before it is handed back",
            check=_not_negative, type=float),
    Setting("walltime", _to_optional_str, None,
            "this task's time limit (HH:MM:SS); default: asked of the scheduler (Slurm, PBS, Torque)",
            check=_walltime_text, type=_OPT_STR),
    Setting("walltime_margin", float, 0.0,
            "seconds kept free at the end of the allocation (0: 5%% of the walltime, 20 s to 5 min)",
            check=_not_negative, type=float),
    Setting("journal_dir", str, os.path.join("~", ".clowder-hpc-agent", "journal"),
            "in-flight journal (on a filesystem every node sees) for extractions longer than journal_after", type=str),
    Setting("journal_after", float, 20.0,
            "seconds a delivery may stay unacknowledged before it is journaled and acknowledged",
            check=lambda v: None if v > 0 else "must be positive (RabbitMQ closes channels holding old deliveries)",
            type=float),
    Setting("connect_timeout", float, 60.0, "seconds to keep trying the broker at start before giving up",
            check=_not_negative, type=float),
    Setting("reconnect_timeout", float, 300.0, "seconds to keep trying the broker after losing it mid-run",
            check=_not_negative, type=float),
    Setting("work_dir", _to_optional_str, None, "scratch folder for downloads (default: TMPDIR)", type=_OPT_STR),
    Setting("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR", check=_log_level, type=str),
    Setting("log_file", _to_optional_str, None, "append logs to this file instead of stderr", type=_OPT_STR),
    Setting("mpi", _to_optional_bool, None,
            "MPI file-per-rank mode: auto (when mpiexec started the agent), 1 (always) or 0 (never)",
            type=Optional[bool]),
    Setting("mpi_leader", _to_group_mode, "node",
            "MPI: rank groups sharing one broker connection: node, allocation or N ranks per group", type=str),
    Setting("mpi_rank_timeout", float, 60.0, "MPI: seconds of silence after which a rank (or the leader) is lost",
            check=_positive, type=float),
    Setting("stage_ahead", _to_optional_bool, None,
            "fetch each waiting file and its file info while the extractor works on the one before: auto (on "
            "with source relay), 1 or 0; MPI ranks and an agent's own slots", type=Optional[bool]),
    Setting("extraction_func", _to_optional_str, None,
            "function extractors: the function, when the Dockerfile names none", ("EXTRACTION_FUNC",), type=_OPT_STR),
    Setting("extraction_module", _to_optional_str, None,
            "function extractors: the function's module, when the Dockerfile names none", ("EXTRACTION_MODULE",),
            type=_OPT_STR),
    Setting("env_dir", str, os.path.join("~", ".clowder-hpc-agent", "envs"),
            "where plugin environments live (python -m agent prepare), on a filesystem every node sees", type=str),
    Setting("env_python", _to_optional_str, None,
            "interpreter plugin environments are built with (default: the agent's own)", type=_OPT_STR),
    Setting("env_build", str, "auto",
            "build a missing plugin environment at run: yes, no, or auto (not inside a batch job)",
            check=lambda v: None if v in ("auto", "yes", "no") else f"{v!r} is not yes, no or auto", type=str),
    Setting("command_prefix", _to_optional_str, None,
            "command put before the extractor process's, e.g. 'apptainer exec x.sif'", type=_OPT_STR),
    Setting("plugins", parse_plugin_table, {},
            "per-plugin settings {NAME: {command_prefix, env_python, env_build, extraction_func, extraction_module, "
            "slots, time_limit, max_retries, rabbitmq_queue, container, env}}",
            type=dict[str, dict[str, Any]]),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class _ConfigMethods:
    """What AgentConfig does besides holding values (its fields come from SETTINGS)."""

    def stages_ahead(self) -> bool:
        """Whether waiting files are staged ahead: as set, or by default where every call crosses a relay."""
        setting = getattr(self, "stage_ahead")
        return setting if setting is not None else getattr(self, "source") == "relay"

    def effective_prefetch(self) -> int:
        """Deliveries held at once: enough to keep every slot busy without hoarding."""
        prefetch, slots = getattr(self, "prefetch"), getattr(self, "slots")
        return prefetch if prefetch > 0 else 2 * slots

    def validate(self) -> None:
        """Raise ConfigError for values no agent can run with (each setting, then how they combine)."""
        for setting in SETTINGS:
            problem = setting.problem(getattr(self, setting.name))
            if problem:
                raise ConfigError(f"{setting.name}: {problem}")
        _check_combination(self)


def _check_combination(cfg: Any) -> None:
    """Checks that involve more than one setting: what the chosen work source needs."""
    problem = source_kind(cfg.source).check(cfg)
    if problem:
        raise ConfigError(problem)


# The one list of settings makes the dataclass: no second list of names or defaults to keep in step.
AgentConfig = dataclasses.make_dataclass("AgentConfig", [s.field() for s in SETTINGS], bases=(_ConfigMethods,))
AgentConfig.__module__ = __name__
AgentConfig.__doc__ = "Resolved settings of one agent process (see SETTINGS for meanings)."


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
    return read_settings_file(path, _BY_NAME, ConfigError, "config file", yaml.safe_load, (yaml.YAMLError,))


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    """Parse and check one raw value; a bad one is a ConfigError naming the setting and its source."""
    value = parse_value(setting.name, setting.parse, raw, origin, setting.secret, ConfigError)
    problem = setting.problem(value)
    if problem:
        raise ConfigError(f"{setting.name}: {problem} (from {origin})")
    return value


def parse_setting(name: str, raw: Any, origin: str) -> Any:
    """Parse and check a raw value of the setting `name` (ConfigError naming origin when bad)."""
    return _parse(_BY_NAME[name], raw, origin)


def setting_from_env(name: str, environ: Mapping[str, str]) -> Any:
    """One setting from the environment alone (its default when unset), parsed and checked."""
    setting = _BY_NAME[name]
    env_name = first_set(setting.env, environ)
    return _parse(setting, environ[env_name], env_name) if env_name else setting.fresh_default()


def load_config(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
                config_file: Optional[str] = None) -> AgentConfig:
    """Resolve every setting from flags, environment, YAML file and defaults, then validate.

    Every bad value raises ConfigError naming the setting and its source.
    """
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("AGENT_CONFIG") or None
    file_values = _read_yaml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if flags.get(setting.name) is not None:
            values[setting.name] = _parse(setting, flags[setting.name], setting.flag)
            continue
        env_name = first_set(setting.env, environ)
        if env_name is not None:
            values[setting.name] = _parse(setting, environ[env_name], env_name)
        elif setting.name in file_values:
            values[setting.name] = _parse(setting, file_values[setting.name], f"config file {config_file}")
        else:
            values[setting.name] = setting.fresh_default()
    cfg = AgentConfig(**values)
    _check_combination(cfg)
    return cfg
