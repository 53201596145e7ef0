"""The queues one extractor queue brings with it on the broker, and their removal when a test or a
benchmark is done with it.

A run leaves more than its input queue behind: the agent declares `error.<queue>`, the launcher's
report window `clowder-hpc-agent.reports.<queue>` (hpc_common.reports) and, on failures, retry
buckets `retry.<queue>.<s>`; the harnesses add `reply.<queue>`. Durable queues that nobody deletes
pile up, and every broker start must recover each of them (over a thousand once made a killed
broker spend minutes in its boot). scripts/services.sh adds an expiry policy for these names as a
backstop for runs that are killed before their clean-up.
"""
from __future__ import annotations

from typing import Any, Iterable

from hpc_common.retry_queues import retry_queue
from hpc_common.reports import window_queue

RETRY_BUCKETS = range(1, 61)  # the backoffs tests and benchmarks use stay within a minute


def companion_queues(queue: str, retries: bool = False) -> list[str]:
    """queue and the queues named after it; with retries, its retry buckets of 1..60 s too."""
    names = [queue, "error." + queue, "reply." + queue, window_queue(queue)]
    if retries:
        names += [retry_queue(queue, s) for s in RETRY_BUCKETS]
    return names


def delete_queues(channel: Any, names: Iterable[str]) -> None:
    """Delete each queue on a pika channel (deleting a queue that does not exist is not an error)."""
    for name in names:
        channel.queue_delete(name)


__all__ = ["companion_queues", "delete_queues", "RETRY_BUCKETS"]
