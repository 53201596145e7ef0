"""One plugin's share of the agent: deliveries in, extractor slots busy, every message settled once.

agent.runner_group turns the agent's event loop (agent.event_loop; one plugin is a group of
one) and calls each Runner's step(): it takes what the work source received and does what is
due. All message state lives on the main thread: slots hand their extractor's frames to it
through the loop, the source only takes and settles. Time-driven chores that touch no message
(registration, activity reports, orphan recovery) are agent.duties'. The rules, in one place:

- A message is acknowledged only after its extractor reported success, that is after pyclowder
  finished its uploads; status replies go to the message's reply_to as they happen.
- What an attempt's outcome does to its message is decided in one place, agent.retry_policy
  (pyclowder's rules: max_retries defaults to its MAX_RETRY, 10 retries, and the body the
  extractor sees carries retry_count = the failed attempts so far, so its statuses are
  pyclowder's own "(#n)" and final ERROR). A failed attempt is retried (after a backoff) with
  its attempt count in a header, so every worker sees the same count; sources that can
  (RabbitMQ's retry queues, the relay's table) hold the backoff themselves, so a message waiting
  for its retry takes no slot and no prefetch place. Past max_retries, or for failures that
  cannot change (bad message, 4xx from Clowder, pyclowder's own "abort"), it goes to
  error.<queue> with the reason in its headers and an ERROR status.
- Idle exit is the group's decision (agent.runner_group): every plugin idle, nothing due soon.
- Deliveries still in flight after journal_after are secured (see agent.journal) so that
  RabbitMQ's consumer_timeout never hands them to a second worker while one still works on them;
  deliveries still waiting for a slot by then are handed back for other workers instead.
- On SIGTERM/SIGINT: no new work; waiting deliveries are handed back at once; work in flight
  may finish for stop_grace seconds, then it is killed and handed back (not a failed attempt).
  SIGUSR1 drains: no new work, and work in flight finishes however long it takes.
- In a batch task with a known end time, a file is started only when the time left can fit
  one more file (the longest recent duration) plus a safety margin; otherwise the agent drains
  and exits 0, leaving the rest of the queue to tasks that have the time.
"""
from __future__ import annotations

import collections
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyclowder.utils

from hpc_common.messages import ATTEMPTS
from hpc_common.redact import Redactor

from . import exitcodes, frames
from .config import AgentConfig
from .duties import Duties
from .event_loop import EventLoop
from .frames import Kind, Outcome
from .messages import BadMessage, Delivery, parse_body, status_payload
from .retry_policy import Action, Attempt, RetrySettings, Settle, attempts_so_far, decide
from .slots import ExtractorSlot, OnFrame
from .stage_pool import StagePool
from .sources.base import SourceLost, SourceUnavailable, WorkSource
from .walltime import DurationEstimate, admit

log = logging.getLogger("agent")
STAGE_PATIENCE = 2.0  # seconds a waiting job waits for its stage-ahead before an idle slot takes it without
MakeSlot = Callable[[int, OnFrame], ExtractorSlot]


@dataclass
class Counters:
    """What this agent did, reported when it ends."""

    received: int = 0
    succeeded: int = 0
    retried: int = 0
    dead_lettered: int = 0
    handed_back: int = 0
    lost_acks: int = 0

    def finished(self) -> int:
        return self.succeeded + self.dead_lettered + self.retried


class Runner:
    """Runs one plugin's extractor slots against one work source until told or due to stop."""

    def __init__(self, cfg: AgentConfig, source: WorkSource, make_slot: MakeSlot,
                 redactor: Redactor, clock: Callable[[], float] = time.monotonic,
                 end_time: Optional[float] = None, margin: float = 10.0, identity: str = "",
                 stage_init: Optional[dict[str, Any]] = None, loop: Optional[EventLoop] = None) -> None:
        """make_slot(index, on_frame): one of this plugin's slots; end_time: epoch seconds when the batch
        task will be killed (None: no limit); loop: the agent's event loop (the source's wake-ups,
        the stage-ahead's calls from its threads).

        stage_init: the extractor's init frame when waiting deliveries are staged ahead
        (agent.stage_pool; make_slot must then give StagedSlots), None for no stage-ahead.
        """
        self.cfg = cfg
        self.end_time = end_time
        self.margin = margin
        self.identity = identity
        self.estimate = DurationEstimate()
        self.source = source
        self.redactor = redactor
        self._clock = clock
        self.loop = loop
        self.slots = [make_slot(i, self._on_frame) for i in range(cfg.slots)]
        self.pending: collections.deque[tuple[Delivery, dict[str, Any]]] = collections.deque()
        self.backoff: list[tuple[float, Delivery, int, str]] = []
        self.deferred: list[tuple[Delivery, Callable[[], None]]] = []
        self.counters = Counters()
        self.info: dict[str, Any] = {}
        self._job_seq = 0
        self._last_activity = clock()
        self._stop_reason: Optional[str] = None
        self._stop_deadline: Optional[float] = None
        self._signal: Optional[int] = None
        self._killed_for_stop: set[int] = set()
        self.duties = Duties(source, cfg.heartbeat, cfg.clowder_email, identity, len(self.slots), clock(),
                            cfg.extractor_key)
        self._defers = 0  # consecutive "Clowder unavailable" outcomes, for their backoff
        self.exit_code = exitcodes.OK
        #: stops that concern the whole agent (this node's scratch is full); agent.runner_group
        #: points it at every plugin's runner
        self.stop_agent: Callable[[str], None] = self.request_stop
        self.stager = None
        if stage_init is not None:
            assert loop is not None, "stage-ahead posts from its threads to the agent's event loop"
            self.stager = StagePool(stage_init, 2 * cfg.slots, loop.call_soon, self._dispatch,
                                    on_off=source.inline_off, patience=STAGE_PATIENCE, clock=clock)

    # -- lifecycle: the phases agent.runner_group drives (one plugin is a group of one) ----------------
    def start_slots(self) -> None:
        """Start the extractor processes (they load in parallel with other plugins' ones)."""
        for slot in self.slots:
            slot.start()

    def wait_ready(self) -> Optional[int]:
        """Wait for the extractor to load: None when ready, else the exit code (slots closed)."""
        try:
            self.info = self.slots[0].wait_ready(timeout=120)
        except RuntimeError as exc:
            log.error("extractor failed to start: %s", exc)
            self.close_slots()
            return exitcodes.PLUGIN_ERROR
        log.info("extractor %s %s ready in %d slot(s)", self.info.get("name"), self.info.get("version", ""),
                 len(self.slots))
        return None

    def open_source(self) -> Optional[int]:
        """Begin taking deliveries: None when started, else the exit code (slots closed)."""
        wake = self.loop.wake if self.loop is not None else (lambda: None)
        try:
            self.source.open(wake, self._on_lost)
        except SourceUnavailable as exc:
            log.error("%s", exc)
            self.close_slots()
            return exitcodes.BROKER_UNREACHABLE
        if self.stager is not None:
            self.stager.start()
        self._last_activity = self._clock()
        return None

    def step(self, now: float) -> None:
        """After a turn of the event loop: take what the source received, then do what is due.

        SourceUnavailable when the source has been unreachable for too long (the group ends).
        """
        for delivery in self.source.take():
            self._on_delivery(delivery)
        self._tick(now)

    def idle_since(self) -> Optional[float]:
        """When this runner last had work (clock time), None while it has some."""
        if self.pending or self._busy() or self.backoff:
            return None
        return self._last_activity

    @property
    def stopping(self) -> bool:
        """True once this runner takes no new work."""
        return self._stop_reason is not None

    def signalled(self, signum: int) -> None:
        """A signal for this runner (safe in a signal handler): acted on at its next step."""
        self._signal = signum

    def source_gone(self, exc: BaseException) -> None:
        """The work source cannot be reached any more: end with BROKER_UNREACHABLE."""
        log.error("%s; handing back what can be handed back", exc)
        self.exit_code = exitcodes.BROKER_UNREACHABLE

    def shutdown(self) -> None:
        """Close the slots, send the last report, close the source, log what was done."""
        self.close_slots()
        if self.stager is not None:
            self.stager.close()
        self.duties.report(self._clock())
        self.source.close()
        c = self.counters
        log.info("stopped (%s): %d received, %d succeeded, %d retried, %d dead-lettered, %d handed back",
                 self._stop_reason or "error", c.received, c.succeeded, c.retried, c.dead_lettered, c.handed_back)

    def request_stop(self, reason: str, grace: Optional[float] = None) -> None:
        """Take no new work; let in-flight work finish for grace seconds (default stop_grace)."""
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._stop_deadline = self._clock() + (self.cfg.stop_grace if grace is None else grace)
        log.info("stopping: %s", reason)
        try:
            self.source.stop_intake()
        except SourceLost:
            pass
        while self.pending:
            delivery = self._pop_pending()
            self._settle(delivery, "hand back", lambda d=delivery: self.source.release(d))
            self.counters.handed_back += 1

    def _busy(self) -> list[ExtractorSlot]:
        return [s for s in self.slots if s.busy_with is not None]

    def finished(self) -> bool:
        """True once this runner stopped and nothing it holds needs it any more."""
        if self._stop_reason is None:
            return False
        if self._busy() or self.backoff:
            return False
        if self.deferred and self.source.connected:
            return False
        if self.deferred:
            log.error("%d journaled message(s) could not be settled; they stay in the journal and will be "
                      "put back by the next agent", len(self.deferred))
        return True

    def close_slots(self) -> None:
        """Stop the extractor processes (at shutdown, or when setup failed)."""
        for slot in self.slots:
            slot.close()

    # -- deliveries ------------------------------------------------------------------------------
    def _on_delivery(self, delivery: Delivery) -> None:
        self.counters.received += 1
        self._last_activity = self._clock()
        budget = self.cfg.max_messages
        if self._stop_reason is not None or (budget and self.counters.received > budget):
            self.counters.received -= 1
            self._settle(delivery, "hand back", lambda: self.source.release(delivery))
            return
        try:
            body = parse_body(delivery.body, delivery.routing_key)
        except BadMessage as exc:
            self._reject(delivery, f"bad message: {exc}")
            return
        delivery.parsed = body
        counted = attempts_so_far(delivery.attempts, body)
        if counted != delivery.attempts:
            delivery.headers[ATTEMPTS] = counted  # pyclowder republished it: its body holds the count
        self.redactor.add(body.get("secretKey"))
        self.pending.append((delivery, body))
        if self.stager is not None:
            inline, delivery.inline = delivery.inline, None  # written out now, not held twice
            self.stager.take(delivery, body, inline)
        self._dispatch()

    def _reject(self, delivery: Delivery, reason: str, traceback: str = "", attempts: Optional[int] = None,
                send_status: bool = True) -> None:
        """Dead-letter a message with its reason (and an ERROR status when Clowder can be told)."""
        log.error("message %s dead-lettered: %s", delivery.file_id or "(unparsed)", self.redactor(reason))
        if send_status and delivery.parsed is not None:
            self._status(delivery, pyclowder.utils.StatusMessage.error, reason)
        attempts = delivery.attempts if attempts is None else attempts
        self.counters.dead_lettered += 1
        self.duties.activity.dead += 1
        self._settle(delivery, "dead-letter", lambda: self.source.dead_letter(
            delivery, self.redactor(reason), self.redactor(traceback), attempts))
        self._work_done()

    def _status(self, delivery: Delivery, status: Any, message: str) -> None:
        payload = status_payload(self.info.get("name", ""), delivery.file_id, delivery.job_id, status,
                                 self.redactor(message), pyclowder.utils.iso8601time())
        self.source.publish_status(delivery, payload)

    def remaining(self) -> Optional[float]:
        """Seconds until the batch task's end, None when it has none."""
        return None if self.end_time is None else self.end_time - time.time()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.pending:
                return
            if slot.busy_with is None and self._stop_reason is None:
                index = self._next_ready()
                if index is None:
                    return  # every waiting delivery is being staged: its end dispatches again
                remaining, estimate = self.remaining(), self.estimate.value()
                if not admit(remaining, estimate, self.margin):
                    assert remaining is not None
                    self.request_stop(f"walltime drain: {remaining:.0f}s left, a file takes about "
                                      f"{estimate or 0:.0f}s plus a {self.margin:.0f}s margin",
                                      grace=float("inf"))
                    return
                delivery, body = self.pending[index]
                del self.pending[index]
                if self.stager is not None:
                    body = self.stager.body_for(delivery, body)
                # pyclowder numbers its statuses from the body's count and gives up at max_retry.
                body = dict(body, retry_count=delivery.attempts)
                self._job_seq += 1
                slot.assign(delivery, body, self._job_seq)

    def _next_ready(self) -> Optional[int]:
        """Where the first waiting delivery a slot can take now is in pending (staged, or not staged at all)."""
        if self.stager is None:
            return 0
        return next((i for i, (d, _) in enumerate(self.pending) if self.stager.ready(d)), None)

    def _pop_pending(self) -> Delivery:
        """The oldest waiting delivery, leaving this runner (its staged file removed)."""
        delivery, _ = self.pending.popleft()
        if self.stager is not None:
            self.stager.forget(delivery)
        return delivery

    def _settle(self, delivery: Delivery, what: str, op: Callable[[], None]) -> None:
        """Carry out a settle operation; if the broker is away, a secured message waits for it."""
        try:
            op()
        except SourceLost:
            if delivery.secured:
                self.deferred.append((delivery, op))
            else:
                self.counters.lost_acks += 1
                log.warning("could not %s message %s: its delivery died with the connection, so the broker "
                            "redelivers it (a duplicate if its results were already uploaded)",
                            what, delivery.file_id or "(unparsed)")

    def _on_lost(self) -> None:
        """The connection is gone: deliveries not yet started are back in the broker's queue."""
        dropped = len(self.pending) + sum(1 for _, d, _, _ in self.backoff if not d.secured)
        while self.pending:
            self._pop_pending()
        self.backoff = [b for b in self.backoff if b[1].secured]
        if dropped:
            log.info("%d waiting message(s) returned to the queue by the broker", dropped)

    # -- frames from slots -----------------------------------------------------------------------
    def _on_frame(self, slot: ExtractorSlot, frame: dict[str, Any]) -> None:
        kind = frame.get(frames.KIND)
        delivery = slot.busy_with
        if kind == Kind.STATUS:
            if delivery is not None:
                payload = frame["payload"]
                if self.identity and payload.get("message_type") == str(pyclowder.utils.StatusMessage.start):
                    # Which batch task has the file: what a person needs when it goes wrong.
                    payload["message"] = f"{payload.get('message', '')} [{self.identity}]"
                    payload["status"] = f"{payload['message_type']}: {payload['message']}"
                for key in ("status", "message"):
                    if isinstance(payload.get(key), str):
                        payload[key] = self.redactor(payload[key])
                self.source.publish_status(delivery, payload)
            return
        if not frames.ends_job(frame):
            return
        slot.busy_with = None
        if delivery is not None and self.stager is not None:
            self.stager.forget(delivery)
            if "staged_used" in frame:
                self.stager.note_use(bool(frame["staged_used"]))
        if delivery is None:
            if kind == Kind.DIED:
                log.warning("slot %d: idle %s", slot.index, frame.get("reason"))
            return
        elapsed = self._clock() - slot.started_at
        self.estimate.add(elapsed)
        self.duties.activity.attempt(elapsed, kind == Kind.DONE and frames.outcome_of(frame) == Outcome.OK)
        if kind == Kind.DIED:
            if slot.index in self._killed_for_stop:
                # We killed it at the end of the grace period: not the file's fault.
                self._killed_for_stop.discard(slot.index)
                attempt = Attempt(Outcome.STOPPED, "killed at the end of the stop's grace period")
            else:
                attempt = Attempt(Outcome.DIED, frame.get("reason") or "extractor process died")
        else:
            outcome = frames.outcome_of(frame) or Outcome.RETRY.value
            attempt = Attempt(outcome, frame.get("reason") or f"extractor {outcome}",
                              reported=bool(frame.get("reported")), exhausted=bool(frame.get("exhausted")))
        if attempt.outcome == Outcome.DEFER:
            self._defers += 1
        elif attempt.outcome == Outcome.OK:
            self._defers = 0
        self._carry_out(delivery, decide(attempt, delivery.attempts, self.retry_settings, self._defers),
                        frame.get("traceback") or "", elapsed)
        self._dispatch()

    @property
    def retry_settings(self) -> RetrySettings:
        """What agent.retry_policy decides with: this plugin's max_retries and retry_backoff."""
        return RetrySettings(self.cfg.max_retries, self.cfg.retry_backoff)

    def _carry_out(self, delivery: Delivery, settle: Settle, traceback: str, elapsed: float) -> None:
        """Settle a message as agent.retry_policy decided: the status, then the source's operation."""
        what = settle.action
        if settle.status is not None and delivery.parsed is not None:
            kind, text = settle.status
            self._status(delivery, getattr(pyclowder.utils.StatusMessage, kind), text)
        if what is Action.ACK:
            self.counters.succeeded += 1
            log.info("done %s in %.2fs", delivery.file_id, elapsed)
            self._settle(delivery, "acknowledge", lambda: self.source.complete(delivery))
            self._work_done()
        elif what is Action.HAND_BACK:
            self.counters.handed_back += 1
            self._settle(delivery, "hand back", lambda: self.source.release(delivery))
            if settle.stop_agent:
                # Not the file's fault (this node's scratch disk is full): another node should take it.
                log.error("%s; handing the message back and stopping this agent", settle.reason)
                self.exit_code = exitcodes.NO_SCRATCH
                self.stop_agent(settle.reason)
            else:
                self._work_done()
        elif what is Action.DEFER:
            # Clowder unreachable: try again later without spending one of the file's attempts.
            log.warning("message %s deferred %.0fs: %s", delivery.file_id, settle.delay,
                        self.redactor(settle.reason))
            self.backoff.append((self._clock() + settle.delay, delivery, settle.attempts, settle.reason))
        elif what is Action.DEAD_LETTER:
            self._reject(delivery, settle.reason, traceback, settle.attempts, send_status=False)
        else:
            self._retry(delivery, settle, elapsed)

    def _retry(self, delivery: Delivery, settle: Settle, elapsed: float) -> None:
        attempts, delay, reason = settle.attempts, settle.delay, settle.reason
        log.warning("message %s failed (attempt %d of %d, %.1fs): %s; retrying in %.1fs", delivery.file_id,
                    attempts, self.cfg.max_retries + 1, elapsed, self.redactor(reason), delay)
        if self.source.delayed_retry:
            # The backend holds the backoff (a retry queue, the relay's table): no slot, no prefetch
            # place, and nothing in this process to lose.
            self.counters.retried += 1
            self._settle(delivery, "retry", lambda: self.source.retry_later(
                delivery, attempts, self.redactor(reason), delay))
            self._work_done()
            return
        self.backoff.append((self._clock() + delay, delivery, attempts, reason))

    def _work_done(self) -> None:
        self._last_activity = self._clock()
        budget = self.cfg.max_messages
        if budget and self.counters.finished() >= budget:
            self.request_stop(f"processed {budget} message(s)")

    # -- time-driven duties ----------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        if self.stager is not None and self.pending:
            self._dispatch()  # a job out of patience with its staging goes to an idle slot (StagePool.ready)
        if self._signal is not None:
            signum, self._signal = self._signal, None
            name = signal.Signals(signum).name
            if signum == signal.SIGUSR1:
                self.request_stop(f"received {name}: draining", grace=float("inf"))
            elif self._stop_reason is None:
                self.request_stop(f"received {name}")
            else:
                # A second signal (SIGTERM at the walltime during a drain): hand back soon.
                self._stop_deadline = min(self._stop_deadline or float("inf"), self._clock() + self.cfg.stop_grace)
                log.info("received %s while stopping: in-flight work is handed back in %.0fs", name,
                         self.cfg.stop_grace)
        self._retry_due(now)
        self._secure_old(now)
        if self.deferred and self.source.connected:
            todo, self.deferred = self.deferred, []
            for delivery, op in todo:
                self._settle(delivery, "settle", op)
        self.duties.run(now, self.info)
        if not self.source.connected:
            # Without the broker the agent cannot know whether the queue is empty: time spent
            # reconnecting is not idleness (reconnect_timeout bounds it, with exit code 4).
            self._last_activity = now
        if self._stop_reason is not None and self._stop_deadline is not None and now >= self._stop_deadline:
            self._end_grace()

    def _retry_due(self, now: float) -> None:
        if not self.backoff:
            return
        due = [b for b in self.backoff if b[0] <= now or self._stop_reason is not None]
        if not due:
            return
        self.backoff = [b for b in self.backoff if b not in due]
        for _, delivery, attempts, reason in due:
            self.counters.retried += 1
            self._settle(delivery, "retry", lambda d=delivery, a=attempts, r=reason:
                         self.source.retry(d, a, self.redactor(r)))
            self._work_done()

    def _secure_old(self, now: float) -> None:
        limit = self.cfg.journal_after
        held = [s.busy_with for s in self.slots if s.busy_with is not None] + [b[1] for b in self.backoff]
        for delivery in held:
            if not delivery.secured and now - delivery.received_at >= limit:
                try:
                    delivery.token = self.source.secure(delivery)
                    delivery.secured = True
                    log.info("message %s in flight for %.0fs: journaled and acknowledged", delivery.file_id,
                             now - delivery.received_at)
                except SourceLost:
                    pass
                except OSError as exc:
                    log.error("cannot journal message %s (%s): it stays unacknowledged and RabbitMQ may "
                              "redeliver it after its consumer_timeout", delivery.file_id, exc.strerror)
                    delivery.received_at = now  # try again after another journal_after
        while self.pending and now - self.pending[0][0].received_at >= limit:
            # Waiting too long for a slot: let another worker have it.
            delivery = self._pop_pending()
            self.counters.handed_back += 1
            self._settle(delivery, "hand back", lambda d=delivery: self.source.release(d))

    def _end_grace(self) -> None:
        for slot in self._busy():
            log.warning("slot %d: grace period over; handing back %s", slot.index, slot.busy_with.file_id)
            self._killed_for_stop.add(slot.index)
            slot.kill()  # its "died" frame hands the message back
        self._stop_deadline = None
