"""The floor: consume (prefetch 20), GET the blob, POST metadata, ack. No pyclowder, no agent."""
import json
import sys

import pika
import requests


def main(url: str, queue: str, count: int) -> None:
    http = requests.Session()
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=20)
    done = 0
    for method, _props, body in ch.consume(queue):
        msg = json.loads(body)
        host, key, fid = msg["host"], msg["secretKey"], msg["id"]
        http.get(f"{host}api/files/{fid}?key={key}").content
        http.post(f"{host}api/files/{fid}/metadata.jsonld?key={key}", data=json.dumps({"content": {"n": 1}}),
                  headers={"Content-Type": "application/json"}).raise_for_status()
        ch.basic_ack(method.delivery_tag)
        done += 1
        if done >= count:
            break
    ch.cancel()
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
