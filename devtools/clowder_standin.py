"""A Clowder API stand-in for tests, benchmarks and the demo (a development tool, not the product).

:class:`ClowderStandin` is a small threaded HTTP server (standard library only) that answers the
parts of the Clowder v1 (``api/...``) and v2 (``api/v2/...``) REST APIs that pyclowder 3.0.8's
helpers call: file blob, info and metadata; JSON-LD metadata; previews, visualizations and
thumbnails; tags; uploads to datasets; dataset info, file lists, metadata, tags, zip download,
creation and deletion: the routes of hpc_common.routes' table, each answered by the handler named
``_<action>``. Every write is recorded so tests can inspect what an extractor sent, and
faults (error statuses, dropped connections, latency) can be injected per route.

Authentication mirrors Clowder: v1 takes ``?key=`` or an ``X-API-Key`` header, v2 the
``X-API-KEY`` header. Keys are never logged or echoed back.

A control API under ``/_standin/`` lets other processes drive a stand-in that runs as its own
process (``python -m devtools.clowder_standin``). **The control API needs no key**: the stand-in is
a test tool and binds to loopback by default; do not expose it on a shared network.

Control routes (JSON in, JSON out):

- ``GET  /_standin/ping`` -> ``{"ok": true, "url": ...}``
- ``POST /_standin/files`` ``{name, content_b64 | content | path, dataset_id?, id?}`` -> ``{"id"}``
- ``GET  /_standin/files`` -> list of ``{id, name, size, dataset_id, path}``
- ``POST /_standin/datasets`` ``{name?, description?, id?}`` -> ``{"id"}``
- ``GET  /_standin/records?kind=&file_id=&dataset_id=`` -> list of records
- ``GET  /_standin/counts`` -> ``{"requests": {"GET api/files/{id}": n, ...}, "connections": n}``
- ``POST /_standin/faults`` ``{"fail": n, "status": 503, "route": s}``, ``{"drop": n, "route": s,
  "after_processing": false}``, ``{"delay": seconds, "route": s}`` or ``{"reset": true}``
- ``POST /_standin/clear`` -> forgets records, request counts and the connection count
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import mimetypes
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote, urlsplit

from hpc_common.clowder_serving import ClowderError, ClowderRequest, error_body, lookup
from hpc_common.routes import CLOWDER, api_version

__all__ = ["ClowderStandin", "main"]

_CHUNK = 1 << 20  # blob streaming block
_SMALL = 64 * 1024  # responses up to this size go out in one write with their headers


class _Blob:
    """A handler result that is a file's bytes (streamed, and partially sent on a drop fault)."""

    def __init__(self, name: str, content_type: str, content: Optional[bytes] = None,
                 path: Optional[str] = None) -> None:
        self.name, self.content_type, self.content, self.path = name, content_type, content, path


if not mimetypes.inited:
    mimetypes.init()  # once, at import: lazy init from handler threads would race


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _java_date(t: float) -> str:
    # Clowder v1 renders dates with java.util.Date.toString().
    return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(t))


def _iso_date(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06d" % int((t % 1) * 1e6)


def _digest(data: bytes) -> Dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


_AUTHOR = {"id": "0" * 24, "email": "standin@example.org", "first_name": "Clowder", "last_name": "Standin"}

_BLOB_ACTIONS = ("file_blob", "ds_zip")  # a drop fault sends these half their body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    request_queue_size = 1024  # benchmarks open many connections at once

    def __init__(self, addr, handler, standin: "ClowderStandin") -> None:
        self.standin = standin
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(): a reverse DNS lookup that can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        # Clients that hang up (or drop faults) are normal here; stay quiet.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "clowder-standin"
    timeout = 300  # an idle keep-alive connection is closed after this many seconds

    def setup(self) -> None:
        super().setup()
        self.server.standin._conn_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._conn_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # no per-request logging (and request lines may carry ?key=)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- request plumbing -------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              extra: Tuple[str, ...] = ()) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Status"
        lines = ["HTTP/1.1 %d %s" % (status, phrase), "Server: clowder-standin",
                 "Date: " + self.date_time_string(), "Content-Type: " + content_type,
                 "Content-Length: %d" % len(body), *extra]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) <= _SMALL:
            self.wfile.write(head + body)  # one segment: no Nagle/delayed-ACK stall
        else:
            self.wfile.write(head)
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"))

    def _send_error(self, status: int, message: str, api: str = "v1") -> None:
        self._send_json(status, error_body(api, message))

    def _send_blob(self, blob: _Blob, partial: bool) -> None:
        name = blob.name.replace('"', "")
        extra = ("Content-Disposition: attachment; filename*=UTF-8''" + quote(name, safe=""),)
        if blob.content is not None:
            data = blob.content
            if partial:
                self._send_partial(len(data), blob.content_type, extra, [data[: len(data) // 2]])
            else:
                self._send(200, data, blob.content_type, extra)
            return
        with open(blob.path, "rb") as fh:  # type: ignore[arg-type]
            size = os.fstat(fh.fileno()).st_size
            if partial:
                self._send_partial(size, blob.content_type, extra, [fh.read(size // 2)])
                return
            if size <= _SMALL:
                self._send(200, fh.read(), blob.content_type, extra)
                return
            self._send_head(200, size, blob.content_type, extra)
            while True:
                block = fh.read(_CHUNK)
                if not block:
                    break
                self.wfile.write(block)

    def _send_head(self, status: int, length: int, content_type: str, extra: Tuple[str, ...]) -> None:
        lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase), "Server: clowder-standin",
                 "Date: " + self.date_time_string(), "Content-Type: " + content_type,
                 "Content-Length: %d" % length, *extra]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_partial(self, length: int, content_type: str, extra: Tuple[str, ...], parts: List[bytes]) -> None:
        # Announce the full length, send less, then hang up: the client must see a short read.
        if length == 0:  # nothing to cut short
            self._hang_up()
            return
        self._send_head(200, length, content_type, extra)
        for part in parts:
            self.wfile.write(part)
        self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self) -> None:
        standin: ClowderStandin = self.server.standin
        split = urlsplit(self.path)
        path = split.path.lstrip("/")
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send_error(400, "unreadable request body")
            return
        query = parse_qs(split.query, keep_blank_values=True)
        if path == "_standin" or path.startswith("_standin/"):
            req = ClowderRequest(self.command, path, query, self.headers, body, {}, "control")
            try:
                self._send_json(200, standin._control(req))
            except ClowderError as exc:
                self._send_error(exc.status, exc.message)
            return

        found = CLOWDER.find(self.command, path)
        route_key = found[0].counted if found else "%s <unknown>" % self.command
        action = found[0].action if found else ""
        api = api_version(path)
        standin._count(route_key)
        fault = standin._before_request(path)
        if fault and fault[0] == "fail":
            self._send_error(fault[1], "injected fault", api)
            return
        if fault and fault[0] == "drop" and not fault[1] and action not in _BLOB_ACTIONS:
            self._hang_up()
            return
        if found is None:
            self._send_error(404, "no such route: %s %s" % (self.command, split.path), api)
            return
        req = ClowderRequest(self.command, path, query, self.headers, body, found[1], api)
        if not standin._authorized(req):
            self._send_error(401, "missing or invalid API key", api)
            return
        try:
            result = getattr(standin, "_" + action)(req)
        except ClowderError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - a stand-in must answer, not die
            result = ClowderError(500, "stand-in error: %s: %s" % (type(exc).__name__, exc))
        if isinstance(result, _Blob):
            self._send_blob(result, partial=bool(fault))
        elif fault:
            self._hang_up()  # processed, but the response is lost
        elif isinstance(result, ClowderError):
            self._send_error(result.status, result.message, api)
        else:
            self._send_json(200, result)


class ClowderStandin:
    """An in-process stand-in for a Clowder server (v1 and v2 APIs) with recording and faults.

    Use as ``with ClowderStandin() as cs: ...`` or call :meth:`start` / :meth:`stop`.
    ``cs.url`` is the base URL to give pyclowder (``host`` in messages), with a trailing slash.
    All public methods are thread-safe.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keys: Optional[set] = None) -> None:
        self._bind = (host, port)
        self._keys = frozenset(keys if keys is not None else {"secret"})
        self._lock = threading.RLock()
        self._files: Dict[str, Dict[str, Any]] = {}
        self._datasets: Dict[str, Dict[str, Any]] = {}
        self._previews: Dict[str, Dict[str, Any]] = {}  # preview / thumbnail / vis config uploads
        self._records: List[Dict[str, Any]] = []
        self._file_md: Dict[str, List[Dict[str, Any]]] = {}
        self._ds_md: Dict[str, List[Dict[str, Any]]] = {}
        self._counts: Dict[str, int] = {}
        self._connections = 0
        self._open_socks: set = set()
        self._faults: List[Dict[str, Any]] = []
        self._delays: Dict[Optional[str], float] = {}
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "ClowderStandin":
        """Bind and serve in a background thread; returns self. Port 0 picks a free port."""
        if self._server is None:
            self._server = _Server(self._bind, _Handler, self)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="clowder-standin", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            socks = list(self._open_socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ClowderStandin":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("stand-in not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL with a trailing slash, e.g. ``http://127.0.0.1:8000/``."""
        host = self._bind[0]
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d/" % (host, self.port)

    # -- registry -------------------------------------------------------------------------------
    def add_file(self, file_id: Optional[str] = None, name: str = "file.bin", content: bytes = b"",
                 dataset_id: Optional[str] = None, path: Optional[str] = None) -> str:
        """Register a file and return its id (a uuid hex if not given; an existing id is replaced).

        With ``path`` the bytes are read from that on-disk file at request time and the path is
        reported as ``filepath`` in the v1 file info (pyclowder then uses the file in place).
        A ``dataset_id`` that does not exist yet is created.
        """
        if path is not None:
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
        file_id = file_id or uuid.uuid4().hex
        with self._lock:
            if dataset_id is not None and dataset_id not in self._datasets:
                self.add_dataset(dataset_id, name=dataset_id)
            self._files[file_id] = {"id": file_id, "name": name, "content": None if path else bytes(content),
                                    "path": path, "dataset_id": dataset_id, "created": time.time(),
                                    "content_type": _content_type(name), "thumbnail_id": None}
        return file_id

    def add_dataset(self, dataset_id: Optional[str] = None, name: str = "dataset", description: str = "") -> str:
        """Register a dataset and return its id (a uuid hex if not given)."""
        dataset_id = dataset_id or uuid.uuid4().hex
        with self._lock:
            self._datasets[dataset_id] = {"id": dataset_id, "name": name, "description": description,
                                          "created": time.time(), "thumbnail_id": None}
        return dataset_id

    def file_content(self, file_id: str) -> bytes:
        """The bytes of a registered (or uploaded) file."""
        with self._lock:
            f = self._files[file_id]
        if f["path"]:
            with open(f["path"], "rb") as fh:
                return fh.read()
        return f["content"]

    def files(self) -> List[Dict[str, Any]]:
        """All files: ``{id, name, size, dataset_id, path}``."""
        with self._lock:
            return [{"id": f["id"], "name": f["name"], "size": self._size(f), "dataset_id": f["dataset_id"],
                     "path": f["path"]} for f in self._files.values()]

    # -- recording ------------------------------------------------------------------------------
    def records(self, kind: Optional[str] = None, file_id: Optional[str] = None,
                dataset_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Recorded writes, oldest first, optionally filtered.

        Each record: ``{"kind", "api": "v1"|"v2", "file_id", "dataset_id", "body", "time"}`` plus
        ``preview_id``/``thumbnail_id`` where relevant. Kinds: metadata, dataset_metadata,
        dataset_metadata_delete, tags, dataset_tags, preview_upload, preview, preview_metadata,
        visualization_config, thumbnail_upload, thumbnail, dataset_thumbnail, upload,
        dataset_create, extraction, dataset_extraction, delete, dataset_delete. ``body`` is the
        parsed JSON, or ``{filename, size, sha256, content_type}`` for uploaded bytes.
        """
        with self._lock:
            return [dict(r) for r in self._records
                    if (kind is None or r["kind"] == kind) and (file_id is None or r["file_id"] == file_id)
                    and (dataset_id is None or r["dataset_id"] == dataset_id)]

    def metadata_for(self, file_id: str) -> List[Any]:
        """The metadata bodies posted for a file (v1 JSON-LD and v2 alike), oldest first."""
        return [r["body"] for r in self.records("metadata", file_id=file_id)]

    def request_counts(self) -> Dict[str, int]:
        """Requests seen per route, e.g. ``{"GET api/files/{id}": 3}`` (control API excluded)."""
        with self._lock:
            return dict(self._counts)

    def connection_count(self) -> int:
        """TCP connections accepted since start (or the last :meth:`clear`)."""
        with self._lock:
            return self._connections

    def clear(self) -> None:
        """Forget records, metadata, request counts and the connection count (files stay)."""
        with self._lock:
            self._records.clear()
            self._file_md.clear()
            self._ds_md.clear()
            self._counts.clear()
            self._connections = 0

    # -- faults ---------------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503, route_contains: Optional[str] = None) -> None:
        """Answer the next ``n`` API requests whose path contains ``route_contains`` with ``status``."""
        with self._lock:
            self._faults.append({"kind": "fail", "n": int(n), "status": int(status), "route": route_contains})

    def drop_next(self, n: int = 1, route_contains: Optional[str] = None, after_processing: bool = False) -> None:
        """Break the next ``n`` matching requests' connections.

        Blob downloads get their headers (full Content-Length) and half the body, then the
        connection closes. Other routes are closed without a response: before the request is
        processed, or with ``after_processing=True`` after it was (the write is recorded, the
        answer is lost).
        """
        with self._lock:
            self._faults.append({"kind": "drop", "n": int(n), "route": route_contains, "after": bool(after_processing)})

    def set_delay(self, seconds: float, route_contains: Optional[str] = None) -> None:
        """Add ``seconds`` of latency to matching API requests (0 removes that delay)."""
        with self._lock:
            if seconds > 0:
                self._delays[route_contains] = float(seconds)
            else:
                self._delays.pop(route_contains, None)

    def reset_faults(self) -> None:
        """Remove all pending failures, drops and delays."""
        with self._lock:
            self._faults.clear()
            self._delays.clear()

    # -- internals used by the handler ----------------------------------------------------------
    def _conn_opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            self._open_socks.add(sock)

    def _conn_closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open_socks.discard(sock)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def _before_request(self, path: str) -> Optional[Tuple[str, Any]]:
        """Apply latency and consume one matching fault: ("fail", status) / ("drop", after) / None."""
        with self._lock:
            delay = max([s for r, s in self._delays.items() if r is None or r in path], default=0.0)
            fault = None
            for rule in self._faults:
                if rule["route"] is None or rule["route"] in path:
                    rule["n"] -= 1
                    fault = ("fail", rule["status"]) if rule["kind"] == "fail" else ("drop", rule["after"])
                    break
            self._faults = [r for r in self._faults if r["n"] > 0]
        if delay:
            time.sleep(delay)
        return fault

    def _authorized(self, req: ClowderRequest) -> bool:
        key = req.api_key()
        return key is not None and key in self._keys

    def _record(self, kind: str, req: ClowderRequest, body: Any, file_id: Optional[str] = None,
                dataset_id: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        rec = {"kind": kind, "api": req.api, "file_id": file_id, "dataset_id": dataset_id, "body": body,
               "time": time.time(), **extra}
        with self._lock:
            self._records.append(rec)
        return rec

    def _file(self, req: ClowderRequest) -> Dict[str, Any]:
        return lookup(self._files, req.ids["file"], "file", self._lock)

    def _dataset(self, req: ClowderRequest) -> Dict[str, Any]:
        return lookup(self._datasets, req.ids["dataset"], "dataset", self._lock)

    @staticmethod
    def _size(f: Dict[str, Any]) -> int:
        if f["path"]:
            try:
                return os.path.getsize(f["path"])
            except OSError:
                return 0
        return len(f["content"])

    def _info_v1(self, f: Dict[str, Any]) -> Dict[str, Any]:
        info = {"id": f["id"], "filename": f["name"], "filedescription": "", "content-type": f["content_type"],
                "date-created": _java_date(f["created"]), "size": str(self._size(f)),
                "thumbnail": f["thumbnail_id"], "authorId": _AUTHOR["id"], "status": "PROCESSED"}
        if f["path"]:
            info["filepath"] = f["path"]
        return info

    def _info_v2(self, f: Dict[str, Any]) -> Dict[str, Any]:
        ctype = f["content_type"]
        return {"id": f["id"], "name": f["name"], "creator": _AUTHOR, "created": _iso_date(f["created"]),
                "version_id": "1", "version_num": 1, "dataset_id": f["dataset_id"], "folder_id": None,
                "views": 0, "downloads": 0, "bytes": self._size(f),
                "content_type": {"content_type": ctype, "main_type": ctype.split("/")[0]},
                "thumbnail_id": f["thumbnail_id"], "storage_type": "local" if f["path"] else "minio",
                "storage_path": f["path"]}

    def _ds_view(self, d: Dict[str, Any], api: str) -> Dict[str, Any]:
        if api == "v2":
            return {"id": d["id"], "name": d["name"], "description": d["description"], "creator": _AUTHOR,
                    "created": _iso_date(d["created"]), "modified": _iso_date(d["created"]),
                    "status": "PRIVATE", "views": 0, "downloads": 0, "thumbnail_id": d["thumbnail_id"]}
        return {"id": d["id"], "name": d["name"], "description": d["description"],
                "created": _java_date(d["created"]), "thumbnail": d["thumbnail_id"], "authorId": _AUTHOR["id"],
                "spaces": [], "resource_type": "dataset"}

    def _ds_file_list(self, dataset_id: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [f for f in self._files.values() if f["dataset_id"] == dataset_id]

    def _store_upload(self, req: ClowderRequest, kind: str, **extra: Any) -> Tuple[str, Dict[str, Any]]:
        name, ctype, data = req.upload()
        upload_id = uuid.uuid4().hex
        info = {"filename": name, **_digest(data), "content_type": ctype or _content_type(name)}
        with self._lock:
            self._previews[upload_id] = dict(info, file_id=None)
        self._record(kind, req, info, preview_id=upload_id, **extra)
        return upload_id, info

    def _upload_info(self, upload_id: str) -> Dict[str, Any]:
        return lookup(self._previews, upload_id, "preview/thumbnail", self._lock)

    # metadata views: the posted body plus what the server adds
    def _md_view(self, body: Any, collection: str, rid: str, req: ClowderRequest) -> Dict[str, Any]:
        view = dict(body) if isinstance(body, dict) else {"content": body}
        now = time.time()
        if req.api == "v2":
            view.update(id=uuid.uuid4().hex, resource={"collection": collection, "resource_id": rid},
                        created=_iso_date(now))
        else:
            view.setdefault("attached_to", {"resource_type": "cat:" + collection.rstrip("s"),
                                            "url": "%s%s/%s" % (self.url, collection, rid)})
            view.setdefault("created_at", _java_date(now))
        return view

    @staticmethod
    def _md_filter(views: List[Dict[str, Any]], extractor: Optional[str]) -> List[Dict[str, Any]]:
        if not extractor:
            return views
        out = []
        for v in views:
            agent = v.get("agent") or v.get("listener") or {}
            ident = str(agent.get("extractor_id") or "") if isinstance(agent, dict) else ""
            if isinstance(agent, dict) and (agent.get("name") == extractor or ident.rstrip("/").endswith("/" + extractor)):
                out.append(v)
        return out

    # -- route handlers -------------------------------------------------------------------------
    def _file_blob(self, req: ClowderRequest) -> _Blob:
        f = self._file(req)
        return _Blob(f["name"], f["content_type"], content=f["content"], path=f["path"])

    def _file_info(self, req: ClowderRequest) -> Dict[str, Any]:
        f = self._file(req)
        return self._info_v2(f) if req.api == "v2" else self._info_v1(f)

    def _file_delete(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        with self._lock:
            self._files.pop(f["id"], None)
        self._record("delete", req, None, file_id=f["id"], dataset_id=f["dataset_id"])
        return {"status": "success"} if req.api == "v1" else {"deleted": f["id"]}

    def _file_md_get(self, req: ClowderRequest) -> List[Dict[str, Any]]:
        f = self._file(req)
        with self._lock:
            views = list(self._file_md.get(f["id"], []))
        return self._md_filter(views, req.arg("extractor"))

    def _file_md_post(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        body = req.json()
        view = self._md_view(body, "files", f["id"], req)
        with self._lock:
            self._file_md.setdefault(f["id"], []).append(view)
        self._record("metadata", req, body, file_id=f["id"], dataset_id=f["dataset_id"])
        return view if req.api == "v2" else "Metadata successfully added to db"

    def _file_tags(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        self._record("tags", req, req.json(), file_id=f["id"], dataset_id=f["dataset_id"])
        return {"status": "success"}

    def _file_extraction(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        self._record("extraction", req, req.json(), file_id=f["id"], dataset_id=f["dataset_id"])
        return {"status": "OK", "job_id": uuid.uuid4().hex}

    def _preview_upload(self, req: ClowderRequest) -> Any:
        return {"id": self._store_upload(req, "preview_upload")[0]}

    def _preview_link(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        info = self._upload_info(req.ids["preview"])
        with self._lock:
            info["file_id"] = f["id"]
        body = {k: v for k, v in info.items() if k != "file_id"}
        self._record("preview", req, body, file_id=f["id"], dataset_id=f["dataset_id"], preview_id=req.ids["preview"])
        return {}

    def _preview_metadata(self, req: ClowderRequest) -> Any:
        info = self._upload_info(req.ids["preview"])
        self._record("preview_metadata", req, req.json(), file_id=info.get("file_id"), preview_id=req.ids["preview"])
        return {"status": "success"}

    def _thumb_upload(self, req: ClowderRequest) -> Any:
        return {"id": self._store_upload(req, "thumbnail_upload")[0]}

    def _file_thumb_link(self, req: ClowderRequest) -> Any:
        f = self._file(req)
        info = self._upload_info(req.ids["thumbnail"])
        with self._lock:
            f["thumbnail_id"] = req.ids["thumbnail"]
        body = {k: v for k, v in info.items() if k != "file_id"}
        self._record("thumbnail", req, body, file_id=f["id"], dataset_id=f["dataset_id"], thumbnail_id=req.ids["thumbnail"])
        return dict(self._info_v2(f), thumbnail_id=req.ids["thumbnail"]) if req.api == "v2" else {}

    def _ds_thumb_link(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        info = self._upload_info(req.ids["thumbnail"])
        with self._lock:
            d["thumbnail_id"] = req.ids["thumbnail"]
        body = {k: v for k, v in info.items() if k != "file_id"}
        self._record("dataset_thumbnail", req, body, dataset_id=d["id"], thumbnail_id=req.ids["thumbnail"])
        return self._ds_view(d, "v2")

    def _vis_config(self, req: ClowderRequest) -> Any:
        body = req.json()
        resource = body.get("resource") or {} if isinstance(body, dict) else {}
        rid, coll = resource.get("resource_id"), resource.get("collection")
        config_id = uuid.uuid4().hex
        with self._lock:
            self._previews[config_id] = {"config": body}
        self._record("visualization_config", req, body, file_id=rid if coll == "files" else None,
                     dataset_id=rid if coll == "datasets" else None, preview_id=config_id)
        return dict(body, id=config_id) if isinstance(body, dict) else {"id": config_id}

    def _vis_upload(self, req: ClowderRequest) -> Any:
        config_id = req.arg("config")
        config = self._upload_info(config_id or "").get("config") or {}
        resource = config.get("resource") or {}
        rid, coll = resource.get("resource_id"), resource.get("collection")
        vis_id, info = self._store_upload(req, "preview_upload")
        body = dict(info, name=req.arg("name"), description=req.arg("description"), config=config_id)
        self._record("preview", req, body, file_id=rid if coll == "files" else None,
                     dataset_id=rid if coll == "datasets" else None, preview_id=vis_id)
        return {"id": vis_id, "name": req.arg("name"), "description": req.arg("description"),
                "visualization_config_id": config_id, "bytes": info["size"], "content_type": info["content_type"]}

    def _ds_create(self, req: ClowderRequest) -> Any:
        body = req.json()
        if not isinstance(body, dict) or "name" not in body:
            raise ClowderError(400, "dataset name required")
        did = self.add_dataset(name=str(body["name"]), description=str(body.get("description") or ""))
        self._record("dataset_create", req, body, dataset_id=did)
        with self._lock:
            return self._ds_view(self._datasets[did], req.api) if req.api == "v2" else {"id": did}

    def _ds_info(self, req: ClowderRequest) -> Any:
        return self._ds_view(self._dataset(req), req.api)

    def _ds_delete(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        with self._lock:
            self._datasets.pop(d["id"], None)
            for f in [f for f in self._files.values() if f["dataset_id"] == d["id"]]:
                self._files.pop(f["id"], None)
        self._record("dataset_delete", req, None, dataset_id=d["id"])
        return {"status": "success"} if req.api == "v1" else {"deleted": d["id"]}

    def _ds_files(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        files = self._ds_file_list(d["id"])
        if req.api == "v1":
            return [self._info_v1(f) for f in files]
        # Clowder v2 pages this list (skip=0, limit=10 by default), newest first.
        try:
            skip, limit = int(req.arg("skip") or 0), int(req.arg("limit") or 10)
        except ValueError:
            raise ClowderError(422, "skip and limit must be integers") from None
        files = sorted(files, key=lambda f: f["created"], reverse=True)
        return {"metadata": {"total_count": len(files), "skip": skip, "limit": limit},
                "data": [self._info_v2(f) for f in files[skip: skip + limit]]}

    def _ds_upload(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        name, ctype, data = req.upload()
        fid = self.add_file(name=name, content=data, dataset_id=d["id"])
        self._record("upload", req, {"filename": name, **_digest(data)}, file_id=fid, dataset_id=d["id"])
        if req.api == "v2":
            with self._lock:
                return self._info_v2(self._files[fid])
        return {"id": fid}

    def _ds_md_get(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        with self._lock:
            views = list(self._ds_md.get(d["id"], []))
        return self._md_filter(views, req.arg("extractor"))

    def _ds_md_post(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        body = req.json()
        view = self._md_view(body, "datasets", d["id"], req)
        with self._lock:
            self._ds_md.setdefault(d["id"], []).append(view)
        self._record("dataset_metadata", req, body, dataset_id=d["id"])
        return view if req.api == "v2" else "Metadata successfully added to db"

    def _ds_md_delete(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        extractor = req.arg("extractor")
        with self._lock:
            views = self._ds_md.get(d["id"], [])
            gone = self._md_filter(views, extractor) if extractor else list(views)
            self._ds_md[d["id"]] = [v for v in views if not any(v is g for g in gone)]
        self._record("dataset_metadata_delete", req, {"extractor": extractor, "removed": len(gone)}, dataset_id=d["id"])
        return {"status": "success"}

    def _ds_tags(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        self._record("dataset_tags", req, req.json(), dataset_id=d["id"])
        return {"status": "success"}

    def _ds_zip(self, req: ClowderRequest) -> _Blob:
        d = self._dataset(req)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in self._ds_file_list(d["id"]):
                zf.writestr("%s/data/%s" % (d["name"], f["name"]), self.file_content(f["id"]))
        return _Blob(d["name"] + ".zip", "application/zip", content=buf.getvalue())

    def _ds_extraction(self, req: ClowderRequest) -> Any:
        d = self._dataset(req)
        self._record("dataset_extraction", req, req.json(), dataset_id=d["id"])
        return {"status": "OK", "job_id": uuid.uuid4().hex}

    # -- control API ----------------------------------------------------------------------------
    def _control(self, req: ClowderRequest) -> Any:
        route = "%s %s" % (req.method, req.path.rstrip("/"))
        if route == "GET _standin/ping":
            return {"ok": True, "url": self.url}
        if route == "GET _standin/files":
            return self.files()
        if route == "POST _standin/files":
            body = self._control_body(req)
            content = base64.b64decode(body["content_b64"]) if "content_b64" in body \
                else str(body.get("content", "")).encode("utf-8")
            path = body.get("path")
            name = body.get("name") or (os.path.basename(path) if path else "file.bin")
            try:
                fid = self.add_file(body.get("id"), name=name, content=content,
                                    dataset_id=body.get("dataset_id"), path=path)
            except FileNotFoundError:
                raise ClowderError(400, "no such file: %s" % path) from None
            return {"id": fid}
        if route == "POST _standin/datasets":
            body = self._control_body(req)
            return {"id": self.add_dataset(body.get("id"), name=body.get("name", "dataset"),
                                           description=body.get("description", ""))}
        if route == "GET _standin/records":
            return self.records(req.arg("kind") or None, req.arg("file_id") or None, req.arg("dataset_id") or None)
        if route == "GET _standin/counts":
            return {"requests": self.request_counts(), "connections": self.connection_count()}
        if route == "POST _standin/faults":
            body = self._control_body(req)
            try:
                if body.get("reset"):
                    self.reset_faults()
                if "fail" in body:
                    self.fail_next(int(body["fail"]), int(body.get("status", 503)), body.get("route"))
                if "drop" in body:
                    self.drop_next(int(body["drop"]), body.get("route"), bool(body.get("after_processing")))
                if "delay" in body:
                    self.set_delay(float(body["delay"]), body.get("route"))
            except (TypeError, ValueError) as exc:
                raise ClowderError(400, "bad fault spec: %s" % exc) from None
            return {"ok": True}
        if route == "POST _standin/clear":
            self.clear()
            return {"ok": True}
        raise ClowderError(404, "no such control route: %s /%s" % (req.method, req.path))

    @staticmethod
    def _control_body(req: ClowderRequest) -> Dict[str, Any]:
        body = req.json() if req.body.strip() else {}
        if not isinstance(body, dict):
            raise ClowderError(400, "JSON object expected")
        return body


def main(argv: Optional[List[str]] = None) -> int:
    """Run a stand-in in the foreground until SIGTERM/SIGINT.

    Prints ``standin: URL`` first, then with ``--files DIR`` one ``name id`` line per regular file
    in DIR (sorted; the id is the last word), then ``dataset id`` if ``--dataset NAME`` was given.
    """
    parser = argparse.ArgumentParser(prog="python -m devtools.clowder_standin", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    parser.add_argument("--key", action="append", dest="keys", metavar="K",
                        help="accepted API key (repeatable; default: secret)")
    parser.add_argument("--files", metavar="DIR", help="register every regular file in DIR (served from disk)")
    parser.add_argument("--dataset", metavar="NAME", help="put the --files files into a new dataset NAME")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    standin = ClowderStandin(args.host, args.port, set(args.keys) if args.keys else None).start()
    try:
        lines = ["standin: " + standin.url]
        dataset_id = standin.add_dataset(name=args.dataset) if args.dataset else None
        if args.files:
            for entry in sorted(os.scandir(args.files), key=lambda e: e.name):
                if entry.is_file():
                    lines.append("%s %s" % (entry.name, standin.add_file(name=entry.name, path=entry.path,
                                                                         dataset_id=dataset_id)))
        if dataset_id:
            lines.append("dataset %s" % dataset_id)
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
