"""Forwarding an extractor's Clowder calls for one lease, streamed both ways.

`/clowder/<lease id>/<path>?<query>` is checked, in this order:

1. the lease is live and the request carries its per-lease key (v1 `?key=`, or an `X-API-Key`
   header as v2 sends it; compared in constant time). Unknown lease and wrong key get the same
   401, so lease ids cannot be probed;
2. the path is an allowed route for the lease's ids (hpc_common.routes);
3. the request body fits the upload limit (413 otherwise, before anything is sent upstream).

Then the request goes to the lease's own Clowder host (the message's `host`, or the relay's
`--clowder-url`), with the real key put back the way the agent presented its lease key, over a
kept-alive connection per handler thread. Bodies are streamed in 1 MiB blocks both ways (files
can be GBs); only JSON request bodies up to JSON_LIMIT are read whole, so that the relay URL the
extractor saw as its `host` (pyclowder writes it into metadata's `extractor_id`) is replaced by
the real host, and only JSON answers of routes that create or list ids are read whole, to learn
those ids for the lease. Hop-by-hop and `Location` headers are not passed on.
"""
from __future__ import annotations

import hmac
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

from hpc_common.routes import Refusal, check, ids_in, lease_scope

from ..errors import RelayError
from .store import LeaseStore

log = logging.getLogger("launcher.relay.forward")
BLOCK = 1 << 20
JSON_LIMIT = 16 << 20
IDLE_REUSE = 4.0      # an upstream connection idle longer than this is replaced (the server may have closed it)
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "content-length", "host", "authorization", "x-api-key",
        "accept-encoding", "expect"}
_PASS_BACK = {"content-type", "content-disposition", "content-encoding", "last-modified", "etag",
              "cache-control", "content-language"}


class ClientError(RelayError):
    """The agent's request is wrong: answered with status and a JSON error."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class _Pool(threading.local):
    def __init__(self) -> None:
        self.conns: dict[tuple[str, str], tuple[http.client.HTTPConnection, float]] = {}


class Forwarder:
    """Checks and forwards one lease's Clowder calls."""

    def __init__(self, store: LeaseStore, max_upload: int, clowder_url: Optional[str] = None,
                 timeout: float = 300.0, connect_timeout: float = 10.0) -> None:
        self.store = store
        self.max_upload = max_upload
        self.clowder_url = clowder_url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._pool = _Pool()
        self._tls = ssl.create_default_context()

    # -- entry point ------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, lease_id: str, path: str, query: str) -> int:
        """Answer one forwarded request on handler h; return the status sent."""
        params = parse_qsl(query, keep_blank_values=True)
        by_query = [v for k, v in params if k == "key"]
        by_header = h.headers.get("X-API-Key")
        presented = by_query[0] if by_query else by_header
        lease = self.store.live(lease_id)
        if lease is None or not presented or not hmac.compare_digest(presented.encode(), lease.lease_key.encode()):
            raise ClientError(401, "unknown or expired lease, or wrong lease key")
        body = lease.original()
        real_host = self.clowder_url or body.get("host")
        real_key = body.get("secretKey")
        if not isinstance(real_host, str) or not isinstance(real_key, str):
            raise ClientError(409, "this lease's message names no Clowder host or key")
        if not real_host.endswith("/"):
            real_host += "/"
        try:
            route = check(h.command, path, lease_scope(body, lease.learned))
        except Refusal as exc:
            raise ClientError(exc.status, exc.text) from None
        upstream_query = [(k, real_key if k == "key" else v) for k, v in params if k != "key" or by_query]
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if not by_query:
            headers["X-API-KEY"] = real_key
        length, chunked = self._request_length(h)
        base = urlsplit(real_host)
        target = (base.path or "/") + path + ("?" + urlencode(upstream_query) if upstream_query else "")
        ctype = h.headers.get("Content-Type", "")
        payload: Any
        if length is not None and length <= JSON_LIMIT and "json" in ctype.lower():
            raw = _read_exact(h.rfile, length)
            if lease.lease_host:
                raw = raw.replace(lease.lease_host.encode(), real_host.encode())
                raw = raw.replace(lease.lease_host.rstrip("/").encode(), real_host.rstrip("/").encode())
            payload, length = raw, len(raw)
        elif length == 0:
            payload = b""
        elif chunked:
            payload = self._chunked_in(h)
        else:
            payload = _blocks(h.rfile, length or 0)
        resp, conn = self._send(base.scheme, base.netloc, h.command, target, headers, payload, length)
        try:
            return self._answer(h, resp, route.learn, lease_id)
        finally:
            if resp.will_close or not resp.isclosed():
                self._drop(base.scheme, base.netloc, conn)

    # -- request side -------------------------------------------------------------------------------
    def _request_length(self, h: BaseHTTPRequestHandler) -> tuple[Optional[int], bool]:
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            return None, True
        raw = h.headers.get("Content-Length")
        if raw is None:
            return 0, False
        try:
            length = int(raw)
        except ValueError:
            raise ClientError(400, "Content-Length is not a number") from None
        if length < 0:
            raise ClientError(400, "Content-Length is negative")
        if length > self.max_upload:
            raise ClientError(413, f"upload of {length} bytes is over the relay's limit of {self.max_upload}")
        return length, False

    def _chunked_in(self, h: BaseHTTPRequestHandler) -> Iterator[bytes]:
        total = 0
        while True:
            line = h.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise ClientError(400, "malformed chunked body") from None
            if size == 0:
                while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return
            total += size
            if total > self.max_upload:
                raise ClientError(413, f"upload is over the relay's limit of {self.max_upload} bytes")
            yield from _blocks(h.rfile, size)
            h.rfile.readline(1024)

    def _connection(self, scheme: str, netloc: str, fresh: bool) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        held = self._pool.conns.pop(key, None)
        if held is not None:
            conn, last = held
            if not fresh and time.monotonic() - last < IDLE_REUSE:
                return conn
            conn.close()
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=self.connect_timeout, context=self._tls)
        return http.client.HTTPConnection(netloc, timeout=self.connect_timeout)

    def _drop(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        self._pool.conns.pop((scheme, netloc), None)
        conn.close()

    def _send(self, scheme: str, netloc: str, method: str, target: str, headers: dict[str, str], payload: Any,
              length: Optional[int]) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        replayable = isinstance(payload, bytes)
        for attempt in (1, 2):
            conn = self._connection(scheme, netloc, fresh=attempt == 2)
            try:
                conn.putrequest(method, target, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                if length is None:
                    conn.putheader("Transfer-Encoding", "chunked")
                else:
                    conn.putheader("Content-Length", str(length))
                small = isinstance(payload, bytes) and len(payload) <= 65536
                conn.endheaders(payload if small and payload else None)  # one segment with its headers
                if conn.sock is not None:
                    conn.sock.settimeout(self.timeout)
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if isinstance(payload, bytes):
                    if payload and not small:
                        conn.send(payload)
                else:
                    for block in payload:
                        conn.send(b"%x\r\n%s\r\n" % (len(block), block) if length is None else block)
                    if length is None:
                        conn.send(b"0\r\n\r\n")
                resp = conn.getresponse()
                self._pool.conns[(scheme, netloc)] = (conn, time.monotonic())
                return resp, conn
            except ClientError:
                conn.close()
                raise
            except (socket.timeout, TimeoutError):
                conn.close()
                raise ClientError(504, f"Clowder at {netloc} did not answer in time") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt == 1 and replayable and isinstance(exc, (http.client.RemoteDisconnected,
                                                                    BrokenPipeError, ConnectionResetError)):
                    continue  # a kept-alive connection the server had closed: once more, fresh
                raise ClientError(502, f"Clowder at {netloc} is not reachable: {exc.__class__.__name__}") from None
        raise AssertionError("unreachable")

    # -- response side ------------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, resp: http.client.HTTPResponse, learn: Optional[str],
                lease_id: str) -> int:
        length_text = resp.getheader("Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        ctype = resp.getheader("Content-Type", "")
        extra = [(k, v) for k, v in resp.getheaders() if k.lower() in _PASS_BACK]
        if learn and 200 <= resp.status < 300 and "json" in ctype.lower() and (length or 0) <= JSON_LIMIT:
            data = resp.read(JSON_LIMIT + 1) if length is None else resp.read(length)
            try:
                self.store.learn(lease_id, learn, ids_in(json.loads(data)))
            except ValueError:
                pass
            _head(h, resp.status, resp.reason, extra, len(data))
            h.wfile.write(data)
            return resp.status
        if length is not None:
            _head(h, resp.status, resp.reason, extra, length)
            remaining = length
            while remaining > 0:
                block = resp.read(min(BLOCK, remaining))
                if not block:
                    h.close_connection = True  # upstream cut short: the agent sees a short read
                    return resp.status
                h.wfile.write(block)
                remaining -= len(block)
            return resp.status
        _head(h, resp.status, resp.reason, extra + [("Transfer-Encoding", "chunked")], None)
        while True:
            block = resp.read1(BLOCK) if hasattr(resp, "read1") else resp.read(BLOCK)
            if not block:
                break
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
        h.wfile.write(b"0\r\n\r\n")
        return resp.status


def _head(h: BaseHTTPRequestHandler, status: int, reason: str, headers: list[tuple[str, str]],
          length: Optional[int]) -> None:
    lines = [f"HTTP/1.1 {status} {reason or 'Status'}", "Server: clowder-relay"]
    lines += [f"{k}: {v}" for k, v in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if h.close_connection:
        lines.append("Connection: close")
    h.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _read_exact(rfile: Any, length: int) -> bytes:
    data = rfile.read(length)
    if len(data) != length:
        raise ClientError(400, "request body shorter than its Content-Length")
    return data


def _blocks(rfile: Any, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        block = rfile.read(min(BLOCK, remaining))
        if not block:
            raise ClientError(400, "request body shorter than its Content-Length")
        remaining -= len(block)
        yield block
