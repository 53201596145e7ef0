"""Forwarding an extractor's Clowder calls for one lease, streamed both ways.

`/clowder/<lease id>/<path>?<query>` is checked, in this order (`Forwarder.plan`, no I/O):

1. the lease is live and the request carries its per-lease key (v1 `?key=`, or an `X-API-Key`
   header as v2 sends it; compared in constant time). Unknown lease and wrong key get the same
   401, so lease ids cannot be probed;
2. the path is an allowed route for the lease's ids (hpc_common.routes);
3. the request body fits the upload limit (413 otherwise, before anything is sent upstream).

Then the request goes to the lease's own Clowder host (the message's `host`, or the relay's
`--clowder-url`), with the real key put back the way the agent presented its lease key, over a
bounded pool of kept-alive connections (POOL in all, shared by every agent; requests beyond it
wait for a free connection): a call whose body the relay holds whole (every GET, JSON and small
bodies) on launcher.relay.upstream's lean client, a streamed upload on aiohttp's client. Bodies
are streamed in 1 MiB blocks both ways (files can be GBs); only JSON request bodies up to
JSON_LIMIT are read whole, so that the relay URL the extractor saw as its `host` (pyclowder
writes it into metadata's `extractor_id`) is replaced by the real host, and only JSON answers of
routes that create or list ids are read whole, to learn those ids for the lease. Hop-by-hop
and `Location` headers are not passed on.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from hpc_common.routes import Refusal, check, ids_in, lease_scope

from ..errors import RelayError
from .store import LeaseStore
from .upstream import Answer, LeanUpstream, Stale, UpstreamError

log = logging.getLogger("launcher.relay.forward")
BLOCK = 1 << 20
JSON_LIMIT = 16 << 20
SMALL = 1 << 16         # answers up to this size are read whole and sent in one write
POOL = 64             # upstream connections at most (all Clowder hosts together)
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "content-length", "host", "authorization", "x-api-key",
        "accept-encoding", "expect"}
_PASS_BACK = {"content-type", "content-disposition", "content-encoding", "last-modified", "etag",
              "cache-control", "content-language"}
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_LEAN_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}  # HEAD and the rest stay on aiohttp
_CUT_SHORT = (asyncio.IncompleteReadError, aiohttp.ClientError, asyncio.TimeoutError, UpstreamError, OSError)
Upstream = Union[aiohttp.ClientResponse, Answer]


class ClientError(RelayError):
    """The agent's request is wrong: answered with status and a JSON error."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


async def continue_if_asked(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` once the request has passed its checks (curl sends it for big bodies)."""
    if request.version >= aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


@dataclass
class Plan:
    """A checked forwarded call: where it goes and how (Forwarder.plan's answer)."""

    url: URL
    netloc: str
    headers: dict[str, str]
    length: Optional[int]       # None: the agent sends it chunked
    learn: Optional[str]        # kind of id in the answer to allow for the lease
    lease_host: str             # the relay URL the agent saw as its host ...
    real_host: str              # ... and the real one that replaces it in JSON bodies


class Forwarder:
    """Checks and forwards one lease's Clowder calls."""

    def __init__(self, store: LeaseStore, max_upload: int, clowder_url: Optional[str] = None,
                 timeout: float = 300.0, connect_timeout: float = 10.0, pool: int = POOL) -> None:
        self.store = store
        self.max_upload = max_upload
        self.clowder_url = clowder_url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool = pool
        self._session: Optional[aiohttp.ClientSession] = None
        self._lean: Optional[LeanUpstream] = None
        self._run: Optional[Callable[..., Awaitable[Any]]] = None

    async def start(self, run_blocking: Optional[Callable[..., Awaitable[Any]]] = None) -> None:
        """Open the upstream connection pool (on the serving loop); run_blocking runs SQLite work."""
        tls = ssl.create_default_context()
        self._lean = LeanUpstream(limit=self.pool, keepalive=4.0, connect_timeout=self.connect_timeout,
                                  timeout=self.timeout, tls=tls)
        connector = aiohttp.TCPConnector(limit=self.pool, limit_per_host=self.pool, ssl=tls,
                                         keepalive_timeout=4.0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.timeout))
        self._run = run_blocking

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
            self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- checks (no I/O) ------------------------------------------------------------------------------
    def plan(self, method: str, headers: Any, lease_id: str, path: str, query: str) -> Plan:
        """Check one forwarded call (see the module docstring); raise ClientError when refused."""
        params = parse_qsl(query, keep_blank_values=True)
        by_query = [v for k, v in params if k == "key"]
        by_header = headers.get("X-API-Key")
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
            route = check(method, path, lease_scope(body, lease.learned))
        except Refusal as exc:
            raise ClientError(exc.status, exc.text) from None
        upstream_query = [(k, real_key if k == "key" else v) for k, v in params if k != "key" or by_query]
        out = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        if not by_query:
            out["X-API-KEY"] = real_key
        length = self._request_length(headers)
        base = urlsplit(real_host)
        target = (base.path or "/") + path + ("?" + urlencode(upstream_query) if upstream_query else "")
        if length is not None:
            out["Content-Length"] = str(length)
        return Plan(url=URL(f"{base.scheme}://{base.netloc}{target}", encoded=True), netloc=base.netloc,
                    headers=out, length=length, learn=route.learn, lease_host=lease.lease_host, real_host=real_host)

    def _request_length(self, headers: Any) -> Optional[int]:
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return None
        raw = headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError:
            raise ClientError(400, "Content-Length is not a number") from None
        if length < 0:
            raise ClientError(400, "Content-Length is negative")
        if length > self.max_upload:
            raise ClientError(413, f"upload of {length} bytes is over the relay's limit of {self.max_upload}")
        return length

    # -- entry point ------------------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest, lease_id: str, path: str, query: str) -> web.StreamResponse:
        """Answer one forwarded request; raise ClientError for a refusal or an unreachable Clowder."""
        plan = self.plan(request.method, request.headers, lease_id, path, query)
        await continue_if_asked(request)
        ctype = request.headers.get("Content-Type", "")
        payload: Union[bytes, AsyncIterator[bytes]]
        trouble: list[ClientError] = []
        if plan.length is not None and plan.length <= JSON_LIMIT and "json" in ctype.lower():
            try:
                raw = await request.content.readexactly(plan.length)
            except asyncio.IncompleteReadError:
                raise ClientError(400, "request body shorter than its Content-Length") from None
            if plan.lease_host:
                raw = raw.replace(plan.lease_host.encode(), plan.real_host.encode())
                raw = raw.replace(plan.lease_host.rstrip("/").encode(), plan.real_host.rstrip("/").encode())
            payload = raw
            plan.headers["Content-Length"] = str(len(raw))
        elif plan.length == 0:
            payload = b""
        else:
            payload = self._body(request, plan.length, trouble)
        if isinstance(payload, bytes) and request.method in _LEAN_METHODS:
            upstream: Upstream = await self._send_lean(request.method, plan, payload)
        else:
            upstream = await self._send(request.method, plan, payload, trouble)
        try:
            return await self._answer(request, upstream, plan.learn, lease_id)
        finally:
            upstream.release()

    # -- fetches of the relay's own (launcher.relay.inline) -----------------------------------------------
    async def fetch(self, lease_id: str, lease_key: str, path: str, version: int, limit: int) -> Optional[bytes]:
        """GET path for a lease as its extractor would (the same checks), the body if 200 and within limit.

        None for anything else (refused, not 200, encoded, too large, Clowder unreachable): the
        extractor then makes the call itself and sees what Clowder says.
        """
        headers = {"X-API-Key": lease_key} if version == 2 else {}
        try:
            plan = self.plan("GET", headers, lease_id, path, "" if version == 2 else urlencode({"key": lease_key}))
            plan.headers["Accept-Encoding"] = "identity"
            answer = await self._send_lean("GET", plan, b"")
        except ClientError:
            return None
        try:
            if answer.status != 200 or answer.headers.get("Content-Encoding", "identity").lower() != "identity" \
                    or (answer.content_length or 0) > limit:
                return None
            return await answer.read_all(limit)
        except _CUT_SHORT:
            return None
        finally:
            answer.release()

    # -- request side -------------------------------------------------------------------------------------
    async def _body(self, request: web.BaseRequest, length: Optional[int],
                    trouble: list[ClientError]) -> AsyncIterator[bytes]:
        """The agent's body in blocks, checked against its length (or, chunked, against max_upload)."""
        total = 0
        while length is None or total < length:
            block = await request.content.read(BLOCK if length is None else min(BLOCK, length - total))
            if not block:
                if length is not None:
                    trouble.append(ClientError(400, "request body shorter than its Content-Length"))
                    raise trouble[-1]
                return
            total += len(block)
            if total > self.max_upload:
                trouble.append(ClientError(413, f"upload is over the relay's limit of {self.max_upload} bytes"))
                raise trouble[-1]
            yield block

    async def _send(self, method: str, plan: Plan, payload: Union[bytes, AsyncIterator[bytes]],
                    trouble: list[ClientError]) -> aiohttp.ClientResponse:
        assert self._session is not None, "Forwarder.start() was not called"
        replayable = isinstance(payload, bytes)
        for attempt in (1, 2):
            try:
                return await self._session.request(method, plan.url, headers=plan.headers, data=payload,
                                                   allow_redirects=False, compress=None)
            except asyncio.TimeoutError:
                raise ClientError(504, f"Clowder at {plan.netloc} did not answer in time") from None
            except ClientError:
                raise
            except (aiohttp.ClientError, OSError) as exc:
                if trouble:
                    raise trouble[0] from None
                if attempt == 1 and replayable and isinstance(exc, _STALE):
                    continue  # a kept-alive connection the server had closed: once more, fresh
                raise ClientError(502, f"Clowder at {plan.netloc} is not reachable: "
                                       f"{exc.__class__.__name__}") from None
        raise AssertionError("unreachable")

    async def _send_lean(self, method: str, plan: Plan, payload: bytes) -> Answer:
        assert self._lean is not None, "Forwarder.start() was not called"
        url = plan.url
        port = url.port or (443 if url.scheme == "https" else 80)
        for fresh in (False, True):
            try:
                return await self._lean.request(method, url.scheme, url.raw_host or "", port, url.raw_path_qs,
                                                plan.netloc, plan.headers, payload, fresh=fresh)
            except Stale:
                continue  # a kept-alive connection the server had closed: once more, fresh
            except asyncio.TimeoutError:
                raise ClientError(504, f"Clowder at {plan.netloc} did not answer in time") from None
            except (UpstreamError, OSError, asyncio.IncompleteReadError) as exc:
                raise ClientError(502, f"Clowder at {plan.netloc} is not reachable: "
                                       f"{exc.__class__.__name__}") from None
        raise ClientError(502, f"Clowder at {plan.netloc} closed the connection twice")

    # -- response side --------------------------------------------------------------------------------------
    async def _answer(self, request: web.BaseRequest, upstream: Upstream, learn: Optional[str],
                      lease_id: str) -> web.StreamResponse:
        length = upstream.content_length
        ctype = upstream.headers.get("Content-Type", "")
        extra = {"Server": "clowder-relay"}
        extra.update((k, v) for k, v in upstream.headers.items() if k.lower() in _PASS_BACK)
        status, reason = upstream.status, upstream.reason or None
        if learn and 200 <= status < 300 and "json" in ctype.lower() and (length or 0) <= JSON_LIMIT:
            data = await _whole(upstream, length, JSON_LIMIT + 1)
            try:
                ids = ids_in(json.loads(data))
            except ValueError:
                ids = []
            if ids:
                await self._blocking(self.store.learn, lease_id, learn, ids)
            return web.Response(status=status, reason=reason, body=data, headers=extra)
        if length is not None and length <= SMALL:  # one write with its headers, not three
            data = await _whole(upstream, length, length)
            return web.Response(status=status, reason=reason, body=data, headers=extra)
        resp = web.StreamResponse(status=status, reason=reason, headers=extra)
        if length is not None:
            resp.content_length = length
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        blocks = upstream.blocks(BLOCK) if isinstance(upstream, Answer) else upstream.content.iter_chunked(BLOCK)
        try:
            async for block in blocks:
                await resp.write(block)
                sent += len(block)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError,
                asyncio.IncompleteReadError, UpstreamError, OSError):
            resp.force_close()  # upstream cut short: the agent sees a short read
            return resp
        if length is not None and sent < length:
            resp.force_close()
            return resp
        await resp.write_eof()
        return resp

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._run is None:
            return fn(*args)
        return await self._run(fn, *args)


async def _whole(upstream: Upstream, length: Optional[int], limit: int) -> bytes:
    """An answer's body read whole: exactly length bytes, or (length unknown) up to limit."""
    try:
        if isinstance(upstream, Answer):
            return await upstream.read_all(limit)
        if length is None:
            return await upstream.content.read(limit)
        return await upstream.content.readexactly(length)
    except _CUT_SHORT:
        raise ClientError(502, "Clowder's answer was cut short") from None
