"""What an extractor process is given: its init frame, its environment and the queue it serves.

Used by `agent run` (every source, MPI ranks included) and `agent local`; it imports neither.
"""
from __future__ import annotations

import os
from typing import Any

from .config import AgentConfig
from .plugin_loader import PluginSpec
from .sources.registry import source_kind

# Broker credentials an extractor process never sees.
_SECRET_ENV = ("RABBITMQ_URI", "AGENT_RABBITMQ_URI", "EXTRACTOR_KEY", "AGENT_EXTRACTOR_KEY")


def queue_name(cfg: AgentConfig, spec: PluginSpec) -> str:
    """The queue pyclowder would consume: RABBITMQ_QUEUE (the agent's, else an image-only plugin's image ENV)
    or the extractor's name, made private by a key."""
    name = cfg.rabbitmq_queue or spec.queue or spec.name
    return f"private.{cfg.extractor_key}.{name}" if cfg.extractor_key else name


def worker_init(cfg: AgentConfig, spec: PluginSpec, queue: str) -> dict[str, Any]:
    """The settings an extractor process needs (no broker credentials)."""
    return {"t": "init", "plugin": spec.__dict__, "queue": queue, "clowder_version": cfg.clowder_version,
            "ssl_verify": cfg.ssl_verify, "mounted_paths": cfg.mounted_paths, "clowder_url": cfg.clowder_url,
            "max_retries": cfg.max_retries,
            "work_dir": os.path.expanduser(cfg.work_dir) if cfg.work_dir else None,
            "limits": {"time_limit": cfg.time_limit, "memory_limit": cfg.memory_limit,
                       "recycle_after": cfg.recycle_after}}


def worker_env(cfg: AgentConfig) -> dict[str, str]:
    """The extractor process's environment: ours without broker secrets, with pyclowder's names set."""
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env["CLOWDER_VERSION"] = str(cfg.clowder_version)
    if cfg.rabbitmq_queue:
        env["RABBITMQ_QUEUE"] = cfg.rabbitmq_queue
    source_kind(cfg.source).extractor_env(cfg, env)
    return env
