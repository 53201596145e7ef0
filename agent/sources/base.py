"""The narrow interface every work source implements: take deliveries, settle them.

A source never waits and never decides. The agent's event loop (agent.event_loop) does the
waiting: a source whose backend needs I/O on the main thread rides on a loop that does it
(RabbitMQ: agent.sources.amqp_connection), any other source fills itself from its own threads
and calls the `wake` it was opened with. Each turn the agent takes what arrived (`take`), and
tells the source what became of each Delivery, as agent.retry_policy decided:

  complete     the work is done and its results are in Clowder: forget the message
  release      hand the message back untouched, not a failure (shutdown, walltime)
  retry        put the message back with one more failed attempt recorded
  retry_later  like retry, but the message comes back only after a delay, held by the backend
               (sources with `delayed_retry`): a message in backoff takes no slot, no prefetch place
  dead_letter  move the message to the error queue with the reason
  secure       make the message survive without holding its delivery open (long work)

Each returns once its effect is durable; a method that cannot reach the backend raises
SourceLost and the message is left to the backend's own redelivery. A source does not change a
Delivery once it has handed it out: `secure` returns the token the agent settles it by from
then on, and the agent records it.

Besides taking and settling, a source tells Clowder and the launcher how things go
(SourceReports: statuses, registration, activity reports) and tidies its backend
(recover_orphans, work_soon): optional, with defaults that do nothing.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Optional

from ..errors import BrokerError
from ..messages import Delivery


class SourceLost(BrokerError):
    """The connection to the backend is gone for now; the source is reconnecting."""


class SourceUnavailable(BrokerError):
    """The backend could not be reached within the configured time: the agent should exit."""


class SourceReports:
    """What a source may also do for the agent: best-effort messages and backend housekeeping."""

    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        """Best effort: tell Clowder how the work is going (dropped when disconnected)."""

    def publish_report(self, report: dict[str, Any]) -> None:
        """Best effort: tell the launcher what this agent did lately (hpc_common.reports)."""

    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        """Announce the extractor so Clowder lists it (best effort)."""

    def recover_orphans(self) -> int:
        """Put back messages left by dead agents; return how many."""
        return 0

    def work_soon(self) -> Optional[float]:
        """Seconds until held work becomes deliverable (retry backoff, a dead agent's lease), or None.

        Asked by an agent that is about to exit on idle: it stays while the answer is not None.
        """
        return None

    def inline_off(self) -> None:
        """Stop sending file contents with deliveries (the agent stopped staging ahead)."""

    def result(self) -> tuple[str, str]:
        """What became of the work, as (outcome, reason): "done" unless the source reports one message
        whose fate the exit code must carry (the message file of a dispatch job)."""
        return "done", ""


class WorkSource(SourceReports, abc.ABC):
    """Where messages come from and where their fate is reported (main thread only)."""

    queue: str
    #: bumped on every (re)connection; deliveries from an older generation cannot be settled
    generation: int = 0
    #: True when the backend holds a retry's backoff itself (retry_later); otherwise the agent waits
    delayed_retry: bool = False

    @abc.abstractmethod
    def open(self, wake: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Connect (retrying within connect_timeout; SourceUnavailable after) and begin receiving.

        wake: call it (from any thread) when deliveries arrived for `take`; on_lost: called on the
        main thread when deliveries not yet started went back to the backend with a lost connection.
        """

    @abc.abstractmethod
    def take(self) -> list[Delivery]:
        """The deliveries received since the last call (never blocks)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True when settle operations can reach the backend now."""

    @abc.abstractmethod
    def stop_intake(self) -> None:
        """Receive no new deliveries (held ones stay held)."""

    @abc.abstractmethod
    def complete(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    def release(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None: ...

    def retry_later(self, delivery: Delivery, attempts: int, reason: str, delay: float) -> None:
        """Settle the delivery now; the backend makes the message deliverable again after delay seconds."""
        raise NotImplementedError("this source has no delayed retry")

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None: ...

    @abc.abstractmethod
    def secure(self, delivery: Delivery) -> Any:
        """Make the message durable without its open delivery; return the token to settle it by."""

    @abc.abstractmethod
    def close(self) -> None: ...
