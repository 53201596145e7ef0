"""The relay's lease table: SQLite (WAL) in the relay's state folder, the messages' only copy.

A row is one message taken from RabbitMQ. Its `state` is

  ready   leasable once `available_at` has passed (a retry's backoff sets it in the future)
  leased  held by an agent until `expires_at` (epoch seconds; extended by heartbeats)
  dead    to be published to error.<queue>, then deleted (the broker link does it)

Only the insert that precedes the ack to RabbitMQ must survive a power loss, so it commits with
`synchronous=FULL` (fsync of the WAL). Every other change commits with `synchronous=NORMAL`:
durable against a crash of the relay process (kill -9), and after a power loss it can only roll
back to an earlier state (a lease not recorded, a completion not recorded), whose effect is that
a message is leased again: a duplicate, never a loss.

All methods are thread-safe (one connection behind one lock; SQLite's own work per call is small).
Long-polling lessees wait on `self.changed`, notified whenever something may have become leasable.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from hpc_common.messages import Message
from hpc_common.relay_api import BacklogCounts

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    routing_key TEXT NOT NULL,
    reply_to TEXT,
    correlation_id TEXT,
    headers TEXT NOT NULL DEFAULT '{}',
    content_type TEXT,
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'ready',
    available_at REAL NOT NULL DEFAULT 0,
    lease_id TEXT UNIQUE,
    lease_key TEXT,
    lease_host TEXT,
    agent TEXT,
    expires_at REAL,
    learned TEXT NOT NULL DEFAULT '{}',
    reason TEXT,
    traceback TEXT
);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, available_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
RECENT_ROUTES = 10000     # finished leases whose reply_to is remembered for late status messages
RECENT_SECONDS = 600.0


@dataclass
class Lease(Message):
    """A leased message: what the relay hands out and what it needs to forward Clowder calls.

    body is the original body, unchanged; attempts is the table's count (it replaces the header's).
    """

    row: int = 0
    lease_id: str = ""
    lease_key: str = ""     # the per-lease Clowder key handed to the agent instead of the real one
    attempts: int = 0       # type: ignore[assignment]
    expires_at: float = 0.0
    lease_host: str = ""    # the host URL handed to the agent (relay_api.clowder_base)
    learned: dict[str, list[str]] = field(default_factory=dict)

    def original(self) -> dict[str, Any]:
        """The body as a JSON object ({} when it is not one); a fresh shallow copy each call."""
        parsed = self.__dict__.get("_parsed")
        if parsed is None:
            try:
                parsed = json.loads(self.body)
            except (ValueError, UnicodeDecodeError):
                parsed = {}
            if not isinstance(parsed, dict):
                parsed = {}
            self.__dict__["_parsed"] = parsed
        return dict(parsed)


@dataclass
class DeadRow(Message):
    """A message to publish to the error queue, with why and by whom."""

    row: int = 0
    attempts: int = 0       # type: ignore[assignment]
    reason: str = ""
    traceback: str = ""
    agent: Optional[str] = None


class LeaseStore:
    """Durable lease table plus an in-memory index of live leases for the forwarding path."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self.demand = threading.Event()      # a lessee found nothing: the broker link should fetch
        self.dead_waiting = threading.Event()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._key_secret = self._meta_secret()
        self._live: dict[str, Lease] = {}
        self._recent: "OrderedDict[str, tuple[float, Optional[str], Optional[str]]]" = OrderedDict()
        self._load()

    # -- plumbing ----------------------------------------------------------------------------------
    def _tx(self, full: bool = False) -> "_Tx":
        return _Tx(self._db, full)

    def _meta_secret(self) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name='key_secret'").fetchone()
            if row is not None:
                return bytes(row[0])
            secret = secrets.token_bytes(32)
            with self._tx(full=True):
                self._db.execute("INSERT INTO meta (name, value) VALUES ('key_secret', ?)", (secret,))
            return secret

    def lease_key(self, agent: str, body: bytes) -> str:
        """The Clowder key handed out instead of the message's real one.

        Derived (HMAC) from a secret of this relay, the agent and the real key: one agent sees one
        key per Clowder key (its secret masking stays small), and the key is worth nothing
        without a live lease id of that agent's in the URL. Unparsable bodies get a random key.
        """
        try:
            real = json.loads(body).get("secretKey")
        except (ValueError, UnicodeDecodeError, AttributeError):
            real = None
        if not isinstance(real, str):
            return secrets.token_urlsafe(24)
        digest = hmac.new(self._key_secret, agent.encode() + b"\0" + real.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def _load(self) -> None:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, lease_id, lease_key, body, routing_key, reply_to, correlation_id, headers, "
                "content_type, attempts, expires_at, lease_host, learned FROM messages WHERE state='leased'"
            ).fetchall()
            for r in rows:
                lease = _lease_from(r)
                self._live[lease.lease_id] = lease
            if self._db.execute("SELECT 1 FROM messages WHERE state='dead' LIMIT 1").fetchone():
                self.dead_waiting.set()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- intake ------------------------------------------------------------------------------------
    def add(self, messages: Iterable[Message]) -> int:
        """Record messages durably (fsync'd) in one transaction; return how many."""
        now = self._clock()
        count = 0
        with self._lock:
            with self._tx(full=True):
                for m in messages:
                    attempts = m.attempts
                    self._db.execute(
                        "INSERT INTO messages (body, routing_key, reply_to, correlation_id, headers, "
                        "content_type, received_at, attempts, available_at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (m.body, m.routing_key, m.reply_to, m.correlation_id, json.dumps(m.headers, default=str),
                         m.content_type, now, attempts, 0.0))
                    count += 1
            if count:
                self.changed.notify_all()
        return count

    def ready_count(self) -> int:
        """Rows waiting for an agent (including those in retry backoff)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages WHERE state='ready'").fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall()
        out = {"ready": 0, "leased": 0, "dead": 0}
        out.update({state: n for state, n in rows})
        return out

    def set_meta(self, name: str, value: str) -> None:
        """Record a setting readers of this table need (the lease ttl, for launcher.backlog)."""
        with self._lock:
            with self._tx():
                self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value.encode()))

    def backlog(self, lease_ttl: float) -> dict[str, Any]:
        """What this table holds for agents now (see backlog_counts)."""
        with self._lock:
            return backlog_counts(self._db, self._clock(), lease_ttl)

    # -- leasing -----------------------------------------------------------------------------------
    def lease(self, agent: str, limit: int, ttl: float, host_for: Callable[[str], str]) -> list[Lease]:
        """Lease up to limit ready rows to agent for ttl seconds (no waiting)."""
        return self.complete_then_lease((), agent, limit, ttl, host_for)[1]

    def complete_then_lease(self, complete: Iterable[str], agent: str, limit: int, ttl: float,
                            host_for: Callable[[str], str]) -> tuple[list[str], list[Lease]]:
        """complete_many(complete), then lease(agent, limit, ...), in one transaction (one commit per
        lease call that carries completions); returns (the ids that were live, the leases)."""
        now = self._clock()
        out: list[Lease] = []
        with self._lock:
            finished = [lease for lease in (self._take(i) for i in complete) if lease is not None]
            rows = self._db.execute(
                "SELECT id, body, routing_key, reply_to, correlation_id, headers, content_type, attempts "
                "FROM messages WHERE state='ready' AND available_at<=? ORDER BY available_at, id LIMIT ?",
                (now, limit)).fetchall()
            if not rows and not finished:
                return [], out
            with self._tx():
                for lease in finished:
                    self._db.execute("DELETE FROM messages WHERE id=?", (lease.row,))
                for r in rows:
                    lease_id = secrets.token_urlsafe(18)
                    lease = Lease(row=r[0], lease_id=lease_id, lease_key=self.lease_key(agent, r[1]), body=r[1],
                                  routing_key=r[2], reply_to=r[3], correlation_id=r[4],
                                  headers=json.loads(r[5] or "{}"), content_type=r[6], attempts=r[7],
                                  expires_at=now + ttl, lease_host=host_for(lease_id))
                    self._db.execute(
                        "UPDATE messages SET state='leased', lease_id=?, lease_key=?, lease_host=?, agent=?, "
                        "expires_at=?, learned='{}' WHERE id=?",
                        (lease.lease_id, lease.lease_key, lease.lease_host, agent, lease.expires_at, lease.row))
                    out.append(lease)
            for lease in finished:
                self._forget(lease)
            for lease in out:
                self._live[lease.lease_id] = lease
        if out:
            self.demand.set()  # room in the buffer: the broker link may fetch more
        return [lease.lease_id for lease in finished], out

    def wait_lease(self, agent: str, limit: int, ttl: float, wait: float, host_for: Callable[[str], str],
                   stopping: Callable[[], bool] = lambda: False) -> list[Lease]:
        """Lease up to limit rows, waiting up to wait seconds for the first one (long poll)."""
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                got = self.lease(agent, limit, ttl, host_for)
                remaining = deadline - time.monotonic()
                if got or remaining <= 0 or stopping():
                    return got
                self.demand.set()
                self.changed.wait(min(remaining, 0.5))

    def live(self, lease_id: str) -> Optional[Lease]:
        """The live lease with this id (not expired), or None."""
        lease = self._live.get(lease_id)  # no lock: the forwarding path must not wait for a commit
        if lease is None or lease.expires_at < self._clock():
            return None
        return lease

    def extend(self, lease_ids: Iterable[str], ttl: float) -> tuple[list[str], list[str]]:
        """Push the expiry of live leases to now + ttl; return (extended, gone)."""
        now = self._clock()
        ok, gone = [], []
        with self._lock:
            with self._tx():
                for lease_id in lease_ids:
                    lease = self._live.get(lease_id)
                    if lease is None or lease.expires_at < now:
                        gone.append(lease_id)
                        continue
                    lease.expires_at = now + ttl
                    self._db.execute("UPDATE messages SET expires_at=? WHERE id=?", (lease.expires_at, lease.row))
                    ok.append(lease_id)
        return ok, gone

    def grace_all(self, ttl: float) -> int:
        """After a restart: give every live lease at least ttl more seconds to be heard from."""
        now = self._clock()
        with self._lock:
            with self._tx():
                for lease in self._live.values():
                    lease.expires_at = max(lease.expires_at, now + ttl)
                    self._db.execute("UPDATE messages SET expires_at=? WHERE id=?", (lease.expires_at, lease.row))
            return len(self._live)

    def _take(self, lease_id: str) -> Optional[Lease]:
        lease = self._live.get(lease_id)
        if lease is None or lease.expires_at < self._clock():
            return None
        return lease

    def _forget(self, lease: Lease) -> None:
        self._live.pop(lease.lease_id, None)
        self._recent[lease.lease_id] = (self._clock(), lease.reply_to, lease.correlation_id)
        while len(self._recent) > RECENT_ROUTES:
            self._recent.popitem(last=False)

    def complete(self, lease_id: str) -> bool:
        """The work is done and in Clowder: delete the row. False when the lease is not live."""
        with self._lock:
            lease = self._take(lease_id)
            if lease is None:
                return False
            with self._tx():
                self._db.execute("DELETE FROM messages WHERE id=?", (lease.row,))
            self._forget(lease)
            return True

    def complete_many(self, lease_ids: Iterable[str]) -> list[str]:
        """complete() for several leases in one transaction; return the ids that were live."""
        done: list[str] = []
        with self._lock:
            leases = [lease for lease in (self._take(i) for i in lease_ids) if lease is not None]
            if not leases:
                return done
            with self._tx():
                for lease in leases:
                    self._db.execute("DELETE FROM messages WHERE id=?", (lease.row,))
            for lease in leases:
                self._forget(lease)
                done.append(lease.lease_id)
        return done

    def release(self, lease_id: str) -> bool:
        """Hand back, not a failure: leasable again at once."""
        with self._lock:
            lease = self._take(lease_id)
            if lease is None:
                return False
            self._to_ready(lease, lease.attempts, 0.0)
            self.changed.notify_all()
            return True

    def fail(self, lease_id: str, attempts: int, reason: str, max_retries: int,
             backoff: Callable[[int], float]) -> Optional[str]:
        """A failed attempt: 'retry' (leasable after backoff), 'dead' (past max_retries) or None (not live)."""
        with self._lock:
            lease = self._take(lease_id)
            if lease is None:
                return None
            attempts = max(lease.attempts + 1, attempts)
            if attempts > max_retries:
                self._to_dead(lease, attempts, f"gave up after {attempts} attempt(s): {reason}", "", None)
                return "dead"
            self._to_ready(lease, attempts, backoff(attempts), reason)
            self.changed.notify_all()
            return "retry"

    def dead_letter(self, lease_id: str, reason: str, traceback: str, attempts: int, agent: Optional[str]) -> bool:
        """Record the message for the error queue (published by the broker link, then deleted)."""
        with self._lock:
            lease = self._take(lease_id)
            if lease is None:
                return False
            self._to_dead(lease, max(attempts, lease.attempts), reason, traceback, agent)
            return True

    def _to_ready(self, lease: Lease, attempts: int, delay: float, reason: Optional[str] = None) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE messages SET state='ready', lease_id=NULL, lease_key=NULL, lease_host=NULL, agent=NULL, "
                "expires_at=NULL, attempts=?, available_at=?, reason=COALESCE(?, reason) WHERE id=?",
                (attempts, self._clock() + delay, reason, lease.row))
        self._forget(lease)

    def _to_dead(self, lease: Lease, attempts: int, reason: str, traceback: str, agent: Optional[str]) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE messages SET state='dead', lease_id=NULL, lease_key=NULL, expires_at=NULL, attempts=?, "
                "reason=?, traceback=?, agent=COALESCE(?, agent) WHERE id=?",
                (attempts, reason, traceback, agent, lease.row))
        self._forget(lease)
        self.dead_waiting.set()

    def expire(self, max_retries: int) -> tuple[int, int]:
        """Leases past their expiry go back to ready (one more attempt) or dead; return (ready, dead)."""
        now = self._clock()
        back = dead = 0
        with self._lock:
            for lease in [x for x in self._live.values() if x.expires_at < now]:
                attempts = lease.attempts + 1
                if attempts > max_retries:
                    self._to_dead(lease, attempts, f"lease expired {attempts} time(s): the agent holding it "
                                  "died or lost the relay each time", "", None)
                    dead += 1
                else:
                    self._to_ready(lease, attempts, 0.0, "lease expired")
                    back += 1
            if back:
                self.changed.notify_all()
        return back, dead

    # -- forwarding and status support ---------------------------------------------------------------
    def learn(self, lease_id: str, kind: str, ids: Iterable[str]) -> None:
        """Allow further Clowder ids for this lease (ids the lease's own calls created or listed)."""
        with self._lock:
            lease = self._live.get(lease_id)
            if lease is None:
                return
            known = lease.learned.setdefault(kind, [])
            added = list(dict.fromkeys(i for i in ids if isinstance(i, str) and i and i not in known))
            if not added:
                return
            known.extend(added[:10000])
            with self._tx():
                self._db.execute("UPDATE messages SET learned=? WHERE id=?", (json.dumps(lease.learned), lease.row))

    def route(self, lease_id: str) -> Optional[tuple[Optional[str], Optional[str]]]:
        """(reply_to, correlation_id) of a live or recently finished lease."""
        with self._lock:
            lease = self._live.get(lease_id)
            if lease is not None:
                return lease.reply_to, lease.correlation_id
            recent = self._recent.get(lease_id)
            if recent is None or self._clock() - recent[0] > RECENT_SECONDS:
                return None
            return recent[1], recent[2]

    # -- the broker link's side ------------------------------------------------------------------------
    def dead_rows(self, limit: int = 100) -> list[DeadRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body, routing_key, reply_to, correlation_id, headers, content_type, attempts, "
                "reason, traceback, agent FROM messages WHERE state='dead' ORDER BY id LIMIT ?", (limit,)).fetchall()
            if len(rows) < limit:
                self.dead_waiting.clear()
        return [DeadRow(row=r[0], body=r[1], routing_key=r[2], reply_to=r[3], correlation_id=r[4],
                        headers=json.loads(r[5] or "{}"), content_type=r[6], attempts=r[7], reason=r[8] or "",
                        traceback=r[9] or "", agent=r[10]) for r in rows]

    def ready_rows(self, limit: int = 100) -> list[DeadRow]:
        """Unleased rows (for handing back to RabbitMQ at shutdown); reason/traceback unused."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body, routing_key, reply_to, correlation_id, headers, content_type, attempts "
                "FROM messages WHERE state='ready' ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [DeadRow(row=r[0], body=r[1], routing_key=r[2], reply_to=r[3], correlation_id=r[4],
                        headers=json.loads(r[5] or "{}"), content_type=r[6], attempts=r[7], reason="",
                        traceback="", agent=None) for r in rows]

    def delete(self, row: int, only_state: Optional[str] = None) -> bool:
        """Delete a row whose message is safely elsewhere (error queue, back in RabbitMQ)."""
        with self._lock:
            with self._tx():
                if only_state:
                    cur = self._db.execute("DELETE FROM messages WHERE id=? AND state=?", (row, only_state))
                else:
                    cur = self._db.execute("DELETE FROM messages WHERE id=?", (row,))
            return cur.rowcount > 0


def stale_after(lease_ttl: float) -> float:
    """Seconds without a heartbeat after which a lease counts as stale: one missed heartbeat.

    Agents extend every ttl/4. Stale is only a hint (idle agents wait for the lease to expire,
    the launcher counts it as waiting): a live agent whose heartbeat is a little late costs
    nothing but an idle agent staying a few seconds longer, so the hint comes early.
    """
    return lease_ttl / 4.0 + 1.0


def backlog_counts(db: sqlite3.Connection, now: float, lease_ttl: float) -> dict[str, Any]:
    """Counts of a lease table: work waiting for an agent, and when the next of it becomes leasable.

      ready        leasable now
      backoff      a failed attempt's retry, leasable at its not-before time
      stale        leased, but not extended for stale_after(lease_ttl): its agent missed a heartbeat;
                   the reaper returns it when the lease expires
      leased       leased to agents that heartbeat (in flight, not waiting)
      dead         waiting to be published to error.<queue> (not waiting for an agent)
      pending      backoff + stale: held now, leasable soon
      retry_after  seconds until the first pending one is leasable (None when nothing is pending)
    """
    heard_before = now - stale_after(lease_ttl) + lease_ttl  # expires_at below this: not extended lately
    row = db.execute(
        "SELECT "
        "COALESCE(SUM(state='ready' AND available_at<=?), 0), "
        "COALESCE(SUM(state='ready' AND available_at>?), 0), "
        "COALESCE(SUM(state='leased' AND expires_at<?), 0), "
        "COALESCE(SUM(state='leased' AND expires_at>=?), 0), "
        "COALESCE(SUM(state='dead'), 0), "
        "MIN(CASE WHEN state='ready' AND available_at>? THEN available_at END), "
        "MIN(CASE WHEN state='leased' AND expires_at<? THEN expires_at END) "
        "FROM messages", (now, now, heard_before, heard_before, now, heard_before)).fetchone()
    ready, backoff, stale, leased, dead, next_retry, next_expiry = row
    due = [t for t in (next_retry, None if next_expiry is None else next_expiry + 1.0) if t is not None]
    return BacklogCounts(int(ready), int(backoff), int(stale), int(leased), int(dead),
                         round(max(0.0, min(due) - now), 1) if due else None).to_json()


def read_backlog(path: str, now: Optional[float] = None, default_ttl: float = 15.0) -> dict[str, Any]:
    """backlog_counts of a relay's table, opened read-only (the relay keeps writing; WAL readers never block it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None)
    try:
        row = db.execute("SELECT value FROM meta WHERE name='lease_ttl'").fetchone()
        try:
            ttl = float(bytes(row[0]).decode()) if row else default_ttl
        except ValueError:
            ttl = default_ttl
        return backlog_counts(db, time.time() if now is None else now, ttl)
    finally:
        db.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, with a full fsync when asked."""

    def __init__(self, db: sqlite3.Connection, full: bool) -> None:
        self.db, self.full = db, full

    def __enter__(self) -> None:
        if self.full:
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if self.full:
                self.db.execute("PRAGMA synchronous=NORMAL")


def _lease_from(r: tuple) -> Lease:
    return Lease(row=r[0], lease_id=r[1], lease_key=r[2], body=r[3], routing_key=r[4], reply_to=r[5],
                 correlation_id=r[6], headers=json.loads(r[7] or "{}"), content_type=r[8], attempts=r[9],
                 expires_at=r[10] or 0.0, lease_host=r[11] or "", learned=json.loads(r[12] or "{}"))
