"""The relay's HTTP side: authenticated work API for agents plus the Clowder forwarding path.

Work API (JSON in and out, `Authorization: Bearer <token>` on every call):

  GET  /v1/hello                         {queue, lease_ttl, max_wait, max_upload, broker_connected,
                                          features} (features: "lease_complete", "inline_files")
  POST /v1/lease       {agent, max, wait, complete?, inline?, clowder_version?}  up to max leases,
                                          waiting up to wait s for the first; `complete` (lease ids
                                          done) is settled first, as /v1/complete would, answered in
                                          {done, gone} beside `leases` (one round trip per file
                                          instead of two); with `inline` (bytes), file messages'
                                          file info and files up to that size come in each lease's
                                          `inline` (launcher.relay.inline)
  POST /v1/extend      {lease_ids}         heartbeat: {extended, gone}
  POST /v1/complete    {lease_id} or {lease_ids}   done, results in Clowder: the message is forgotten
  POST /v1/release     {lease_id}          hand back (not a failure): leasable again at once
  POST /v1/fail        {lease_id, attempts, reason, delay?}  {outcome: retry | dead}; leasable again
                                          after delay s (default: the relay's --retry-backoff)
  GET  /v1/backlog[?agent=ID]            what the table holds: {ready, backoff, stale, leased, dead,
                                          pending, retry_after} (launcher.backlog, idle agents); with
                                          agent, `on_the_way`: leases granted to it, answer not yet sent
  POST /v1/dead-letter {lease_id, reason, traceback, attempts, agent}
  POST /v1/status      {items: [{lease_id, payload}]}        best effort, to the lease's reply_to
  POST /v1/register    {agent, extractor_info, owner}        best effort, `extractors` exchange
  GET  /metrics                          Prometheus text (launcher.relay.metrics), same token

Registration for agents that cannot reach the broker: the relay remembers the last extractor_info
an agent registered and publishes it itself every `heartbeat` seconds (default 60, well inside
Clowder v2's 300 s window) while agents have called it within the last interval.

A settle call on a lease that is no longer live answers 409 with {"gone": true}: the message is
already back in the relay's hands (expired) and the agent must not retry the call.

`/clowder/<lease id>/api/...` is the Clowder path (launcher.relay.forward); it is authenticated
by the per-lease key instead, because unchanged extractors send Clowder's key, not ours.

Serving: aiohttp's low-level server on one asyncio event loop (uvloop's when installed; one thread serves every
connection; a waiting long poll is a future, launcher.relay.longpoll). Blocking work -- the lease
table's SQLite commits -- runs in a small thread pool; publishes go to the broker link's thread
through its outbox; the lease reaper keeps its own thread. Every route is one method
`async def _name(request, body) -> (status, answer)` listed in `Relay.routes`.

Limits: work-API bodies need a Content-Length and at most `max_json` bytes (413 otherwise);
request lines up to 64 KiB, headers up to 8 KiB each and 128 in all (400 beyond). Open
connections are capped at `max_connections`: one more gets a 503 JSON answer and is closed (an
agent keeps about six connections open). One relay process serves thousands of agent
connections and uses one core at most (the GIL): benchmarks/results/relay_load.md measures it
against the earlier thread-per-connection server, side by side. Every error is JSON
{"error": "..."} with a 4xx/5xx. The lease key in forwarded URLs is a capability: the relay
never logs query strings (no access log) and logs only the first characters of lease ids.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hmac
import itertools
import json
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from hpc_common.messages import ATTEMPTS, REASON_LIMIT, TRACEBACK_LIMIT
from hpc_common.retry_queues import DEFAULT_MAX_RETRIES

from .broker import BrokerLink
from .forward import ClientError, Forwarder, continue_if_asked
from .inline import inline_parts
from .longpoll import LeaseWaiters
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RelayMetrics
from .store import Lease, LeaseStore

log = logging.getLogger("launcher.relay")
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
MAX_DELAY_S = 24 * 3600.0
_LEASE_PATH = re.compile(r"^/clowder/([A-Za-z0-9_\-]{10,64})/(.*)$")
_CLOSE_AFTER = (400, 411, 413)      # the request body may be unread: this connection cannot go on
IDLE_TIMEOUT = 120.0                # an idle kept-alive connection is closed after this
THREADS = 4                         # SQLite work (serialised by the store's lock anyway)
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nServer: clowder-relay\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: 58\r\n\r\n"
         b'{"error": "too many connections to the relay; try again"}\n')

Route = Callable[[web.BaseRequest, dict[str, Any]], Awaitable[tuple[int, Optional[Any]]]]


@dataclass
class RelaySettings:
    """What one relay process needs (launcher.relay.main builds it from flags and environment)."""

    host: str
    port: int
    token: str
    queue: str
    lease_ttl: float = 15.0
    heartbeat: float = 60.0
    max_wait: float = 30.0
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff: float = 2.0
    max_upload: int = 50 << 30
    max_json: int = 1 << 20
    max_connections: int = 1024
    clowder_url: Optional[str] = None
    public_url: Optional[str] = None
    tls: Optional[ssl.SSLContext] = None


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 answer, our side closed, the rest of its request dropped."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        transport.write(_BUSY)  # type: ignore[attr-defined]
        if transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]
        # closing at once could reset the connection before the client read the answer
        self._timer = asyncio.get_running_loop().call_later(2.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._timer.cancel()


class _CappedServer(web.Server):
    """aiohttp's low-level server with an open-connection cap (503 beyond it)."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], cap: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.cap = cap

    def __call__(self) -> Any:
        if len(self.connections) >= self.cap:
            return _Refuse()
        return super().__call__()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (about twice as fast per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def json_response(status: int, obj: Any, close: bool = False, headers: Optional[dict[str, str]] = None
                  ) -> web.Response:
    """A JSON answer (what every work-API route and every error sends)."""
    resp = web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json",
                        headers={"Server": "clowder-relay", **(headers or {})})
    if close:
        resp.force_close()
    return resp


def _error(status: int, text: str, close: bool = False, **more: Any) -> web.Response:
    extra = {"WWW-Authenticate": 'Bearer realm="clowder-relay"'} if status == 401 else None
    return json_response(status, {"error": text, **more}, close=close, headers=extra)


def _loggable(path: str) -> str:
    match = _LEASE_PATH.match(path)
    return f"/clowder/{match.group(1)[:6]}…/{match.group(2)}" if match else path


def _field(obj: dict[str, Any], name: str, kind: type, required: bool = True, default: Any = None) -> Any:
    value = obj.get(name, default)
    if value is None:
        if required:
            raise ClientError(400, f"missing field {name!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClientError(400, f"field {name!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _settled(asked: list[str], done: list[str]) -> dict[str, list[str]]:
    """The answer to a batch of completions: which were settled, which leases were no longer live."""
    ok = set(done)
    return {"done": sorted(ok), "gone": [i for i in asked if i not in ok]}


def _gone_peer(request: web.BaseRequest) -> Callable[[], bool]:
    """True once the agent has hung up (checked by the long poll)."""
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()
    return gone


class Relay:
    """The relay's request handling, over a lease store, a broker link and a forwarder."""

    def __init__(self, settings: RelaySettings, store: LeaseStore, broker: BrokerLink, forwarder: Forwarder) -> None:
        self.settings = settings
        self.token_bytes = settings.token.encode()
        self.store = store
        self.broker = broker
        self.forwarder = forwarder
        self.stopping = threading.Event()
        self.routes: dict[str, tuple[str, Route]] = {
            "/v1/hello": ("GET", self._hello), "/v1/lease": ("POST", self._lease),
            "/v1/extend": ("POST", self._extend), "/v1/complete": ("POST", self._complete),
            "/v1/release": ("POST", self._release), "/v1/fail": ("POST", self._fail),
            "/v1/dead-letter": ("POST", self._dead_letter), "/v1/status": ("POST", self._status),
            "/v1/register": ("POST", self._register), "/v1/backlog": ("GET", self._backlog),
            "/metrics": ("GET", self._metrics)}
        self._sock: Optional[socket.socket] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="relay-db")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._served = threading.Event()
        self.waiters = LeaseWaiters(store, settings.lease_ttl, self.run_blocking)
        self._reaper = threading.Thread(target=self._reap, name="relay-reaper", daemon=True)
        self.metrics = RelayMetrics(store, broker, settings.queue)
        self._agent_seen = 0.0            # monotonic time of the last call by an agent
        self._long_polls = 0              # agents waiting in /v1/lease right now (alive too; event loop only)
        self._on_the_way: dict[str, int] = {}  # agent -> leases granted, its answer not yet written (event loop)
        self._registration: Optional[dict[str, Any]] = None
        self._next_register = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        """Open the listening socket; return the bound (host, port)."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.settings.host, self.settings.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        return sock.getsockname()[:2]

    def serve(self) -> None:
        """Serve until shutdown() (blocks; runs its own event loop in this thread)."""
        assert self._sock is not None
        self._reaper.start()
        loop = new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._pool.shutdown(wait=False)
            self._served.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.stopping.is_set():
            return
        await self.forwarder.start(self.run_blocking)
        self.waiters.start()
        web_server = _CappedServer(self._dispatch, self.settings.max_connections, access_log=None,
                                   keepalive_timeout=IDLE_TIMEOUT, max_line_size=65536, auto_decompress=False,
                                   lingering_time=2.0)
        server = await self._loop.create_server(web_server, sock=self._sock, ssl=self.settings.tls,
                                                ssl_handshake_timeout=15 if self.settings.tls else None,
                                                backlog=1024)
        try:
            await self._stop.wait()
        finally:
            server.close()
            await self.waiters.stop()
            await web_server.shutdown(2.0)
            await self.forwarder.close()

    def shutdown(self) -> None:
        """Stop answering: long polls return at once, the listening socket closes (from another thread)."""
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop has already ended
            self._served.wait(15.0)
        elif self._sock is not None and not self._reaper.is_alive():
            self._sock.close()

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call (SQLite) in the relay's thread pool."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def _reap(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                back, dead = self.store.expire(self.settings.max_retries)
                if back or dead:
                    log.warning("%d expired lease(s) returned to the queue, %d dead-lettered", back, dead)
            except Exception:  # noqa: BLE001 - the reaper must keep going
                log.exception("lease reaper failed")
            self._register_for_agents(time.monotonic())

    def _register_for_agents(self, now: float) -> None:
        """Keep Clowder seeing the extractor while agents live (they cannot reach the broker)."""
        interval = self.settings.heartbeat
        alive = self._long_polls > 0 or now - self._agent_seen <= interval
        if self._registration is None or now < self._next_register or not alive:
            return
        self._next_register = now + interval
        self.broker.publish_registration(dict(self._registration))

    def backoff(self, attempts: int) -> float:
        return min(self.settings.retry_backoff * (2 ** max(0, attempts - 1)), 60.0)

    # -- dispatch ----------------------------------------------------------------------------------
    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        path, _, query = request.raw_path.partition("?")
        status = 500
        match = None
        try:
            match = _LEASE_PATH.match(path)
            if match:
                try:
                    resp = await self.forwarder.handle(request, match.group(1), match.group(2), query)
                except ClientError as exc:
                    # The request body may be unread or half-sent upstream: this connection cannot go on.
                    resp = _error(exc.status, exc.text, close=True)
            elif not self._authorized(request):
                resp = _error(401, "missing or wrong bearer token", close=(request.content_length or 0) > 65536)
            else:
                resp = await self.api(request, path)
            status = resp.status
            return resp
        except ClientError as exc:
            status = exc.status
            return _error(exc.status, exc.text, close=exc.status in _CLOSE_AFTER or exc.status >= 500)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the agent has gone: nothing to answer
        except Exception:  # noqa: BLE001 - answered as JSON like every other error
            log.exception("relay: unexpected error serving %s %s", request.method, _loggable(path))
            return _error(500, "internal error in the relay (see its log)", close=True)
        finally:
            self.metrics.observe(path, status, forwarded=match is not None)
            if log.isEnabledFor(logging.DEBUG):  # _loggable's regex on every request otherwise
                log.debug("%s %s -> %d in %.1f ms", request.method, _loggable(path), status,
                          (time.monotonic() - started) * 1000)

    def _authorized(self, request: web.BaseRequest) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token_bytes)

    async def _json_body(self, request: web.BaseRequest) -> dict[str, Any]:
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise ClientError(411, "send the body with a Content-Length, not chunked")
        raw = request.headers.get("Content-Length")
        if raw is None:
            raise ClientError(411, "a Content-Length header is required")
        length = request.content_length or 0  # the parser has checked it is a number >= 0
        if length > self.settings.max_json:
            raise ClientError(413, f"request body of {length} bytes is over the limit of "
                                   f"{self.settings.max_json}")
        await continue_if_asked(request)
        try:
            data = await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ClientError(400, "request body shorter than its Content-Length") from None
        try:
            obj = json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(obj, dict):
            raise ClientError(400, f"the body must be a JSON object, not {type(obj).__name__}")
        return obj

    # -- the work API ------------------------------------------------------------------------------
    async def api(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        """One work-API call: look its route up, read its body, answer what the route returns."""
        if path not in self.routes:
            raise ClientError(404, f"no such endpoint: {path}")
        method, fn = self.routes[path]
        if request.method != method:
            raise ClientError(405, f"{path} takes {method}, not {request.method}")
        if path not in ("/v1/backlog", "/metrics"):  # the launcher and Prometheus ask too: only agents count
            self._agent_seen = time.monotonic()
        body = await self._json_body(request) if method == "POST" else {}
        status, answer = await fn(request, body)
        if isinstance(answer, web.StreamResponse):
            return answer
        return json_response(status, answer)

    async def _hello(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"queue": self.settings.queue, "lease_ttl": self.settings.lease_ttl,
                     "max_wait": self.settings.max_wait, "max_upload": self.settings.max_upload,
                     "broker_connected": self.broker.connected.is_set(),
                     "features": ["lease_complete", "inline_files"]}

    def _base_url(self, request: web.BaseRequest) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = request.headers.get("Host", "")
        if not _HOST_HEADER.match(host):
            raise ClientError(400, "missing or malformed Host header")
        scheme = "https" if self.settings.tls is not None else "http"
        return f"{scheme}://{host}"

    async def _lease(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, Any]:
        agent = _field(body, "agent", str)[:200]
        limit = _field(body, "max", int, required=False, default=1)
        wait = _field(body, "wait", float, required=False, default=0.0)
        if not 1 <= limit <= 100:
            raise ClientError(400, "field 'max' must be between 1 and 100")
        if wait < 0:
            raise ClientError(400, "field 'wait' must not be negative")
        inline = _field(body, "inline", int, required=False, default=0)
        version = _field(body, "clowder_version", int, required=False, default=1)
        if inline < 0 or version not in (1, 2):
            raise ClientError(400, "field 'inline' must not be negative, 'clowder_version' must be 1 or 2")
        ids = self._lease_ids(body, "complete") if "complete" in body else None
        if self.stopping.is_set():
            if ids is None:
                raise ClientError(503, "the relay is shutting down")
            done = await self.run_blocking(self.store.complete_many, ids)
            return 200, {"leases": [], **_settled(ids, done)}  # the completions count; nothing more goes out
        base = self._base_url(request)
        gone = _gone_peer(request)
        self._long_polls += 1
        try:
            leases, done = await self.waiters.lease(agent, limit, min(wait, self.settings.max_wait),
                                                    lambda lease_id: f"{base}/clowder/{lease_id}/", gone, ids or ())
        finally:
            self._long_polls -= 1
            self._agent_seen = time.monotonic()
        settled = _settled(ids, done) if ids is not None else {}
        self._on_the_way[agent] = self._on_the_way.get(agent, 0) + len(leases)
        try:
            return 200, await self._hand_out(request, leases, settled, inline, version, gone)
        finally:
            left = self._on_the_way.pop(agent, 0) - len(leases)
            if left > 0:
                self._on_the_way[agent] = left

    async def _hand_out(self, request: web.BaseRequest, leases: list[Lease], settled: dict[str, Any], inline: int,
                        version: int, gone: Callable[[], bool]) -> web.Response:
        """Write the lease answer (with inline files if asked); leases it did not reach go back at once."""
        delivered = False
        resp = json_response(200, {"leases": [], **settled})  # what is left to say should the lease answer fail
        try:
            parts = await inline_parts(self.forwarder, leases, inline, version) if inline and leases else []
            self.metrics.inlined(sum(1 for part in parts if part and "file_b64" in part))
            handed = [self._handed_out(lease, part) for lease, part in itertools.zip_longest(leases, parts)]
            resp = json_response(200, {"leases": handed, **settled})
            if leases and gone():
                raise ConnectionResetError("the agent hung up during its long poll")
            await resp.prepare(request)
            await resp.write_eof()
            delivered = True
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if not delivered:
                for lease in leases:  # never delivered: leasable again at once
                    await self.run_blocking(self.store.release, lease.lease_id)
        return resp

    def _handed_out(self, lease: Lease, inline: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        body = lease.body
        original = lease.original()
        if isinstance(original.get("host"), str) and isinstance(original.get("secretKey"), str):
            # The agent gets the relay as its Clowder, and a key good only for this lease.
            original["host"] = lease.lease_host
            original["secretKey"] = lease.lease_key
            body = json.dumps(original).encode()
        headers = dict(lease.headers)
        headers[ATTEMPTS] = lease.attempts
        return {"lease_id": lease.lease_id, "body_b64": base64.b64encode(body).decode("ascii"),
                "routing_key": lease.routing_key, "reply_to": lease.reply_to,
                "correlation_id": lease.correlation_id, "headers": headers, "content_type": lease.content_type,
                "attempts": lease.attempts, "expires_in": lease.expires_at - time.time(),
                **({"inline": inline} if inline else {})}

    def _lease_id(self, body: dict[str, Any]) -> str:
        value = _field(body, "lease_id", str)
        if len(value) > 64:
            raise ClientError(400, "field 'lease_id' is too long")
        return value

    @staticmethod
    def _gone() -> tuple[int, dict[str, Any]]:
        return 409, {"error": "lease not live (expired, or already settled)", "gone": True}

    @staticmethod
    def _lease_ids(body: dict[str, Any], name: str = "lease_ids") -> list[str]:
        ids = _field(body, name, list)
        if len(ids) > 10000 or not all(isinstance(i, str) and len(i) <= 64 for i in ids):
            raise ClientError(400, f"field {name!r} must be a list of lease ids")
        return ids

    async def _extend(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ok, gone = await self.run_blocking(self.store.extend, self._lease_ids(body), self.settings.lease_ttl)
        return 200, {"extended": ok, "gone": gone, "lease_ttl": self.settings.lease_ttl}

    async def _complete(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "lease_ids" in body:  # a batch: {"done": [...], "gone": [...]}
            ids = self._lease_ids(body)
            return 200, _settled(ids, await self.run_blocking(self.store.complete_many, ids))
        ok = await self.run_blocking(self.store.complete, self._lease_id(body))
        return (200, {"ok": True}) if ok else self._gone()

    async def _release(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ok = await self.run_blocking(self.store.release, self._lease_id(body))
        return (200, {"ok": True}) if ok else self._gone()

    async def _fail(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        lease_id = self._lease_id(body)
        attempts = _field(body, "attempts", int, required=False, default=0)
        reason = _field(body, "reason", str, required=False, default="")[:REASON_LIMIT]
        delay = _field(body, "delay", float, required=False, default=None)
        if delay is not None and not 0 <= delay <= MAX_DELAY_S:
            raise ClientError(400, f"field 'delay' must be between 0 and {MAX_DELAY_S}")
        backoff = self.backoff if delay is None else (lambda _attempts: delay)
        outcome = await self.run_blocking(self.store.fail, lease_id, attempts, self._scrub(lease_id, reason),
                                          self.settings.max_retries, backoff)
        return (200, {"outcome": outcome}) if outcome else self._gone()

    async def _dead_letter(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        lease_id = self._lease_id(body)
        reason = self._scrub(lease_id, _field(body, "reason", str, required=False, default="")[:REASON_LIMIT])
        tb = self._scrub(lease_id, _field(body, "traceback", str, required=False, default="")[-TRACEBACK_LIMIT:])
        attempts = _field(body, "attempts", int, required=False, default=0)
        agent = _field(body, "agent", str, required=False, default=None)
        ok = await self.run_blocking(self.store.dead_letter, lease_id, reason, tb, attempts,
                                     agent[:200] if agent else None)
        return (200, {"ok": True}) if ok else self._gone()

    def _scrub(self, lease_id: str, text: str) -> str:
        """Mask the real Clowder key and the lease key in text bound for the error queue."""
        lease = self.store.live(lease_id)
        if lease is None or not text:
            return text
        for secret in (lease.original().get("secretKey"), lease.lease_key):
            if isinstance(secret, str) and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    async def _status(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        items = _field(body, "items", list)
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("lease_id"), str) \
                    or not isinstance(item.get("payload"), dict):
                raise ClientError(400, "each status item needs a 'lease_id' string and a 'payload' object")
        routes = await self.run_blocking(lambda: [self.store.route(item["lease_id"]) for item in items])
        accepted = 0
        for item, route in zip(items, routes):
            if route is None or not route[0]:
                continue
            if self.broker.publish_status(route[0], route[1], item["payload"]):
                accepted += 1
        return 202, {"accepted": accepted}

    async def _register(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        agent = _field(body, "agent", str)[:200]
        info = _field(body, "extractor_info", dict)
        owner = _field(body, "owner", str, required=False, default="")
        message = {"id": agent, "queue": self.settings.queue, "owner": owner, "extractor_info": info}
        self._registration = message
        self._next_register = time.monotonic() + self.settings.heartbeat
        queued = self.broker.publish_registration(dict(message))
        return 202, {"accepted": queued}

    async def _backlog(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        counts = await self.run_blocking(self.store.backlog, self.settings.lease_ttl)
        counts.update(queue=self.settings.queue, lease_ttl=self.settings.lease_ttl)
        agent = request.query.get("agent")
        if agent:  # leases granted to that agent whose answer is still being written: work it is about to get
            counts["on_the_way"] = self._on_the_way.get(agent[:200], 0)
        return 200, counts

    async def _metrics(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, web.Response]:
        """Prometheus text; scraped with the same bearer token (the store is read in the pool)."""
        body = await self.run_blocking(self.metrics.render)
        return 200, web.Response(status=200, body=body, headers={"Server": "clowder-relay",
                                                                 "Content-Type": METRICS_CONTENT_TYPE})
