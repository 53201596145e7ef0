#!/usr/bin/env python
"""The per-file worker the launcher benchmark runs inside Slurm jobs (same code both ways).

  launcher_worker.py resident   consume the queue until it stays empty for 3 s (an array task)
  launcher_worker.py one        process $CLOWDER_MESSAGE_FILE once (a dispatch job)

"Processing" a file is WORK_SECONDS of sleep; each file's end time is published to the queue
$BENCH_DONE_QUEUE so the benchmark can measure the makespan.
"""
import json
import os
import sys
import time

import pika

WORK = float(os.environ.get("WORK_SECONDS", "0.05"))


def done(ch, file_id, mode):
    ch.basic_publish("", os.environ["BENCH_DONE_QUEUE"],
                     json.dumps({"id": file_id, "t": time.time(), "mode": mode}).encode(),
                     pika.BasicProperties(delivery_mode=2))


def connect():
    """Connect, retrying for a minute (the shared test broker may be restarting)."""
    deadline = time.time() + 60
    while True:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(os.environ["RABBITMQ_URI"]))
            return conn, conn.channel()
        except pika.exceptions.AMQPError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def main():
    conn, ch = connect()
    if sys.argv[1] == "one":
        with open(os.environ["CLOWDER_MESSAGE_FILE"]) as fh:
            body = json.loads(json.load(fh)["body"])
        time.sleep(WORK)
        done(ch, body["id"], "dispatch")
        conn.close()
        return
    queue = os.environ["RABBITMQ_QUEUE"]
    idle_since = time.time()
    while time.time() - idle_since < 3:
        try:
            method, _, body = ch.basic_get(queue)
            if method is None:
                time.sleep(0.1)
                continue
            time.sleep(WORK)
            done(ch, json.loads(body)["id"], "array")
            ch.basic_ack(method.delivery_tag)
            idle_since = time.time()
        except pika.exceptions.AMQPError:  # broker restart: unacked work comes back
            conn, ch = connect()
            idle_since = time.time()
    conn.close()


if __name__ == "__main__":
    main()
