"""The small interface every work source implements.

The agent's main thread drives a source with poll() and tells it what became of each
Delivery. A source never decides retries or dead-lettering; it only carries out:

  complete     the work is done and its results are in Clowder: forget the message
  release      hand the message back untouched, not a failure (shutdown, walltime)
  retry        put the message back with one more failed attempt recorded
  dead_letter  move the message to the error queue with the reason
  secure       make the message survive without holding its delivery open (long work)
  retry_later  like retry, but the message comes back only after a delay, held by the backend
               (sources with `delayed_retry`): a message in backoff takes no slot, no prefetch place

Each returns once its effect is durable; a method that cannot reach the backend raises
SourceLost and the message is left to the backend's own redelivery.
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


OnDelivery = Callable[[Delivery], None]


class WorkSource(abc.ABC):
    """Where messages come from and where their fate is reported."""

    queue: str
    #: bumped on every (re)connection; deliveries from an older generation cannot be settled
    generation: int = 0
    #: True when the backend holds a retry's backoff itself (retry_later); otherwise the agent waits
    delayed_retry: bool = False
    #: True when poll() runs an event loop that can also watch the extractors' pipes (watch/unwatch)
    watches_fds: bool = False

    @abc.abstractmethod
    def start(self, on_delivery: OnDelivery, on_lost: Callable[[], None]) -> None:
        """Connect (retrying within connect_timeout) and begin receiving deliveries."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> None:
        """Do I/O for up to timeout seconds, calling on_delivery; reconnect when needed."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Make a poll() in progress return soon (safe from any thread)."""

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Sources with watches_fds: call on_readable from poll() while fd is readable (main thread);
        poll() returns after a call, so what on_readable posts without a wake-up runs at the next step."""
        raise NotImplementedError("this source watches no file descriptors")

    def unwatch(self, fd: int) -> None:
        """Stop watching fd (watches_fds sources)."""

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

    def work_soon(self) -> Optional[float]:
        """Seconds until held work becomes deliverable (retry backoff, a dead agent's lease), or None.

        Asked by an agent that is about to exit on idle: it stays while the answer is not None.
        """
        return None

    def inline_off(self) -> None:
        """Stop sending file contents with deliveries (the agent stopped staging ahead); optional."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None: ...

    @abc.abstractmethod
    def secure(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        """Best effort: tell Clowder how the work is going (dropped when disconnected)."""

    def publish_report(self, report: dict[str, Any]) -> None:
        """Best effort: tell the launcher what this agent did lately (hpc_common.reports); optional."""

    @abc.abstractmethod
    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        """Announce the extractor so Clowder lists it (best effort)."""

    @abc.abstractmethod
    def recover_orphans(self) -> int:
        """Put back messages left by dead agents; return how many."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def result(self) -> tuple[str, str]:
        """What became of the work, as (outcome, reason): "done" unless the source reports one message
        whose fate the exit code must carry (the message file of a dispatch job)."""
        return "done", ""
