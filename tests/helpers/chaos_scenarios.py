"""Chaos scenarios for the agent, written once for the tests (tests/chaos/test_chaos.py) and the
reliability report (benchmarks/reliability_report.py).

Each scenario starts real agent processes against the real RabbitMQ and a Clowder stand-in,
injects one fault, lets the agents finish, and returns a `Result`: what was sent, what ended
with metadata in "Clowder", what ended in error.<queue> with a reason, what was lost (neither),
how many extractions ran again (at-least-once duplicates), how long the agent took to get going
again, and every rule the scenario saw broken (`problems`, which the tests assert is empty).

Accounting, the same for every scenario:
  processed      files with at least one metadata record in the stand-in
  dead_lettered  files whose message is in error.<queue> with an `x-error-reason` header
  lost           files with neither once the agents have ended (anything still in the queue or
                 in a journal counts as lost: a scenario must end with every file settled)
  duplicates     extraction runs beyond what the file needed: for a processed file, runs - 1;
                 for a dead-lettered one, runs - the attempts the agent counted. From the
                 directive extractor's DIRECTIVE_LOG (one line per extraction started).
  duplicate_metadata  metadata records beyond one per file: what Clowder itself saw twice.
  recover_seconds  from the moment the fault was cleared (broker back, Clowder healthy, a new
                 agent started) to the first file whose extraction started after that moment
                 and whose metadata then reached Clowder.
Every metadata record is also checked against the file's length (the directive extractor
reports the bytes it read), so a truncated download handed to an extractor is a problem.

Faults that need root (tmpfs for a full scratch disk, rabbitmqctl for broker restarts and the
secrets scenario's broker user) raise `Unavailable` when the machine cannot do them; the tests
turn that into a failure with CI=true and a skip elsewhere.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote, urlsplit

import pika

from devtools.amqp_queues import companion_queues, delete_queues
from devtools.clowder_standin import ClowderStandin
from helpers.agent_harness import AgentHarness

KILLED = -signal.SIGKILL
NO_SCRATCH = 6
BROKER_UNREACHABLE = 4


class Unavailable(RuntimeError):
    """The machine cannot inject this fault (not root, no rabbitmqctl, no tmpfs)."""


@dataclass
class Result:
    """What one scenario did, in the report's terms, plus the rules it saw broken."""

    scenario: str
    fault: str
    sent: int = 0
    processed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicate_metadata: int = 0
    recover_seconds: Optional[float] = None
    seconds: float = 0.0
    agent_exits: list = field(default_factory=list)
    expected_exits: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- fault injectors ------------------------------------------------------------------------------
_BLOB = re.compile(r"api/(?:v2/)?files/([^/]+)")


class ChaosStandin(ClowderStandin):
    """The stand-in plus faults aimed at one file's download (its blob GET) only.

    The stand-in's own faults match route substrings, and a file's blob path is a prefix of its
    info and metadata paths, so they cannot single out the download; this subclass can.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blob_cuts: dict[str, int] = {}       # file id -> downloads still to cut halfway
        self.blob_delays: dict[str, float] = {}   # file id -> seconds before the download answers
        self.blob_requests: collections.Counter = collections.Counter()

    def _before_request(self, path: str):  # type: ignore[override]
        match = _BLOB.fullmatch(path)
        if match:
            fid = match.group(1)
            with self._lock:
                self.blob_requests[fid] += 1
                cut = self.blob_cuts.get(fid, 0)
                if cut:
                    self.blob_cuts[fid] = cut - 1
                delay = self.blob_delays.get(fid, 0.0)
            if delay:
                time.sleep(delay)
            if cut:
                return ("drop", False)  # headers with the full length, half the body, hang up
        return super()._before_request(path)


class TcpProxy:
    """A TCP forwarder between agents and the broker whose link can be cut and restored.

    cut(): every open connection is shut down and the port refuses new ones (the broker is
    unreachable from the agent's side, while it keeps running for everybody else on the
    machine). restore(): the same port accepts and forwards again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: Optional[socket.socket] = None
        self.connections = 0
        self._listen()

    def _listen(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        with self._lock:
            self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), name="chaos-proxy", daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not ls:
                    client.close()
                    upstream.close()
                    return
                self._socks.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._socks.discard(src)

    @property
    def url_netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            socks, self._socks = list(self._socks), set()
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut()


def with_netloc(url: str, netloc_hostport: str, userinfo: Optional[str] = None) -> str:
    """url with its host:port (and optionally user:password) replaced."""
    parts = urlsplit(url)
    if userinfo is None:
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    netloc = f"{userinfo}@{netloc_hostport}" if userinfo else netloc_hostport
    return parts._replace(netloc=netloc).geturl()


# The node rabbitmqctl acts on (``-n``): None is rabbitmqctl's default node. tests/chaos/test_chaos.py
# points it at the second node of scripts/services.sh, so a broker restart never touches the
# broker the rest of the suite uses.
BROKER_NODE: Optional[str] = None


def _rabbitmqctl(*args: str, stdin: Optional[str] = None, timeout: float = 120) -> str:
    node = ["-n", BROKER_NODE] if BROKER_NODE else []
    try:
        out = subprocess.run(["rabbitmqctl", *node, "-q", *args], input=stdin, capture_output=True, text=True,
                             timeout=timeout)
    except FileNotFoundError:
        raise Unavailable("rabbitmqctl is not installed") from None
    if out.returncode != 0:
        raise Unavailable(f"rabbitmqctl {args[0]} failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def broker_app_running() -> bool:
    try:
        return _rabbitmqctl("eval", "rabbit:is_running().", timeout=30) == "true"
    except (Unavailable, subprocess.TimeoutExpired):
        return False


def ensure_broker_app() -> None:
    """Start the rabbit application if a scenario left it stopped (as scripts/services.sh does)."""
    if not broker_app_running():
        with contextlib.suppress(Unavailable, subprocess.TimeoutExpired):
            _rabbitmqctl("start_app")


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs at {path} (needs root): {out.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)


# -- harness and accounting -----------------------------------------------------------------------
@contextlib.contextmanager
def open_harness(amqp_url: str, tmp: Path, key: str = "secret") -> Iterator[AgentHarness]:
    """A fresh queue, its error queue, a ChaosStandin accepting `key`, and an AgentHarness on them."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    standin = ChaosStandin(keys={key}).start()
    h: Optional[AgentHarness] = None
    try:
        h = AgentHarness(amqp_url, queue, standin, tmp, key=key)
        yield h
    finally:
        if h is not None:
            with contextlib.suppress(Exception):
                h.close()
        standin.stop()
        with contextlib.suppress(Exception):
            conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
            ch = conn.channel()
            delete_queues(ch, companion_queues(queue, retries=True))
            conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def finish(h: AgentHarness, proc: subprocess.Popen, timeout: float, r: Result, what: str) -> int:
    """Wait for an agent's exit (kill it and record a problem when it hangs); record the code."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = "hung"
        r.problems.append(f"{what}: agent did not exit within {timeout:.0f}s")
    r.agent_exits.append(code)
    return code if isinstance(code, int) else -999


def publish_files(h: AgentHarness, contents: list[bytes], **extra: Any) -> list[str]:
    ids = []
    for i, content in enumerate(contents):
        fid = h.add_file(content, name=f"c{i}.txt")
        h.publish(h.v1_body(fid, name=f"c{i}.txt", **extra))
        ids.append(fid)
    return ids


def run_counts(h: AgentHarness) -> collections.Counter:
    return collections.Counter(r[0] for r in h.runs())


def journal_entries(h: AgentHarness) -> int:
    return sum(1 for _, _, names in os.walk(h.journal_dir) for n in names if n.endswith(".msg.json"))


def agent_crash_lines(h: AgentHarness) -> list[str]:
    """Signs that an agent thread died of an unhandled exception, or the interpreter crashed.

    (An unhandled exception on the main thread shows as exit code 1, which the exit codes catch;
    tracebacks alone prove nothing, since logged exceptions print theirs too.)
    """
    return [line for line in h.log_text().splitlines()
            if line.startswith(("Exception in thread", "Fatal Python error"))]


class Clock:
    """Marks when a fault was cleared, with the runs already started at that moment."""

    def __init__(self) -> None:
        self.cleared_at: Optional[float] = None
        self.runs_before: collections.Counter = collections.Counter()

    def clear(self, h: AgentHarness) -> None:
        self.cleared_at = time.time()
        self.runs_before = run_counts(h)


def account(h: AgentHarness, ids: list[str], r: Result, clock: Optional[Clock] = None,
            expect_dead: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """Fill r's counts from what reached the stand-in, the error queue and the directive log.

    expect_dead: file id -> attempts the agent should have counted before dead-lettering it.
    Returns the raw facts (dead-letter headers by file, runs, metadata) for scenario checks.
    """
    expect_dead = expect_dead or {}
    r.sent = len(ids)
    dead: dict[str, list[dict[str, Any]]] = {}
    for props, body in h.errors():
        headers = dict(props.headers or {})
        try:
            fid = json.loads(body)["id"]
        except (ValueError, KeyError, TypeError):
            r.problems.append(f"error queue holds a message that is not one of ours: {body[:80]!r}")
            continue
        if not str(headers.get("x-error-reason") or "").strip():
            r.problems.append(f"{fid}: dead-lettered without x-error-reason")
        dead.setdefault(fid, []).append(headers)
    runs = run_counts(h)
    metadata = {fid: h.standin.metadata_for(fid) for fid in ids}
    processed = {fid for fid in ids if metadata[fid]}
    lost = [fid for fid in ids if fid not in processed and fid not in dead]
    r.processed = len(processed)
    r.dead_lettered = len([fid for fid in ids if fid in dead])
    r.lost = len(lost)
    if lost:
        r.problems.append(f"{len(lost)} file(s) lost: {lost[:5]}")
    depth = h.depth()
    if depth:
        r.problems.append(f"{depth} message(s) still in the queue after the agents ended")
    left = journal_entries(h)
    if left:
        r.problems.append(f"{left} message(s) left in the journal after the agents ended")
    for fid in ids:
        try:
            want = len(h.standin.file_content(fid))
        except KeyError:  # a message for a file Clowder does not have
            continue
        for md in metadata[fid]:
            got = (md.get("content") or {}).get("bytes")
            if got != want:
                r.problems.append(f"{fid}: the extractor read {got} bytes of a {want}-byte file")
    unexpected = sorted(set(dead) - set(expect_dead))
    if unexpected:
        reasons = [dead[f][0].get("x-error-reason") for f in unexpected[:3]]
        r.problems.append(f"{len(unexpected)} file(s) dead-lettered unexpectedly: {reasons}")
    for fid, attempts in expect_dead.items():
        if fid not in dead:
            r.problems.append(f"{fid}: expected in the error queue")
            continue
        if fid in processed:
            r.notes.append(f"{fid} has metadata and is in the error queue")
        got = dead[fid][0].get("x-agent-attempts")
        if got != attempts:
            r.problems.append(f"{fid}: dead-lettered after {got} attempt(s), expected {attempts}")
    if len([f for f in ids if f in dead and len(dead[f]) > 1]):
        r.problems.append("a file was dead-lettered more than once")
    dup = 0
    for fid in ids:
        if fid in processed:
            dup += max(0, runs[fid] - 1)
        elif fid in dead:
            dup += max(0, runs[fid] - int(dead[fid][0].get("x-agent-attempts") or 0))
    r.duplicates = dup
    r.duplicate_metadata = sum(max(0, len(metadata[f]) - 1) for f in ids)
    if clock is not None and clock.cleared_at is not None:
        fresh = [rec["time"] for rec in h.standin.records(kind="metadata")
                 if rec["time"] >= clock.cleared_at and runs[rec["file_id"]] > clock.runs_before[rec["file_id"]]]
        if fresh:
            r.recover_seconds = round(min(fresh) - clock.cleared_at, 2)
        else:
            r.notes.append("no file started and finished after the fault was cleared")
    crashes = agent_crash_lines(h)
    if crashes:
        r.problems.append(f"an agent thread died of an unhandled exception: {crashes[:2]}")
    if r.expected_exits and r.agent_exits != r.expected_exits:
        r.problems.append(f"agent exit codes {r.agent_exits}, expected {r.expected_exits}")
    return {"dead": dead, "runs": runs, "metadata": metadata, "processed": processed}


def scenario(name: str, fault: str) -> Callable:
    """Decorator: time the scenario and hand it a fresh Result."""
    def wrap(fn: Callable[..., None]) -> Callable[..., Result]:
        def run(amqp_url: str, tmp: Path) -> Result:
            r = Result(scenario=name, fault=fault)
            t0 = time.monotonic()
            fn(amqp_url, Path(tmp), r)
            r.seconds = round(time.monotonic() - t0, 1)
            return r
        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        run.scenario_name = name  # type: ignore[attr-defined]
        return run
    return wrap


def _wait_runs(h: AgentHarness, n: int, timeout: float) -> bool:
    return wait_until(lambda: len(h.runs()) >= n, timeout)


# -- scenarios ------------------------------------------------------------------------------------
@scenario("broker restarted mid-run", "rabbitmqctl stop_app, 3 s, start_app while two slots work "
          "(some files journaled)")
def broker_restart(amqp_url: str, tmp: Path, r: Result) -> None:
    """The broker's application restarts while files are in flight, some of them journaled."""
    with open_harness(amqp_url, tmp) as h:
        contents = [b"sleep 0.2\n"] * 30 + [b"sleep 2.5\n"] * 4
        random.Random(1).shuffle(contents)
        ids = publish_files(h, contents)
        r.expected_exits = [0]
        agent = h.start_agent("--idle-exit", "4", AGENT_SLOTS="2", AGENT_JOURNAL_AFTER="1")
        clock = Clock()
        try:
            if not _wait_runs(h, 6, 60):
                r.problems.append("agent never got going before the fault")
            _rabbitmqctl("stop_app")
            time.sleep(3)
            _rabbitmqctl("start_app")
            clock.clear(h)
        finally:
            ensure_broker_app()
        wait_until(lambda: _reconnect(h), 60, step=0.5)
        finish(h, agent, 180, r, "restart")
        log = _after_the_loss(h, ids, r, clock)
        r.notes.append(f"{log.count('journaled and acknowledged')} deliveries journaled; reconnected "
                       f"{_reconnected_after(log)} after the loss; "
                       f"{log.count('its delivery died with the connection')} acks lost with the connection")


def _after_the_loss(h: AgentHarness, ids: list[str], r: Result, clock: Clock) -> str:
    """Every file accounted for and the agent reconnected; the agent's log, for the notes."""
    account(h, ids, r, clock)
    log = h.log_text()
    if "reconnected" not in log:
        r.problems.append("the agent never logged a reconnection")
    return log


def _reconnected_after(log: str) -> str:
    """Seconds from each 'lost the broker' log line to the next 'reconnected' line (log timestamps)."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
    lost_at, gaps = None, []
    for line in log.splitlines():
        m = stamp.match(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if "lost the broker during" in line and lost_at is None:
            lost_at = t
        elif "reconnected after" in line and lost_at is not None:
            gaps.append(f"{t - lost_at:.1f} s")
            lost_at = None
    return ", ".join(gaps) or "never"


def _reconnect(h: AgentHarness) -> bool:
    try:
        h.reconnect()
        return True
    except pika.exceptions.AMQPError:
        return False


@scenario("broker unreachable 30 s", "TCP link agent-broker cut (reset, then refused) for 30 s; "
          "idle_exit 5 s is shorter than the outage")
def broker_unreachable(amqp_url: str, tmp: Path, r: Result) -> None:
    """The network between agent and broker goes away for 30 s (the broker itself keeps running)."""
    parts = urlsplit(amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    try:
        with open_harness(amqp_url, tmp) as h:
            contents = [b"sleep 0.2\n"] * 30 + [b"sleep 2.5\n"] * 4
            random.Random(2).shuffle(contents)
            ids = publish_files(h, contents)
            r.expected_exits = [0]
            agent = h.start_agent("--idle-exit", "5", AGENT_SLOTS="2", AGENT_JOURNAL_AFTER="1",
                                  RABBITMQ_URI=with_netloc(amqp_url, proxy.url_netloc))
            clock = Clock()
            if not _wait_runs(h, 6, 60):
                r.problems.append("agent never got going before the fault")
            proxy.cut()
            time.sleep(30)
            if agent.poll() is not None:
                r.problems.append(f"the agent exited ({agent.returncode}) while the broker was unreachable")
            proxy.restore()
            clock.clear(h)
            finish(h, agent, 120, r, "unreachable")
            log = _after_the_loss(h, ids, r, clock)
            r.notes.append(f"{log.count('reconnect failed')} failed reconnect attempts during the outage, "
                           f"reconnected {_reconnected_after(log)} after the loss; "
                           f"{log.count('its delivery died with the connection')} acks lost with the connection")
            r.notes.append("reconnect attempts back off 1, 2, 4, 8, then every 15 s (at +1, +3, +7, +15, +30, "
                           "+45 s...), so a 30 s outage happens to end just before an attempt; an outage of "
                           "d seconds costs at most 15 s more than d")
    finally:
        proxy.close()


@scenario("Clowder 5xx / timeouts 30 s", "every API call: 503 for 10 s, 504 for 5 s, then connections "
          "dropped unanswered after 1 s for 15 s")
def clowder_outage(amqp_url: str, tmp: Path, r: Result) -> None:
    """Clowder is down for 30 s: errors first, then connections that hang and die unanswered."""
    with open_harness(amqp_url, tmp) as h:
        ids = publish_files(h, [b"ok\n"] * 24 + [b"sleep 1\n"] * 6)
        r.expected_exits = [0]
        agent = h.start_agent("--idle-exit", "4", AGENT_SLOTS="2", AGENT_MAX_RETRIES="1",
                              AGENT_RETRY_BACKOFF="0.1")
        clock = Clock()
        if not wait_until(lambda: len(h.standin.records(kind="metadata")) >= 3, 60):
            r.problems.append("agent never got going before the fault")
        try:
            h.standin.fail_next(10 ** 9, status=503)
            time.sleep(10)
            h.standin.reset_faults()
            h.standin.fail_next(10 ** 9, status=504)
            time.sleep(5)
            h.standin.reset_faults()
            h.standin.set_delay(1.0)
            h.standin.drop_next(10 ** 9)
            time.sleep(15)
        finally:
            h.standin.reset_faults()
        clock.clear(h)
        finish(h, agent, 150, r, "clowder outage")
        account(h, ids, r, clock)
        log = h.log_text()
        r.notes.append(f"{log.count('deferred')} deferrals; max_retries 1 and nothing dead-lettered: "
                       "an outage spends no attempts")
        if "deferred" not in log:
            r.problems.append("the outage never deferred a file")


@scenario("Clowder drops connections mid-download", "downloads cut after half the body (1-2 times per "
          "file, 40 KB to 3 MB); 2 metadata answers lost after the write")
def clowder_drops(amqp_url: str, tmp: Path, r: Result) -> None:
    """Downloads are cut halfway: the agent must retry, never hand a truncated file to the extractor."""
    with open_harness(amqp_url, tmp) as h:
        sizes = [40_000, 70_000, 200_000, 600_000, 1_100_000, 3_000_000, 150_000, 2_000_000]
        contents = [b"ok " + bytes([97 + i % 26]) * n + b"\n" for i, n in enumerate(sizes)]
        ids = publish_files(h, contents)
        for i, fid in enumerate(ids):
            h.standin.blob_cuts[fid] = 1 + i % 2
        for fid in ids[:2]:
            h.standin.drop_next(1, route_contains=f"{fid}/metadata.jsonld", after_processing=True)
        r.expected_exits = [0]
        agent = h.start_agent("--idle-exit", "3", AGENT_SLOTS="2", AGENT_MAX_RETRIES="0",
                              AGENT_RETRY_BACKOFF="0.1")
        finish(h, agent, 150, r, "drops")
        account(h, ids, r)
        pending = {f: n for f, n in h.standin.blob_cuts.items() if n}
        if pending:
            r.problems.append(f"{len(pending)} cuts were never triggered")
        cuts = sum(1 + i % 2 for i in range(len(ids)))
        r.notes.append(f"{cuts} downloads cut halfway, {sum(h.standin.blob_requests.values())} blob requests; "
                       f"every extractor read the whole file; the 2 lost metadata answers were re-sent "
                       f"({r.duplicate_metadata} duplicate record(s))")


@scenario("scratch full (ENOSPC)", "1 MB tmpfs as AGENT_WORK_DIR; a 3 MB file whose message claims "
          "10 bytes; two agents on the tiny scratch, then one with room")
def scratch_full(amqp_url: str, tmp: Path, r: Result) -> None:
    """A download fills the scratch disk: the file is handed back (no attempt spent) and the agent stops."""
    with open_harness(amqp_url, tmp) as h, tiny_tmpfs(tmp / "scratch") as scratch:
        contents = [b"ok\n"] * 3 + [b"ok " + b"z" * 3_000_000 + b"\n"] + [b"ok\n"] * 4
        ids = publish_files(h, contents)
        r.expected_exits = [NO_SCRATCH, NO_SCRATCH, 0]
        for i in range(2):
            agent = h.start_agent("--idle-exit", "5", AGENT_WORK_DIR=str(scratch), AGENT_MAX_RETRIES="1")
            finish(h, agent, 60, r, f"tiny scratch {i}")
        left = [str(p) for p in scratch.rglob("*") if p.is_file()]
        if left:
            r.problems.append(f"partial downloads left on the scratch disk: {left}")
        clock = Clock()
        clock.clear(h)
        roomy = tmp / "roomy-scratch"
        agent = h.start_agent("--idle-exit", "3", AGENT_WORK_DIR=str(roomy), AGENT_MAX_RETRIES="1")
        finish(h, agent, 60, r, "roomy scratch")
        account(h, ids, r, clock)
        log = h.log_text()
        if "No space left on device" not in log and "scratch space" not in log:
            r.problems.append("no ENOSPC was seen")
        r.notes.append(f"handed back {log.count('handing the message back')} times, no attempt counted; "
                       "no partial file left on the scratch disk")


def _orphan_workers(directive_log: str) -> list[int]:
    """Extractor processes of this scenario (by their DIRECTIVE_LOG) still alive."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"agent.worker_process" not in fh.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"DIRECTIVE_LOG={directive_log}".encode() in fh.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


@scenario("kill -9 loop (20 rounds)", "20 x: start an agent, wait 0.2-3 s, SIGKILL its process group "
          "(journal_after 1 s in every other round); then one agent drains")
def kill9_loop(amqp_url: str, tmp: Path, r: Result, rounds: int = 20) -> None:
    """kill -9 at random moments, 20 times in a row: nothing lost, journaled work recovered."""
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "20")))
    with open_harness(amqp_url, tmp) as h:
        contents = [b"sleep 0.4\n"] * 35 + [b"ok\n"] * 8 + [b"sleep 1.5\n"] * 7
        rng.shuffle(contents)
        ids = publish_files(h, contents)
        orphans = 0
        journaled_rounds = 0
        for i in range(rounds):
            env: dict[str, Any] = {"AGENT_SLOTS": str(1 + i % 2)}
            if i % 2:
                env["AGENT_JOURNAL_AFTER"] = "1"
            agent = h.start_agent(**env)
            time.sleep(rng.uniform(0.2, 3.0))
            if agent.poll() is not None:
                r.problems.append(f"round {i}: the agent exited ({agent.returncode}) before it was killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            finish(h, agent, 10, r, f"round {i}")
            if wait_until(lambda: not _orphan_workers(h.directive_log), 5, step=0.1) is False:
                orphans += 1
                for pid in _orphan_workers(h.directive_log):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            journaled_rounds += journal_entries(h) > 0
        if orphans:
            r.problems.append(f"extractor processes outlived their killed agent in {orphans} round(s)")
        clock = Clock()
        clock.clear(h)
        before = len({f for f in ids if h.standin.metadata_for(f)})
        agent = h.start_agent("--idle-exit", "4", AGENT_SLOTS="2")
        r.expected_exits = [KILLED] * rounds + [0]
        finish(h, agent, 120, r, "final drain")
        account(h, ids, r, clock)
        log = h.log_text()
        recovered = sum(int(n) for n in re.findall(r"put back (\d+) message\(s\) journaled", log))
        r.notes.append(f"{before} files done during the kill rounds; {journaled_rounds} round(s) left journal "
                       f"entries, {recovered} journaled message(s) put back by later agents; no orphaned "
                       "extractor process")


def _sigterm_phase(amqp_url: str, tmp: Path, r: Result, phase: str) -> None:
    """Two files in two slots: A's stall fits in the stop grace, B's does not. SIGTERM mid-phase.

    A must finish within the grace and be acknowledged once; B must be handed back (no attempt
    counted, never dead-lettered) and processed by the next agent.
    """
    grace = 2.0
    with open_harness(amqp_url, tmp) as h:
        if phase == "extraction":
            ids = publish_files(h, [b"sleep 0.3\n", b"sleep 4\n"])
        else:
            ids = publish_files(h, [b"ok\n", b"ok\n"])
        a, b = ids
        if phase == "download":
            h.standin.blob_delays.update({a: 0.5, b: 8.0})
            started = lambda: h.standin.blob_requests[a] and h.standin.blob_requests[b]  # noqa: E731
        elif phase == "upload":
            h.standin.set_delay(0.5, route_contains=f"{a}/metadata.jsonld")
            h.standin.set_delay(5.0, route_contains=f"{b}/metadata.jsonld")
            started = lambda: h.standin.request_counts().get("POST api/files/{id}/metadata.jsonld", 0) >= 2  # noqa: E731
        else:
            started = lambda: len(h.runs()) >= 2  # noqa: E731
        r.expected_exits = [0, 0]
        agent = h.start_agent(AGENT_SLOTS="2", AGENT_STOP_GRACE=str(grace))
        if not wait_until(started, 60):
            r.problems.append(f"both files never reached the {phase} phase")
        t_term = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        finish(h, agent, 30, r, "SIGTERM")
        took = time.monotonic() - t_term
        if took > grace + 5:
            r.problems.append(f"the agent took {took:.1f}s to stop after SIGTERM (grace {grace:g}s)")
        a_done = len(h.standin.metadata_for(a))
        if a_done != 1:
            r.problems.append(f"file A (stall within the grace) has {a_done} metadata records after SIGTERM")
        # B is back in the queue untouched: no attempt counted.
        wait_until(lambda: h.depth() == 1, 10)
        method, props, body = h.ch.basic_get(h.queue, auto_ack=False)
        if method is None:
            r.problems.append("file B is not back in the queue after SIGTERM")
        else:
            if json.loads(body)["id"] != b:
                r.problems.append("the message handed back is not file B's")
            if (props.headers or {}).get("x-agent-attempts"):
                r.problems.append("handing B back counted a failed attempt")
            h.ch.basic_nack(method.delivery_tag, requeue=True)
        h.standin.reset_faults()
        h.standin.blob_delays.clear()
        clock = Clock()
        clock.clear(h)
        drain = h.start_agent("--idle-exit", "2")
        finish(h, drain, 60, r, "drain")
        if phase == "upload":
            # B's first POST was cut by the kill but Clowder still writes it when its 5 s stall ends.
            wait_until(lambda: len(h.standin.metadata_for(b)) >= 2, 8)
        account(h, ids, r, clock)
        runs = run_counts(h)
        if runs[a] != 1:
            r.problems.append(f"file A ran {runs[a]} times")
        expect_b_runs = 1 if phase == "download" else 2
        if runs[b] != expect_b_runs:
            r.problems.append(f"file B ran {runs[b]} times, expected {expect_b_runs}")
        r.notes.append(f"SIGTERM to exit {took:.1f}s (grace {grace:g}s); A finished in the grace and was "
                       f"acked once; B handed back with no attempt counted, B ran {runs[b]} time(s)"
                       + ("; B's cut upload still reached Clowder: one duplicate record (at-least-once)"
                          if phase == "upload" else ""))


@scenario("SIGTERM during download", "blob GET of file B stalled 8 s, A 0.5 s; SIGTERM with stop_grace 2 s")
def sigterm_download(amqp_url: str, tmp: Path, r: Result) -> None:
    _sigterm_phase(amqp_url, tmp, r, "download")


@scenario("SIGTERM during extraction", "B sleeps 4 s, A 0.3 s in the extractor; SIGTERM with stop_grace 2 s")
def sigterm_extraction(amqp_url: str, tmp: Path, r: Result) -> None:
    _sigterm_phase(amqp_url, tmp, r, "extraction")


@scenario("SIGTERM during upload", "metadata POST of B stalled 5 s, A 0.5 s; SIGTERM with stop_grace 2 s")
def sigterm_upload(amqp_url: str, tmp: Path, r: Result) -> None:
    _sigterm_phase(amqp_url, tmp, r, "upload")


@scenario("poison messages", "files that crash, segfault, exit, raise, leak memory past the limit or hang "
          "past the time limit on every attempt, among good files; max_retries 2")
def poison(amqp_url: str, tmp: Path, r: Result) -> None:
    """Messages that kill their worker every time still end: bounded attempts, then error.<queue>."""
    with open_harness(amqp_url, tmp) as h:
        bad = [b"crash\n", b"segv\n", b"exit\n", b"raise\n", b"leak 300\n", b"sleep 120\n", b"abort\n"]
        good = [b"ok\n"] * 8
        contents = good[:4] + bad + good[4:]
        ids = publish_files(h, contents)
        poison_ids = ids[4:4 + len(bad)]
        expect = {fid: (1 if c == b"abort\n" else 3) for fid, c in zip(poison_ids, bad)}
        r.expected_exits = [0]
        agent = h.start_agent("--idle-exit", "3", AGENT_SLOTS="2", AGENT_MAX_RETRIES="2", AGENT_TIME_LIMIT="2",
                              AGENT_MEMORY_LIMIT="150")
        finish(h, agent, 120, r, "poison")
        facts = account(h, ids, r, expect_dead=expect)
        runs = facts["runs"]
        for fid, attempts in expect.items():
            if runs[fid] != attempts:
                r.problems.append(f"{fid}: ran {runs[fid]} times, expected {attempts}")
        reasons = {h.standin.file_content(f).split()[0].decode(): facts["dead"][f][0].get("x-error-reason", "")
                   for f in poison_ids if f in facts["dead"]}
        for verb, needle in (("leak", "memory limit"), ("sleep", "time limit"), ("segv", "signal 11"),
                             ("crash", "code 9"), ("abort", "abort")):
            if needle not in reasons.get(verb, ""):
                r.problems.append(f"{verb}: reason {reasons.get(verb)!r} does not say {needle!r}")
        r.notes.append("reasons: " + "; ".join(f"{v}: {reason[:90]}" for v, reason in sorted(reasons.items())))


# -- secrets --------------------------------------------------------------------------------------
@contextlib.contextmanager
def broker_user() -> Iterator[tuple[str, str]]:
    """A throwaway RabbitMQ user with a random password (given on stdin, never on a command line)."""
    user = f"chaos-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(18)
    _rabbitmqctl("add_user", user, stdin=password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        with contextlib.suppress(Unavailable, subprocess.TimeoutExpired):
            _rabbitmqctl("delete_user", user)


class PsWatcher:
    """Snapshots of every process's command line (what `ps -eo args` shows) while agents run."""

    def __init__(self, directive_log: str) -> None:
        self.marker = f"DIRECTIVE_LOG={directive_log}".encode()
        self.snapshots: list[str] = []
        self.environs: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PsWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            self.snapshots.append(out)
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) in self.environs:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if b"agent.worker_process" not in fh.read():
                            continue
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        environ = fh.read()
                    if self.marker in environ.split(b"\0"):  # one of this scenario's extractors
                        self.environs[int(pid)] = environ
                except OSError:
                    continue
            self._stop.wait(0.2)


@scenario("secrets never leak", "agents with a broker password and a random Clowder key; 404s, 5xx, "
          "tracebacks, a wrong broker password; logs at DEBUG")
def secrets_scan(amqp_url: str, tmp: Path, r: Result) -> None:
    """Grep every log line, status, error header and process title for the key and the password."""
    key = secrets.token_hex(16)
    with broker_user() as (user, password), open_harness(amqp_url, tmp, key=key) as h:
        agent_url = with_netloc(amqp_url, urlsplit(amqp_url).netloc.rsplit("@", 1)[-1],
                                f"{quote(user, safe='')}:{quote(password, safe='')}")
        wrong = secrets.token_urlsafe(18)
        wrong_url = with_netloc(amqp_url, urlsplit(amqp_url).netloc.rsplit("@", 1)[-1],
                                f"{quote(user, safe='')}:{quote(wrong, safe='')}")
        ids = publish_files(h, [b"ok\n", b"print\n", b"tags\n", b"raise\n", b"abort\n", b"ok\n", b"ok\n"])
        flaky = ids[5]
        h.standin.fail_next(5, status=500, route_contains=f"api/files/{flaky}")
        h.standin.fail_next(2, status=502, route_contains=f"{ids[6]}/metadata.jsonld")
        missing = "nosuchfile" + secrets.token_hex(4)
        h.publish(h.v1_body(missing))
        ids.append(missing)
        expect = {ids[3]: 2, ids[4]: 1, missing: 1}
        r.expected_exits = [0, 0, BROKER_UNREACHABLE]
        env = {"RABBITMQ_URI": agent_url, "AGENT_LOG_LEVEL": "DEBUG", "AGENT_MAX_RETRIES": "1"}
        with PsWatcher(h.directive_log) as ps:
            first = h.start_agent("--idle-exit", "3", **env)
            second = h.start_agent("--idle-exit", "3", **env)
            finish(h, first, 60, r, "agent 1")
            finish(h, second, 60, r, "agent 2")
            bad = h.start_agent("--idle-exit", "3", RABBITMQ_URI=wrong_url, AGENT_CONNECT_TIMEOUT="2",
                                AGENT_LOG_LEVEL="DEBUG")
            finish(h, bad, 60, r, "wrong password")
        statuses = h.statuses()
        errors = h.drain("error." + h.queue)
        # Put the error messages back for account() (it reads the error queue itself).
        for props, body in errors:
            h.ch.basic_publish("", "error." + h.queue, body, props)
        account(h, ids, r, expect_dead=expect)
        texts: list[tuple[str, str]] = [("log", h.log_text())]
        texts += [("status", json.dumps(s)) for s in statuses]
        texts += [("error header", json.dumps({k: str(v) for k, v in (p.headers or {}).items()})) for p, _ in errors]
        texts += [("ps", snap) for snap in ps.snapshots]
        texts += [(f"worker environ {pid}", env_bytes.decode("utf-8", "replace"))
                  for pid, env_bytes in ps.environs.items()]
        needles = {"Clowder key": key, "broker password": password, "wrong broker password": wrong}
        for label, text in texts:
            for name, needle in needles.items():
                if needle in text or quote(needle, safe="") in text:
                    where = text.find(needle)
                    r.problems.append(f"{name} found in {label}: ...{text[max(0, where - 80):where]}...")
        # The scan must have looked at something, and the faults must have put keys in harm's way.
        lines = h.log_text().count("\n")
        if not statuses or not errors or len(ps.snapshots) < 3 or not ps.environs:
            r.problems.append(f"too little to scan: {len(statuses)} statuses, {len(errors)} error messages, "
                              f"{len(ps.snapshots)} ps snapshots, {len(ps.environs)} worker environments")
        if not any("agent" in snap and " run" in snap for snap in ps.snapshots):
            r.problems.append("no ps snapshot caught a running agent")
        log = h.log_text()
        for needle in ("404", "500", "key=***"):
            if needle not in log:
                r.problems.append(f"the log never mentions {needle!r}: the faults did not fire")
        r.notes.append(f"scanned {lines} log lines, {len(statuses)} statuses, {len(errors)} error-queue header "
                       f"sets, {len(ps.snapshots)} `ps -eo args` snapshots, {len(ps.environs)} extractor "
                       "environments: key and passwords found 0 times")


@scenario("kill -9 during retry backoffs", "4 files fail once (backoff 4 s, parked in retry queues), 6 good; "
          "SIGKILL the agent while the retries wait; a second agent drains")
def kill9_during_backoff(amqp_url: str, tmp: Path, r: Result) -> None:
    """A retry waiting for its backoff lives in the broker (retry.<queue>.<s>), not in the agent."""
    with open_harness(amqp_url, tmp) as h:
        contents = [f"raise-once {tmp / f'marker-{i}'}\n".encode() for i in range(4)] + [b"ok\n"] * 6
        ids = publish_files(h, contents)
        agent = h.start_agent(AGENT_RETRY_BACKOFF="4", AGENT_SLOTS="2")
        if not wait_until(lambda: h.log_text().count("retrying in 4.0s") >= 4, 60):
            r.problems.append("the four first attempts did not all fail in time")
        parked = h.depth()
        os.killpg(agent.pid, signal.SIGKILL)
        finish(h, agent, 10, r, "agent killed during the backoffs")
        clock = Clock()
        clock.clear(h)
        # The dead agent's retries come back from their retry queue when its 4 s TTL expires. A new
        # agent cannot see retries another agent parked (it stays only for its own), so it idles
        # longer than the backoff; an agent that left earlier would leave them to the next one.
        second = h.start_agent("--idle-exit", "6", AGENT_RETRY_BACKOFF="4")
        r.expected_exits = [KILLED, 0]
        finish(h, second, 90, r, "second agent")
        facts = account(h, ids, r, clock)
        never = [f for f in ids[:4] if facts["runs"][f] < 2]
        if never:
            r.problems.append(f"{len(never)} failing file(s) never ran their retry")
        r.notes.append(f"{parked} message(s) in the work queue at the kill (the retries waited in retry queues); "
                       "4 of the extra runs are the planned retries of the files that fail once")


@scenario("kill -9 under the relay (lease expiry)", "relay with its default 15 s leases; SIGKILL an agent "
          "3 s into a 20-file run; a second agent with --idle-exit 5 at once")
def relay_lease_expiry(amqp_url: str, tmp: Path, r: Result) -> None:
    """A dead agent's leases come back within the lease ttl and the next agent waits for them."""
    from helpers.relay_harness import RelayProc, start_agent_in

    with open_harness(amqp_url, tmp) as h:
        relay = RelayProc(h, "127.0.0.1", tmp).start()
        try:
            ids = publish_files(h, [b"sleep 0.2\n"] * 20)
            first = start_agent_in(h, None, **relay.agent_env())
            if not _wait_runs(h, 1, 60):
                r.problems.append("the first agent never started a file")
            time.sleep(3.0)
            os.killpg(first.pid, signal.SIGKILL)
            finish(h, first, 10, r, "agent killed holding leases")
            clock = Clock()
            clock.clear(h)
            second = start_agent_in(h, None, "--idle-exit", "5", **relay.agent_env())
            r.expected_exits = [KILLED, 0]
            finish(h, second, 120, r, "second agent")
            wait_until(lambda: "expired lease(s) returned" in relay.log(), 5)
        finally:
            relay.stop()
        account(h, ids, r, clock)
        if "expired lease(s) returned" not in relay.log():
            r.notes.append("the killed agent held no lease at the kill")
        waited = h.log_text().count("source holds work deliverable")
        r.notes.append(f"the second agent stayed {waited} time(s) for leases the relay said were coming back")


ALL: list[Callable[[str, Path], Result]] = [
    broker_restart, broker_unreachable, clowder_outage, clowder_drops, scratch_full, kill9_loop,
    sigterm_download, sigterm_extraction, sigterm_upload, poison, secrets_scan, kill9_during_backoff,
    relay_lease_expiry,
]
