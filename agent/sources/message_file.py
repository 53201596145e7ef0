"""One message from a file: the agent as the job of `python -m launcher dispatch`.

dispatch writes each message (body, AMQP properties and its queue, mode 0600) to a file and submits one
batch job for it with CLOWDER_MESSAGE_FILE set; the launcher has already recorded the message
durably and settles it from the job's exit code. So this source settles nothing itself: it only
remembers what the runner decided, and the agent exits 0 when the file was processed, or with
exitcodes.MESSAGE_NOT_DONE otherwise (the launcher then retries or dead-letters it, with the
reason from the job's log). Status messages go to the message's reply_to when the broker in
RABBITMQ_URI can be reached from the job, and are only logged otherwise.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..messages import Delivery
from .base import WorkSource

log = logging.getLogger("agent.message_file")


class MessageFileError(ConfigError):
    """The message file is missing or not what dispatch writes."""


def read_message_file(path: str) -> dict[str, Any]:
    """The file's record: body, properties (a mapping) and, from newer dispatchers, the queue it was taken from."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or "body" not in data:
            raise ValueError("no body")
        data["properties"] = dict(data.get("properties") or {})
    except OSError as exc:
        raise MessageFileError(f"message file {path}: {exc.strerror}") from None
    except (ValueError, KeyError, AttributeError, TypeError):
        raise MessageFileError(f"message file {path}: not a dispatch message (needs body, properties)") from None
    return data


class MessageFileSource(WorkSource):
    """Deliver the one message in a file; record its fate in `outcome`."""

    def __init__(self, path: str, queue: str, rabbitmq_uri: Optional[str] = None) -> None:
        self.path = path
        self.queue = queue
        self.generation = 1
        self.outcome: Optional[str] = None    # done, released, retry or dead-lettered
        self.reason = ""
        self._uri = rabbitmq_uri
        self._conn: Any = None
        self._channel: Any = None
        self._delivery = self._read()
        self._taken = False

    def _read(self) -> Delivery:
        data = read_message_file(self.path)
        props, body = data["properties"], data["body"]
        return Delivery(body=body.encode("utf-8") if isinstance(body, str) else bytes(body),
                        routing_key=props.get("routing_key") or self.queue, reply_to=props.get("reply_to"),
                        correlation_id=props.get("correlation_id"), headers=dict(props.get("headers") or {}),
                        content_type=props.get("content_type"), token=self.path, received_at=time.monotonic())

    def open(self, wake: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Open a connection for status replies when the message has a reply_to and the broker is given."""
        if self._uri and self._delivery.reply_to:
            self._connect_for_statuses()

    def take(self) -> list[Delivery]:
        """The one message, at the first call; then nothing (a status connection does its I/O here)."""
        if self._taken:
            self._pump_statuses()
            return []
        self._taken = True
        self._delivery.received_at = time.monotonic()
        return [self._delivery]

    def _connect_for_statuses(self) -> None:
        from .amqp import BrokerError, open_status_channel

        try:
            self._conn, self._channel = open_status_channel(self._uri or "")
        except BrokerError as exc:  # best effort: a job without broker access still processes its file
            log.info("no broker for status messages: %s", exc)
            self._conn = self._channel = None

    def _pump_statuses(self) -> None:
        """Let the status connection answer the broker's heartbeats and flush (never waits)."""
        if self._conn is None:
            return
        from .amqp import BrokerError, pump

        try:
            pump(self._conn, 0)
        except BrokerError:
            self._conn = self._channel = None

    @property
    def connected(self) -> bool:
        return True  # nothing to reach: settling is the launcher's job

    def stop_intake(self) -> None:
        pass

    def result(self) -> tuple[str, str]:
        """The message's fate: done, released, retry, dead-lettered, or not settled at all."""
        return self.outcome or "not settled", self.reason

    def _settle(self, outcome: str, reason: str = "") -> None:
        if self.outcome is None:
            self.outcome, self.reason = outcome, reason

    def complete(self, delivery: Delivery) -> None:
        self._settle("done")

    def release(self, delivery: Delivery) -> None:
        self._settle("released", "handed back")

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        self._settle("retry", reason)

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        self._settle("dead-lettered", reason)

    def secure(self, delivery: Delivery) -> Any:
        return delivery.token  # the launcher's ledger already holds it durably

    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        log.info("status: %s", payload.get("status"))
        if self._channel is None or not delivery.reply_to:
            return
        from .amqp import BrokerError, publish_reply

        try:
            publish_reply(self._channel, delivery.reply_to, delivery.correlation_id, payload)
        except BrokerError:
            self._conn = self._channel = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
