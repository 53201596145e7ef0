"""The message as both sides carry it: its fields, the headers the product adds, dead-letter headers.

Every place that holds a Clowder message (the agent's Delivery and journal entries, the relay's
table and the spool's staged files) keeps the same six AMQP fields, in `Message`. The headers
below are a contract with whoever reads the queues and error queues: keep their names.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ATTEMPTS = "x-agent-attempts"              # failed attempts so far, carried across workers
LAST_ERROR = "x-agent-last-error"          # why the last attempt failed (retries)
RECOVERED = "x-agent-recovered"            # times a dead agent's journal entry was republished
AGENT_ID = "x-agent-id"                    # who gave up on the message (dead letters)
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
ERROR_REASON = "x-error-reason"
ERROR_TRACEBACK = "x-error-traceback"
ERROR_TIME = "x-error-time"

TRACEBACK_LIMIT = 8000    # characters of traceback kept (its end: where the error is)
REASON_LIMIT = 2000       # characters of a dead letter's reason
LAST_ERROR_LIMIT = 1000   # characters of a retry's last error


def attempts_of(headers: Mapping[str, Any]) -> int:
    """Failed attempts recorded in a message's headers (0 when absent or unreadable)."""
    try:
        return max(0, int(headers.get(ATTEMPTS, 0) or 0))
    except (TypeError, ValueError):
        return 0


@dataclass
class Message:
    """One message exactly as received from RabbitMQ: enough to publish it again unchanged."""

    body: bytes
    routing_key: str
    reply_to: Optional[str] = None
    correlation_id: Optional[str] = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: Optional[str] = None

    @property
    def attempts(self) -> int:
        """Failed attempts so far, carried across workers in a header."""
        return attempts_of(self.headers)

    def fields_json(self) -> dict[str, Any]:
        """The fields as JSON (body base64-encoded): the form journal and spool files store."""
        return {"body_b64": base64.b64encode(self.body).decode("ascii"), "routing_key": self.routing_key,
                "reply_to": self.reply_to, "correlation_id": self.correlation_id, "headers": self.headers,
                "content_type": self.content_type}

    @staticmethod
    def fields_from_json(data: Mapping[str, Any], default_routing_key: str) -> dict[str, Any]:
        """Keyword arguments for Message (or a subclass) from fields_json's form."""
        return {"body": base64.b64decode(data["body_b64"]),
                "routing_key": data.get("routing_key") or default_routing_key,
                "reply_to": data.get("reply_to"), "correlation_id": data.get("correlation_id"),
                "headers": dict(data.get("headers") or {}), "content_type": data.get("content_type")}


def retry_headers(headers: Mapping[str, Any], attempts: int, reason: str) -> dict[str, Any]:
    """A copy of headers for a message sent back to its queue after a failed attempt."""
    out = dict(headers)
    out[ATTEMPTS] = attempts
    out[LAST_ERROR] = reason[:LAST_ERROR_LIMIT]
    return out


def dead_letter_headers(headers: Mapping[str, Any], reason: str, traceback: str, attempts: int,
                        routing_key: str, agent_id: str, now: Optional[float] = None) -> dict[str, Any]:
    """A copy of headers for a message published to its error queue: why, where from, by whom, when."""
    out = dict(headers)
    out.update({ERROR_REASON: reason[:REASON_LIMIT], ERROR_TRACEBACK: traceback[-TRACEBACK_LIMIT:],
                ATTEMPTS: attempts, ORIGINAL_ROUTING_KEY: routing_key, AGENT_ID: agent_id,
                ERROR_TIME: int(time.time() if now is None else now)})
    return out
