"""Command line of the agent.

  python -m agent run [--plugin NAME[,NAME...]] [--idle-exit S] [--max-messages N] [...]
  python -m agent plugins [--json] [--show-env NAME]
  python -m agent prepare [--plugin NAME ...]
  python -m agent local --plugin NAME --out DIR FILE...

Settings come from flags, the environment and a YAML file (see agent.config).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Optional, Sequence

from hpc_common.redact import Redactor

from . import exitcodes
from .config import AgentConfig, ConfigError, add_setting_flags, load_config, parse_setting
from .errors import AgentError
from .logs import setup_logging
from .plugin_loader import search_dirs


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
    plugins.add_argument("--show-env", dest="show_env", metavar="NAME",
                         help="what NAME's extractor processes get in their environment, and from where")
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
                                                              "out", "files", "prepare_plugins", "show_env")}
    return load_config(flags, config_file=args.config_sub or args.config)


def _task_end(cfg: AgentConfig, identity: Any, log: logging.Logger) -> tuple[Optional[float], float]:
    """When this task ends (None: unknown) and the margin kept free before that."""
    from .jobenv import scheduler_end_time
    from hpc_common.walltime import parse_walltime

    from .walltime import default_margin

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
    return end_time, margin


def cmd_run(cfg: AgentConfig) -> int:
    """`agent run`: one plugin or several, one work source, on one rank or an MPI group (agent.assemble)."""
    from . import assemble, image_plugins
    from .jobenv import detect
    from .mpi_ranks import launched_by_mpi  # does not import mpi4py
    from .plugin_set import plan_plugins

    identity = detect()
    redactor = Redactor()
    setup_logging(cfg.log_level, redactor, identity=identity.label() if identity.scheduler else "",
                  log_file=cfg.log_file)
    log = logging.getLogger("agent")
    end_time, margin = _task_end(cfg, identity, log)
    try:
        plans = plan_plugins(cfg, lambda name: image_plugins.find(cfg, name), parse_setting)
        ctx = assemble.TaskContext(redactor, identity.label(), identity.file_tag() if identity.scheduler else "",
                                   end_time, margin)
        return assemble.run(cfg, plans, ctx, launched_by_mpi(forced=cfg.mpi))
    except AgentError as exc:  # setup failed: one line, the exit code of its kind
        log.error("%s", exc)
        if cfg.log_file:  # the batch job's own output (what `launcher status` shows) says why too
            print(f"agent: {redactor(str(exc))}", file=sys.stderr)
        return exitcodes.for_error(exc)


def cmd_plugins(cfg: AgentConfig, as_json: bool) -> int:
    from .image_plugins import discover_all
    from .plugin_settings import container_setting

    found, problems = discover_all(cfg)
    if as_json:
        print(json.dumps({"plugins": [{"name": p.name, "folder": p.folder, "script": p.script,
                                       "class": p.class_name, "version": p.info.get("version"),
                                       "kind": p.kind, "entry": p.entry, "requirements": p.requirements,
                                       "image": p.image or None}
                                      for p in found], "problems": problems}, indent=2))
        return exitcodes.OK
    if not found:
        print("no plugins found in: " + ", ".join(search_dirs(cfg.plugin_path)))
    for p in found:
        container = container_setting(cfg, p.name, p.folder_name)
        where = (f"\t{'image only' if p.image else 'runs in'} {container.runtime} image {container.image}"
                 if container else "\town environment" if p.requirements else "")
        print(f"{p.name}\t{p.info.get('version', '')}\t{p.kind}\t{p.folder_name}\t{p.entry}{where}")
    for problem in problems:
        print(f"broken: {problem}", file=sys.stderr)
    return exitcodes.OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code (agent.exitcodes)."""
    args = _parser().parse_args(argv)
    if args.command != "run":
        from . import early_signals
        early_signals.release()  # only `run` acts on stop signals itself (agent/__main__.py holds them)
    try:
        cfg = _settings(args)
    except ConfigError as exc:
        print(f"agent: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    if args.command == "plugins":
        if args.show_env:
            from .show_env import show_env
            return show_env(cfg, args.show_env, args.json)
        return cmd_plugins(cfg, args.json)
    if args.command == "prepare":
        from .plugin_env import prepare_plugins
        names = [n for arg in args.prepare_plugins for n in arg.split(",") if n]
        return prepare_plugins(cfg, names)
    if args.command == "local":
        from .local_run import run_local
        if cfg.plugin and "," in cfg.plugin:
            print(f"agent: configuration error: local runs one plugin, not {cfg.plugin}", file=sys.stderr)
            return exitcodes.CONFIG_ERROR
        return run_local(cfg, args.out, args.files)
    return cmd_run(cfg)
