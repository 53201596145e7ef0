"""What a Clowder extraction message must hold, checked before any extractor sees it.

Clowder v1 and v2 send different shapes (FACTS.md): v1 carries routing_key, jobid, a string
fileSize and a correlation_id property; v2 carries job_id, an int fileSize, resource_type and
no routing_key. Both need id, host and secretKey. A message that fails these checks can never
succeed, so it is dead-lettered at once with the reason instead of being retried.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from hpc_common.messages import Message

from .errors import MessageError


class BadMessage(MessageError):
    """The message cannot be processed by any extractor; str() is the reason (no secrets)."""


@dataclass
class Delivery(Message):
    """One message held from a work source, with what is needed to reply, retry or dead-letter it."""

    redelivered: bool = False
    token: Any = None                    # source-specific handle (delivery tag, lease id, journal entry)
    received_at: float = 0.0
    secured: bool = False                # no longer needs an open delivery (journaled and acked)
    stale: bool = False                  # its delivery died with a lost connection: cannot be acked
    parsed: Optional[dict[str, Any]] = None
    inline: Optional[dict[str, Any]] = None  # file info and file that came with it (a relay's lease)

    @property
    def file_id(self) -> str:
        body = self.parsed or {}
        value = body.get("id", "")
        return value if isinstance(value, str) else ""

    @property
    def job_id(self) -> Optional[str]:
        body = self.parsed or {}
        value = body.get("jobid", body.get("job_id"))
        return value if isinstance(value, str) else None


def _decode(raw: bytes) -> str:
    for codec in ("utf-8", "iso-8859-1"):  # the codecs pyclowder accepts, in its order
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            continue
    raise BadMessage("body is not text")  # unreachable: iso-8859-1 decodes any bytes


def parse_body(raw: bytes, routing_key: str) -> dict[str, Any]:
    """Decode and check a message body; return the dict pyclowder's _process_message expects.

    Raises BadMessage with a reason a person can act on.
    """
    if not raw:
        raise BadMessage("empty body")
    try:
        body = json.loads(_decode(raw))
    except (json.JSONDecodeError, RecursionError):
        raise BadMessage("body is not JSON") from None
    if not isinstance(body, dict):
        raise BadMessage(f"body is JSON {type(body).__name__}, not an object")
    for name in ("id", "host", "secretKey"):
        if name not in body:
            raise BadMessage(f"missing field {name!r}")
        if not isinstance(body[name], str):
            raise BadMessage(f"field {name!r} must be a string, not {type(body[name]).__name__}")
    if not body["id"].strip():
        raise BadMessage("field 'id' is empty")
    if not body["host"].startswith(("http://", "https://")):
        raise BadMessage("field 'host' is not an http(s) URL")
    if len(body["id"]) > 200 or any(c in body["id"] for c in "/\\?#\x00 "):
        raise BadMessage("field 'id' is not a Clowder identifier")
    for name in ("datasetId", "filename", "routing_key", "jobid", "job_id"):
        if name in body and body[name] is not None and not isinstance(body[name], str):
            raise BadMessage(f"field {name!r} must be a string, not {type(body[name]).__name__}")
    if isinstance(body.get("filename"), str) and "\x00" in body["filename"]:
        raise BadMessage("field 'filename' contains a NUL byte")
    if "retry_count" in body and not isinstance(body["retry_count"], int):
        raise BadMessage("field 'retry_count' must be an integer")
    if not body.get("routing_key"):
        # v2 messages carry none; pyclowder reads the type from the delivery's routing key.
        body["routing_key"] = routing_key
    return body


def status_payload(extractor_name: str, file_id: Optional[str], job_id: Optional[str], status: Any,
                   message: str, start: str) -> dict[str, Any]:
    """The status body pyclowder's RabbitMQ handler sends to reply_to; Clowder v1 and v2 read it.

    status is a pyclowder StatusMessage (rendered "StatusMessage.done") or its string form.
    """
    return {
        "file_id": file_id,
        "extractor_id": extractor_name,
        "job_id": job_id,
        "status": "%s: %s" % (status, message),
        "start": start,
        "message_type": "%s" % status,
        "message": message,
    }
