"""The launcher's operations (submit, reconcile, scale once, cancel, status) over its parts.

Everything the launcher does to the scheduler goes through here, so every path writes the ledger
first: an intent before qsub/sbatch, a cancel request before qdel/scancel.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from hpc_common.redact import redact_text
from launcher.backlog import Backlog
from launcher.broker import BrokerError, QueueStats
from launcher.caps import Allowance, Caps, Request, Usage, clamp, period_start
from launcher.errors import LauncherError
from launcher.ledger import Ledger
from launcher.runner import CommandError, CommandTimeout, Runner
from launcher.schedulers.base import QueryFailed, Scheduler, SubmitFailed, SubmitRequest
from launcher.states import JobState
from launcher.strategy import Decision, Observation, Policy, decide

log = logging.getLogger("launcher")


WHY_MAX_CHARS = 300
WHY_READS_PER_JOB = 10  # output files read per job and refresh to say why tasks failed


def last_output_line(runner: Runner, path: str) -> Optional[str]:
    """The last non-blank line of a task's output file (redacted, shortened); None if unreadable."""
    try:
        result = runner.run(["tail", "-n", "20", "--", path], timeout=30, check=False)
    except CommandError:
        return None
    if result.returncode != 0:
        return None
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return redact_text(lines[-1])[:WHY_MAX_CHARS] if lines else None


class Refused(LauncherError):
    """The caps allow none of the request (message is the one-line reason)."""


@dataclasses.dataclass
class Launcher:
    """One launcher: where commands run, which scheduler, the ledger, the site caps."""

    runner: Runner
    scheduler: Scheduler
    ledger: Ledger
    caps: Caps
    script: str = ""
    job_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: returns queue stats or raises BrokerError; None when no broker is configured
    broker: Optional[Callable[[], QueueStats]] = None
    #: the backlog's parts outside RabbitMQ (launcher.backlog.held); None: RabbitMQ only
    held: Optional[Callable[[], Backlog]] = None
    clock: Callable[[], float] = time.time

    # ------------------------------------------------------------------ accounting
    def usage(self) -> Usage:
        counts = self.ledger.counts()
        now = self.clock()
        _, committed = self.ledger.node_hours(period_start(now, self.caps.budget_period), now)
        return Usage(queued=counts["queued"], running=counts["running"],
                     run_slots_claimed=self.ledger.run_slots_claimed(),
                     node_hours_committed=committed)

    def queue_stats(self) -> QueueStats:
        """One look at the broker (raises BrokerError); the agents' reports read are kept in the ledger."""
        if self.broker is None:
            raise BrokerError("no broker configured (RABBITMQ_URI, RABBITMQ_QUEUE)")
        stats = self.broker()
        if stats.reports:
            self.ledger.record_reports(stats.reports, self.clock())
        return stats

    # ------------------------------------------------------------------ reconcile
    def reconcile(self) -> bool:
        """Resolve interrupted submissions and refresh every open job; False if a query failed.

        A failed query changes nothing in the ledger (tasks keep their last known state).
        """
        ok = True
        for intent in self.ledger.pending_intents():
            try:
                found = self.scheduler.find(self.runner, intent["job_name"])
            except QueryFailed as exc:
                log.warning("cannot resolve interrupted submission %s yet: %s",
                            intent["job_name"], exc)
                ok = False
                continue
            if found:
                log.info("adopting job %s submitted before a restart (%s)", found[0],
                         intent["job_name"])
                self.ledger.record_submitted(intent["id"], found[0], self.clock())
                for extra in found[1:]:
                    log.error("job name %s matches several jobs (%s): only %s is tracked",
                              intent["job_name"], ", ".join(found), found[0])
            else:
                self.ledger.record_failed(intent["id"], "not found at the scheduler after a"
                                          " restart: the submission never happened", self.clock())
        return self.refresh() and ok

    def refresh(self) -> bool:
        """Query the scheduler for every open job; False (and no change) when the query failed."""
        jobs = self.ledger.open_jobs()
        if not jobs:
            return True
        try:
            statuses = self.scheduler.status_many(self.runner, jobs)
        except QueryFailed as exc:
            log.warning("scheduler query failed, nothing changed: %s", exc)
            return False
        now = self.clock()
        for status in statuses.values():
            self.ledger.apply_status(status, now)
            self._note_failures(status)
        return True

    def _note_failures(self, status) -> None:
        """For newly failed tasks, keep the last line each printed: why it could not run.

        Each output file is read once ("" when it cannot be: status then shows the exit status),
        and at most WHY_READS_PER_JOB per refresh, so a large array failing at once costs little.
        """
        rows = {r["idx"]: r for r in self.ledger.tasks(status.job_id)}
        reads = 0
        for idx, task in sorted(status.tasks.items()):
            row = rows.get(idx)
            if (task.state != JobState.FAILED or not task.output_path or row is None
                    or row["state"] != JobState.FAILED.value or row["why"] is not None):
                continue
            if reads >= WHY_READS_PER_JOB:
                break
            reads += 1
            why = last_output_line(self.runner, task.output_path)
            self.ledger.set_task_why(status.job_id, idx, why or "")

    # ------------------------------------------------------------------ submit
    def allowance(self, request: Request) -> Allowance:
        return clamp(request, self.usage(), self.caps)

    def submit(self, request: Request) -> Tuple[str, Allowance]:
        """Submit within caps; returns (job id, allowance). Raises Refused or SubmitFailed."""
        allowed = self.allowance(request)
        if allowed.refused:
            raise Refused(allowed.reasons[-1])
        for line in allowed.reasons:
            log.info("%s", line)
        return self._submit_allowed(allowed.tasks, allowed.walltime_s, allowed.queue,
                                    allowed.account, allowed.max_running), allowed

    def submit_one(self, request: Request, extra_env: Mapping[str, str], kind: str,
                   on_intent: Optional[Callable[[str], None]] = None) -> Tuple[str, str]:
        """Submit a single-task job within caps (dispatch); returns (job id, job name)."""
        allowed = self.allowance(request)
        if allowed.refused:
            raise Refused(allowed.reasons[-1])
        names: List[str] = []

        def intent(name: str) -> None:
            names.append(name)
            if on_intent:
                on_intent(name)

        job_id = self._submit_allowed(1, allowed.walltime_s, allowed.queue, allowed.account, 1,
                                      extra_env=extra_env, kind=kind, on_intent=intent)
        return job_id, names[0]

    def _submit_allowed(self, tasks: int, walltime_s: int, queue: Optional[str],
                        account: Optional[str], max_running: int,
                        extra_env: Optional[Mapping[str, str]] = None, kind: str = "array",
                        on_intent: Optional[Callable[[str], None]] = None) -> str:
        sub_id, name = self.ledger.begin_submission(
            self.scheduler.name, tasks, walltime_s, queue, account, max_running,
            self.caps.nodes_per_task, self.script, self.clock(), kind=kind)
        if on_intent:
            on_intent(name)
        req = SubmitRequest(script=self.script, tasks=tasks, walltime_s=walltime_s,
                            job_name=name, queue=queue, account=account,
                            cores_per_task=self.caps.cores_per_task,
                            max_running=max_running if max_running < tasks else None,
                            env={**self.job_env, **(extra_env or {})})
        try:
            job_id = self.scheduler.submit(self.runner, req)
        except SubmitFailed as exc:
            if isinstance(exc.__cause__, CommandTimeout):
                # The scheduler may have created the job: leave the intent for reconcile().
                log.error("submission %s timed out; it will be looked up by name: %s", name, exc)
                raise
            self.ledger.record_failed(sub_id, str(exc), self.clock())
            raise
        self.ledger.record_submitted(sub_id, job_id, self.clock())
        log.info("submitted %s: %d task(s), walltime %d s, job name %s", job_id, tasks,
                 walltime_s, name)
        return job_id

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str, indices: Optional[List[int]] = None) -> None:
        """Cancel a job (or some of its tasks), recording the request first."""
        self.ledger.mark_cancel_requested(job_id, indices, self.clock())
        self.scheduler.cancel(self.runner, job_id, indices)

    def cancel_tasks(self, state: JobState, count: int) -> int:
        """Cancel up to ``count`` open tasks in ``state``, newest jobs and highest indices first."""
        rows = [r for r in self.ledger.tasks(open_only=True)
                if r["state"] == state.value and not r["cancel_requested_at"]]
        rows.sort(key=lambda r: (r["first_seen"], r["job_id"], r["idx"]), reverse=True)
        picked: Dict[str, List[int]] = {}
        for row in rows[:count]:
            picked.setdefault(row["job_id"], []).append(row["idx"])
        done = 0
        for job_id, indices in picked.items():
            total = len(self.ledger.tasks(job_id, open_only=True))
            try:
                self.cancel(job_id, None if len(indices) == total else sorted(indices))
            except CommandError as exc:  # e.g. the tasks ended meanwhile: next refresh tells
                log.warning("cancel of %s failed: %s", job_id, exc)
                continue
            done += len(indices)
        return done

    # ------------------------------------------------------------------ scale
    def observe(self, scheduler_ok: bool, per_file_s: Optional[float] = None
                ) -> Tuple[Observation, Optional[str]]:
        """Broker and ledger counts now; the second item is the broker error, if any."""
        counts = self.ledger.counts()
        ready = consumers = unacked = None
        retrying, error = 0, None
        if self.broker is not None:
            try:
                stats = self.queue_stats()
                ready, consumers, unacked = stats.ready, stats.consumers, stats.unacked
                retrying = stats.retrying
                if per_file_s is None and stats.activity is not None:
                    per_file_s = stats.activity.per_file_seconds  # measured by the agents themselves
            except BrokerError as exc:
                error = str(exc)
        else:
            error = "no broker configured (RABBITMQ_URI)"
        held = self.held_backlog()
        if held.errors:
            error = "; ".join(([error] if error else []) + held.errors)
        obs = Observation(now=self.clock(), ready=ready, consumers=consumers, unacked=unacked,
                          queued=counts["queued"], running=counts["running"],
                          missing=counts["missing"], scheduler_ok=scheduler_ok,
                          per_file_s=per_file_s, held=held.held + retrying,
                          held_in_flight=held.in_flight.get("relay_leased", 0))
        return obs, error

    def held_backlog(self) -> Backlog:
        """Work waiting outside RabbitMQ (relay, spool, journal); empty when not configured."""
        if self.held is None:
            return Backlog()
        try:
            return self.held()
        except OSError as exc:  # a part that cannot be read must not stop scaling on the others
            return Backlog(errors=[f"backlog: {exc}"])

    def scale_once(self, policy: Policy, per_file_s: Optional[float] = None) -> Decision:
        """Reconcile, observe, decide, act, record. Never raises for a flaky scheduler/broker."""
        scheduler_ok = self.reconcile()
        obs, broker_error = self.observe(scheduler_ok, per_file_s)
        decision = decide(obs, self.ledger.last_idle_since(), policy, self.caps, self.usage())
        if broker_error:
            decision = dataclasses.replace(decision, reasons=decision.reasons + (broker_error,))
        record = dataclasses.asdict(obs)
        decision_id = self.ledger.record_decision(decision, record, now=obs.now)
        for line in decision.reasons:
            log.info("%s: %s", decision.case.value, line)
        if decision.submit:
            try:
                job_id = self._submit_allowed(decision.submit, decision.walltime_s,
                                              decision.queue, decision.account,
                                              decision.max_running)
                self.ledger.set_decision_job(decision_id, job_id)
            except SubmitFailed as exc:
                log.error("scale-up submission failed: %s", exc)
        if decision.cancel_queued:
            self.cancel_tasks(JobState.QUEUED, decision.cancel_queued)
        if decision.cancel_running:
            self.cancel_tasks(JobState.RUNNING, decision.cancel_running)
        return decision
