"""The floor: consume (prefetch 20), GET the blob, POST metadata, ack. No pyclowder, no agent."""
import json
import sys
from typing import Any, Callable

import pika
import requests


def consume(url: str, queue: str, count: int, handle: Callable[[Any, Any, bytes], None]) -> None:
    """Consume count messages (prefetch 20), calling handle(channel, properties, body) before each ack."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=20)
    done = 0
    for method, props, body in ch.consume(queue):
        handle(ch, props, body)
        ch.basic_ack(method.delivery_tag)
        done += 1
        if done >= count:
            break
    ch.cancel()
    conn.close()


def main(url: str, queue: str, count: int) -> None:
    http = requests.Session()

    def handle(_ch: Any, _props: Any, body: bytes) -> None:
        msg = json.loads(body)
        host, key, fid = msg["host"], msg["secretKey"], msg["id"]
        http.get(f"{host}api/files/{fid}?key={key}").content
        http.post(f"{host}api/files/{fid}/metadata.jsonld?key={key}", data=json.dumps({"content": {"n": 1}}),
                  headers={"Content-Type": "application/json"}).raise_for_status()

    consume(url, queue, count, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
