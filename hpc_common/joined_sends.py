"""One socket send per turn for a pika BlockingConnection (the agent's AMQP source, the relay's broker link).

pika buffers each frame apart (a publish is three: method, header, body) and sends each with
its own send(): a few statuses and an ack cost a dozen system calls, each also waking the broker.
Joining the buffers before pika writes them keeps the bytes and their order and leaves one send.
This reaches pika's private attributes by name only (no pika import: hpc_common stays free of it);
with a pika that lacks them nothing changes. benchmarks/noop_overhead.py and relay_throughput.py
measure what it is worth (AGENT_AMQP_INTERNALS, RELAY_AMQP_INTERNALS).
"""
from __future__ import annotations

from typing import Any


def join_sends(conn: Any) -> bool:
    """Make conn send everything it has buffered in one send(); False when its pika has no such internals."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    buffers = getattr(transport, "_tx_buffers", None)
    produce = getattr(transport, "_produce", None)
    if buffers is None or produce is None:
        return False

    def produce_joined() -> None:
        if len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)
        produce()

    transport._produce = produce_joined
    return True
