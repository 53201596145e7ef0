#!/usr/bin/env python
"""End-to-end demo on this machine: Clowder-style messages in, metadata out.

A Clowder stand-in serves a few text files, their extraction messages are published to
RabbitMQ exactly as Clowder v1 publishes them, and an agent runs the unchanged example
wordcount extractor until the queue is drained, then exits by itself (idle exit). Prints
what reached "Clowder": the metadata and the status messages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pika

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from agent.clowder_standin import ClowderStandin  # noqa: E402

TEXTS = {
    "moby.txt": "Call me Ishmael. Some years ago, never mind how long precisely,\nhaving little or no money in my purse\n",
    "haiku.txt": "An old silent pond\nA frog jumps into the pond\nSplash! Silence again.\n",
    "lorem.txt": "lorem ipsum dolor sit amet\n" * 50,
}


def main() -> int:
    url = os.environ.get("RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = "ncsa.wordcount.hpc"
    reply = "demo.replies." + uuid.uuid4().hex[:6]
    with ClowderStandin() as clowder:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.queue_declare(reply, auto_delete=False)
        ids = {}
        for name, text in TEXTS.items():
            fid = clowder.add_file(name=name, content=text.encode(), dataset_id="demo-dataset")
            ids[fid] = name
            body = {"id": fid, "intermediateId": fid, "jobid": uuid.uuid4().hex, "host": clowder.url,
                    "secretKey": "secret", "fileSize": str(len(text)), "datasetId": "demo-dataset",
                    "filename": name, "routing_key": "clowder.file.text.plain", "flags": "", "parameters": {}}
            ch.basic_publish("", queue, json.dumps(body), pika.BasicProperties(
                delivery_mode=2, reply_to=reply, correlation_id=str(uuid.uuid4()), content_type="application/json"))
        print(f"published {len(ids)} extraction messages to queue {queue!r}; starting the agent")
        env = dict(os.environ, AGENT_PLUGIN_PATH=os.path.join(REPO, "examples"), RABBITMQ_URI=url)
        started = time.time()
        code = subprocess.call([sys.executable, "-m", "agent", "run", "--plugin", "ncsa.wordcount.hpc",
                                "--idle-exit", "3"], cwd=REPO, env=env)
        print(f"agent exited with code {code} after {time.time() - started:.1f}s\n")
        for fid, name in ids.items():
            for md in clowder.metadata_for(fid):
                print(f"  {name:10s} metadata from {md['agent']['name']}: {json.dumps(md['content'])}")
        statuses = []
        while True:
            method, _props, body = ch.basic_get(reply, auto_ack=True)
            if method is None:
                break
            statuses.append(json.loads(body)["status"])
        done = sum(1 for s in statuses if s.startswith("StatusMessage.done"))
        print(f"\n{len(statuses)} status messages sent to Clowder, {done} of them DONE")
        ch.queue_delete(reply)
        conn.close()
        ok = code == 0 and all(clowder.metadata_for(f) for f in ids) and done == len(ids)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
