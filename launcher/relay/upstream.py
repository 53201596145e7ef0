"""A lean HTTP/1.1 client for the relay's forwarded calls whose request body is already in hand.

Why: with aiohttp's ClientSession (its request and response objects, tracing hooks, cookie and
redirect machinery) a forwarded call cost the relay 0.30 ms of CPU, with this client 0.19 ms,
measured side by side (benchmarks/results/relay_forward_cost.md), and every file makes three. The
relay needs none of that machinery: its calls carry a checked target, fixed headers and a body
it holds as bytes, and the answer is passed on as it comes. This client writes the request in one
write on a pooled kept-alive asyncio stream and parses the status line and headers itself; the
body is read whole (small answers) or block by block (Content-Length or chunked), so files of
any size still stream. Streamed uploads (bodies of unknown or large size) stay on aiohttp
(launcher.relay.forward decides).

Connections: at most `limit` at once over all hosts (callers beyond it wait), kept for
`keepalive` seconds after use; one that the server closed while idle fails its request with
`Stale` before any answer byte arrives, and the caller may send once more on a fresh one. An
answer with `Connection: close`, HTTP/1.0 or a body not read to its end closes its connection.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from typing import AsyncIterator, Awaitable, Optional, TypeVar

from multidict import CIMultiDict, CIMultiDictProxy

_MAX_HEAD = 64 << 10
T = TypeVar("T")


class UpstreamError(Exception):
    """The upstream answer was malformed or the connection failed (message names no secrets)."""


class Stale(UpstreamError):
    """A pooled connection closed by the server before any answer byte: safe to send again."""


class _Conn:
    __slots__ = ("reader", "writer", "key", "idle_since", "timed_out")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple) -> None:
        self.reader, self.writer, self.key, self.idle_since = reader, writer, key, 0.0
        self.timed_out = False

    async def bounded(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await one read with a deadline: past it the connection is aborted and TimeoutError raised.

        One timer per wait (not wait_for's task, not asyncio.timeout's bookkeeping): this runs
        for every forwarded call.
        """
        handle = asyncio.get_running_loop().call_later(seconds, self._expire)
        try:
            return await awaitable
        except (ConnectionError, asyncio.IncompleteReadError):
            if self.timed_out:
                raise asyncio.TimeoutError() from None
            raise
        finally:
            handle.cancel()

    def _expire(self) -> None:
        self.timed_out = True
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


class Answer:
    """An upstream answer: status, reason, headers, and its body to read once (then release())."""

    def __init__(self, pool: "LeanUpstream", conn: _Conn, status: int, reason: str,
                 headers: CIMultiDictProxy[str], keep: bool, timeout: float) -> None:
        self._pool, self._conn, self._timeout = pool, conn, timeout
        self.status, self.reason, self.headers = status, reason, headers
        encoding = headers.get("Transfer-Encoding", "").lower()
        self.chunked = "chunked" in encoding
        raw = headers.get("Content-Length")
        self.content_length: Optional[int] = None
        if not self.chunked and raw is not None:
            try:
                self.content_length = int(raw)
            except ValueError:
                raise UpstreamError("Clowder's answer has a malformed Content-Length") from None
        # No length and not chunked: the body runs to the connection's end (which then closes).
        self._keep = keep and (self.chunked or self.content_length is not None)
        self._left = self.content_length
        self._done = self.content_length == 0 or status in (204, 304)
        self._released = False

    async def _read(self, awaitable: Awaitable[T]) -> T:
        return await self._conn.bounded(awaitable, self._timeout)

    async def read_all(self, limit: int) -> bytes:
        """The whole body (at most limit bytes; UpstreamError beyond)."""
        if self._left is not None and not self._done:  # the common case: one read
            if self._left > limit:
                raise UpstreamError("Clowder's answer is larger than expected")
            data = await self._read(self._conn.reader.readexactly(self._left))
            self._left, self._done = 0, True
            return data
        parts: list[bytes] = []
        total = 0
        async for block in self.blocks(1 << 20):
            total += len(block)
            if total > limit:
                raise UpstreamError("Clowder's answer is larger than expected")
            parts.append(block)
        return b"".join(parts)

    async def blocks(self, size: int) -> AsyncIterator[bytes]:
        """The body in blocks of up to size bytes; asyncio.IncompleteReadError when cut short."""
        reader = self._conn.reader
        while not self._done:
            if self.chunked:
                line = await self._read(reader.readuntil(b"\r\n"))
                try:
                    length = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise UpstreamError("Clowder's chunked answer is malformed") from None
                if length == 0:
                    while (await self._read(reader.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers are dropped
                    self._done = True
                    return
                while length > 0:
                    block = await self._read(reader.readexactly(min(size, length)))
                    length -= len(block)
                    yield block
                if await self._read(reader.readexactly(2)) != b"\r\n":
                    raise UpstreamError("Clowder's chunked answer is malformed")
            elif self._left is None:  # to the end of the connection
                block = await self._read(reader.read(size))
                if not block:
                    self._done = True
                    return
                yield block
            else:
                block = await self._read(reader.readexactly(min(size, self._left)))
                self._left -= len(block)
                self._done = self._left == 0
                yield block

    def release(self) -> None:
        """Hand the connection back (kept alive only if the body was read to its end)."""
        if self._released:
            return
        self._released = True
        self._pool._give_back(self._conn, self._keep and self._done)


class LeanUpstream:
    """Pooled kept-alive HTTP/1.1 connections to Clowder hosts (see the module docstring)."""

    def __init__(self, limit: int = 64, keepalive: float = 4.0, connect_timeout: float = 10.0,
                 timeout: float = 300.0, tls: Optional[ssl.SSLContext] = None) -> None:
        self.keepalive, self.connect_timeout, self.timeout = keepalive, connect_timeout, timeout
        self._tls = tls  # made on the first https connection when not given
        self._idle: dict[tuple, list[_Conn]] = {}
        self._slots = asyncio.Semaphore(limit)

    async def request(self, method: str, scheme: str, host: str, port: int, target: str, host_header: str,
                      headers: dict[str, str], body: bytes, fresh: bool = False) -> Answer:
        """Send one request (not HEAD: its answer has no body whatever its headers say) and read the
        answer's head; the caller reads the body, then release()s."""
        await self._slots.acquire()
        conn: Optional[_Conn] = None
        try:
            key = (scheme, host, port)
            conn = None if fresh else self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            # utf-8 with surrogateescape gives back the exact bytes aiohttp's parser decoded
            conn.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body)
            try:
                status, reason, head, keep = await self._head(conn)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    raise Stale("kept-alive connection closed by Clowder") from None
                raise
            return Answer(self, conn, status, reason, CIMultiDictProxy(head), keep, self.timeout)
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise

    async def _connect(self, key: tuple) -> _Conn:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None, limit=_MAX_HEAD),
            self.connect_timeout)
        return _Conn(reader, writer, key)

    async def _head(self, conn: _Conn) -> tuple[int, str, CIMultiDict[str], bool]:
        while True:  # 1xx answers (100 Continue) come before the real one
            try:
                raw = await conn.bounded(conn.reader.readuntil(b"\r\n\r\n"), self.timeout)
            except asyncio.LimitOverrunError:
                raise UpstreamError("Clowder's answer headers are too large") from None
            lines = raw.decode("utf-8", "surrogateescape").split("\r\n")  # as aiohttp decodes headers
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise UpstreamError("Clowder's answer is not HTTP/1.x")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue
            head: CIMultiDict[str] = CIMultiDict()
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep and name and name == name.strip():
                    head.add(name, value.strip())
            connection = head.get("Connection", "").lower()
            keep = parts[0] == "HTTP/1.1" and "close" not in connection
            return status, parts[2] if len(parts) > 2 else "", head, keep

    def _take(self, key: tuple) -> Optional[_Conn]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.keepalive and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Conn, keep: bool) -> None:
        self._slots.release()
        if not keep or conn.reader.at_eof() or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
