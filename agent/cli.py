"""Command line of the agent.

  python -m agent run [--plugin NAME] [--idle-exit S] [--max-messages N] [...]
  python -m agent plugins
  python -m agent prepare [--plugin NAME ...]
  python -m agent local --plugin NAME --out DIR FILE...

Settings come from flags, the environment and a YAML file (see agent.config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence
from urllib.parse import urlsplit

from . import exitcodes
from .config import AgentConfig, ConfigError, add_setting_flags, load_config
from .logs import setup_logging
from .plugin_loader import PluginError, PluginSpec, discover, find_plugin, search_dirs
from .plugin_settings import entry_defaults
from .redact import Redactor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent",
                                     description="Run unchanged pyclowder extractors on HPC allocations.")
    parser.add_argument("--config", help="YAML settings file (also AGENT_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="process messages from the work source")
    add_setting_flags(run)
    plugins = sub.add_parser("plugins", help="list the plugins found")
    add_setting_flags(plugins, ["plugin_path"])
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    prepare = sub.add_parser("prepare", help="build the environments of plugins with a requirements.txt "
                             "(on a machine with network access)")
    add_setting_flags(prepare, ["plugin_path", "env_dir", "env_python", "log_level"])
    prepare.add_argument("--plugin", dest="prepare_plugins", action="append", default=[], metavar="NAME",
                         help="plugin to prepare (repeat or comma-separate; default: every plugin found)")
    local = sub.add_parser("local", help="run the extractor on local files, no broker and no Clowder")
    add_setting_flags(local, ["plugin", "plugin_path", "clowder_version", "log_level"])
    local.add_argument("--out", required=True, help="folder for what the extractor would have uploaded")
    local.add_argument("files", nargs="+", help="input files")
    for p in (run, plugins, prepare, local):
        p.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
    return parser


def _settings(args: argparse.Namespace) -> AgentConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "config_sub", "json",
                                                              "out", "files", "prepare_plugins")}
    return load_config(flags, config_file=args.config_sub or args.config)


def queue_name(cfg: AgentConfig, spec: PluginSpec) -> str:
    """The queue pyclowder would consume: RABBITMQ_QUEUE or the extractor's name, made private by a key."""
    name = cfg.rabbitmq_queue or spec.name
    return f"private.{cfg.extractor_key}.{name}" if cfg.extractor_key else name


def worker_init(cfg: AgentConfig, spec: PluginSpec, queue: str) -> dict:
    """The settings an extractor process needs (no broker credentials)."""
    return {"t": "init", "plugin": spec.__dict__, "queue": queue, "clowder_version": cfg.clowder_version,
            "ssl_verify": cfg.ssl_verify, "mounted_paths": cfg.mounted_paths, "clowder_url": cfg.clowder_url,
            "work_dir": os.path.expanduser(cfg.work_dir) if cfg.work_dir else None,
            "limits": {"time_limit": cfg.time_limit, "memory_limit": cfg.memory_limit,
                       "recycle_after": cfg.recycle_after}}


def worker_env(cfg: AgentConfig) -> dict[str, str]:
    """The extractor process's environment: ours without broker secrets, with pyclowder's names set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RABBITMQ_URI", "AGENT_RABBITMQ_URI", "EXTRACTOR_KEY", "AGENT_EXTRACTOR_KEY")}
    env["CLOWDER_VERSION"] = str(cfg.clowder_version)
    if cfg.rabbitmq_queue:
        env["RABBITMQ_QUEUE"] = cfg.rabbitmq_queue
    # Extractors of every rank (MPI included) talk to Clowder through the relay or the spool's
    # local recorder: never through a proxy, and trusting the relay's CA.
    if cfg.source == "relay":
        if cfg.relay_ca:
            env["REQUESTS_CA_BUNDLE"] = cfg.relay_ca
        env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), urlsplit(cfg.relay_url or "").hostname]))
    elif cfg.source == "spool":
        env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1"]))
    return env


def cmd_run(cfg: AgentConfig) -> int:
    import logging
    import time

    from .jobenv import detect, scheduler_end_time
    from .journal import Journal
    from .mpi_ranks import launched_by_mpi  # does not import mpi4py
    from .runner import Runner
    from .slots import Slot
    from .sources.amqp import AmqpSource, new_agent_id
    from .sources.base import WorkSource
    from .walltime import default_margin, parse_walltime

    identity = detect()
    redactor = Redactor()
    setup_logging(cfg.log_level, redactor, identity=identity.label() if identity.scheduler else "",
                  log_file=cfg.log_file)
    log = logging.getLogger("agent")
    started = time.time()
    if cfg.walltime:
        end_time: Optional[float] = started + parse_walltime(cfg.walltime)
    else:
        end_time = scheduler_end_time(identity)
        if identity.scheduler and end_time is None:
            log.warning("the scheduler did not say when this task ends; set AGENT_WALLTIME so the agent can "
                        "stop taking files in time")
    margin = cfg.walltime_margin or default_margin(end_time - started if end_time else None)
    if end_time is not None:
        log.info("task ends at %s (%.0fs from now); files start only while they fit, with a %.0fs margin",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end_time)), end_time - started, margin)
    from . import extractor_launch
    from .plugin_env import EnvError
    try:
        spec = find_plugin(cfg.plugin, cfg.plugin_path, entry_defaults(cfg))
        queue = queue_name(cfg, spec)
        init, env = extractor_launch.apply(cfg, spec, worker_init(cfg, spec, queue), worker_env(cfg))
    except (PluginError, EnvError) as exc:
        log.error("%s", exc)
        return exitcodes.PLUGIN_ERROR
    ranks = None
    if launched_by_mpi():  # started by mpiexec: one extractor per rank, one connection per group
        from .mpi_ranks import join_allocation
        ranks = join_allocation(cfg, init, env, redactor)
        if not ranks.leader:
            return ranks.serve()  # this rank gets its files over MPI from its group's leader
        cfg = ranks.leader_config(cfg)
    agent_id = new_agent_id(identity.file_tag() if identity.scheduler else "")
    journal: Optional[Journal] = None
    source: WorkSource
    if cfg.source == "relay":  # leases live in the relay: no journal, no broker connection
        from .sources.relay import TokenFileError, from_config
        try:
            source = from_config(cfg, agent_id)
        except TokenFileError as exc:
            log.error("%s", exc)
            return exitcodes.CONFIG_ERROR
    elif cfg.source == "file":  # one message for a dispatch job: the launcher settles it from our exit code
        import dataclasses

        from .sources.message_file import MessageFileError, MessageFileSource
        assert cfg.message_file is not None
        try:
            source = MessageFileSource(cfg.message_file, queue, cfg.rabbitmq_uri)
        except MessageFileError as exc:
            log.error("%s", exc)
            return exitcodes.CONFIG_ERROR
        cfg = dataclasses.replace(cfg, max_messages=1, idle_exit=0.0)
    elif cfg.source == "spool":  # messages and files on the shared filesystem; Clowder calls recorded
        from .sources.spool import from_config as spool_source
        source = spool_source(cfg, agent_id)
    else:
        journal = Journal(cfg.journal_dir, agent_id)
        try:
            journal.open()
        except OSError as exc:
            log.error("cannot use journal folder %s: %s", journal.root, exc.strerror)
            return exitcodes.CONFIG_ERROR
        source = AmqpSource(cfg.rabbitmq_uri, queue, cfg.effective_prefetch(), journal, agent_id,
                            connect_timeout=cfg.connect_timeout, reconnect_timeout=cfg.reconnect_timeout)

    def make_slot(index: int, post, on_frame) -> Slot:
        if ranks is not None:
            return ranks.make_slot(index, post, on_frame)
        return Slot(index, init, post, on_frame, redactor, env=env)

    log.info("agent %s: plugin %s (%s), queue %s", agent_id, spec.name, spec.folder, queue)
    try:
        code = Runner(cfg, source, make_slot, redactor, end_time=end_time, margin=margin,
                      identity=identity.label()).run()
        outcome = getattr(source, "outcome", "done") if cfg.source == "file" else "done"
        if code == exitcodes.OK and outcome != "done":
            log.error("message not processed (%s): %s", outcome, redactor(getattr(source, "reason", "")))
            code = exitcodes.MESSAGE_NOT_DONE
    finally:
        if journal is not None:
            journal.close()
    return ranks.finish(code) if ranks is not None else code


def cmd_plugins(cfg: AgentConfig, as_json: bool) -> int:
    found, problems = discover(cfg.plugin_path, entry_defaults(cfg))
    if as_json:
        print(json.dumps({"plugins": [{"name": p.name, "folder": p.folder, "script": p.script,
                                       "class": p.class_name, "version": p.info.get("version"),
                                       "kind": p.kind, "entry": p.entry, "requirements": p.requirements}
                                      for p in found], "problems": problems}, indent=2))
        return exitcodes.OK
    if not found:
        print("no plugins found in: " + ", ".join(search_dirs(cfg.plugin_path)))
    for p in found:
        own_env = "\town environment" if p.requirements else ""
        print(f"{p.name}\t{p.info.get('version', '')}\t{p.kind}\t{p.folder_name}\t{p.entry}{own_env}")
    for problem in problems:
        print(f"broken: {problem}", file=sys.stderr)
    return exitcodes.OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (agent.exitcodes)."""
    args = _parser().parse_args(argv)
    try:
        cfg = _settings(args)
    except ConfigError as exc:
        print(f"agent: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    if args.command == "plugins":
        return cmd_plugins(cfg, args.json)
    if args.command == "prepare":
        from .plugin_env import prepare_plugins
        names = [n for arg in args.prepare_plugins for n in arg.split(",") if n]
        return prepare_plugins(cfg, names)
    if args.command == "local":
        from .local_run import run_local
        return run_local(cfg, args.out, args.files)
    return cmd_run(cfg)
