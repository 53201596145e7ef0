"""A lean Clowder stand-in for benchmarks: the per-file routes only, served as fast as Python can.

The full stand-in (devtools.clowder_standin) is a thread-per-connection server built for faults
and inspection; at a few hundred files/s it becomes the bottleneck and hides the agent's own
cost. This one is a single asyncio event loop (uvloop when installed) with a hand-written
HTTP/1.1 keep-alive parser, no logging, and responses written in one segment (no Nagle stall).

It answers exactly what the wordcount extractor and pyclowder 3.0.8 call per file (those routes of
hpc_common.routes' table, which every Clowder in this tree serves from), with the same bodies as
the full stand-in:

- v1: ``GET api/files/{id}/metadata`` (file info), ``GET api/files/{id}`` (blob),
  ``POST api/files/{id}/metadata.jsonld``;
- v2: ``GET api/v2/files/{id}/summary``, ``GET api/v2/files/{id}/metadata`` (what pyclowder's v2
  download_info reads: the metadata list), ``GET api/v2/files/{id}``, ``POST api/v2/files/{id}/metadata``.

Keys as in Clowder (v1 ``?key=`` or ``X-API-Key``; v2 ``X-API-KEY``), 401 without one, 404 for
unknown files or routes. The control routes the benchmarks use match the full stand-in's:
``GET /_standin/ping``, ``POST /_standin/files`` ``{name, content_b64 | content}`` (or
``{"count": n, ...}`` -> ``{"ids": [...]}`` to add n copies at once), ``GET /_standin/records?kind=``,
``GET /_standin/counts``, ``POST /_standin/clear``. Run ``python -m devtools.bench_clowder --port 0``;
it prints ``standin: URL`` first, like the full stand-in.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

from hpc_common.clowder_serving import error_body
from hpc_common.routes import CLOWDER, CLOWDER_ROUTES, api_version

_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024
# The per-file calls, from hpc_common.routes' table (v1 metadata is listed on a route no per-file call reads).
_SERVED = frozenset(r for r in CLOWDER_ROUTES if r.action in ("file_blob", "file_info", "file_md_post")
                    or (r.action, r.api) == ("file_md_get", "v2"))
_PHRASES = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large"}


class BenchClowder:
    """Files, metadata records and request counts of one benchmark stand-in (one event loop)."""

    def __init__(self, keys: Optional[set] = None) -> None:
        self.keys = frozenset(keys if keys is not None else {"secret"})
        self.files: Dict[str, Dict[str, Any]] = {}
        self.records: List[Dict[str, Any]] = []
        self.counts: Dict[str, int] = {}
        self.connections = 0
        self.url = ""

    # -- one request -------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Dict[str, str], body: bytes) -> Tuple[int, bytes, str, str]:
        """(status, body, content type, extra header lines) for one request."""
        path, _, query = target.partition("?")
        path = path.lstrip("/")
        if path.startswith("_standin/"):
            return self._control(method, path, query, body)
        found = CLOWDER.find(method, path)
        route = found[0] if found is not None and found[0] in _SERVED else None
        counted = route.counted if route is not None else method + " <unknown>"
        self.counts[counted] = self.counts.get(counted, 0) + 1
        if route is None:
            return self._error(404, "no such route: %s /%s" % (method, path), api_version(path))
        api = route.api
        key = headers.get("x-api-key")
        if key is None and api == "v1" and "key=" in query:
            key = (parse_qs(query).get("key") or [None])[0]
        if key not in self.keys:
            return self._error(401, "missing or invalid API key", api)
        fid = found[1]["file"]  # type: ignore[index]
        f = self.files.get(fid)
        if f is None:
            return self._error(404, "file %s not found" % fid, api)
        if route.action == "file_info":
            return 200, json.dumps(self._info(f, api)).encode(), "application/json", ""
        if route.action == "file_md_get":  # v2: the metadata list (pyclowder's download_info)
            return 200, json.dumps(f["metadata"]).encode(), "application/json", ""
        if route.action == "file_blob":
            return 200, f["content"], f["content_type"], f["disposition"]
        try:
            posted = json.loads(body) if body else None
        except ValueError:
            return self._error(400, "invalid JSON", api)
        self.records.append({"kind": "metadata", "api": api, "file_id": fid, "dataset_id": f["dataset_id"],
                             "body": posted, "time": time.time()})
        view = {"id": uuid.uuid4().hex, "resource": {"collection": "files", "resource_id": fid}}
        view.update(posted if isinstance(posted, dict) else {"content": posted})
        if api == "v2":
            f["metadata"].append(view)  # v1 lists metadata on another route, which no per-file path reads
        answer = view if api == "v2" else "Metadata successfully added to db"
        return 200, json.dumps(answer).encode(), "application/json", ""

    @staticmethod
    def _info(f: Dict[str, Any], api: str) -> Dict[str, Any]:
        if api == "v2":
            return {"id": f["id"], "name": f["name"], "bytes": len(f["content"]), "dataset_id": f["dataset_id"],
                    "content_type": {"content_type": f["content_type"], "main_type": f["content_type"].split("/")[0]},
                    "version_num": 1, "storage_type": "minio", "storage_path": None}
        return {"id": f["id"], "filename": f["name"], "filedescription": "", "content-type": f["content_type"],
                "size": str(len(f["content"])), "status": "PROCESSED"}

    @staticmethod
    def _error(status: int, message: str, api: str = "v1") -> Tuple[int, bytes, str, str]:
        return status, json.dumps(error_body(api, message)).encode(), "application/json", ""

    def add_file(self, name: str, content: bytes, dataset_id: Optional[str] = None) -> str:
        fid = uuid.uuid4().hex[:24]
        ctype = "text/plain" if name.endswith(".txt") else "application/octet-stream"
        self.files[fid] = {"id": fid, "name": name, "content": content, "content_type": ctype,
                           "dataset_id": dataset_id, "metadata": [],
                           "disposition": "Content-Disposition: attachment; filename=\"%s\"\r\n" % name.replace('"', "")}
        return fid

    def _control(self, method: str, path: str, query: str, body: bytes) -> Tuple[int, bytes, str, str]:
        route = "%s %s" % (method, path.rstrip("/"))
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            return self._error(400, "invalid JSON")
        if route == "GET _standin/ping":
            out: Any = {"ok": True, "url": self.url}
        elif route == "POST _standin/files":
            content = base64.b64decode(data["content_b64"]) if "content_b64" in data \
                else str(data.get("content", "")).encode()
            name = data.get("name") or "file.bin"
            if "count" in data:
                out = {"ids": [self.add_file(name, content, data.get("dataset_id")) for _ in range(int(data["count"]))]}
            else:
                out = {"id": self.add_file(name, content, data.get("dataset_id"))}
        elif route == "GET _standin/records":
            kind = (parse_qs(query).get("kind") or [None])[0]
            out = [r for r in self.records if not kind or r["kind"] == kind]
        elif route == "GET _standin/counts":
            out = {"requests": dict(self.counts), "connections": self.connections}
        elif route == "POST _standin/clear":
            self.records.clear()
            self.counts.clear()
            self.connections = 0
            out = {"ok": True}
        else:
            return self._error(404, "no such control route: %s /%s" % (method, path))
        return 200, json.dumps(out).encode(), "application/json", ""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests may arrive pipelined."""

    def __init__(self, app: BenchClowder) -> None:
        self.app = app
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.app.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._fail(413)
                break
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._fail(400)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body, used = self._chunked(end + 4)
                if body is None:
                    break
            else:
                length = int(headers.get("content-length") or 0)
                if length > _MAX_BODY:
                    self._fail(413)
                    return
                if len(self.buf) < end + 4 + length:
                    break
                body, used = self.buf[end + 4:end + 4 + length], end + 4 + length
            self.buf = self.buf[used:]
            status, payload, ctype, extra = self.app.handle(method, unquote(target), headers, body)
            close = headers.get("connection", "").lower() == "close"
            out.append(("HTTP/1.1 %d %s\r\nServer: clowder-bench\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
                        % (status, _PHRASES.get(status, "Status"), ctype, len(payload), extra,
                           "Connection: close\r\n" if close else "")).encode("latin-1") + payload)
            if close:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))  # one write for every answer ready now

    def _chunked(self, start: int) -> Tuple[Optional[bytes], int]:
        chunks, pos = [], start
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None, 0
            size = int(self.buf[pos:eol].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n", eol + 2)
                if trailer_end < 0:
                    return None, 0
                return b"".join(chunks), trailer_end + 2
            if len(self.buf) < eol + 2 + size + 2:
                return None, 0
            chunks.append(self.buf[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2

    def _fail(self, status: int) -> None:
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                             % (status, _PHRASES[status].encode()))
        self.transport.close()


async def serve(host: str, port: int, keys: Optional[set], ready: Any = None) -> None:
    """Serve until cancelled; ready(url) is called once the socket is bound."""
    app = BenchClowder(keys)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(app), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()
    app.url = "http://%s:%d/" % (bound[0], bound[1])
    if ready:
        ready(app.url)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Optional[List[str]] = None) -> int:
    """Run in the foreground until SIGTERM/SIGINT, printing ``standin: URL`` first."""
    parser = argparse.ArgumentParser(prog="python -m devtools.bench_clowder", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    parser.add_argument("--key", action="append", dest="keys", metavar="K", help="accepted API key (default: secret)")
    args = parser.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run

    def ready(url: str) -> None:
        sys.stdout.write("standin: %s\n" % url)
        sys.stdout.flush()

    runner(serve(args.host, args.port, set(args.keys) if args.keys else None, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
