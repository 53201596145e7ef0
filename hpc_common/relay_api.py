"""The relay's work API, defined once: paths, request and answer records, limits, hello features.

The relay (launcher.relay.server) answers these calls and the agent's relay source
(agent.sources.relay) makes them; the launcher's backlog reads /v1/backlog. Every call is JSON with
`Authorization: Bearer <token>`; the paths, keys and features below are a contract with relays and
agents of other versions: keep their spelling.

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

A settle call on a lease that is no longer live answers GONE (409) with {"gone": true}: the message
is already back in the relay's hands (expired) and the agent must not retry the call.

Records are plain dataclasses with `to_json()` (what goes on the wire) and `from_json(obj)`
(what came off it). Requests are read strictly (`BadRequest`, answered 400, on a missing or
mistyped field: the relay's checks); answers are read leniently (a missing key takes its default:
an agent may talk to an older relay). A leased message carries the six message fields exactly as
`Message.fields_json` writes them, plus the lease's own keys. Standard library only and no
validation library: the relay's hot path is /v1/lease, and a record costs about a microsecond
per lease item over the hand-written dicts it replaced.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .messages import REASON_LIMIT, TRACEBACK_LIMIT, Message  # noqa: F401 - the API's text limits too

# -- paths -------------------------------------------------------------------------------------------
HELLO = "/v1/hello"
LEASE = "/v1/lease"
EXTEND = "/v1/extend"
COMPLETE = "/v1/complete"
RELEASE = "/v1/release"
FAIL = "/v1/fail"
DEAD_LETTER = "/v1/dead-letter"
STATUS = "/v1/status"
REGISTER = "/v1/register"
BACKLOG = "/v1/backlog"
METRICS = "/metrics"
CLOWDER = "/clowder/"     # + <lease id>/<Clowder path>: an extractor's forwarded Clowder call
PATHS = (HELLO, LEASE, EXTEND, COMPLETE, RELEASE, FAIL, DEAD_LETTER, STATUS, REGISTER, BACKLOG, METRICS)

# -- hello features (what a relay offers beyond the first API) ---------------------------------------
LEASE_COMPLETE = "lease_complete"   # /v1/lease settles the `complete` lease ids it is sent first
INLINE_FILES = "inline_files"       # /v1/lease carries small files and their file info (`inline`)
FEATURES = (LEASE_COMPLETE, INLINE_FILES)

# -- limits ----------------------------------------------------------------------------------------------
MAX_LEASES = 100            # leases one /v1/lease call may ask for
MAX_IDS = 10000             # lease ids in one list (extend, complete)
LEASE_ID_LIMIT = 64         # characters of a lease id
AGENT_LIMIT = 200           # characters of an agent id kept
MAX_DELAY_S = 24 * 3600.0   # the longest retry delay /v1/fail accepts
STATUS_BATCH = 200          # status items an agent sends in one /v1/status call
INLINE_MAX = 1 << 20        # bytes per inline file, whatever the agent asks
INLINE_TOTAL = 8 << 20      # bytes of inline files per lease answer
GONE = 409                  # the status of a settle call on a lease that is no longer live
CLOWDER_VERSIONS = (1, 2)



class BadRequest(ValueError):
    """A request the relay refuses with 400: text says which field and why."""

    status = 400

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def field_of(obj: Mapping[str, Any], name: str, kind: type, required: bool = True, default: Any = None) -> Any:
    """obj[name] checked to be of kind (an int is a float; a bool is not an int); default when absent or null."""
    value = obj.get(name, default)
    if value is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field {name!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def lease_id_of(obj: Mapping[str, Any]) -> str:
    """The request's `lease_id`."""
    value = field_of(obj, "lease_id", str)
    if len(value) > LEASE_ID_LIMIT:
        raise BadRequest("field 'lease_id' is too long")
    return value


def lease_ids_of(obj: Mapping[str, Any], name: str = "lease_ids") -> list[str]:
    """The request's list of lease ids under name (`lease_ids`, or a lease call's `complete`)."""
    ids = field_of(obj, name, list)
    if len(ids) > MAX_IDS or not all(isinstance(i, str) and len(i) <= LEASE_ID_LIMIT for i in ids):
        raise BadRequest(f"field {name!r} must be a list of lease ids")
    return ids


def clowder_base(relay_url: str, lease_id: str) -> str:
    """The Clowder host a leased message is handed out with: the relay's forwarding path for that lease."""
    return f"{relay_url}{CLOWDER}{lease_id}/"


def gone_answer() -> dict[str, Any]:
    """The body of a GONE answer."""
    return {"error": "lease not live (expired, or already settled)", "gone": True}


# -- GET /v1/hello -----------------------------------------------------------------------------------
@dataclass
class Hello:
    """The relay introduces itself: its queue, lease life, longest long poll, upload cap, features."""

    queue: str = ""
    lease_ttl: float = 15.0
    max_wait: Optional[float] = None
    max_upload: Optional[int] = None
    broker_connected: bool = False
    features: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"queue": self.queue, "lease_ttl": self.lease_ttl, "max_wait": self.max_wait,
                "max_upload": self.max_upload, "broker_connected": self.broker_connected,
                "features": list(self.features)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Hello":
        wait = obj.get("max_wait")
        return cls(queue=str(obj.get("queue", "")), lease_ttl=float(obj.get("lease_ttl", 15.0)),
                   max_wait=None if wait is None else float(wait), max_upload=obj.get("max_upload"),
                   broker_connected=bool(obj.get("broker_connected")),
                   features=tuple(f for f in obj.get("features") or () if isinstance(f, str)))


# -- POST /v1/lease ------------------------------------------------------------------------------------
@dataclass
class LeaseRequest:
    """Up to `max` leases for agent, waiting up to `wait` s for the first; `complete` is settled first."""

    agent: str
    max: int = 1
    wait: float = 0.0
    complete: Optional[list[str]] = None   # lease ids done (the "lease_complete" feature)
    inline: int = 0                        # bytes: files up to this size come inline ("inline_files")
    clowder_version: int = 1               # which Clowder API the inline fetches use

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agent": self.agent, "max": self.max, "wait": self.wait}
        if self.inline:
            out.update(inline=self.inline, clowder_version=self.clowder_version)
        if self.complete is not None:
            out["complete"] = self.complete
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "LeaseRequest":
        agent = field_of(obj, "agent", str)[:AGENT_LIMIT]
        limit = field_of(obj, "max", int, required=False, default=1)
        wait = field_of(obj, "wait", float, required=False, default=0.0)
        if not 1 <= limit <= MAX_LEASES:
            raise BadRequest(f"field 'max' must be between 1 and {MAX_LEASES}")
        if wait < 0:
            raise BadRequest("field 'wait' must not be negative")
        inline = field_of(obj, "inline", int, required=False, default=0)
        version = field_of(obj, "clowder_version", int, required=False, default=1)
        if inline < 0 or version not in CLOWDER_VERSIONS:
            raise BadRequest("field 'inline' must not be negative, 'clowder_version' must be 1 or 2")
        complete = lease_ids_of(obj, "complete") if "complete" in obj else None
        return cls(agent, limit, wait, complete, inline, version)


@dataclass
class LeaseItem:
    """One leased message as handed out: the message record's fields plus the lease's own keys.

    headers carry the relay's attempt count (hpc_common.messages.ATTEMPTS); `inline` is the
    inline_files item in its wire form (inline_json), kept as sent: the agent decodes it (inline_of).
    """

    lease_id: str
    message: Message
    attempts: int = 0
    expires_in: float = 0.0
    inline: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        out = {"lease_id": self.lease_id, **self.message.fields_json(), "attempts": self.attempts,
               "expires_in": self.expires_in}
        if self.inline:
            out["inline"] = self.inline
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], default_routing_key: str) -> "LeaseItem":
        inline = obj.get("inline")
        return cls(lease_id=obj["lease_id"], message=Message(**Message.fields_from_json(obj, default_routing_key)),
                   attempts=int(obj.get("attempts") or 0), expires_in=float(obj.get("expires_in") or 0.0),
                   inline=inline if isinstance(inline, dict) else None)


def inline_json(info: Optional[tuple[str, str]], file: Optional[tuple[str, bytes]]) -> Optional[dict[str, Any]]:
    """A lease item's "inline" value: (path, JSON text) of the file info and (path, bytes) of the file,
    either possibly missing; None when both are."""
    item: dict[str, Any] = {}
    if info is not None:
        item.update(info_path=info[0], info=info[1])
    if file is not None:
        item.update(file_path=file[0], file_b64=base64.b64encode(file[1]).decode("ascii"))
    return item or None


def inline_has_file(item: Optional[Mapping[str, Any]]) -> bool:
    """True when an "inline" value carries the file itself (not only its file info)."""
    return bool(item) and "file_b64" in item  # type: ignore[operator]


def inline_of(raw: Any) -> Optional[dict[str, Any]]:
    """A lease item's "inline" value decoded: {info_path, info} and/or {file_path, file (bytes)}.

    Anything malformed is dropped, not an error (None when nothing is left): the extractor then
    makes that call itself, through the relay.
    """
    if not isinstance(raw, dict):
        return None
    inline: dict[str, Any] = {}
    if isinstance(raw.get("info"), str) and isinstance(raw.get("info_path"), str):
        inline.update(info=raw["info"], info_path=raw["info_path"])
    if isinstance(raw.get("file_b64"), str) and isinstance(raw.get("file_path"), str):
        try:
            inline.update(file=base64.b64decode(raw["file_b64"], validate=True), file_path=raw["file_path"])
        except ValueError:
            pass
    return inline or None


@dataclass
class Settled:
    """The answer to a batch of completions: which were settled, which leases were no longer live."""

    done: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, asked: list[str], done: list[str]) -> "Settled":
        ok = set(done)
        return cls(sorted(ok), [i for i in asked if i not in ok])

    def to_json(self) -> dict[str, list[str]]:
        return {"done": self.done, "gone": self.gone}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Optional["Settled"]:
        """None when the answer settled nothing (a relay without "lease_complete" ignores `complete`)."""
        if "done" not in obj:
            return None
        return cls(list(obj.get("done") or []), list(obj.get("gone") or []))


@dataclass
class LeaseAnswer:
    """Leases handed out, and the settlement of the request's `complete` ids when it had some."""

    leases: list[LeaseItem] = field(default_factory=list)
    settled: Optional[Settled] = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"leases": [item.to_json() for item in self.leases]}
        if self.settled is not None:
            out.update(self.settled.to_json())
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], default_routing_key: str) -> "LeaseAnswer":
        return cls([LeaseItem.from_json(item, default_routing_key) for item in obj.get("leases") or ()],
                   Settled.from_json(obj))


# -- POST /v1/extend -------------------------------------------------------------------------------------
@dataclass
class ExtendAnswer:
    """A heartbeat's answer: leases extended by lease_ttl, leases no longer live."""

    extended: list[str]
    gone: list[str]
    lease_ttl: float

    def to_json(self) -> dict[str, Any]:
        return {"extended": self.extended, "gone": self.gone, "lease_ttl": self.lease_ttl}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ExtendAnswer":
        return cls(list(obj.get("extended") or []), list(obj.get("gone") or []), float(obj.get("lease_ttl") or 0.0))


# -- POST /v1/fail and /v1/dead-letter -------------------------------------------------------------------
@dataclass
class FailRequest:
    """A failed attempt: the relay answers {outcome: retry | dead}; leasable again after delay s."""

    lease_id: str
    attempts: int = 0
    reason: str = ""
    delay: Optional[float] = None   # None: the relay's own backoff

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lease_id": self.lease_id, "attempts": self.attempts,
                               "reason": self.reason[:REASON_LIMIT]}
        if self.delay is not None:
            out["delay"] = float(self.delay)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "FailRequest":
        lease_id = lease_id_of(obj)
        attempts = field_of(obj, "attempts", int, required=False, default=0)
        reason = field_of(obj, "reason", str, required=False, default="")[:REASON_LIMIT]
        delay = field_of(obj, "delay", float, required=False, default=None)
        if delay is not None and not 0 <= delay <= MAX_DELAY_S:
            raise BadRequest(f"field 'delay' must be between 0 and {MAX_DELAY_S}")
        return cls(lease_id, attempts, reason, delay)


@dataclass
class DeadLetterRequest:
    """Give up on a lease's message: the relay publishes it to error.<queue> with why and by whom."""

    lease_id: str
    reason: str = ""
    traceback: str = ""
    attempts: int = 0
    agent: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id, "reason": self.reason[:REASON_LIMIT],
                "traceback": self.traceback[-TRACEBACK_LIMIT:], "attempts": self.attempts, "agent": self.agent}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DeadLetterRequest":
        lease_id = lease_id_of(obj)
        reason = field_of(obj, "reason", str, required=False, default="")[:REASON_LIMIT]
        traceback = field_of(obj, "traceback", str, required=False, default="")[-TRACEBACK_LIMIT:]
        attempts = field_of(obj, "attempts", int, required=False, default=0)
        agent = field_of(obj, "agent", str, required=False, default=None)
        return cls(lease_id, reason, traceback, attempts, agent[:AGENT_LIMIT] if agent else None)


# -- POST /v1/status and /v1/register ----------------------------------------------------------------------
def status_item(lease_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One entry of /v1/status's `items`: a status message for the lease's reply_to."""
    return {"lease_id": lease_id, "payload": payload}


def status_items_of(obj: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """/v1/status's items as (lease id, payload)."""
    items = field_of(obj, "items", list)
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("lease_id"), str) \
                or not isinstance(item.get("payload"), dict):
            raise BadRequest("each status item needs a 'lease_id' string and a 'payload' object")
        out.append((item["lease_id"], item["payload"]))
    return out


@dataclass
class RegisterRequest:
    """An agent's extractor registration, which the relay publishes (and repeats) for it."""

    agent: str
    extractor_info: dict[str, Any]
    owner: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "extractor_info": self.extractor_info, "owner": self.owner}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "RegisterRequest":
        return cls(field_of(obj, "agent", str)[:AGENT_LIMIT], field_of(obj, "extractor_info", dict),
                   field_of(obj, "owner", str, required=False, default=""))


# -- GET /v1/backlog[?agent=ID] ---------------------------------------------------------------------------
@dataclass
class BacklogCounts:
    """What a relay's table holds (see launcher.relay.store.backlog_counts for each count's meaning).

    pending = backoff + stale; retry_after: seconds until the first pending one is leasable (None:
    nothing pending); on_the_way: leases granted to the asking agent whose answer is not yet sent.
    The relay's answer also names its queue and lease_ttl.
    """

    ready: int = 0
    backoff: int = 0
    stale: int = 0
    leased: int = 0
    dead: int = 0
    retry_after: Optional[float] = None
    on_the_way: Optional[int] = None

    @property
    def pending(self) -> int:
        return self.backoff + self.stale

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready, "backoff": self.backoff, "stale": self.stale,
                               "leased": self.leased, "dead": self.dead, "pending": self.pending,
                               "retry_after": self.retry_after}
        if self.on_the_way is not None:
            out["on_the_way"] = self.on_the_way
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "BacklogCounts":
        after = obj.get("retry_after")
        way = obj.get("on_the_way")
        return cls(_count(obj.get("ready")), _count(obj.get("backoff")), _count(obj.get("stale")),
                   _count(obj.get("leased")), _count(obj.get("dead")),
                   float(after) if isinstance(after, (int, float)) else None, None if way is None else _count(way))


def _count(value: Any) -> int:
    """A count from an answer (0 when absent or not a number: the backlog is a view, not the data)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0
