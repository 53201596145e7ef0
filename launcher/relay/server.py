"""The relay's HTTP side: authenticated work API for agents plus the Clowder forwarding path.

The work API for agents (paths, request and answer records, limits, hello features) is defined
once, in hpc_common.relay_api; its docstring lists every call.

Registration for agents that cannot reach the broker: the relay remembers the last extractor_info
an agent registered and publishes it itself every `heartbeat` seconds (default 60, well inside
Clowder v2's 300 s window) while agents have called it within the last interval.

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

from hpc_common import relay_api as api
from hpc_common.messages import ATTEMPTS, Message
from hpc_common.retry_queues import DEFAULT_MAX_RETRIES

from .broker import BrokerLink
from .forward import ClientError, Forwarder, continue_if_asked
from .inline import inline_parts
from .longpoll import LeaseWaiters
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RelayMetrics
from .store import Lease, LeaseStore

log = logging.getLogger("launcher.relay")
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
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
            api.HELLO: ("GET", self._hello), api.LEASE: ("POST", self._lease),
            api.EXTEND: ("POST", self._extend), api.COMPLETE: ("POST", self._complete),
            api.RELEASE: ("POST", self._release), api.FAIL: ("POST", self._fail),
            api.DEAD_LETTER: ("POST", self._dead_letter), api.STATUS: ("POST", self._status),
            api.REGISTER: ("POST", self._register), api.BACKLOG: ("GET", self._backlog),
            api.METRICS: ("GET", self._metrics)}
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
        except (ClientError, api.BadRequest) as exc:
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
        if path not in (api.BACKLOG, api.METRICS):  # the launcher and Prometheus ask too: only agents count
            self._agent_seen = time.monotonic()
        body = await self._json_body(request) if method == "POST" else {}
        status, answer = await fn(request, body)
        if isinstance(answer, web.StreamResponse):
            return answer
        return json_response(status, answer)

    async def _hello(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, api.Hello(self.settings.queue, self.settings.lease_ttl, self.settings.max_wait,
                              self.settings.max_upload, self.broker.connected.is_set(), api.FEATURES).to_json()

    def _base_url(self, request: web.BaseRequest) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = request.headers.get("Host", "")
        if not _HOST_HEADER.match(host):
            raise ClientError(400, "missing or malformed Host header")
        scheme = "https" if self.settings.tls is not None else "http"
        return f"{scheme}://{host}"

    async def _lease(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, Any]:
        asked = api.LeaseRequest.from_json(body)
        agent, ids = asked.agent, asked.complete
        if self.stopping.is_set():
            if ids is None:
                raise ClientError(503, "the relay is shutting down")
            done = await self.run_blocking(self.store.complete_many, ids)
            # the completions count; nothing more goes out
            return 200, api.LeaseAnswer([], api.Settled.of(ids, done)).to_json()
        base = self._base_url(request)
        gone = _gone_peer(request)
        self._long_polls += 1
        try:
            leases, done = await self.waiters.lease(agent, asked.max, min(asked.wait, self.settings.max_wait),
                                                    lambda lease_id: api.clowder_base(base, lease_id), gone,
                                                    ids or ())
        finally:
            self._long_polls -= 1
            self._agent_seen = time.monotonic()
        settled = api.Settled.of(ids, done) if ids is not None else None
        self._on_the_way[agent] = self._on_the_way.get(agent, 0) + len(leases)
        try:
            return 200, await self._hand_out(request, leases, settled, asked.inline, asked.clowder_version, gone)
        finally:
            left = self._on_the_way.pop(agent, 0) - len(leases)
            if left > 0:
                self._on_the_way[agent] = left

    async def _hand_out(self, request: web.BaseRequest, leases: list[Lease], settled: Optional[api.Settled],
                        inline: int, version: int, gone: Callable[[], bool]) -> web.Response:
        """Write the lease answer (with inline files if asked); leases it did not reach go back at once."""
        delivered = False
        resp: Optional[web.Response] = None
        try:
            parts = await inline_parts(self.forwarder, leases, inline, version) if inline and leases else []
            self.metrics.inlined(sum(1 for part in parts if api.inline_has_file(part)))
            handed = [self._handed_out(lease, part) for lease, part in itertools.zip_longest(leases, parts)]
            resp = json_response(200, api.LeaseAnswer(handed, settled).to_json())
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
        if resp is None:  # what is left to say should the lease answer fail before it was made
            resp = json_response(200, api.LeaseAnswer([], settled).to_json())
        return resp

    def _handed_out(self, lease: Lease, inline: Optional[dict[str, Any]] = None) -> api.LeaseItem:
        body = lease.body
        original = lease.original()
        if isinstance(original.get("host"), str) and isinstance(original.get("secretKey"), str):
            # The agent gets the relay as its Clowder, and a key good only for this lease.
            original["host"] = lease.lease_host
            original["secretKey"] = lease.lease_key
            body = json.dumps(original).encode()
        headers = dict(lease.headers)
        headers[ATTEMPTS] = lease.attempts
        shown = Message(body, lease.routing_key, lease.reply_to, lease.correlation_id, headers, lease.content_type)
        return api.LeaseItem(lease.lease_id, shown, lease.attempts, lease.expires_at - time.time(), inline)

    @staticmethod
    def _gone() -> tuple[int, dict[str, Any]]:
        return api.GONE, api.gone_answer()

    async def _extend(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ok, gone = await self.run_blocking(self.store.extend, api.lease_ids_of(body), self.settings.lease_ttl)
        return 200, api.ExtendAnswer(ok, gone, self.settings.lease_ttl).to_json()

    async def _complete(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "lease_ids" in body:  # a batch: {"done": [...], "gone": [...]}
            ids = api.lease_ids_of(body)
            return 200, api.Settled.of(ids, await self.run_blocking(self.store.complete_many, ids)).to_json()
        ok = await self.run_blocking(self.store.complete, api.lease_id_of(body))
        return (200, {"ok": True}) if ok else self._gone()

    async def _release(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ok = await self.run_blocking(self.store.release, api.lease_id_of(body))
        return (200, {"ok": True}) if ok else self._gone()

    async def _fail(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        failed = api.FailRequest.from_json(body)
        delay = failed.delay
        backoff = self.backoff if delay is None else (lambda _attempts: delay)
        outcome = await self.run_blocking(self.store.fail, failed.lease_id, failed.attempts,
                                          self._scrub(failed.lease_id, failed.reason), self.settings.max_retries,
                                          backoff)
        return (200, {"outcome": outcome}) if outcome else self._gone()

    async def _dead_letter(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        dead = api.DeadLetterRequest.from_json(body)
        ok = await self.run_blocking(self.store.dead_letter, dead.lease_id, self._scrub(dead.lease_id, dead.reason),
                                     self._scrub(dead.lease_id, dead.traceback), dead.attempts, dead.agent)
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
        items = api.status_items_of(body)
        routes = await self.run_blocking(lambda: [self.store.route(lease_id) for lease_id, _ in items])
        accepted = 0
        for (_, payload), route in zip(items, routes):
            if route is None or not route[0]:
                continue
            if self.broker.publish_status(route[0], route[1], payload):
                accepted += 1
        return 202, {"accepted": accepted}

    async def _register(self, request: web.BaseRequest, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        asked = api.RegisterRequest.from_json(body)
        message = {"id": asked.agent, "queue": self.settings.queue, "owner": asked.owner,
                   "extractor_info": asked.extractor_info}
        self._registration = message
        self._next_register = time.monotonic() + self.settings.heartbeat
        queued = self.broker.publish_registration(dict(message))
        return 202, {"accepted": queued}

    async def _backlog(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        counts = await self.run_blocking(self.store.backlog, self.settings.lease_ttl)
        counts.update(queue=self.settings.queue, lease_ttl=self.settings.lease_ttl)
        agent = request.query.get("agent")
        if agent:  # leases granted to that agent whose answer is still being written: work it is about to get
            counts["on_the_way"] = self._on_the_way.get(agent[:api.AGENT_LIMIT], 0)
        return 200, counts

    async def _metrics(self, request: web.BaseRequest, _body: dict[str, Any]) -> tuple[int, web.Response]:
        """Prometheus text; scraped with the same bearer token (the store is read in the pool)."""
        body = await self.run_blocking(self.metrics.render)
        return 200, web.Response(status=200, body=body, headers={"Server": "clowder-relay",
                                                                 "Content-Type": METRICS_CONTENT_TYPE})
