"""Relay work source: the agent leases messages over HTTP from `python -m launcher relay`.

For compute nodes that reach the login node (or the extractor VM) and nothing else. The relay
hands out each message with its `host` pointing at the relay and a per-lease Clowder key, so the
extractor's Clowder calls go through the relay too: with `source: relay` the agent opens no
connection to anything but AGENT_RELAY_URL.

The source never waits on the agent's main thread: the agent's event loop (a SelectLoop,
agent.event_loop) does, and the lease thread wakes it when leases arrived for `take`.

Threads (the agent's main thread only calls the methods below; none of them blocks for long):
  - lease thread: long-polls POST /v1/lease while fewer than `prefetch` leases are waiting or
    running (one whose completion is on its way does not count) and intake is on; leased
    deliveries wait in an inbox that `take` empties;
  - heartbeat thread: extends every held lease every lease_ttl/4 seconds (a lease lives in the
    relay's table, not in an open delivery, so RabbitMQ's consumer_timeout never applies and
    `secure()` has nothing to do);
  - status thread: posts status messages in batches (best effort, like pyclowder's).
  - completion thread: sends completions in batches, so the Runner never waits for one. When
    the relay offers it (hello's features: "lease_complete"), the lease thread carries the
    completions that made room in its next lease call instead: one request per file, not two.
A failed attempt is handed to the relay at once with its backoff (`retry_later`): the relay's
table holds the message until it is due, so it takes no prefetch place here. An agent about to
exit on idle asks the relay (GET /v1/backlog) whether work will be leasable soon (a retry due, a
dead agent's lease about to expire) and stays if so.
Release, retry and dead_letter are synchronous calls that return once the relay has committed
them. Every delivery is marked `secured`: the relay keeps its lease while it is
unreachable, so a settle that fails with SourceLost is kept by the Runner and retried when the
relay answers again (`connected`). A lease the relay no longer knows (409: it expired and went
back to the queue) is logged and dropped: that message may run twice, never zero times.
The source raises SourceUnavailable once the relay has been unreachable for reconnect_timeout.
"""
from __future__ import annotations

import json as jsonlib
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import quote

import requests
from requests.structures import CaseInsensitiveDict

from hpc_common import relay_api as api
from hpc_common.tokens import TokenFileError, read_token_file

from ..errors import ConfigError, SourceError
from ..keepalive_http import KeepAliveHTTP
from ..messages import Delivery
from .base import SourceLost, SourceUnavailable, WorkSource

log = logging.getLogger("agent.relay")
STATUS_LINGER = 0.1
CARRY_WINDOW = 0.05  # a completion waits this long for the lease thread to carry it (one request, not two)


class _Gone(SourceError):
    """The relay answered 409: the lease is no longer live."""


class _Http:
    """One thread's calls to the relay: JSON over its own kept-alive connections, no proxy from the environment.

    agent.keepalive_http rather than a requests.Session: a relay call costs the agent a quarter of
    the CPU (the agent makes one or two per file), with requests' exceptions and responses kept.
    """

    def __init__(self, auth: dict[str, str], verify: Any) -> None:
        self._pool = KeepAliveHTTP()
        self._verify = verify
        self._headers = CaseInsensitiveDict(dict(auth, Accept="application/json", **{"Accept-Encoding": "identity"}))
        self._json_headers = CaseInsensitiveDict(dict(self._headers, **{"Content-Type": "application/json"}))

    def request(self, method: str, url: str, json: Optional[dict[str, Any]] = None,
                timeout: Any = (10.0, 30.0)) -> requests.Response:
        body = None if json is None else jsonlib.dumps(json).encode()
        return self._pool.request(method, url, self._headers if body is None else self._json_headers, body,
                                  timeout, self._verify, stream=False)

    def close(self) -> None:
        self._pool.close()


class RelaySource(WorkSource):
    """Lease messages from a relay (see the module docstring)."""

    delayed_retry = True

    def __init__(self, url: str, token: str, prefetch: int, agent_id: str, connect_timeout: float = 60.0,
                 reconnect_timeout: float = 300.0, verify: Any = True, lease_wait: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, inline: int = 0, clowder_version: int = 1) -> None:
        """inline: ask for files up to this size with their lease (the relay's "inline_files"), 0: never."""
        self.url = url.rstrip("/")
        self.inline = inline
        self.clowder_version = clowder_version
        self.prefetch = max(1, prefetch)
        self._refill = max(1, self.prefetch // 2)
        self.agent_id = agent_id
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.lease_wait = lease_wait
        self.queue = ""
        self.lease_ttl = 15.0
        self._clock = clock
        self._auth = {"Authorization": f"Bearer {token}"}
        self._verify = verify
        self._settle_http = self._session()
        self._inbox: "queue.Queue[Delivery]" = queue.Queue()  # each batch of puts is followed by a wake
        self._statuses: "queue.Queue[dict[str, Any]]" = queue.Queue(maxsize=10000)
        self._held: set[str] = set()
        self._completing: set[str] = set()  # held, done here, completion not yet confirmed by the relay
        self._held_lock = threading.Lock()
        self._room = threading.Event()
        self._stop = threading.Event()
        self._intake = True
        self._down_since: Optional[float] = None
        self._fatal: Optional[str] = None
        self._polling_since: Optional[float] = None
        self._done: list[Delivery] = []
        self._done_lock = threading.Lock()
        self._done_ready = threading.Event()
        self._carry = False  # the relay settles completions sent with a lease call ("lease_complete")
        self._wake: Callable[[], None] = lambda: None
        self._threads: list[threading.Thread] = []

    # -- HTTP ------------------------------------------------------------------------------------
    def _session(self) -> _Http:
        return _Http(self._auth, self._verify)

    def _call(self, http: _Http, method: str, path: str, payload: Optional[dict[str, Any]] = None,
              timeout: float = 30.0) -> dict[str, Any]:
        """One request; SourceLost when the relay cannot be reached or fails, _Gone on 409."""
        try:
            resp = http.request(method, self.url + path, json=payload, timeout=(10.0, timeout))
        except requests.RequestException as exc:
            self._note_down(exc.__class__.__name__)
            raise SourceLost(f"relay not reachable ({exc.__class__.__name__})") from None
        if resp.status_code == 409:
            self._note_up()
            raise _Gone(path)
        if resp.status_code == 401:
            self._note_up()
            raise SourceUnavailable("the relay refused our token (401): check AGENT_RELAY_TOKEN_FILE")
        if resp.status_code >= 500:
            self._note_down(f"HTTP {resp.status_code}")
            raise SourceLost(f"relay answered {resp.status_code}")
        if resp.status_code >= 400:
            self._note_up()
            raise SourceLost(f"relay refused {path}: {resp.status_code} {_error_text(resp)}")
        self._note_up()
        try:
            return resp.json()
        except ValueError:
            return {}

    def _note_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
            log.warning("relay at %s not reachable (%s); retrying", self.url, why)

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.info("relay reachable again after %.1fs", self._clock() - self._down_since)
            self._down_since = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self, wake: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Say hello (retrying within connect_timeout), then start the lease, heartbeat and status threads."""
        self._wake = wake  # on_lost is not needed: leases outlive a lost relay
        deadline = self._clock() + self.connect_timeout
        delay = 1.0
        while True:
            try:
                hello = api.Hello.from_json(self._call(self._settle_http, "GET", api.HELLO, timeout=10.0))
                break
            except SourceLost as exc:
                if self._clock() >= deadline:
                    raise SourceUnavailable(f"cannot use the relay at {self.url}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.queue = hello.queue
        self.lease_ttl = hello.lease_ttl
        if hello.max_wait is not None:
            self.lease_wait = min(self.lease_wait, hello.max_wait)
        self.generation = 1
        self._carry = api.LEASE_COMPLETE in hello.features
        if api.INLINE_FILES not in hello.features:
            self.inline = 0  # an earlier relay: each file's calls are forwarded as they come
        log.info("relay %s: queue %s, leases of %.0fs, up to %d held", self.url, self.queue, self.lease_ttl,
                 self.prefetch)
        for target, name in ((self._lease_loop, "relay-lease"), (self._heartbeat_loop, "relay-heartbeat"),
                             (self._status_loop, "relay-status"), (self._complete_loop, "relay-complete")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def take(self) -> list[Delivery]:
        """The leases that arrived; SourceUnavailable once the relay is gone for good."""
        if self._fatal:
            raise SourceUnavailable(self._fatal)
        if self._down_since is not None and self._clock() - self._down_since > self.reconnect_timeout:
            raise SourceUnavailable(f"relay at {self.url} unreachable for {self.reconnect_timeout:.0f}s")
        got: list[Delivery] = []
        while True:
            try:
                got.append(self._inbox.get_nowait())
            except queue.Empty:
                return got

    @property
    def connected(self) -> bool:
        return self._down_since is None

    def stop_intake(self) -> None:
        self._intake = False
        self._room.set()

    def close(self) -> None:
        """Stop the threads; hand back leases received but never given to the Runner."""
        self._intake = False
        self._stop.set()
        self._room.set()
        # Let the lease thread hand back what a poll just brought; a poll still waiting is left
        # to the relay, which sees this process hang up and leases nothing on that connection.
        deadline = self._clock() + 2.0
        while self._threads and self._threads[0].is_alive() and self._clock() < deadline:
            started = self._polling_since
            if started is not None and self._clock() - started > 0.2:
                break
            time.sleep(0.01)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                self.release(item)
            except SourceLost:
                pass
        self._flush_statuses()
        self._flush_completions()
        for thread in self._threads:
            thread.join(timeout=0.3)  # a lease long poll in flight is not waited for (the relay notices)
        self._settle_http.close()

    # -- background loops ----------------------------------------------------------------------
    def _lease_loop(self) -> None:
        http = self._session()
        delay = 0.5
        while not self._stop.is_set():
            with self._held_lock:
                room = self._room_left()
                working = self._working()
            # Refill in batches of half the prefetch while as much work is in hand: fewer calls.
            if not self._intake or room <= 0 or (room < self._refill and working >= self._refill):
                self._room.wait(1.0)
                self._room.clear()
                continue
            asked = api.LeaseRequest(self.agent_id, room, self.lease_wait, inline=self.inline,
                                     clowder_version=self.clowder_version)
            carried = self._take_done() if self._carry else []
            if carried:  # settled first; no long poll, so their confirmation comes back at once
                asked.complete, asked.wait = [d.token for d in carried], 0
            self._polling_since = self._clock()
            try:
                answer = api.LeaseAnswer.from_json(
                    self._call(http, "POST", api.LEASE, asked.to_json(), timeout=self.lease_wait + 15.0), self.queue)
                delay = 0.5
            except (SourceLost, _Gone, SourceUnavailable) as exc:
                self._polling_since = None
                self._put_back_done(carried)
                if isinstance(exc, SourceUnavailable):
                    self._fatal = str(exc)
                    self._wake()
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._polling_since = None
            if carried:
                if answer.settled is not None:
                    self._settled(carried, answer.settled)
                else:  # the relay did not settle them: the completion thread sends these and all others
                    self._carry = False
                    log.warning("the relay at %s did not settle completions sent with a lease call; sending "
                                "them on their own from now on", self.url)
                    self._put_back_done(carried)
            arrived = False
            for item in answer.leases:
                delivery = self._delivery(item)
                with self._held_lock:
                    self._held.add(delivery.token)
                if not self._intake or self._stop.is_set():
                    try:
                        self._settle(api.RELEASE, delivery, {}, http)
                    except SourceLost:
                        pass
                    continue
                self._inbox.put(delivery)
                arrived = True
            if arrived:
                self._wake()
        http.close()

    def _room_left(self) -> int:
        """Leases to ask for now (caller holds _held_lock).

        A lease whose completion is on its way takes no place: waiting for that round trip before
        leasing the next file left slots idle. Held leases stay bounded (4x prefetch) should
        completions stop getting through while leases still do.
        """
        return min(self.prefetch - self._working(), 4 * self.prefetch - len(self._held))

    def _working(self) -> int:
        """Leases waiting or running here, their completion not yet on its way (caller holds _held_lock)."""
        return len(self._held) - len(self._completing)

    def _delivery(self, item: api.LeaseItem) -> Delivery:
        m = item.message
        return Delivery(body=m.body, routing_key=m.routing_key, reply_to=m.reply_to, correlation_id=m.correlation_id,
                        headers=m.headers, content_type=m.content_type, redelivered=item.attempts > 0,
                        token=item.lease_id, received_at=self._clock(), secured=True, inline=api.inline_of(item.inline))

    def _heartbeat_loop(self) -> None:
        http = self._session()
        # Four heartbeats per lease life: a lease outlives three missed ones (a node paused by swap
        # or I/O for up to about 3/4 of lease_ttl: 11 s with the relay's default of 15 s).
        while not self._stop.wait(max(0.5, self.lease_ttl / 4.0)):
            with self._held_lock:
                ids = sorted(self._held)
            if not ids:
                continue
            try:
                answer = api.ExtendAnswer.from_json(
                    self._call(http, "POST", api.EXTEND, {"lease_ids": ids}, timeout=15.0))
            except (SourceLost, _Gone, SourceUnavailable):
                continue
            with self._held_lock:  # a lease settled meanwhile (or completing) is gone on the relay, rightly
                gone = [i for i in answer.gone if i in self._held and i not in self._completing]
            if gone:
                log.warning("%d lease(s) expired on the relay before their work ended; those messages may run "
                            "twice", len(gone))
        http.close()

    def _status_loop(self) -> None:
        http = self._session()
        while not self._stop.is_set():
            try:
                first = self._statuses.get(timeout=0.5)
            except queue.Empty:
                continue
            self._stop.wait(STATUS_LINGER)  # gather the statuses of a few files into one request
            self._post_statuses(http, first)
        http.close()

    def _post_statuses(self, http: _Http, first: Optional[dict[str, Any]]) -> None:
        items = [first] if first is not None else []
        while len(items) < api.STATUS_BATCH:
            try:
                items.append(self._statuses.get_nowait())
            except queue.Empty:
                break
        if not items:
            return
        try:
            self._call(http, "POST", api.STATUS, {"items": items}, timeout=15.0)
        except (SourceLost, _Gone, SourceUnavailable):
            log.debug("dropped %d status message(s): relay not reachable", len(items))

    def _flush_statuses(self) -> None:
        if not self._statuses.empty() and self.connected:
            self._post_statuses(self._settle_http, None)

    # -- settling ---------------------------------------------------------------------------------
    def _settle(self, path: str, delivery: Delivery, payload: dict[str, Any],
                http: Optional[_Http] = None) -> dict[str, Any]:
        lease_id = delivery.token
        try:
            answer = self._call(http or self._settle_http, "POST", path, dict(payload, lease_id=lease_id),
                                timeout=30.0)
        except _Gone:
            log.warning("lease of message %s had expired on the relay (%s not recorded); the relay has given it "
                        "out again", delivery.file_id or "(unparsed)", path.rsplit("/", 1)[-1])
            answer = {"gone": True}
        except SourceUnavailable as exc:
            raise SourceLost(str(exc)) from None
        with self._held_lock:
            self._held.discard(lease_id)
        self._room.set()
        return answer

    def complete(self, delivery: Delivery) -> None:
        """Queue the completion for the completion thread (like an AMQP ack, not waited for).

        A crash before it reaches the relay lets the lease expire and the message run again:
        at-least-once, as with RabbitMQ, and the Runner's main thread goes on at once.
        """
        with self._held_lock:
            self._completing.add(delivery.token)
        with self._done_lock:
            self._done.append(delivery)
        self._done_ready.set()
        self._room.set()

    def _complete_loop(self) -> None:
        http = self._session()
        delay = 0.5
        while not self._stop.is_set():
            if not self._done_ready.wait(0.5):
                continue
            if self._carry and self._intake:
                self._stop.wait(CARRY_WINDOW)  # the lease thread usually takes them with its next call
            if self._send_completions(http):
                delay = 0.5
            else:
                self._stop.wait(delay)  # relay away: the leases wait for us there
                delay = min(delay * 2, 5.0)
        http.close()

    def _take_done(self) -> list[Delivery]:
        with self._done_lock:
            batch, self._done = self._done, []
            self._done_ready.clear()
        return batch

    def _put_back_done(self, batch: list[Delivery]) -> None:
        """Completions that did not get through: first in line for the next attempt."""
        if batch:
            with self._done_lock:
                self._done[:0] = batch
                self._done_ready.set()

    def _send_completions(self, http: _Http) -> bool:
        """Post every queued completion in one request; False when the relay could not be reached."""
        batch = self._take_done()
        if not batch:
            return True
        try:
            answer = self._call(http, "POST", api.COMPLETE, {"lease_ids": [d.token for d in batch]}, timeout=30.0)
        except (SourceLost, SourceUnavailable, _Gone):
            self._put_back_done(batch)
            return False
        self._settled(batch, api.Settled.from_json(answer) or api.Settled())
        return True

    def _settled(self, batch: list[Delivery], answer: api.Settled) -> None:
        """The relay's answer to a batch of completions: forget those leases, warn about expired ones."""
        gone = set(answer.gone)
        for delivery in batch:
            if delivery.token in gone:
                log.warning("lease of message %s had expired on the relay before its completion; the relay has "
                            "given it out again", delivery.file_id or "(unparsed)")
        with self._held_lock:
            self._held.difference_update(d.token for d in batch)
            self._completing.difference_update(d.token for d in batch)
        self._room.set()

    def _flush_completions(self) -> None:
        """At close: send what is queued, trying for a while if the relay is away."""
        deadline = self._clock() + min(self.reconnect_timeout, 30.0)
        while True:
            with self._done_lock:
                if not self._done:
                    return
            if self._send_completions(self._settle_http):
                continue
            if self._clock() >= deadline:
                log.error("%d completion(s) could not reach the relay; their leases will expire and those "
                          "messages run again", len(self._done))
                return
            time.sleep(1.0)

    def release(self, delivery: Delivery) -> None:
        self._settle(api.RELEASE, delivery, {})

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        self._settle(api.FAIL, delivery, api.FailRequest(delivery.token, attempts, reason).to_json())

    def retry_later(self, delivery: Delivery, attempts: int, reason: str, delay: float) -> None:
        """The relay keeps the message unleasable for delay seconds (its table's not-before time)."""
        self._settle(api.FAIL, delivery, api.FailRequest(delivery.token, attempts, reason, delay).to_json())

    def work_soon(self) -> Optional[float]:
        """Ask the relay whether messages will be leasable soon (None when not, or when it is away).

        Leases the relay granted us whose answer is still on its way (its inline files being
        fetched, say) count as work now: they are leased, so the table no longer shows them.
        """
        try:
            counts = api.BacklogCounts.from_json(
                self._call(self._settle_http, "GET", f"{api.BACKLOG}?agent={quote(self.agent_id)}", timeout=5.0))
        except (SourceLost, _Gone, SourceUnavailable):
            return None
        if counts.ready > 0 or (counts.on_the_way or 0) > 0 or not self._inbox.empty():
            return 0.0
        if counts.pending > 0:
            return 1.0 if counts.retry_after is None else counts.retry_after
        return None

    def inline_off(self) -> None:
        """Lease without inline files from now on (read by the lease thread at its next call)."""
        self.inline = 0

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        self._settle(api.DEAD_LETTER, delivery,
                     api.DeadLetterRequest(delivery.token, reason, traceback, attempts, self.agent_id).to_json())

    def secure(self, delivery: Delivery) -> Any:
        """Nothing to do: a lease is durable in the relay's table from the start."""
        return delivery.token

    # -- replies and registration ---------------------------------------------------------------
    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        try:
            self._statuses.put_nowait(api.status_item(delivery.token, payload))
        except queue.Full:
            pass

    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        try:
            self._call(self._settle_http, "POST", api.REGISTER,
                       api.RegisterRequest(self.agent_id, extractor_info, owner or "").to_json(), timeout=10.0)
        except (SourceLost, _Gone, SourceUnavailable) as exc:
            log.debug("registration through the relay failed: %s", exc)

    def recover_orphans(self) -> int:
        """Nothing to do: the relay returns the leases of dead agents when they expire."""
        return 0


def _error_text(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("error", ""))[:300]
    except ValueError:
        return resp.text[:300]


def from_config(cfg: Any, agent_id: str) -> RelaySource:
    """A RelaySource from the agent's settings; raises ConfigError for a bad token file."""
    try:
        token = read_token_file(os.path.expanduser(cfg.relay_token_file))
    except TokenFileError as exc:
        raise ConfigError(f"relay_token_file: {exc}") from None
    verify: Any = cfg.relay_ca if getattr(cfg, "relay_ca", None) else True
    return RelaySource(cfg.relay_url, token, cfg.effective_prefetch(), agent_id,
                       connect_timeout=cfg.connect_timeout, reconnect_timeout=cfg.reconnect_timeout, verify=verify,
                       inline=cfg.relay_inline, clowder_version=cfg.clowder_version)


__all__ = ["RelaySource", "from_config"]
