"""The plugins one agent serves (`--plugin a,b`) and each one's own settings.

Every plugin gets a copy of the agent's settings with its own values put in: slots (from the
`plugins:` table or the AGENT_SLOTS split `a:2,b:1`), time_limit, max_retries and rabbitmq_queue
(table only: RABBITMQ_QUEUE names one queue, so it is refused with several plugins), and relay_url,
relay_token_file, spool_dir (table only). The work source's needs are checked on each copy, and two
plugins never take from one place (one queue, relay URL or spool folder: the kind's `endpoint`).
The rest of the agent then treats each copy as it treats the settings of a one-plugin agent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ConfigError
from .plugin_loader import PluginSpec
from .plugin_settings import PER_PLUGIN_SOURCE_KEYS, own_value
from .sources.registry import source_kind
from .worker_settings import queue_name

#: settings the `plugins:` table may give per plugin that a plugin's copy of the settings takes over
#: (slots too, which may also come from the AGENT_SLOTS split)
PER_PLUGIN_OVERRIDES = ("time_limit", "max_retries", "rabbitmq_queue") + PER_PLUGIN_SOURCE_KEYS


def plugin_names(cfg: Any) -> list[Optional[str]]:
    """The plugin names asked for (comma-separated `plugin`), [None] when none was (the only one found)."""
    names = [n.strip() for n in (cfg.plugin or "").split(",") if n.strip()]
    return names or [None]


def _names_of(spec: PluginSpec, asked: Optional[str]) -> set[str]:
    return {n for n in (asked, spec.name, spec.folder_name) if n}


def _slot_count(cfg: Any, spec: PluginSpec, asked: Optional[str]) -> Any:
    """This plugin's slots (raw): the plugins table, then the AGENT_SLOTS split, then the agent-wide count."""
    own = _table_value(cfg, spec, "slots")
    if own is not None:
        return own
    if isinstance(cfg.slots, dict):
        names = _names_of(spec, asked)
        return next((count for name, count in cfg.slots.items() if name in names), 1)
    return cfg.slots


@dataclass(frozen=True)
class PluginPlan:
    """One served plugin: what it is, its own settings and the queue it consumes."""

    spec: PluginSpec
    cfg: Any      # agent.config.AgentConfig with this plugin's own values
    queue: str


def plan_plugins(cfg: Any, find: Callable[[Optional[str]], PluginSpec],
                 parse: Callable[[str, Any, str], Any]) -> list[PluginPlan]:
    """Find every plugin asked for and give each its settings and queue.

    find: plugin name -> PluginSpec (PluginError when missing); parse(setting, raw, origin) parses and
    checks a per-plugin value like the agent-wide one. ConfigError for combinations no agent can serve:
    RABBITMQ_QUEUE with several plugins, two plugins on one queue (relay URL, spool folder), a slot split
    naming an unknown plugin, a plugin whose settings lack what the source needs.
    """
    kind = source_kind(cfg.source)
    asked = plugin_names(cfg)
    several = len(asked) > 1
    specs = [(name, find(name)) for name in asked]
    if several and cfg.rabbitmq_queue:
        missing = [s.name for _, s in specs if not _table_value(cfg, s, "rabbitmq_queue")]
        if missing:
            raise ConfigError("rabbitmq_queue (RABBITMQ_QUEUE) names one queue but the agent serves "
                              f"{len(specs)} plugins; give each its queue in the plugins table "
                              f"(plugins: {{{missing[0]}: {{rabbitmq_queue: NAME}}}}) or leave it unset")
    if isinstance(cfg.slots, dict):
        known = set().union(*(_names_of(s, n) for n, s in specs))
        unknown = sorted(set(cfg.slots) - known)
        if unknown:
            raise ConfigError(f"slots: {', '.join(unknown)} is not a plugin this agent serves "
                              f"(serving: {', '.join(s.name for _, s in specs)})")
    plans: list[PluginPlan] = []
    for name, spec in specs:
        values: dict[str, Any] = {"plugin": name or spec.name}
        for key in PER_PLUGIN_OVERRIDES:
            raw = _table_value(cfg, spec, key)
            if raw is not None:
                values[key] = parse(key, raw, f"plugins.{spec.name}.{key}")
        slots = _slot_count(cfg, spec, name)
        values["slots"] = slots if type(slots) is int else parse("slots", slots, f"plugins.{spec.name}.slots")
        if not isinstance(values["slots"], int):
            raise ConfigError(f"plugins.{spec.name}.slots: expected a number of slots, not {slots!r}")
        own = dataclasses.replace(cfg, **values)
        problem = kind.check(own)
        if problem:
            raise ConfigError(f"plugins.{spec.name}: {problem}" if several else problem)
        plans.append(PluginPlan(spec, own, queue_name(own, spec)))
    seen: dict[str, str] = {}
    for plan in plans:
        where = kind.endpoint(plan.cfg, plan.queue)
        if where in seen:
            raise ConfigError(f"plugins {seen[where]} and {plan.spec.name} {kind.shared} {where}: "
                              f"a message must go to one plugin only ({kind.own_endpoint})")
        seen[where] = plan.spec.name
    return plans


def _table_value(cfg: Any, spec: PluginSpec, key: str) -> Any:
    """The plugins table's own value for key (None when the table does not give one)."""
    return own_value(cfg, key, spec.name, spec.folder_name)
