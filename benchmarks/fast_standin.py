#!/usr/bin/env python
"""A minimal, fast Clowder stand-in for load benchmarks only (not for tests: it checks nothing).

Answers the two calls the relay load benchmark's agents make, on aiohttp:
  GET  <base>api/files/<id>?key=...                the same 1 KB text for every id
  POST <base>api/files/<id>/metadata.jsonld?key=...  counted, answered {"status": "ok"}
  GET  <base>_count                                 {"metadata": n, "files": n}
The agent stand-in in agent/clowder_standin.py is the faithful one (tests use it); this one only
has to be faster than what it measures, and the benchmark prints its own rate to show it is.

  python benchmarks/fast_standin.py [--port 0]     prints "standin: <base url>" when ready
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket

from aiohttp import web

CONTENT = b"lorem ipsum dolor sit amet\n" * 37


def make_handler(counts: dict[str, int]):
    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.path
        if request.method == "GET" and path.startswith("/api/files/"):
            counts["files"] += 1
            return web.Response(body=CONTENT, content_type="text/plain")
        if request.method == "POST" and path.endswith("/metadata.jsonld"):
            await request.read()
            counts["metadata"] += 1
            return web.Response(body=b'{"status": "ok"}', content_type="application/json")
        if path == "/_count":
            return web.Response(body=json.dumps(counts).encode(), content_type="application/json")
        return web.Response(status=404, body=b'{"error": "not here"}', content_type="application/json")
    return handle


async def serve(port: int) -> None:
    counts = {"metadata": 0, "files": 0}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    server = web.Server(make_handler(counts), access_log=None)
    await asyncio.get_running_loop().create_server(server, sock=sock, backlog=1024)
    print(f"standin: http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
