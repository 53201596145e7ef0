"""The relay's HTTP side: authenticated work API for agents plus the Clowder forwarding path.

Work API (JSON in and out, `Authorization: Bearer <token>` on every call):

  GET  /v1/hello                         {queue, lease_ttl, max_wait, max_upload}
  POST /v1/lease       {agent, max, wait}  up to max leases, waiting up to wait s for the first
  POST /v1/extend      {lease_ids}         heartbeat: {extended, gone}
  POST /v1/complete    {lease_id} or {lease_ids}   done, results in Clowder: the message is forgotten
  POST /v1/release     {lease_id}          hand back (not a failure): leasable again at once
  POST /v1/fail        {lease_id, attempts, reason, delay?}  {outcome: retry | dead}; leasable again
                                          after delay s (default: the relay's --retry-backoff)
  GET  /v1/backlog                       what the table holds: {ready, backoff, stale, leased, dead,
                                          pending, retry_after} (launcher.backlog, idle agents)
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

Limits: work-API bodies need a Content-Length and at most `max_json` bytes (413 otherwise); the
stdlib parser already bounds request lines and headers (64 KiB, 100 headers). One thread per
connection (`http.server.ThreadingHTTPServer`), capped at `max_connections` (503 beyond it; an
agent keeps about six connections open), so a relay serves some hundreds of agents, not tens of
thousands, and uses one core at most (the GIL): about 85 files/s of small files measured on a
2-core machine shared with everything else. Every error is JSON {"error": "..."} with a 4xx/5xx.
The lease key in forwarded URLs is a capability: the relay never logs query strings and logs only
the first characters of lease ids.
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import urlsplit

from hpc_common.messages import ATTEMPTS, REASON_LIMIT, TRACEBACK_LIMIT

from .broker import BrokerLink
from .forward import ClientError, Forwarder
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RelayMetrics
from .store import Lease, LeaseStore

log = logging.getLogger("launcher.relay")
_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
MAX_DELAY_S = 24 * 3600.0
_LEASE_PATH = re.compile(r"^/clowder/([A-Za-z0-9_\-]{10,64})/(.*)$")


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
    max_retries: int = 3
    retry_backoff: float = 2.0
    max_upload: int = 50 << 30
    max_json: int = 1 << 20
    max_connections: int = 1024
    clowder_url: Optional[str] = None
    public_url: Optional[str] = None
    tls: Optional[ssl.SSLContext] = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self._slots = threading.BoundedSemaphore(relay.settings.max_connections)
        if ":" in relay.settings.host:
            self.address_family = socket.AF_INET6
        super().__init__((relay.settings.host, relay.settings.port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no reverse DNS lookup (HTTPServer does one)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self.relay.settings.tls is None:
                try:
                    body = b'{"error": "too many connections to the relay; try again"}'
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.relay.settings.tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(15)  # the handshake happens here, in this connection's own thread
        try:
            wrapped = tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc.__class__.__name__)
            return
        try:
            self.RequestHandlerClass(wrapped, client_address, self)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            return
        log.exception("relay: unexpected error serving %s", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clowder-relay"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120  # an idle kept-alive connection is closed after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # request lines can carry lease keys (?key=): never logged

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    @property
    def relay(self) -> "Relay":
        return self.server.relay  # type: ignore[attr-defined]

    # -- plumbing --------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._send_body(status, json.dumps(obj).encode(), "application/json", extra)

    def _send_body(self, status: int, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('Status',))[0]}", "Server: clowder-relay",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in extra]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _error(self, status: int, text: str, close: bool = False, **more: Any) -> None:
        if close:
            self.close_connection = True
        extra = (("WWW-Authenticate", 'Bearer realm="clowder-relay"'),) if status == 401 else ()
        self._send_json(status, {"error": text, **more}, extra)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self.relay.token_bytes)

    def _json_body(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ClientError(411, "send the body with a Content-Length, not chunked")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ClientError(411, "a Content-Length header is required")
        try:
            length = int(raw)
        except ValueError:
            raise ClientError(400, "Content-Length is not a number") from None
        if length < 0:
            raise ClientError(400, "Content-Length is negative")
        if length > self.relay.settings.max_json:
            raise ClientError(413, f"request body of {length} bytes is over the limit of "
                                   f"{self.relay.settings.max_json}")
        data = self.rfile.read(length)
        if len(data) != length:
            raise ClientError(400, "request body shorter than its Content-Length")
        try:
            obj = json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(obj, dict):
            raise ClientError(400, f"the body must be a JSON object, not {type(obj).__name__}")
        return obj

    def _dispatch(self) -> None:
        started = time.monotonic()
        split = urlsplit(self.path)
        status = 500
        match = None
        try:
            match = _LEASE_PATH.match(split.path)
            if match:
                status = self._forward(match.group(1), match.group(2), split.query)
                return
            if not self._authorized():
                self._consume_small_body()
                status = 401
                self._error(401, "missing or wrong bearer token")
                return
            status = self.relay.api(self, split.path)
        except ClientError as exc:
            status = exc.status
            self._error(exc.status, exc.text, close=exc.status in (400, 411, 413) or exc.status >= 500)
        finally:
            self.relay.metrics.observe(split.path, status, forwarded=match is not None)
            log.debug("%s %s -> %d in %.1f ms", self.command, _loggable(split.path), status,
                      (time.monotonic() - started) * 1000)

    def _consume_small_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= 65536:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _forward(self, lease_id: str, rest: str, query: str) -> int:
        try:
            return self.relay.forwarder.handle(self, lease_id, rest, query)
        except ClientError as exc:
            # The request body may be unread or half-sent upstream: this connection cannot go on.
            self._error(exc.status, exc.text, close=True)
            return exc.status


def _peer_closed(sock: Any) -> bool:
    """True when the client has closed its side of the connection (checked without reading)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False  # (a socket with a timeout would wait in recv even with MSG_DONTWAIT)
        data = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True
    return data == b""


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


class Relay:
    """The relay's request handling, over a lease store, a broker link and a forwarder."""

    def __init__(self, settings: RelaySettings, store: LeaseStore, broker: BrokerLink, forwarder: Forwarder) -> None:
        self.settings = settings
        self.token_bytes = settings.token.encode()
        self.store = store
        self.broker = broker
        self.forwarder = forwarder
        self.stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._reaper = threading.Thread(target=self._reap, name="relay-reaper", daemon=True)
        self.metrics = RelayMetrics(store, broker, settings.queue)
        self._agent_seen = 0.0            # monotonic time of the last call by an agent
        self._long_polls = 0              # agents waiting in /v1/lease right now (alive too)
        self._polls_lock = threading.Lock()
        self._registration: Optional[dict[str, Any]] = None
        self._next_register = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        """Open the listening socket; return the bound (host, port)."""
        self._server = _Server(self)
        return self._server.server_address[:2]

    def serve(self) -> None:
        """Serve until shutdown() (blocks)."""
        assert self._server is not None
        self._reaper.start()
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop answering: long polls return at once, the listening socket closes."""
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

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

    # -- the work API ------------------------------------------------------------------------------
    def api(self, h: _Handler, path: str) -> int:
        routes = {"/v1/hello": ("GET", self._hello), "/v1/lease": ("POST", self._lease),
                  "/v1/extend": ("POST", self._extend), "/v1/complete": ("POST", self._complete),
                  "/v1/release": ("POST", self._release), "/v1/fail": ("POST", self._fail),
                  "/v1/dead-letter": ("POST", self._dead_letter), "/v1/status": ("POST", self._status),
                  "/v1/register": ("POST", self._register), "/v1/backlog": ("GET", self._backlog)}
        if path == "/metrics" and h.command == "GET":  # Prometheus scrapes with the bearer token
            h._send_body(200, self.metrics.render(), METRICS_CONTENT_TYPE)
            return 200
        if path not in routes:
            raise ClientError(404, f"no such endpoint: {path}")
        method, fn = routes[path]
        if h.command != method:
            raise ClientError(405, f"{path} takes {method}, not {h.command}")
        if path != "/v1/backlog":  # the launcher asks for counts too: only agents keep registration alive
            self._agent_seen = time.monotonic()
        body = h._json_body() if method == "POST" else {}
        status, answer = fn(h, body)
        if answer is not None:
            h._send_json(status, answer)
        return status

    def _hello(self, h: _Handler, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"queue": self.settings.queue, "lease_ttl": self.settings.lease_ttl,
                     "max_wait": self.settings.max_wait, "max_upload": self.settings.max_upload,
                     "broker_connected": self.broker.connected.is_set()}

    def _base_url(self, h: _Handler) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = h.headers.get("Host", "")
        if not _HOST_HEADER.match(host):
            raise ClientError(400, "missing or malformed Host header")
        scheme = "https" if self.settings.tls is not None else "http"
        return f"{scheme}://{host}"

    def _lease(self, h: _Handler, body: dict[str, Any]) -> tuple[int, Optional[dict[str, Any]]]:
        agent = _field(body, "agent", str)[:200]
        limit = _field(body, "max", int, required=False, default=1)
        wait = _field(body, "wait", float, required=False, default=0.0)
        if not 1 <= limit <= 100:
            raise ClientError(400, "field 'max' must be between 1 and 100")
        if wait < 0:
            raise ClientError(400, "field 'wait' must not be negative")
        if self.stopping.is_set():
            raise ClientError(503, "the relay is shutting down")
        base = self._base_url(h)

        def give_up() -> bool:
            return self.stopping.is_set() or _peer_closed(h.connection)

        with self._polls_lock:
            self._long_polls += 1
        try:
            leases = self.store.wait_lease(agent, limit, self.settings.lease_ttl, min(wait, self.settings.max_wait),
                                           lambda lease_id: f"{base}/clowder/{lease_id}/", give_up)
        finally:
            with self._polls_lock:
                self._long_polls -= 1
            self._agent_seen = time.monotonic()
        try:
            if leases and _peer_closed(h.connection):
                raise ConnectionResetError("the agent hung up during its long poll")
            h._send_json(200, {"leases": [self._handed_out(lease) for lease in leases]})
        except OSError:
            for lease in leases:  # never delivered: leasable again at once
                self.store.release(lease.lease_id)
            raise
        return 200, None

    def _handed_out(self, lease: Lease) -> dict[str, Any]:
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
                "attempts": lease.attempts, "expires_in": lease.expires_at - time.time()}

    def _lease_id(self, body: dict[str, Any]) -> str:
        value = _field(body, "lease_id", str)
        if len(value) > 64:
            raise ClientError(400, "field 'lease_id' is too long")
        return value

    @staticmethod
    def _gone() -> tuple[int, dict[str, Any]]:
        return 409, {"error": "lease not live (expired, or already settled)", "gone": True}

    def _extend(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ids = _field(body, "lease_ids", list)
        if len(ids) > 10000 or not all(isinstance(i, str) and len(i) <= 64 for i in ids):
            raise ClientError(400, "field 'lease_ids' must be a list of lease ids")
        ok, gone = self.store.extend(ids, self.settings.lease_ttl)
        return 200, {"extended": ok, "gone": gone, "lease_ttl": self.settings.lease_ttl}

    def _complete(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "lease_ids" in body:  # a batch: {"done": [...], "gone": [...]}
            ids = _field(body, "lease_ids", list)
            if len(ids) > 10000 or not all(isinstance(i, str) and len(i) <= 64 for i in ids):
                raise ClientError(400, "field 'lease_ids' must be a list of lease ids")
            done = set(self.store.complete_many(ids))
            return 200, {"done": sorted(done), "gone": [i for i in ids if i not in done]}
        return (200, {"ok": True}) if self.store.complete(self._lease_id(body)) else self._gone()

    def _release(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return (200, {"ok": True}) if self.store.release(self._lease_id(body)) else self._gone()

    def _fail(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        lease_id = self._lease_id(body)
        attempts = _field(body, "attempts", int, required=False, default=0)
        reason = _field(body, "reason", str, required=False, default="")[:REASON_LIMIT]
        delay = _field(body, "delay", float, required=False, default=None)
        if delay is not None and not 0 <= delay <= MAX_DELAY_S:
            raise ClientError(400, f"field 'delay' must be between 0 and {MAX_DELAY_S}")
        backoff = self.backoff if delay is None else (lambda _attempts: delay)
        outcome = self.store.fail(lease_id, attempts, self._scrub(lease_id, reason), self.settings.max_retries,
                                  backoff)
        return (200, {"outcome": outcome}) if outcome else self._gone()

    def _dead_letter(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        lease_id = self._lease_id(body)
        reason = self._scrub(lease_id, _field(body, "reason", str, required=False, default="")[:REASON_LIMIT])
        tb = self._scrub(lease_id, _field(body, "traceback", str, required=False, default="")[-TRACEBACK_LIMIT:])
        attempts = _field(body, "attempts", int, required=False, default=0)
        agent = _field(body, "agent", str, required=False, default=None)
        ok = self.store.dead_letter(lease_id, reason, tb, attempts, agent[:200] if agent else None)
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

    def _status(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        items = _field(body, "items", list)
        accepted = 0
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("lease_id"), str) \
                    or not isinstance(item.get("payload"), dict):
                raise ClientError(400, "each status item needs a 'lease_id' string and a 'payload' object")
            route = self.store.route(item["lease_id"])
            if route is None or not route[0]:
                continue
            if self.broker.publish_status(route[0], route[1], item["payload"]):
                accepted += 1
        return 202, {"accepted": accepted}

    def _register(self, h: _Handler, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        agent = _field(body, "agent", str)[:200]
        info = _field(body, "extractor_info", dict)
        owner = _field(body, "owner", str, required=False, default="")
        message = {"id": agent, "queue": self.settings.queue, "owner": owner, "extractor_info": info}
        self._registration = message
        self._next_register = time.monotonic() + self.settings.heartbeat
        queued = self.broker.publish_registration(dict(message))
        return 202, {"accepted": queued}

    def _backlog(self, h: _Handler, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        counts = self.store.backlog(self.settings.lease_ttl)
        counts.update(queue=self.settings.queue, lease_ttl=self.settings.lease_ttl)
        return 200, counts
