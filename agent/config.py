"""Agent settings: one table, three sources.

Precedence, highest first: command-line flag > environment > YAML file > default.
The YAML file comes from `--config FILE` or AGENT_CONFIG; its keys are the setting names
below (e.g. `idle_exit: 60`). Every setting also has an environment variable AGENT_<NAME>
(AGENT_IDLE_EXIT), and pyclowder's own variable names are honoured where pyclowder has one
(RABBITMQ_URI, RABBITMQ_QUEUE, CLOWDER_URL, ...); when both are set, AGENT_<NAME> wins.
Job scripts pass settings through the environment, so the environment alone is enough.
The table is declared into hpc_common.settings_table, which resolves it (the launcher's table too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import yaml

from hpc_common.retry_queues import DEFAULT_MAX_RETRIES
from hpc_common.settings_files import parse_bool as _to_bool
from hpc_common.settings_table import Check, Setting, SettingsTable

from .errors import ConfigError
from .sources.registry import SOURCES, source_kind
from .plugin_settings import PER_PLUGIN_SOURCE_KEYS, parse_plugin_table


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


def _plugins_check(table: Any) -> Optional[str]:
    """A plugins table whose `env:` entries an extractor may get (agent.extractor_env says which)."""
    from .extractor_env import plugin_env_problem  # it builds on this module's SETTINGS

    problems = (plugin_env_problem(name, entry["env"]) for name, entry in (table or {}).items()
                if entry.get("env") is not None)
    return next((p for p in problems if p), None)


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


def _setting(name: str, parse: Callable[[Any], Any], default: Any, help: str, pyclowder_env: tuple[str, ...] = (),
             secret: bool = False, check: Optional[Check] = None, type: Any = Any) -> Setting:
    """An agent setting: read from AGENT_<NAME>, then pyclowder's own variable names; flag --<name>
    (add_setting_flags leaves secrets off the command line)."""
    return Setting(name, parse, default, help, env=("AGENT_" + name.upper(),) + pyclowder_env,
                   flag="--" + name.replace("_", "-"), secret=secret, check=check, type=type)


_OPT_STR = Optional[str]
_TABLE: tuple[Setting, ...] = (
    _setting("plugin", _to_plugins, None, "extractor(s) to run: extractor_info name or folder name; several "
             "comma-separated (a,b) or a YAML list, served by one agent", type=_OPT_STR),
    _setting("plugin_path", _to_path_list, [], "extra folders holding plugin folders (colon-separated)",
             type=list[str]),
    _setting("source", _to_source, "amqp", "where work comes from: amqp (RabbitMQ), relay or spool (python -m launcher relay|spool), or file "
             "(one message, for python -m launcher dispatch)", type=str),
    _setting("relay_url", _to_optional_str, None, "source relay: the relay's URL, e.g. https://login1:8765",
             type=_OPT_STR),
    _setting("relay_token_file", _to_optional_str, None, "source relay: file holding the relay's bearer token (mode 0600)",
             type=_OPT_STR),
    _setting("relay_ca", _to_optional_str, None, "source relay: CA bundle to verify the relay's TLS certificate",
             type=_OPT_STR),
    _setting("relay_inline", int, 256 << 10, "source relay, staging ahead: files up to this many bytes come with "
             "their lease, with their file info (0: never)", check=_not_negative, type=int),
    _setting("message_file", _to_optional_str, None,
             "source file: the one message to process (written by python -m launcher dispatch)",
             ("CLOWDER_MESSAGE_FILE",), type=_OPT_STR),
    _setting("spool_dir", _to_optional_str, None, "source spool: the spool folder (python -m launcher spool --dir)",
             type=_OPT_STR),
    _setting("rabbitmq_uri", str, "amqp://guest:guest@127.0.0.1:5672/%2f", "broker URI",
             ("RABBITMQ_URI",), secret=True, type=str),
    _setting("rabbitmq_queue", _to_optional_str, None, "queue to consume (default: the extractor's name)",
             ("RABBITMQ_QUEUE",), type=_OPT_STR),
    _setting("extractor_key", _to_optional_str, None, "private extractor key: queue becomes private.<key>.<queue>",
             ("EXTRACTOR_KEY",), secret=True, type=_OPT_STR),
    _setting("clowder_url", _to_optional_str, None, "Clowder URL to use instead of the message's host",
             ("CLOWDER_URL",), type=_OPT_STR),
    _setting("clowder_version", int, 1, "Clowder API version the extractor speaks (1 or 2)", ("CLOWDER_VERSION",),
             check=_one_of(1, 2), type=int),
    _setting("clowder_email", _to_optional_str, None, "owner announced at registration", ("CLOWDER_EMAIL",),
             type=_OPT_STR),
    _setting("mounted_paths", _to_mapping, {}, "JSON {remote path: local path} for files Clowder stores on a shared disk",
             ("MOUNTED_PATHS",), type=dict[str, str]),
    _setting("ssl_verify", _to_bool, True, "verify Clowder's TLS certificate", type=bool),
    _setting("max_retries", int, DEFAULT_MAX_RETRIES, "retries after a failed attempt before the message is "
             "dead-lettered (pyclowder's MAX_RETRY: 10, so 11 attempts)",
             ("MAX_RETRY",), check=_not_negative, type=int),
    _setting("retry_backoff", float, 2.0, "seconds before the first retry; doubles each retry (capped at 60)",
             check=_not_negative, type=float),
    _setting("heartbeat", float, 60.0, "seconds between registrations on the 'extractors' exchange (Clowder v2 "
             "forgets an extractor unheard for 300 s; pyclowder's 300 s sits on that edge)", ("HEARTBEAT",),
             check=_not_negative, type=float),
    _setting("slots", _to_slots, 1, "extractor processes this agent runs at once (per rank under MPI); with "
             "several plugins, for each, or split by plugin: a:2,b:1", check=_slots_check, type=Any),
    _setting("time_limit", float, 0.0, "seconds one file may take before its extractor is killed (0: no limit)",
             check=_not_negative, type=float),
    _setting("memory_limit", float, 0.0, "MB one extractor process tree may use before it is killed (0: no limit)",
             check=_not_negative, type=float),
    _setting("recycle_after", int, 0, "replace an extractor process after this many files (0: never)",
             check=_not_negative, type=int),
    _setting("prefetch", int, 0, "deliveries held at once (0: twice the slots)", check=_not_negative, type=int),
    _setting("idle_exit", float, 0.0, "exit 0 after this many seconds without work (0: never)",
             check=_not_negative, type=float),
    _setting("max_messages", int, 0, "exit 0 after this many messages (0: no limit)", check=_not_negative, type=int),
    _setting("stop_grace", float, 5.0, "seconds in-flight work may finish after SIGTERM before it is handed back",
             check=_not_negative, type=float),
    _setting("walltime", _to_optional_str, None,
             "this task's time limit (HH:MM:SS); default: asked of the scheduler (Slurm, PBS, Torque)",
             check=_walltime_text, type=_OPT_STR),
    _setting("walltime_margin", float, 0.0,
             "seconds kept free at the end of the allocation (0: 5%% of the walltime, 20 s to 5 min)",
             check=_not_negative, type=float),
    _setting("journal_dir", str, os.path.join("~", ".clowder-hpc-agent", "journal"),
             "in-flight journal (on a filesystem every node sees) for extractions longer than journal_after", type=str),
    _setting("journal_after", float, 20.0,
             "seconds a delivery may stay unacknowledged before it is journaled and acknowledged",
             check=lambda v: None if v > 0 else "must be positive (RabbitMQ closes channels holding old deliveries)",
             type=float),
    _setting("connect_timeout", float, 60.0, "seconds to keep trying the broker at start before giving up",
             check=_not_negative, type=float),
    _setting("reconnect_timeout", float, 300.0, "seconds to keep trying the broker after losing it mid-run",
             check=_not_negative, type=float),
    _setting("work_dir", _to_optional_str, None, "scratch folder for downloads (default: TMPDIR)", type=_OPT_STR),
    _setting("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR", check=_log_level, type=str),
    _setting("log_file", _to_optional_str, None, "append logs to this file instead of stderr", type=_OPT_STR),
    _setting("mpi", _to_optional_bool, None,
             "MPI file-per-rank mode: auto (when mpiexec started the agent), 1 (always) or 0 (never)",
             type=Optional[bool]),
    _setting("mpi_leader", _to_group_mode, "node",
             "MPI: rank groups sharing one broker connection: node, allocation or N ranks per group", type=str),
    _setting("mpi_rank_timeout", float, 60.0, "MPI: seconds of silence after which a rank (or the leader) is lost",
             check=_positive, type=float),
    _setting("amqp_internals", _to_bool, True,
             "source amqp: use pika's internals on the hot path (one socket send per loop turn, status frames "
             "marshalled once, the extractors' pipes read in pika's event loop); 0: pika's public API only "
             "(benchmarks/noop_overhead.py measures both)", type=bool),
    _setting("stage_ahead", _to_optional_bool, None,
             "fetch each waiting file and its file info while the extractor works on the one before: auto (on "
             "with source relay), 1 or 0; MPI ranks and an agent's own slots", type=Optional[bool]),
    _setting("extraction_func", _to_optional_str, None,
             "function extractors: the function, when the Dockerfile names none", ("EXTRACTION_FUNC",), type=_OPT_STR),
    _setting("extraction_module", _to_optional_str, None,
             "function extractors: the function's module, when the Dockerfile names none", ("EXTRACTION_MODULE",),
             type=_OPT_STR),
    _setting("env_dir", str, os.path.join("~", ".clowder-hpc-agent", "envs"),
             "where plugin environments live (python -m agent prepare), on a filesystem every node sees", type=str),
    _setting("env_python", _to_optional_str, None,
             "interpreter plugin environments are built with (default: the agent's own)", type=_OPT_STR),
    _setting("env_build", str, "auto",
             "build a missing plugin environment at run: yes, no, or auto (not inside a batch job)",
             check=lambda v: None if v in ("auto", "yes", "no") else f"{v!r} is not yes, no or auto", type=str),
    _setting("command_prefix", _to_optional_str, None,
             "command put before the extractor process's, e.g. 'apptainer exec x.sif'", type=_OPT_STR),
    _setting("plugins", parse_plugin_table, {},
             "per-plugin settings {NAME: {command_prefix, env_python, env_build, extraction_func, extraction_module, "
             "slots, time_limit, max_retries, rabbitmq_queue, container, env, relay_url, relay_token_file, spool_dir}}",
             check=_plugins_check, type=dict[str, dict[str, Any]]),
)

TABLE = SettingsTable(_TABLE, ConfigError, "config file", "AGENT_CONFIG", yaml.safe_load, (yaml.YAMLError,))
SETTINGS = TABLE.settings


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
    """Checks that involve more than one setting: what the chosen work source needs.

    A value the source needs may come from the plugins table instead (relay_url, spool_dir per plugin):
    then the agent-wide settings pass when one plugin's entry completes them, and agent.plugin_set
    checks every served plugin's own settings.
    """
    kind = source_kind(cfg.source)
    problem = kind.check(cfg)
    if problem and not any(kind.check(dataclasses.replace(cfg, **own)) is None for own in _own_sources(cfg)):
        raise ConfigError(problem)


def _own_sources(cfg: Any) -> list[dict[str, Any]]:
    """Each plugins-table entry's own source settings (entries that give none are left out)."""
    table = getattr(cfg, "plugins", None) or {}
    entries = ({key: str(entry[key]) for key in PER_PLUGIN_SOURCE_KEYS if entry.get(key) not in (None, "")}
               for entry in table.values())
    return [own for own in entries if own]


# The one list of settings makes the dataclass: no second list of names or defaults to keep in step.
AgentConfig = TABLE.make_dataclass("AgentConfig", __name__, "Resolved settings of one agent process (see SETTINGS "
                                   "for meanings).", bases=(_ConfigMethods,))


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


def parse_setting(name: str, raw: Any, origin: str) -> Any:
    """Parse and check a raw value of the setting `name` (ConfigError naming origin when bad)."""
    return TABLE.parse(name, raw, origin)


def setting_from_env(name: str, environ: Mapping[str, str]) -> Any:
    """One setting from the environment alone (its default when unset), parsed and checked."""
    return TABLE.from_env(name, environ)


def load_config(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
                config_file: Optional[str] = None) -> AgentConfig:
    """Resolve every setting from flags, environment, YAML file and defaults (the settings engine's
    precedence), then check how they combine.

    Every bad value raises ConfigError naming the setting and its source.
    """
    cfg = AgentConfig(**TABLE.resolve(flags, environ, config_file))
    _check_combination(cfg)
    return cfg
