"""What every Clowder served in this tree shares besides the route table (hpc_common.routes): one request
as a route handler sees it, the refusal that becomes an error status, and Clowder's own rules for API keys
and error bodies. Used by `agent local`'s loopback Clowder and by the stand-ins in devtools.
Standard library only.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, ContextManager, Mapping, Optional, TypeVar

from hpc_common.routes import Refusal, api_version


class ClowderError(Refusal):
    """A request a served Clowder answers with an error status (`message` goes in Clowder's error body)."""

    @property
    def message(self) -> str:
        """What the error body says."""
        return self.text


T = TypeVar("T")


def lookup(table: Mapping[str, T], key: str, what: str, lock: ContextManager[Any]) -> T:
    """table[key], read under lock, or ClowderError 404 "<what> <key> not found"."""
    with lock:
        value = table.get(key)
    if value is None:
        raise ClowderError(404, "%s %s not found" % (what, key))
    return value


def error_body(api: str, message: str) -> dict[str, str]:
    """Clowder's error answer: v2 (FastAPI) says {"detail"}, v1 {"error"}."""
    return {"detail": message} if api == "v2" else {"error": message}


class ClowderRequest:
    """One API request: method, path (relative to the base URL), parsed query, headers, raw body, the ids
    its route named ({kind: id}) and the API version ("v1", "v2"; "control" for a stand-in's control API)."""

    __slots__ = ("method", "path", "query", "headers", "body", "ids", "api")

    def __init__(self, method: str, path: str, query: Mapping[str, list[str]], headers: Any, body: bytes,
                 ids: Optional[dict[str, str]] = None, api: Optional[str] = None) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.ids = ids if ids is not None else {}
        self.api = api or api_version(path)

    def arg(self, name: str) -> Optional[str]:
        """The first value of a query argument, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def api_key(self) -> Optional[str]:
        """The key as Clowder reads it: the X-API-Key header (any case), and for v1 also ?key=."""
        key = self.headers.get("X-API-Key")  # headers are case-insensitive (X-API-KEY too)
        return self.arg("key") if key is None and self.api == "v1" else key

    def json(self) -> Any:
        """The JSON body; ClowderError 400 when it is empty or malformed."""
        if not self.body.strip():
            raise ClowderError(400, "empty body, JSON expected")
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ClowderError(400, "malformed JSON body: %s" % exc) from None

    def upload(self) -> tuple[str, Optional[str], bytes]:
        """The first file part of a multipart/form-data body: (file name, its content type or None, bytes)."""
        ctype = self.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', ctype)
        if not ctype.lower().startswith("multipart/form-data") or not match:
            raise ClowderError(400, "multipart/form-data body expected")
        delimiter = b"--" + match.group(1).encode("latin-1")
        # Clowder accepts the file under any field name (pyclowder uses both "File" and "file").
        for part in self.body.split(delimiter)[1:]:
            if part.startswith(b"--"):
                break
            head, sep, data = part.partition(b"\r\n\r\n")
            if not sep:
                continue
            if data.endswith(b"\r\n"):
                data = data[:-2]
            head_text = head.decode("utf-8", "replace")
            fname = re.search(r'filename="([^"]*)"', head_text) or re.search(r"filename=([^;\r\n]+)", head_text)
            if fname is None:
                continue
            part_type = re.search(r"(?im)^content-type:\s*([^\r\n]+)", head_text)
            name = os.path.basename(fname.group(1).replace("\\", "/")) or "upload"
            return name, part_type.group(1).strip() if part_type else None, data
        raise ClowderError(400, "no file part in multipart body")
