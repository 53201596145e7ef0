"""The agent's one driver: one event loop, one Runner per plugin (one plugin is a group of one; under
MPI: in the group's leader, each Runner's slots being lanes to the ranks, agent.mpi_ranks).
agent.assemble builds it.

Each plugin keeps everything a one-plugin agent has (its queue, slots, retries, time limits,
registration, error queue, walltime estimate): its Runner does exactly what it does alone. What
this module adds is what belongs to the agent as a whole:
- it owns the event loop (agent.event_loop: over the one RabbitMQ connection every AMQP queue rides
  on, or a select() for other sources) and turns it: wait, run what was posted, step every runner;
- idle exit: only when every plugin has been idle for idle_exit and no source holds work due soon;
- signals: SIGTERM/SIGINT stop and SIGUSR1 drains every plugin; a full scratch disk stops them all;
- the walltime drain is per plugin (each estimates its own files' length) and the agent exits
  once every plugin has drained; max_messages counts per plugin;
- the exit code is the first non-zero one of a plugin, else 0.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Optional

from . import early_signals, exitcodes
from .event_loop import EventLoop
from .runner import Runner
from .sources.base import SourceUnavailable

log = logging.getLogger("agent")


class RunnerGroup:
    """Turns the agent's event loop and drives the runners of every plugin of one agent."""

    def __init__(self, runners: list[Runner], idle_exit: float, clock: Callable[[], float],
                 loop: EventLoop) -> None:
        self.runners = runners
        self.loop = loop
        self.idle_exit = idle_exit
        self._clock = clock
        self._hold_until = 0.0  # idle, but work is due soon: no idle check before this
        for runner in runners:
            runner.stop_agent = self._stop_all

    def _stop_all(self, reason: str, grace: Optional[float] = None) -> None:
        for runner in self.runners:
            runner.request_stop(reason, grace)

    def run(self) -> int:
        """Start every plugin, serve them all until each has stopped; return the agent's exit code."""
        for runner in self.runners:
            runner.start_slots()  # every plugin's extractor processes load at the same time
        for runner in self.runners:
            code = runner.wait_ready()
            if code is not None:
                self._close_all_slots()
                return code
        for runner in self.runners:  # AMQP: the first connects the loop, the others ride on it
            code = runner.open_source()
            if code is not None:
                self._close_all_slots()
                self.loop.close()
                return code
        self._install_signals()
        try:
            while not all(r.finished() for r in self.runners):
                self.loop.run_once(0.25)
                now = self._clock()
                for runner in self.runners:
                    runner.step(now)
                self._check_idle(now)
        except SourceUnavailable as exc:
            for runner in self.runners:
                runner.source_gone(exc)
        finally:
            for runner in self.runners:
                runner.shutdown()
            self.loop.close()  # last: the sources' final settles and reports went through it
        return next((r.exit_code for r in self.runners if r.exit_code != exitcodes.OK), exitcodes.OK)

    def _close_all_slots(self) -> None:
        for runner in self.runners:
            runner.close_slots()

    def _check_idle(self, now: float) -> None:
        """Stop every plugin once all of them have been idle for idle_exit (unless work is due soon)."""
        if not self.idle_exit or now < self._hold_until:
            return
        running = [r for r in self.runners if not r.stopping]
        if not running:
            return
        since = [r.idle_since() for r in self.runners if not r.finished()]
        if any(s is None for s in since) or now - max(since) < self.idle_exit:
            return
        soon = [t for t in (r.source.work_soon() for r in running if r.source.connected) if t is not None]
        if not soon:
            self._stop_all(f"idle for {self.idle_exit:g}s" + (" (every queue)" if len(self.runners) > 1 else ""))
            return
        log.info("idle, but a source holds work deliverable in about %.0fs: staying", min(soon))
        self._hold_until = now + min(max(min(soon), 1.0), self.idle_exit)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            for runner in self.runners:
                runner.signalled(signum)  # each acts on it in its own step, as a one-plugin agent does
            self.loop.wake()

        for signum in early_signals.SIGNALS:
            signal.signal(signum, handler)
        for signum in early_signals.take():  # came while the agent was starting
            handler(signum, None)
