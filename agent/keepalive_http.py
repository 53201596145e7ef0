"""Plain keep-alive HTTP/1.1 for the per-file Clowder calls, answered as requests.Response objects.

A small Clowder call through requests costs about 0.33 ms of CPU on this project's benchmark
host, http.client on a kept-alive socket about 0.07 ms; an extractor makes three such calls per
file (file info, download, metadata), which made requests the largest part of the extractor
process's own cost. ClowderHTTP sends the calls this module can take exactly (see `fits`) through
it and everything else through its requests.Session: proxies, client certificates, cookies,
multipart and streamed uploads, form-encoded dicts.

What it keeps of requests' behaviour: the Session's default headers, params encoding, `json=`,
TLS verification against the same CA bundle (certifi, or the verify path/env the Session
resolved), (connect, read) timeouts, redirects (followed by the Session from the first 3xx on),
and requests' exception types, so callers and ClowderHTTP's retries cannot tell the difference.
It asks for `Accept-Encoding: identity` (a Clowder API body is small or already compressed) and
still decodes gzip/deflate should a server compress anyway.
"""
from __future__ import annotations

import datetime
import http.client
import json as jsonlib
import os
import select
import socket
import ssl
import threading
import time
import zlib
from typing import Any, Optional
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_encoding_from_headers

_TAKES = frozenset(("params", "data", "json", "headers", "stream", "timeout", "verify", "allow_redirects"))
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
IDLE_PER_HOST = 8  # idle connections kept per (scheme, host, port, TLS settings)
_REQUESTS_ENCODING = requests.utils.default_headers()["Accept-Encoding"]


def fits(kwargs: dict[str, Any]) -> bool:
    """True when a call with these requests keyword arguments can go through this module unchanged."""
    if not _TAKES.issuperset(kwargs):
        return False
    data, params = kwargs.get("data"), kwargs.get("params")
    if data is not None and not isinstance(data, (bytes, str)):
        return False  # files, generators, dicts to form-encode: requests does those
    if params is not None and not (isinstance(params, dict)
                                   and all(isinstance(v, (str, int, float)) for v in params.values())):
        return False
    return True


class _Raw:
    """Response.raw for a streamed answer: reads the body, hands the connection back at its end."""

    def __init__(self, pool: "KeepAliveHTTP", key: tuple, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, decoder: Any) -> None:
        self._pool, self._key, self._conn, self._resp, self._decoder = pool, key, conn, resp, decoder
        self._done = False

    def read(self, amt: Optional[int] = None, decode_content: bool = True) -> bytes:
        """Up to amt bytes of the decoded body; b"" at its end (decode_content: urllib3's signature, always on)."""
        while not self._done:
            try:
                chunk = self._resp.read(amt) if amt else self._resp.read()
            except http.client.IncompleteRead as exc:
                self._abandon()
                raise requests.exceptions.ChunkedEncodingError(f"connection broken: {exc!r}") from None
            except socket.timeout:
                self._abandon()
                raise requests.exceptions.ConnectionError("read timed out during the body") from None
            except (OSError, http.client.HTTPException) as exc:
                self._abandon()
                raise requests.exceptions.ChunkedEncodingError(f"connection broken: {exc!r}") from None
            if not chunk and self._resp.length:  # http.client ends a short Content-Length body quietly
                self._abandon()
                raise requests.exceptions.ChunkedEncodingError(
                    f"connection broken: body ended {self._resp.length} bytes short of its Content-Length")
            if not chunk or not amt:
                self._finish()
            if self._decoder is not None:
                chunk = self._decoder.decompress(chunk) + (self._decoder.flush() if self._done else b"")
            if chunk or self._done:
                return chunk
        return b""

    def _finish(self) -> None:
        self._done = True
        self._pool._give_back(self._key, self._conn, self._resp)

    def _abandon(self) -> None:
        self._done = True
        self._conn.close()

    def close(self) -> None:
        """A body left unread closes the connection: what follows it on the socket is unknown."""
        if not self._done:
            self._abandon()

    def release_conn(self) -> None:
        self.close()


class KeepAliveHTTP:
    """Idle connections per host, reused for each call; thread-safe (one caller per connection)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: dict[Any, ssl.SSLContext] = {}
        self._clock = clock

    def request(self, method: str, url: str, headers: CaseInsensitiveDict, body: Optional[bytes],
                timeout: Any, verify: Any, stream: bool) -> requests.Response:
        """Send one request; a requests.Response, or a requests exception. Redirects are returned as they are."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise requests.exceptions.InvalidURL(f"not an http(s) URL: {url.split('?', 1)[0]}")
        connect_timeout, read_timeout = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port, verify if parts.scheme == "https" else None)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        started = self._clock()
        conn = self._take(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(key, connect_timeout)
            try:
                conn.sock.settimeout(read_timeout)
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
                conn.close()
                if not reused:
                    raise requests.exceptions.ConnectionError(f"connection to {parts.hostname} lost: {exc!r}") \
                        from None
                # A kept-alive socket the server closed as we sent: once more on a new connection.
                conn, reused = None, False
            except socket.timeout:
                conn.close()
                raise requests.exceptions.ReadTimeout(f"no answer from {parts.hostname} within {read_timeout}s") \
                    from None
            except ssl.SSLError as exc:
                conn.close()
                raise requests.exceptions.SSLError(str(exc)) from None
            # Bad input, not a network fault (so not retried), and named without its value: a URL's
            # query or a header may hold a Clowder key.
            except http.client.InvalidURL:
                conn.close()
                raise requests.exceptions.InvalidURL(
                    f"a URL for {parts.hostname} holds characters HTTP does not allow (not shown: it may hold a key)") \
                    from None
            except ValueError:
                conn.close()
                raise requests.exceptions.InvalidHeader(
                    "a request header holds characters HTTP does not allow (not shown: it may hold a key)") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise requests.exceptions.ConnectionError(f"{parts.hostname}: {exc!r}") from None
        return self._response(method, url, headers, body, key, conn, resp, stream, started)

    def _response(self, method: str, url: str, headers: CaseInsensitiveDict, body: Optional[bytes], key: tuple,
                  conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, stream: bool,
                  started: float) -> requests.Response:
        out = requests.Response()
        out.status_code = resp.status
        out.reason = resp.reason
        out.headers = _headers(resp.getheaders())
        out.url = url
        out.encoding = get_encoding_from_headers(out.headers)
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url, prepared.headers, prepared.body = method, url, headers, body
        out.request = prepared
        coding = out.headers.get("Content-Encoding", "").strip().lower()
        decoder = None
        if coding in ("gzip", "x-gzip"):
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            decoder = zlib.decompressobj()
        out.raw = _Raw(self, key, conn, resp, decoder)
        if not stream:
            out._content = out.raw.read()  # noqa: SLF001 - what requests itself does without stream
            out._content_consumed = True  # noqa: SLF001
        out.elapsed = datetime.timedelta(seconds=self._clock() - started)
        return out

    def _connect(self, key: tuple, timeout: Optional[float]) -> http.client.HTTPConnection:
        scheme, host, port, verify = key
        try:
            if scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=self._context(verify))
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.connect()
        except socket.timeout:
            raise requests.exceptions.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except ssl.SSLError as exc:
            raise requests.exceptions.SSLError(str(exc)) from None
        except OSError as exc:
            raise requests.exceptions.ConnectionError(f"cannot connect to {host}:{port}: {exc}") from None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _context(self, verify: Any) -> ssl.SSLContext:
        ctx = self._tls.get(verify)
        if ctx is None:
            if verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif isinstance(verify, str):  # a CA bundle file or a folder of hashed certificates, as requests takes
                where = {"capath": verify} if os.path.isdir(verify) else {"cafile": verify}
                ctx = ssl.create_default_context(**where)
            else:
                ctx = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)
            self._tls[verify] = ctx
        return ctx

    def _take(self, key: tuple) -> Optional[http.client.HTTPConnection]:
        """An idle connection the server has not closed (urllib3's check: readable while idle = EOF)."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None or conn.sock is None:
                return None
            try:
                readable = select.select([conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = [conn.sock]
            if not readable:
                return conn
            conn.close()

    def _give_back(self, key: tuple, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        if resp.will_close or conn.sock is None:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _headers(pairs: list[tuple[str, str]]) -> CaseInsensitiveDict:
    """Response headers as requests gives them: a repeated header's values joined with ", "."""
    out: CaseInsensitiveDict = CaseInsensitiveDict()
    for name, value in pairs:
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def redirect(method: str, url: str, response: requests.Response,
             kwargs: dict[str, Any]) -> Optional[tuple[str, str, dict[str, Any]]]:
    """Where requests would go next after this answer (method, URL, keyword arguments), or None."""
    location = response.headers.get("Location")
    if response.status_code not in _REDIRECTS or not location or not kwargs.get("allow_redirects", True):
        return None
    target = urljoin(url, location)
    follow = dict(kwargs, params=None)
    if (response.status_code == 303 and method != "HEAD") or (response.status_code in (301, 302) and method == "POST"):
        method = "GET"
        follow.pop("data", None)
        follow.pop("json", None)
    if urlsplit(target).hostname != urlsplit(url).hostname and follow.get("headers"):
        follow["headers"] = {k: v for k, v in follow["headers"].items() if k.lower() != "authorization"}
    return method, target, follow


def prepare(session: requests.Session, url: str, kwargs: dict[str, Any]) -> tuple[str, CaseInsensitiveDict,
                                                                                 Optional[bytes]]:
    """The URL (params added), headers (the Session's defaults merged) and body bytes of a call that fits."""
    params = kwargs.get("params")
    if params:
        url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
    headers = CaseInsensitiveDict(session.headers)
    for name, value in (kwargs.get("headers") or {}).items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    if headers.get("Accept-Encoding") == _REQUESTS_ENCODING:
        headers["Accept-Encoding"] = "identity"
    data, payload = kwargs.get("data"), kwargs.get("json")
    body: Optional[bytes]
    if data is not None:
        body = data.encode("utf-8") if isinstance(data, str) else data
    elif payload is not None:
        body = jsonlib.dumps(payload, allow_nan=False).encode("utf-8")
        headers.setdefault("Content-Type", "application/json")
    else:
        body = None
    return url, headers, body


__all__ = ["KeepAliveHTTP", "fits", "prepare", "redirect"]
