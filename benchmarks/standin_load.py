#!/usr/bin/env python
"""How many files/s a Clowder stand-in serves on its own: no broker, no extractor, a lean client.

Per file the client makes the bare loop's requests (GET the blob, POST metadata; with --info also
pyclowder's file-info GET), over kept-alive raw sockets with pre-built requests, from several connections at once, so the
client costs far less than the server. The benchmarks print this next to the bare loop's rate:
the stand-in must serve several times the loop's rate for ratios to measure the agent.

  python benchmarks/standin_load.py URL FILE_ID [--seconds 3] [--connections 4] [--info]   (prints files/s)
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import urlsplit


def _requests(url: str, file_id: str, key: str, info: bool) -> list[bytes]:
    host = urlsplit(url).netloc
    body = b'{"@context":["https://clowder.ncsa.illinois.edu/contexts/metadata.jsonld"],"content":{"lines":37}}'
    common = "Host: %s\r\nAccept: */*\r\nConnection: keep-alive\r\n" % host
    first = [("GET /api/files/%s/metadata?key=%s HTTP/1.1\r\n%s\r\n" % (file_id, key, common)).encode()]
    return first[:int(info)] + [
            ("GET /api/files/%s?key=%s HTTP/1.1\r\n%s\r\n" % (file_id, key, common)).encode(),
            ("POST /api/files/%s/metadata.jsonld?key=%s HTTP/1.1\r\n%sContent-Type: application/json\r\n"
             "Content-Length: %d\r\n\r\n" % (file_id, key, common, len(body))).encode() + body]


async def _worker(url: str, reqs: list[bytes], until: float, counts: list[int]) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        while time.perf_counter() < until:
            for req in reqs:
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError("stand-in answered " + head.split(b"\r\n", 1)[0].decode())
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()


async def _load(url: str, file_id: str, key: str, seconds: float, connections: int, info: bool) -> float:
    reqs = _requests(url, file_id, key, info)
    counts = [0]
    start = time.perf_counter()
    await asyncio.gather(*(_worker(url, reqs, start + seconds, counts) for _ in range(connections)))
    return counts[0] / (time.perf_counter() - start)


def files_per_second(url: str, file_id: str, key: str = "secret", seconds: float = 3.0, connections: int = 4,
                     info: bool = False) -> float:
    """Files/s (blob + metadata per file, and the file info with info=True) the stand-in at url served."""
    try:
        import uvloop  # the client's own cost must stay small next to the server's
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(_load(url, file_id, key, seconds, connections, info))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("file_id")
    parser.add_argument("--key", default="secret")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--info", action="store_true", help="also GET the file info, as pyclowder does")
    args = parser.parse_args()
    print("%.1f" % files_per_second(args.url, args.file_id, args.key, args.seconds, args.connections, args.info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
