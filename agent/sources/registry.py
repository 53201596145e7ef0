"""The work sources an agent can take messages from, each registered with a factory.

A SourceKind says how to build its source from the settings (`build`), which event loop the agent
waits in while it uses it (`make_loop`: RabbitMQ's connection, else a select() loop), whether the agent must open
the in-flight journal for it (`uses_journal`), which settings it forces (`forced`: a message file
is one message), what it needs from the settings (`check`, run on each plugin's own settings), what it
changes in the extractor's environment (`extractor_env`), where a plugin's messages come from
(`endpoint`: two plugins of one agent never share one) and which plugins a run serves (`pick`: a
message file is for one queue). agent.cli's wiring only looks kinds up here, so a new source is
one `register()` call, and several plugins (each with its queue) share a kind: the factory gets the
plugin's settings, queue and journal per request, not from globals.

Each source module is imported only when its factory runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..event_loop import EventLoop, SelectLoop
from .base import WorkSource


@dataclass(frozen=True)
class SourceRequest:
    """What a factory gets: the plugin's resolved settings, its queue, this agent's id, journal and loop."""

    cfg: Any                 # agent.config.AgentConfig (the plugin's own copy)
    queue: str
    agent_id: str
    journal: Any = None      # agent.journal.Journal, open, when the kind uses_journal
    loop: Any = None         # the agent's event loop, made by the kind's make_loop (shared by every plugin)


def _select_loop(cfg: Any, agent_id: str) -> EventLoop:
    return SelectLoop()


@dataclass(frozen=True)
class SourceKind:
    """One work source: how it is built and what it asks of the rest of the agent."""

    name: str
    build: Callable[[SourceRequest], WorkSource]
    make_loop: Callable[[Any, str], EventLoop] = _select_loop
    uses_journal: bool = False
    forced: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any], Optional[str]] = lambda cfg: None
    extractor_env: Callable[[Any, dict[str, str]], None] = lambda cfg, env: None
    #: (plugin's settings, its queue) -> where its messages come from, and how to say two plugins share it.
    #: The queue by default: for amqp, and for file, whose one message file names the queue it is for.
    endpoint: Callable[[Any, str], str] = lambda cfg, queue: queue
    shared: str = "both consume queue"
    own_endpoint: str = "give one its own rabbitmq_queue"
    #: (agent-wide settings, plans) -> the plans this run serves
    pick: Callable[[Any, list[Any]], list[Any]] = lambda cfg, plans: plans
    help: str = ""


SOURCES: dict[str, SourceKind] = {}


def register(kind: SourceKind) -> SourceKind:
    """Add a work source (a later registration of the same name replaces the earlier one)."""
    SOURCES[kind.name] = kind
    return kind


def source_kind(name: str) -> SourceKind:
    """The registered kind called `name`; ConfigError naming the known ones otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"source: unknown work source {name!r} (known: {', '.join(SOURCES)})") from None


def _no_proxy(env: dict[str, str], host: Optional[str]) -> None:
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), host]))


# -- the built-in sources ------------------------------------------------------------------------------
def _amqp_connection(cfg: Any, agent_id: str) -> EventLoop:
    from .amqp_connection import AmqpConnection

    return AmqpConnection(cfg.rabbitmq_uri, agent_id, connect_timeout=cfg.connect_timeout,
                          reconnect_timeout=cfg.reconnect_timeout, internals=cfg.amqp_internals)


def _amqp(req: SourceRequest) -> WorkSource:
    from hpc_common import retry_queues

    from .amqp import AmqpConsumer

    cfg = req.cfg
    return AmqpConsumer(req.loop, req.queue, cfg.effective_prefetch(), req.journal,
                        retry_buckets=retry_queues.buckets(cfg.retry_backoff, cfg.max_retries))


def _relay(req: SourceRequest) -> WorkSource:
    from .relay import from_config

    return from_config(req.cfg, req.agent_id)  # a bad token file is a ConfigError


def _relay_check(cfg: Any) -> Optional[str]:
    if not cfg.relay_url or not cfg.relay_token_file:
        return "source relay needs relay_url and relay_token_file (AGENT_RELAY_URL, AGENT_RELAY_TOKEN_FILE)"
    if not cfg.relay_url.startswith(("http://", "https://")):
        return f"relay_url: {cfg.relay_url!r} is not an http(s) URL"
    if cfg.clowder_url:
        return ("clowder_url cannot be used with source relay: the relay forwards Clowder calls "
                "(give the relay --clowder-url instead)")
    return None


def _relay_env(cfg: Any, env: dict[str, str]) -> None:
    # Extractors of every rank reach Clowder through the relay: never through a proxy, trusting its CA.
    if cfg.relay_ca:
        env["REQUESTS_CA_BUNDLE"] = cfg.relay_ca
    _no_proxy(env, urlsplit(cfg.relay_url or "").hostname)


def _spool(req: SourceRequest) -> WorkSource:
    from .spool import from_config

    return from_config(req.cfg, req.agent_id)


def _spool_folder(cfg: Any, queue: str) -> str:
    return os.path.realpath(os.path.expanduser(cfg.spool_dir or ""))


def _file_pick(cfg: Any, plans: list[Any]) -> list[Any]:
    """With several plugins, the one whose queue the message file names (`launcher dispatch` writes "queue")."""
    if len(plans) < 2:
        return plans  # one plugin serves the file whatever it says, as before "queue" was written
    from .message_file import read_message_file

    queue = read_message_file(cfg.message_file).get("queue")
    chosen = [plan for plan in plans if plan.queue == queue]
    if not isinstance(queue, str) or not chosen:
        served = ", ".join(f"{plan.spec.name} ({plan.queue})" for plan in plans)
        said = f"is for queue {queue}" if isinstance(queue, str) else "names no queue"
        raise ConfigError(f"message file {cfg.message_file} {said}, but this agent serves several plugins "
                          f"and none consumes it: {served}")
    return chosen


def _file(req: SourceRequest) -> WorkSource:
    from .message_file import MessageFileSource

    return MessageFileSource(req.cfg.message_file, req.queue, req.cfg.rabbitmq_uri)


register(SourceKind("amqp", _amqp, make_loop=_amqp_connection, uses_journal=True,
                    help="RabbitMQ, as pyclowder consumes it"))
register(SourceKind("relay", _relay, check=_relay_check, extractor_env=_relay_env,
                    endpoint=lambda cfg, queue: (cfg.relay_url or "").rstrip("/"), shared="both lease from relay URL",
                    own_endpoint="give one its own relay_url",
                    help="leases from python -m launcher relay; no journal, no broker connection"))
register(SourceKind("spool", _spool,
                    check=lambda cfg: None if cfg.spool_dir else "source spool needs spool_dir (AGENT_SPOOL_DIR)",
                    extractor_env=lambda cfg, env: _no_proxy(env, "127.0.0.1"),
                    endpoint=_spool_folder, shared="both claim from spool dir",
                    own_endpoint="give one its own spool_dir",
                    help="messages and files in a shared folder (python -m launcher spool); Clowder calls recorded"))
register(SourceKind("file", _file, forced={"max_messages": 1, "idle_exit": 0.0}, pick=_file_pick,
                    check=lambda cfg: None if cfg.message_file else
                    "source file needs message_file (AGENT_MESSAGE_FILE or CLOWDER_MESSAGE_FILE)",
                    help="one message written by python -m launcher dispatch; the exit code reports its fate"))
