"""Command line of the agent.

  python -m agent run [--plugin NAME[,NAME...]] [--idle-exit S] [--max-messages N] [...]
  python -m agent plugins
  python -m agent prepare [--plugin NAME ...]
  python -m agent local --plugin NAME --out DIR FILE...

Settings come from flags, the environment and a YAML file (see agent.config).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Iterator, Optional, Sequence

from hpc_common.redact import Redactor

from . import exitcodes
from .config import AgentConfig, ConfigError, add_setting_flags, load_config, parse_setting
from .errors import AgentError
from .logs import setup_logging
from .plugin_loader import discover, find_plugin, search_dirs
from .plugin_settings import entry_defaults
from .sources.registry import SourceRequest, source_kind
from .worker_settings import worker_env, worker_init


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


@contextlib.contextmanager
def _journal(cfg: AgentConfig, agent_id: str, wanted: bool) -> Iterator[Any]:
    """The open in-flight journal when the source uses one (else None); closed on the way out."""
    if not wanted:
        yield None
        return
    from .journal import Journal

    journal = Journal(cfg.journal_dir, agent_id)
    try:
        journal.open()
    except OSError as exc:
        raise ConfigError(f"journal_dir: cannot use journal folder {journal.root}: {exc.strerror}") from None
    try:
        yield journal
    finally:
        journal.close()


STAGED_DEPTH = 3  # deliveries held per slot when staging ahead (see _staging)


def cmd_run(cfg: AgentConfig) -> int:
    """`agent run`: one plugin (or several, agent.runner_group), one work source, on one rank or an MPI group."""
    from . import extractor_launch
    from .jobenv import detect
    from .mpi_ranks import launched_by_mpi  # does not import mpi4py
    from .plugin_set import plan_plugins
    from .runner import Runner
    from .slots import Slot
    from .sources.amqp import new_agent_id

    identity = detect()
    redactor = Redactor()
    setup_logging(cfg.log_level, redactor, identity=identity.label() if identity.scheduler else "",
                  log_file=cfg.log_file)
    log = logging.getLogger("agent")
    end_time, margin = _task_end(cfg, identity, log)
    ranks = None
    try:
        plans = plan_plugins(cfg, lambda name: find_plugin(name, cfg.plugin_path, entry_defaults(cfg)),
                             parse_setting)
        if len(plans) > 1:
            return _run_plugins(cfg, plans, identity, redactor, end_time, margin, launched_by_mpi(forced=cfg.mpi))
        spec, cfg, queue = plans[0].spec, plans[0].cfg, plans[0].queue
        init, env = extractor_launch.apply(cfg, spec, worker_init(cfg, spec, queue), worker_env(cfg))
        if launched_by_mpi(forced=cfg.mpi):  # started by mpiexec: one extractor per rank, one connection per group
            from .mpi_ranks import join_allocation
            ranks = join_allocation(cfg, init, env, redactor)
            if not ranks.leader:
                return ranks.serve()  # this rank gets its files over MPI from its group's leader
            cfg = ranks.leader_config(cfg)
        kind = source_kind(cfg.source)
        cfg = dataclasses.replace(cfg, **kind.forced)
        agent_id = new_agent_id(identity.file_tag() if identity.scheduler else "")
        cfg, stage_init = _staging(cfg, init, ranks is not None)
        with _journal(cfg, agent_id, kind.uses_journal) as journal:
            source = kind.build(SourceRequest(cfg, queue, agent_id, journal))

            def make_slot(index: int, post, on_frame) -> Slot:
                if ranks is not None:
                    return ranks.make_slot(index, post, on_frame)
                return _slot_class(stage_init)(index, init, post, on_frame, redactor, env=env,
                                               watcher=source if source.watches_fds else None)

            log.info("agent %s: plugin %s (%s), queue %s", agent_id, spec.name, spec.folder, queue)
            code = Runner(cfg, source, make_slot, redactor, end_time=end_time, margin=margin,
                          identity=identity.label(), stage_init=stage_init).run()
            outcome, reason = source.result()
            if code == exitcodes.OK and outcome != "done":
                log.error("message not processed (%s): %s", outcome, redactor(reason))
                code = exitcodes.MESSAGE_NOT_DONE
    except AgentError as exc:  # setup failed: one line, the exit code of its kind
        log.error("%s", exc)
        if cfg.log_file:  # the batch job's own output (what `launcher status` shows) says why too
            print(f"agent: {redactor(str(exc))}", file=sys.stderr)
        return exitcodes.for_error(exc)
    return ranks.finish(code) if ranks is not None else code


def _staging(cfg: AgentConfig, init: dict[str, Any], under_mpi: bool) -> tuple[AgentConfig, Optional[dict[str, Any]]]:
    """The Runner's settings and the init frame for its stage-ahead (agent.stage_pool; None: it does not stage).

    A staging Runner holds three deliveries per slot unless AGENT_PREFETCH says otherwise: one
    running, one staged, one being staged (a file's two fetches through a relay take longer
    than a short file's processing). Under MPI the ranks stage their own files (agent.rank_worker).
    Files come inline with a relay's leases only for a Runner that stages them.
    """
    from .stage_pool import StagePool

    if under_mpi or not cfg.stages_ahead() or not StagePool.wanted(init):
        return dataclasses.replace(cfg, relay_inline=0), None
    if cfg.prefetch <= 0:
        cfg = dataclasses.replace(cfg, prefetch=STAGED_DEPTH * cfg.slots)
    return cfg, init


def _slot_class(stage_init: Optional[dict[str, Any]]) -> type:
    """StagedSlot when the Runner stages ahead (its extractor takes staged files), else Slot."""
    from .slots import Slot, StagedSlot

    return StagedSlot if stage_init is not None else Slot


def _run_plugins(cfg: AgentConfig, plans: list, identity: Any, redactor: Redactor,
                 end_time: Optional[float], margin: float, mpi: bool) -> int:
    """Several plugins in this process: a Runner each, their queues on one broker connection.

    Under MPI every rank runs each plugin's extractors; the group's leader runs the Runners.
    """
    from . import extractor_launch
    from .runner import Runner
    from .runner_group import RunnerGroup
    from .slots import Slot
    from .sources.amqp import new_agent_id

    log = logging.getLogger("agent")
    launches = []
    for plan in plans:
        own = dataclasses.replace(plan.cfg, idle_exit=0.0)  # idle exit is the group's: every queue idle
        launches.append(extractor_launch.apply(own, plan.spec, worker_init(own, plan.spec, plan.queue),
                                               worker_env(own)))
    ranks = None
    if mpi:
        from .mpi_ranks import RankPlugin, join_allocation_plugins
        ranks = join_allocation_plugins(cfg, [RankPlugin(init, env, plan.cfg.slots)
                                              for plan, (init, env) in zip(plans, launches)], redactor)
        if not ranks.leader:
            return ranks.serve()  # this rank gets its files over MPI from its group's leader
    kind = source_kind(cfg.source)
    agent_id = new_agent_id(identity.file_tag() if identity.scheduler else "")
    with _journal(cfg, agent_id, kind.uses_journal) as journal:
        runners: list[Runner] = []
        owner = None
        for number, (plan, (init, env)) in enumerate(zip(plans, launches)):
            own = dataclasses.replace(plan.cfg, idle_exit=0.0)
            if ranks is not None:
                own = ranks.leader_config(own, number)
            own, stage_init = _staging(own, init, ranks is not None)
            source = kind.build(SourceRequest(own, plan.queue, agent_id, journal, shared=owner is None,
                                              joins=owner))
            owner = owner or source

            def make_slot(index: int, post: Any, on_frame: Any, init: Any = init, env: Any = env,
                          number: int = number, source: Any = source, stage_init: Any = stage_init) -> Any:
                if ranks is not None:
                    return ranks.make_slot(index, post, on_frame, number)
                return _slot_class(stage_init)(index, init, post, on_frame, redactor, env=env,
                                               watcher=source if source.watches_fds else None)

            log.info("agent %s: plugin %s (%s), queue %s, %d slot(s)", agent_id, plan.spec.name, plan.spec.folder,
                     plan.queue, own.slots)
            runners.append(Runner(own, source, make_slot, redactor, end_time=end_time, margin=margin,
                                  identity=identity.label(), stage_init=stage_init))
        code = RunnerGroup(runners, cfg.idle_exit, time.monotonic).run()
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
    if args.command != "run":
        from . import early_signals
        early_signals.release()  # only `run` acts on stop signals itself (agent/__main__.py holds them)
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
        if cfg.plugin and "," in cfg.plugin:
            print(f"agent: configuration error: local runs one plugin, not {cfg.plugin}", file=sys.stderr)
            return exitcodes.CONFIG_ERROR
        return run_local(cfg, args.out, args.files)
    return cmd_run(cfg)
