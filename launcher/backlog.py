"""The launcher's backlog: every message not yet settled that waits for an agent, wherever it waits.

RabbitMQ's ready count alone is blind to the transports that take messages out of RabbitMQ
(and acknowledge them there) before an agent has them. The parts, each counted here:

  rabbitmq_ready      ready in the work queue (launcher.broker)
  rabbitmq_retry      parked in the queue's retry queues, back in it after their backoff
                      (hpc_common.retry_queues; the buckets follow AGENT_RETRY_BACKOFF, MAX_RETRY)
  relay_ready         in a relay's lease table, leasable now
  relay_backoff       in a relay's table, waiting for a failed attempt's retry time
  relay_stale         leased to agents that stopped heartbeating (back when the lease expires)
  spool_inbox         staged in a spool folder, not claimed
  spool_dead_claims   claimed by spool agents that died (their lock is free)
  journal_orphans     journaled in-flight work whose agent died (agent.journal: lock free)

`total` is their sum; `status` shows the parts and `scale` sizes from the total plus what is in
flight (RabbitMQ's unacked, relay leases of live agents), as it did from ready + unacked before.

Where the parts come from:
  - relays started with `python -m launcher relay` from this state folder: their SQLite lease
    tables (`<state>/relay-<queue>/leases.sqlite3`), opened read-only (WAL: the relay never
    waits for us); or a relay on another host, asked over its API (GET /v1/backlog with its
    token) when LAUNCHER_RELAY_URL and LAUNCHER_RELAY_TOKEN_FILE name it (then local tables are
    not read, so nothing is counted twice);
  - spool folders: the ones `python -m launcher spool` recorded in this state folder when it
    started (`<state>/spool-<queue>.json`), plus LAUNCHER_SPOOL_DIR;
  - the agents' journal: AGENT_JOURNAL_DIR (the agents' default, ~/.clowder-hpc-agent/journal).
A part that cannot be read is left out of the total and named in `errors`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from hpc_common import relay_api
from hpc_common.owned_folders import try_lock

log = logging.getLogger("launcher.backlog")
WAITING_PARTS = ("rabbitmq_ready", "rabbitmq_retry", "relay_ready", "relay_backoff", "relay_stale", "spool_inbox",
                 "spool_dead_claims", "journal_orphans")


@dataclasses.dataclass
class Backlog:
    """Counts of waiting work by where it waits; parts never measured stay out of `parts`."""

    parts: dict[str, int] = dataclasses.field(default_factory=dict)
    in_flight: dict[str, int] = dataclasses.field(default_factory=dict)  # being worked on: not waiting
    retry_after: Optional[float] = None  # seconds until held work (backoff, stale lease) is leasable
    errors: list[str] = dataclasses.field(default_factory=list)
    by_queue: dict[str, "Backlog"] = dataclasses.field(default_factory=dict)  # several queues: each one's

    @property
    def total(self) -> int:
        """All waiting messages that were counted."""
        return sum(self.parts.values())

    @property
    def held(self) -> int:
        """Waiting messages RabbitMQ's ready count cannot see."""
        return self.total - self.parts.get("rabbitmq_ready", 0)

    def add(self, part: str, count: int) -> None:
        self.parts[part] = self.parts.get(part, 0) + int(count)

    def merge(self, other: "Backlog") -> "Backlog":
        """The sum of two backlogs (parts, in-flight counts and errors)."""
        out = Backlog(dict(self.parts), dict(self.in_flight), _earliest(self.retry_after, other.retry_after),
                      self.errors + other.errors)
        for k, v in other.parts.items():
            out.add(k, v)
        for k, v in other.in_flight.items():
            out.in_flight[k] = out.in_flight.get(k, 0) + v
        return out

    def as_json(self) -> dict[str, Any]:
        """`"backlog"` of `status --json`: {"total": N, <part>: n, ..., "in_flight": {...}, ...}."""
        out: dict[str, Any] = {"total": self.total}
        out.update({k: self.parts[k] for k in WAITING_PARTS if k in self.parts})
        out["in_flight"] = dict(self.in_flight)
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def _earliest(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else min(a, b)


def from_relay_counts(counts: dict[str, Any]) -> Backlog:
    """A relay's /v1/backlog answer (or launcher.relay.store.backlog_counts) as backlog parts."""
    read = relay_api.BacklogCounts.from_json(counts)
    b = Backlog()
    b.add("relay_ready", read.ready)
    b.add("relay_backoff", read.backoff)
    b.add("relay_stale", read.stale)
    b.in_flight["relay_leased"] = read.leased
    b.retry_after = read.retry_after
    return b


# -- relays ------------------------------------------------------------------------------------------
def _folder_name(queue: str) -> str:
    """The state sub-folder a relay for queue uses (launcher.relay.main)."""
    return "relay-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in queue)


def relay_tables(state_dir: Path, queue: Optional[str]) -> list[str]:
    """Lease tables of relays run from state_dir (only queue's relay when the queue is known)."""
    if queue:
        path = state_dir / _folder_name(queue) / "leases.sqlite3"
        return [str(path)] if path.is_file() else []
    return sorted(glob.glob(str(state_dir / "relay-*" / "leases.sqlite3")))


def local_relays(paths: Iterable[str]) -> Backlog:
    """Read relay lease tables read-only (no lock is taken that the relay could wait for)."""
    import sqlite3

    from launcher.relay.store import read_backlog

    out = Backlog()
    for path in paths:
        try:
            out = out.merge(from_relay_counts(read_backlog(path)))
        except sqlite3.Error as exc:
            out.errors.append(f"relay table {path}: {exc}")
    return out


def remote_relay(url: str, token_file: str, ca: Optional[str] = None, timeout: float = 10.0) -> Backlog:
    """Ask a relay on another host for its counts (GET /v1/backlog with its bearer token)."""
    import requests

    from hpc_common.tokens import TokenFileError, read_token_file

    try:
        token = read_token_file(os.path.expanduser(token_file))
    except TokenFileError as exc:
        return Backlog(errors=[str(exc)])
    try:
        with requests.Session() as s:
            s.trust_env = False
            resp = s.get(url.rstrip("/") + relay_api.BACKLOG, headers={"Authorization": f"Bearer {token}"},
                         timeout=timeout, verify=ca or True)
    except requests.RequestException as exc:
        return Backlog(errors=[f"relay {url}: not reachable ({exc.__class__.__name__})"])
    if resp.status_code != 200:
        return Backlog(errors=[f"relay {url}: answered {resp.status_code} to GET {relay_api.BACKLOG}"])
    try:
        counts = resp.json()
    except ValueError:
        return Backlog(errors=[f"relay {url}: GET {relay_api.BACKLOG} did not answer JSON"])
    return from_relay_counts(counts if isinstance(counts, dict) else {})


# -- spools ------------------------------------------------------------------------------------------
def spool_pointer(state_dir: Path, queue: str) -> Path:
    """Where `python -m launcher spool` records its folder for this state folder's launcher."""
    return state_dir / ("spool-" + re.sub(r"[^A-Za-z0-9._-]", "_", queue) + ".json")


def record_spool(state_dir: Path, queue: str, spool_dir: str) -> None:
    """Called by the spool command at start (best effort: the backlog is a view, not the data)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = spool_pointer(state_dir, queue).with_suffix(".tmp")
        tmp.write_text(json.dumps({"dir": os.path.abspath(os.path.expanduser(spool_dir)), "queue": queue}))
        os.replace(tmp, spool_pointer(state_dir, queue))
    except OSError as exc:
        log.warning("cannot record the spool folder in %s (the launcher's backlog will not see it): %s",
                    state_dir, exc.strerror)


def spool_dirs(state_dir: Path, queue: Optional[str], extra: Optional[str]) -> list[str]:
    """Spool folders recorded in state_dir (for queue when known), plus extra."""
    found = []
    pattern = str(spool_pointer(state_dir, queue)) if queue else str(state_dir / "spool-*.json")
    for pointer in sorted(glob.glob(pattern)):
        try:
            found.append(str(json.loads(Path(pointer).read_text())["dir"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if extra:
        found.append(os.path.abspath(os.path.expanduser(extra)))
    return list(dict.fromkeys(found))


def _free(lock_path: str) -> bool:
    """True when nobody holds the flock on lock_path (taken and dropped at once to find out)."""
    try:
        fd = try_lock(lock_path, create=False)
    except FileNotFoundError:
        return True
    if fd is None:
        return False
    os.close(fd)  # closing drops the lock
    return True


def _orphaned(root: str, suffix: str) -> list[str]:
    """Files ending in suffix in root's sub-folders whose owner (the flock on <folder>/lock) is dead.

    Folders without such files are skipped before any lock is tried: an agent that is just taking
    its lock has none yet, so it never finds our brief probe in its way.
    """
    found: list[str] = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return found
    for name in names:
        folder = os.path.join(root, name)
        try:
            held = [n for n in os.listdir(folder) if n.endswith(suffix)]
        except (NotADirectoryError, FileNotFoundError):
            continue
        if held and _free(os.path.join(folder, "lock")):
            found += [os.path.join(folder, n) for n in held]
    return found


def spool(root: str) -> Backlog:
    """Messages staged and unclaimed, and claims of dead agents, in one spool folder."""
    from hpc_common.spool_layout import SpoolLayout

    layout = SpoolLayout(root)
    b = Backlog()
    try:
        b.add("spool_inbox", sum(1 for n in os.listdir(layout.inbox) if n.endswith(".json")))
        b.add("spool_dead_claims", len(_orphaned(layout.claimed, ".json")))
    except FileNotFoundError:
        b.errors.append(f"spool {root}: no inbox/ (not a spool folder, or not set up yet)")
    except OSError as exc:
        b.errors.append(f"spool {root}: {exc.strerror}")
    return b


# -- the journal -------------------------------------------------------------------------------------
def journal(root: str, queue: Optional[str] = None) -> Backlog:
    """Journaled messages (of queue, when given) whose agent died: republished by the next agent.

    One journal folder serves every queue a user's agents consume, so each orphan's queue is read.
    """
    from hpc_common.journal_layout import SUFFIX

    b = Backlog()
    try:
        paths = _orphaned(os.path.abspath(os.path.expanduser(root)), SUFFIX)
    except OSError as exc:
        b.errors.append(f"journal {root}: {exc.strerror}")
        return b
    b.add("journal_orphans", sum(1 for p in paths if queue is None or _journal_queue(p) in (queue, None)))
    return b


def _journal_queue(path: str) -> Optional[str]:
    """The queue a journal entry belongs to (None when unreadable: counted, a person should look)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh).get("queue")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# -- everything --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Places:
    """Where this launcher looks for work held outside RabbitMQ."""

    state_dir: Path
    queue: Optional[str] = None
    relay_url: Optional[str] = None
    relay_token_file: Optional[str] = None
    relay_ca: Optional[str] = None
    spool_dir: Optional[str] = None
    journal_dir: Optional[str] = None

    @classmethod
    def from_settings(cls, settings: Any, queue: Optional[str]) -> "Places":
        """From the launcher's settings (LAUNCHER_RELAY_URL, LAUNCHER_RELAY_TOKEN_FILE, LAUNCHER_RELAY_CA,
        LAUNCHER_SPOOL_DIR, AGENT_JOURNAL_DIR: launcher/settings.py)."""
        return cls(state_dir=Path(settings.state_dir), queue=queue, relay_url=settings.relay_url,
                   relay_token_file=settings.relay_token_file, relay_ca=settings.relay_ca,
                   spool_dir=settings.spool_dir, journal_dir=settings.journal_dir)


def held(places: Places) -> Backlog:
    """Every part of the backlog except RabbitMQ's ready count."""
    out = Backlog()
    if places.relay_url:
        if not places.relay_token_file:
            out.errors.append("LAUNCHER_RELAY_URL is set without LAUNCHER_RELAY_TOKEN_FILE")
        else:
            out = out.merge(remote_relay(places.relay_url, places.relay_token_file, places.relay_ca))
    else:
        out = out.merge(local_relays(relay_tables(places.state_dir, places.queue)))
    for root in spool_dirs(places.state_dir, places.queue, places.spool_dir):
        out = out.merge(spool(root))
    if places.journal_dir:
        out = out.merge(journal(places.journal_dir, places.queue))
    return out


def places_per_queue(settings: Any, queues: list[str]) -> list[Places]:
    """Places of several queues (agents serving several plugins). A remote relay and LAUNCHER_SPOOL_DIR
    serve one queue: they are counted with the first queue only, never once per queue."""
    first = Places.from_settings(settings, queues[0])
    return [first] + [dataclasses.replace(first, queue=q, relay_url=None, relay_token_file=None, spool_dir=None)
                      for q in queues[1:]]


def held_queues(places: list[Places]) -> Backlog:
    """held() of several queues: their sum, with each queue's own in `by_queue`."""
    out = Backlog()
    each = {p.queue or "": held(p) for p in places}
    for part in each.values():
        out = out.merge(part)
    out.by_queue = each
    return out


def total(rabbitmq_ready: Optional[int], rest: Backlog, rabbitmq_retry: int = 0) -> Backlog:
    """The whole backlog: RabbitMQ's ready count (None: the broker query failed), what its retry
    queues hold, and the held parts."""
    out = Backlog(dict(rest.parts), dict(rest.in_flight), rest.retry_after, list(rest.errors))
    if rabbitmq_ready is not None:
        out.parts = {"rabbitmq_ready": int(rabbitmq_ready), "rabbitmq_retry": int(rabbitmq_retry), **out.parts}
    return out


__all__ = ["Backlog", "Places", "WAITING_PARTS", "from_relay_counts", "held", "held_queues", "journal",
           "local_relays", "places_per_queue", "record_spool", "relay_tables", "remote_relay", "spool", "spool_dirs", "total"]
