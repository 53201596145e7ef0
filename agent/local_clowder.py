"""The loopback Clowder that ``python -m agent local`` gives the extractor.

A threaded HTTP server (standard library only) bound to 127.0.0.1 on a free port, for one local
run. It answers the Clowder v1 and v2 routes an extractor calls through pyclowder while it works
on one file: the file's info (with its on-disk path, so pyclowder reads it in place) and bytes,
and the writes (metadata, tags, previews, thumbnails, visualizations, new files in the file's
dataset, dataset info and file list). Every write is kept in memory for the run's JSON report.

Its routes are hpc_common.routes' table (the one the stand-ins serve), each action mapped to a
handler here; requests are read with hpc_common.clowder_serving. It is not a Clowder for other
programs: one API key, no fault injection, no control API, no command line. The full stand-in with those lives in ``devtools/clowder_standin.py`` (tests,
benchmarks, demo).
"""
from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from hpc_common.clowder_serving import ClowderError, ClowderRequest, error_body, lookup
from hpc_common.routes import CLOWDER

__all__ = ["LocalClowder"]

def _mime(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _summary(data: bytes, name: str, ctype: Optional[str]) -> dict[str, Any]:
    return {"filename": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "content_type": ctype or _mime(name)}


class LocalClowder:
    """Serve one local run's files and keep what the extractor wrote back.

    ``with LocalClowder(key) as clowder:`` binds, ``clowder.url`` is the ``host`` for messages.
    """

    def __init__(self, key: str) -> None:
        self._key = key
        self._lock = threading.Lock()
        self._files: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, str] = {}  # id -> name
        self._uploads: dict[str, dict[str, Any]] = {}  # previews, thumbnails, visualization configs
        self._records: list[dict[str, Any]] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._handlers = self._handler_table()

    # -- what local mode calls --------------------------------------------------------------------
    def __enter__(self) -> "LocalClowder":
        owner = self

        class Handler(_Handler):
            clowder = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="local-clowder", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        """Base URL with a trailing slash."""
        if self._server is None:
            raise RuntimeError("local Clowder not started")
        return "http://127.0.0.1:%d/" % self._server.server_address[1]

    def add_dataset(self, name: str) -> str:
        """A new empty dataset; returns its id."""
        dataset_id = uuid.uuid4().hex
        with self._lock:
            self._datasets[dataset_id] = name
        return dataset_id

    def add_file(self, name: str, path: Optional[str], dataset_id: str, content: bytes = b"") -> str:
        """A file served from ``path`` on disk (or from ``content``); returns its id."""
        file_id = uuid.uuid4().hex
        with self._lock:
            self._files[file_id] = {"id": file_id, "name": name, "path": path, "content": content,
                                    "dataset_id": dataset_id, "created": time.time()}
        return file_id

    def records(self, kind: Optional[str] = None, file_id: Optional[str] = None,
                dataset_id: Optional[str] = None) -> list[dict[str, Any]]:
        """The writes seen so far, oldest first: ``{kind, api, file_id, dataset_id, body, time}``."""
        with self._lock:
            return [dict(r) for r in self._records
                    if kind in (None, r["kind"]) and file_id in (None, r["file_id"])
                    and dataset_id in (None, r["dataset_id"])]

    def metadata_for(self, file_id: str) -> list[Any]:
        """The metadata bodies posted for a file, oldest first."""
        return [r["body"] for r in self.records("metadata", file_id=file_id)]

    # -- routes -----------------------------------------------------------------------------------
    def _handler_table(self) -> dict[str, Callable[[ClowderRequest], Any]]:
        """The actions of hpc_common.routes' table that local mode serves (v1 and v2 spellings alike)."""
        return {
            "file_blob": self._blob, "file_info": self._file_info, "file_md_get": self._metadata_list,
            "file_md_post": self._write("metadata"), "file_tags": self._write("tags"),
            "preview_upload": self._store("preview_upload"), "preview_link": self._link("preview"),
            "preview_metadata": self._preview_metadata, "thumb_upload": self._store("thumbnail_upload"),
            "file_thumb_link": self._link("thumbnail"), "vis_config": self._vis_config,
            "vis_upload": self._store("preview_upload"), "ds_info": self._dataset_info,
            "ds_files": self._dataset_files, "ds_upload": self._new_file,
        }

    def answer(self, call: ClowderRequest) -> Any:
        """The JSON-able answer (or ``bytes`` for a blob) to one request; raises ``ClowderError``."""
        if call.api_key() != self._key:
            raise ClowderError(401, "missing or invalid API key")
        found = CLOWDER.find(call.method, call.path)
        handler = self._handlers.get(found[0].action) if found else None
        if found is None or handler is None:
            raise ClowderError(404, "local mode does not serve %s /%s" % (call.method, call.path))
        call.ids = found[1]
        return handler(call)

    def _file(self, call: ClowderRequest) -> dict[str, Any]:
        return lookup(self._files, call.ids["file"], "file", self._lock)

    def _dataset(self, call: ClowderRequest) -> str:
        lookup(self._datasets, call.ids["dataset"], "dataset", self._lock)
        return call.ids["dataset"]

    def _keep(self, kind: str, call: ClowderRequest, body: Any, file_id: Optional[str] = None,
              dataset_id: Optional[str] = None, **extra: Any) -> None:
        with self._lock:
            self._records.append({"kind": kind, "api": call.api, "file_id": file_id, "dataset_id": dataset_id,
                                  "body": body, "time": time.time(), **extra})

    def _bytes(self, entry: dict[str, Any]) -> bytes:
        if entry["path"]:
            with open(entry["path"], "rb") as fh:
                return fh.read()
        return entry["content"]

    def _info(self, entry: dict[str, Any], api: str) -> dict[str, Any]:
        size = os.path.getsize(entry["path"]) if entry["path"] else len(entry["content"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry["created"]))
        if api == "v1":
            info = {"id": entry["id"], "filename": entry["name"], "content-type": _mime(entry["name"]),
                    "size": str(size), "date-created": stamp, "status": "PROCESSED"}
            if entry["path"]:
                info["filepath"] = entry["path"]  # pyclowder then reads the file where it is
            return info
        return {"id": entry["id"], "name": entry["name"], "bytes": size, "created": stamp,
                "dataset_id": entry["dataset_id"], "storage_type": "local" if entry["path"] else "minio",
                "storage_path": entry["path"], "content_type": {"content_type": _mime(entry["name"])}}

    def _blob(self, call: ClowderRequest) -> bytes:
        return self._bytes(self._file(call))

    def _file_info(self, call: ClowderRequest) -> Any:
        return self._info(self._file(call), call.api)

    def _metadata_list(self, call: ClowderRequest) -> Any:
        return self.metadata_for(self._file(call)["id"])

    def _write(self, kind: str) -> Callable[[ClowderRequest], Any]:
        def route(call: ClowderRequest) -> Any:
            entry = self._file(call)
            body = call.json()
            self._keep(kind, call, body, entry["id"], entry["dataset_id"])
            return body if call.api == "v2" and isinstance(body, dict) else {"status": "success"}
        return route

    def _store(self, kind: str) -> Callable[[ClowderRequest], Any]:
        def route(call: ClowderRequest) -> Any:
            name, ctype, data = call.upload()
            upload_id = uuid.uuid4().hex
            summary = _summary(data, name, ctype)
            with self._lock:
                self._uploads[upload_id] = summary
            self._keep(kind, call, summary, preview_id=upload_id)
            return {"id": upload_id}
        return route

    def _link(self, kind: str) -> Callable[[ClowderRequest], Any]:
        def route(call: ClowderRequest) -> Any:
            entry = self._file(call)
            summary = lookup(self._uploads, call.ids[kind], "upload", self._lock)
            self._keep(kind, call, summary, entry["id"], entry["dataset_id"], **{kind + "_id": call.ids[kind]})
            return {}
        return route

    def _preview_metadata(self, call: ClowderRequest) -> Any:
        self._keep("preview_metadata", call, call.json(), preview_id=call.ids["preview"])
        return {"status": "success"}

    def _vis_config(self, call: ClowderRequest) -> Any:
        body = call.json()
        resource = (body.get("resource") or {}) if isinstance(body, dict) else {}
        file_id = resource.get("resource_id") if resource.get("collection") == "files" else None
        config_id = uuid.uuid4().hex
        self._keep("visualization_config", call, body, file_id=file_id, preview_id=config_id)
        return dict(body, id=config_id) if isinstance(body, dict) else {"id": config_id}

    def _dataset_info(self, call: ClowderRequest) -> Any:
        dataset_id = self._dataset(call)
        return {"id": dataset_id, "name": self._datasets[dataset_id], "description": ""}

    def _dataset_files(self, call: ClowderRequest) -> Any:
        dataset_id = self._dataset(call)
        with self._lock:
            entries = [e for e in self._files.values() if e["dataset_id"] == dataset_id]
        infos = [self._info(e, call.api) for e in entries]
        if call.api == "v1":
            return infos
        return {"metadata": {"total_count": len(infos), "skip": 0, "limit": len(infos)}, "data": infos}

    def _new_file(self, call: ClowderRequest) -> Any:
        dataset_id = self._dataset(call)
        name, ctype, data = call.upload()
        file_id = self.add_file(name, None, dataset_id, content=data)
        self._keep("upload", call, _summary(data, name, ctype), file_id, dataset_id)
        return {"id": file_id}


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: parse, ask :meth:`LocalClowder.answer`, send JSON or bytes."""

    clowder: LocalClowder
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # request lines may carry ?key=

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        call = ClowderRequest(self.command, split.path.strip("/"), parse_qs(split.query), self.headers, body)
        try:
            result = self.clowder.answer(call)
            status = 200
        except ClowderError as exc:
            status, result = exc.status, error_body(call.api, exc.message)
        except Exception as exc:  # noqa: BLE001 - answer the extractor rather than drop it
            status, result = 500, error_body(call.api, "%s: %s" % (type(exc).__name__, exc))
        data = result if isinstance(result, bytes) else json.dumps(result).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(result, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET
