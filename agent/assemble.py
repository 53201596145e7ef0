"""How `agent run` is put together: one path for one plugin or several, with or without MPI.

    plans (agent.plugin_set) -> each plugin's extractor launch (agent.extractor_launch)
         -> under MPI: join the allocation (agent.mpi_ranks); a rank that is not its group's
            leader only serves files and never gets here past that
         -> the in-flight journal when the source uses one
         -> the agent's event loop (agent.event_loop): the RabbitMQ connection every AMQP queue
            rides on, or a select() loop for the other sources (the source kind's `loop`)
         -> per plugin: a work source (agent.sources.registry), its slots (watched by the loop),
            its Runner
         -> one RunnerGroup turns the loop and drives them all (one plugin is a group of one)

`assemble` builds the group from open resources; `run` owns those resources (MPI group, journal)
and turns the group's end into the process's exit code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from hpc_common.redact import Redactor

from . import exitcodes, extractor_launch
from .config import AgentConfig, ConfigError
from .event_loop import EventLoop, Post
from .plugin_set import PluginPlan
from .runner import Runner
from .runner_group import RunnerGroup
from .sources.registry import SourceKind, SourceRequest, source_kind
from .worker_settings import worker_env, worker_init

log = logging.getLogger("agent")
STAGED_DEPTH = 3  # deliveries held per slot when staging ahead (see _staging)


@dataclass(frozen=True)
class TaskContext:
    """What the whole agent shares: who it is, when its batch task ends, how secrets are masked."""

    redactor: Redactor
    identity_label: str = ""      # "slurm 1234_5 on node7", shown in statuses and reports
    file_tag: str = ""            # scheduler task id for the agent id ("" outside a batch job)
    end_time: Optional[float] = None
    margin: float = 10.0


def run(cfg: AgentConfig, plans: list[PluginPlan], ctx: TaskContext, mpi: bool) -> int:
    """Run the agent for these plugins until it ends; return its exit code (agent.exitcodes)."""
    kind = source_kind(cfg.source)
    plans = kind.pick(cfg, plans)  # a message file is for one of the plugins: only that one runs
    launches = [extractor_launch.apply(plan.cfg, plan.spec, worker_init(plan.cfg, plan.spec, plan.queue),
                                       worker_env(plan.cfg)) for plan in plans]
    from .sources.amqp import new_agent_id

    agent_id = new_agent_id(ctx.file_tag)
    # Made once, and only where the agent's loop runs (not on MPI followers).
    make_loop = functools.cache(lambda: kind.make_loop(cfg, agent_id))

    ranks = None
    if mpi:  # started by mpiexec: one extractor set per rank, one broker connection per group
        from .mpi_ranks import RankPlugin, join_allocation
        # The leader's own extractors are read by the agent's loop, as a one-rank agent's are.
        ranks = join_allocation(cfg, [RankPlugin(init, env, plan.cfg.slots)
                                      for plan, (init, env) in zip(plans, launches)], ctx.redactor, make_loop)
        if not ranks.leader:
            return ranks.serve()  # this rank gets its files over MPI from its group's leader
    with _journal(cfg, agent_id, kind.uses_journal) as journal:
        group = assemble(cfg, plans, launches, kind, agent_id, journal, ctx, ranks, make_loop())
        code = group.run()
        for runner in group.runners:
            outcome, reason = runner.source.result()
            if code == exitcodes.OK and outcome != "done":
                log.error("message not processed (%s): %s", outcome, ctx.redactor(reason))
                code = exitcodes.MESSAGE_NOT_DONE
    return ranks.finish(code) if ranks is not None else code


def assemble(cfg: AgentConfig, plans: list[PluginPlan], launches: list[tuple[dict[str, Any], dict[str, str]]],
             kind: SourceKind, agent_id: str, journal: Any, ctx: TaskContext, ranks: Any,
             loop: EventLoop) -> RunnerGroup:
    """A Runner per plugin (its source, its slots) under one RunnerGroup, around the agent's event loop.

    launches: each plan's extractor init frame and environment; ranks: the MPI leader (its lanes are
    the Runners' slots) or None; loop: made by the kind's make_loop.
    """
    from .slots import Slot, StagedSlot

    forced = dict(kind.forced)
    runners: list[Runner] = []
    for number, (plan, (init, env)) in enumerate(zip(plans, launches)):
        # idle exit is the group's (every queue idle); what the source forces applies to each plugin
        own = dataclasses.replace(plan.cfg, **dict(forced, idle_exit=0.0))
        if ranks is not None:
            own = ranks.leader_config(own, number)
        own, stage_init = _staging(own, init, ranks is not None)
        source = kind.build(SourceRequest(own, plan.queue, agent_id, journal, loop))
        slot_class = StagedSlot if stage_init is not None else Slot

        def make_slot(index: int, on_frame: Any, init: Any = init, env: Any = env, number: int = number,
                      slot_class: Any = slot_class) -> Any:
            if ranks is not None:
                return ranks.make_slot(index, Post(loop), on_frame, number)
            return slot_class(index, init, loop, on_frame, ctx.redactor, env=env)

        log.info("agent %s: plugin %s (%s), queue %s, %d slot(s)", agent_id, plan.spec.name, plan.spec.folder,
                 plan.queue, own.slots)
        runners.append(Runner(own, source, make_slot, ctx.redactor, end_time=ctx.end_time, margin=ctx.margin,
                              identity=ctx.identity_label, stage_init=stage_init, loop=loop))
    return RunnerGroup(runners, forced.get("idle_exit", cfg.idle_exit), time.monotonic, loop)


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
