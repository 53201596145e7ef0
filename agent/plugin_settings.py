"""Per-plugin settings: the `plugins` table and the lookups that fall back to the agent-wide value.

YAML (or AGENT_PLUGINS as JSON) maps a plugin's extractor_info name or folder name to settings
that apply to that plugin only, so several plugins in one agent can each have their own:

    plugins:
      ncsa.wordcount:
        command_prefix: apptainer exec --bind /scratch wordcount.sif
        env_python: /opt/python/3.11/bin/python3
        env: {WORDCOUNT_LANG: en}
      ncsa.image.preview:
        container: {runtime: charliecloud, image: /scratch/images/preview}

Keys: command_prefix, env_python, env_build, extraction_func, extraction_module, container
(agent.container_runtime), env (variables for
the plugin's extractor processes, over the agent's environment and the Dockerfile's ENV:
agent.extractor_env), and for an agent serving several plugins (agent.plugin_set) slots,
time_limit, max_retries, rabbitmq_queue, and where the plugin's messages come from with the relay or
spool source: relay_url, relay_token_file, spool_dir.
A key missing there takes the agent-wide setting of the same name (AGENT_COMMAND_PREFIX, ...);
env has no agent-wide setting: the agent's own environment is that.
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Mapping, Optional

from .container_runtime import ContainerSetting, parse_container

PER_PLUGIN_KEYS = ("command_prefix", "env_python", "env_build", "extraction_func", "extraction_module",
                   "slots", "time_limit", "max_retries", "rabbitmq_queue", "container", "env",
                   "relay_url", "relay_token_file", "spool_dir")
#: per-plugin keys that say where the plugin's messages come from (relay and spool sources)
PER_PLUGIN_SOURCE_KEYS = ("relay_url", "relay_token_file", "spool_dir")


def parse_plugin_table(value: Any) -> dict[str, dict[str, Any]]:
    """{plugin name: {key: value}} from a YAML mapping or a JSON string; ValueError on unknown keys."""
    table = value if isinstance(value, Mapping) else json.loads(str(value) or "{}")
    if not isinstance(table, Mapping):
        raise ValueError("expected a mapping of plugin name: {setting: value}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in table.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"plugin {name}: expected a mapping of setting: value")
        unknown = sorted(set(map(str, entry)) - set(PER_PLUGIN_KEYS))
        if unknown:
            raise ValueError(f"plugin {name}: unknown setting(s) {', '.join(unknown)} "
                             f"(known: {', '.join(PER_PLUGIN_KEYS)})")
        out[str(name)] = dict(entry)
        try:
            if entry.get("container") is not None:
                parse_container(entry["container"])
        except ValueError as exc:
            raise ValueError(f"plugin {name}: {exc}") from None
    # `env:` is checked by the settings' own check (agent.extractor_env.plugin_env_problem).
    return out


def container_setting(cfg: Any, name: str, folder_name: str = "") -> Optional[ContainerSetting]:
    """The plugin's `container:` setting, or None when its extractor processes run on the host."""
    raw = own_value(cfg, "container", name, folder_name)
    return parse_container(raw) if raw else None


def own_value(cfg: Any, key: str, name: str, folder_name: str = "") -> Any:
    """The plugin's own value for key in the plugins table (by extractor_info name, then folder name), or None."""
    table: Mapping[str, Mapping[str, Any]] = getattr(cfg, "plugins", None) or {}
    for candidate in (name, folder_name):
        entry = table.get(candidate) if candidate else None
        if entry is not None and entry.get(key) not in (None, ""):
            return entry[key]
    return None


def plugin_value(cfg: Any, key: str, name: str, folder_name: str = "") -> Any:
    """The plugin's own value for key (by extractor_info name, then folder name), else the agent-wide one."""
    own = own_value(cfg, key, name, folder_name)
    return getattr(cfg, key) if own is None else own


def command_prefix(value: Any) -> list[str]:
    """A command prefix as argv: a YAML list as is, a string split like a shell would (no shell runs)."""
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return shlex.split(str(value))


def entry_defaults(cfg: Any):  # -> plugin_loader.EntryDefaults
    """EXTRACTION_FUNC / EXTRACTION_MODULE from the settings, for plugins whose Dockerfile names none."""
    def lookup(name: str, folder_name: str) -> tuple[Optional[str], Optional[str]]:
        return (plugin_value(cfg, "extraction_func", name, folder_name) or None,
                plugin_value(cfg, "extraction_module", name, folder_name) or None)
    return lookup
