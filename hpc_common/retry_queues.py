"""Delayed retries the RabbitMQ way: a retry queue per delay bucket that dead-letters back.

A failed message waiting for its backoff must not hold a prefetch place or a slot, and must
survive kill -9 of the agent. So instead of keeping the delivery open for the backoff, the agent
publishes a copy (with its attempt count) to `retry.<queue>.<seconds>`, waits for the broker's
confirm, and only then acknowledges the original. That queue has no consumer; it is declared
with `x-message-ttl` = the bucket's delay and dead-letters expired messages through the default
exchange back to `<queue>`. Per-message expiry is applied only at the head of a queue, so every
message in one retry queue has the same delay: one queue per bucket (whole seconds, rounded
up), a handful in practice because backoffs double up to a cap.

Retry queues are durable and expire (`x-expires`) an hour after their last use. The agent
declares the queue again right before every retry publish, which restarts that clock, so a queue
is never dropped while it holds a message (a message's TTL, at most a day, is far below it).

A message parked there is unsettled work like any other: the launcher counts it in its backlog and
an idle agent stays for it. Neither can list queues over AMQP, so both derive the bucket names
from the retry settings (`buckets`) and ask for each one's depth.
"""
from __future__ import annotations

import math
from typing import Any

PREFIX = "retry."
MAX_DELAY_S = 24 * 3600
UNUSED_EXPIRY_S = 3600  # beyond the bucket's TTL
MAX_BACKOFF_S = 60.0     # a retry's backoff doubles up to this
#: retries after a failed attempt, as pyclowder's MAX_RETRY default (11 attempts in all); agents and
#: launcher share it so the launcher counts the retry queues the agents fill
DEFAULT_MAX_RETRIES = 10


def backoff(first: float, attempt: int) -> float:
    """Seconds before retry number attempt (1 = the first retry): first, doubling, capped at a minute."""
    return min(first * (2 ** max(attempt - 1, 0)), MAX_BACKOFF_S)


def buckets(first: float, max_retries: int) -> list[int]:
    """Every delay bucket a message can wait in with these settings (AGENT_RETRY_BACKOFF, MAX_RETRY)."""
    return sorted({bucket(backoff(first, a)) for a in range(1, max_retries + 1)})


def bucket(delay: float) -> int:
    """The delay bucket (whole seconds, at least 1, at most a day) for a backoff of delay seconds."""
    return int(min(max(1, math.ceil(delay - 1e-9)), MAX_DELAY_S))


def retry_queue(queue: str, seconds: int) -> str:
    """Name of the retry queue that returns messages to queue after seconds."""
    return f"{PREFIX}{queue}.{seconds}"


def retry_queue_arguments(queue: str, seconds: int) -> dict[str, Any]:
    """Declaration arguments: expire after seconds, then dead-letter back to queue."""
    return {"x-message-ttl": seconds * 1000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
            "x-expires": (seconds + UNUSED_EXPIRY_S) * 1000}


__all__ = ["backoff", "bucket", "buckets", "retry_queue", "retry_queue_arguments", "DEFAULT_MAX_RETRIES", "MAX_BACKOFF_S", "PREFIX"]
