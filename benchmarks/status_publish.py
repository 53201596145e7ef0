"""What the relay's old private-pika batch publish was worth: status replies, public vs private path.

Until 2026-12-05 the relay published a drained batch of status replies through pika's private
channel (`BlockingChannel._impl.basic_publish` for each, then one `_flush_output`): one socket
write per batch. launcher.broker.Link now uses pika's public API only (`basic_publish`, which
writes each message before it returns). This measures both on the real broker, side by side in
one run, medians of 3: the publishing process's CPU per message and messages per second, in
batches of BATCH (the relay drains its outbox in batches).

    .venv/bin/python benchmarks/status_publish.py [--messages 20000] [--batch 20]

Results: benchmarks/results/status_publish.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import pika

from _common import AMQP_URL


def _run(channel, queue: str, messages: int, batch: int, private: bool) -> tuple[float, float]:
    body = json.dumps({"status": "StatusMessage.processing: Downloading file.", "file_id": "x" * 24,
                       "extractor_id": "bench", "start": "2026-12-05T19:00:00+0000", "job_id": "y" * 24}).encode()
    props = pika.BasicProperties(delivery_mode=2, correlation_id=str(uuid.uuid4()), content_type="application/json")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(messages // batch):
        if private:
            for _ in range(batch):
                channel._impl.basic_publish(exchange="", routing_key=queue, body=body, properties=props)
            channel._flush_output()
        else:
            for _ in range(batch):
                channel.basic_publish("", queue, body, props)
    channel.connection.process_data_events(time_limit=0)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return messages / wall, cpu / messages * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = conn.channel()
    queue = f"bench-status-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue, durable=False, auto_delete=False)
    results: dict[str, list[tuple[float, float]]] = {"public": [], "private": []}
    try:
        for _ in range(args.repeats):
            for kind in ("public", "private"):  # alternated, so drift hits both
                results[kind].append(_run(channel, queue, args.messages, args.batch, kind == "private"))
                channel.queue_purge(queue)
    finally:
        channel.queue_delete(queue)
        conn.close()
    print(f"{args.messages} status messages in batches of {args.batch}, medians of {args.repeats}")
    print("| path | messages/s | publisher CPU ms/message |")
    print("|---|---|---|")
    for kind, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"| {kind} | {rate:,.0f} | {cpu:.4f} |")


if __name__ == "__main__":
    main()
