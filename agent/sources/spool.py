"""Spool work source: for compute nodes that reach nothing but the shared filesystem.

`python -m launcher spool` (on the login node) takes messages from RabbitMQ, downloads each
message's file from Clowder into a spool folder on the shared filesystem and stages the message
there; agents with `source: spool` claim staged messages, run the extractor on the staged file,
and leave what the extractor sent to Clowder in an outbox; the launcher replays it to the real
Clowder and forgets the message. Layout (all writes are write-to-temporary + fsync + rename):

  inbox/<msg>.json               staged messages, claimable
  files/<msg>/<filename>         the staged input file
  claimed/<agent>/lock           flock held by the agent for its whole life (dies with it)
  claimed/<agent>/<msg>.json     claimed by atomic rename from inbox/ (one winner, also on NFS)
  outbox/<msg>.partial/          what the extractor sent so far (NNNN.json + NNNN.body, statuses.jsonl)
  outbox/<msg>/                  the same, complete, with result.json: renamed when the agent settles
  extractor_info.json            written by agents; the launcher registers the extractor with it

The extractor talks to a recorder the agent runs on 127.0.0.1: it answers the file's info with
the staged file's local path (pyclowder then reads it in place), serves its bytes, records every
write that hpc_common.routes allows for the message (anything else: 403), and answers the
calls that create ids (previews, uploads, new datasets) with placeholders the launcher maps to
the real ids when it replays. Reads of other Clowder data are not available offline (404).

A claim whose agent died (its lock can be taken) is reclaimed by any agent or the launcher:
the message goes back to inbox/ with one more attempt, its partial outbox is deleted (a
finished outbox/<msg>/ wins: its results are collected). Needs flock that works across nodes
(NFSv4, Lustre mounted with -o flock), as the journal does. The recorder listens on the
loopback of the node whose agent holds the messages: under MPI keep one group per node
(AGENT_MPI_LEADER=node, the default), so every rank's extractor is on the recorder's node.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlsplit

from hpc_common.messages import ATTEMPTS, REASON_LIMIT, TRACEBACK_LIMIT, Message
from hpc_common.owned_folders import OwnedFolder, fsync_dir
from hpc_common.routes import Refusal, check, lease_scope
from hpc_common.spool_layout import SpoolLayout, bump_attempts, reclaim

from ..messages import Delivery
from .base import WorkSource

log = logging.getLogger("agent.spool")
PLACEHOLDER = "spool-"


# -- the recorder the extractor talks to -----------------------------------------------------------
class _Recorder(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, source: "SpoolSource") -> None:
        self.source = source
        super().__init__(("127.0.0.1", 0), _RecorderHandler)

    def server_bind(self) -> None:
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _RecorderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self.server.source._handle(self)  # type: ignore[attr-defined]

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Held:
    """A claimed message as the agent holds it."""

    def __init__(self, msg: str, staged: dict[str, Any], body: dict[str, Any]) -> None:
        self.msg = msg
        self.staged = staged
        self.body = body            # the original body (real host and key never leave the spool)
        self.learned: dict[str, list[str]] = {}
        self.seq = 0
        self.lock = threading.Lock()


class SpoolSource(WorkSource):
    """Claim staged messages from a spool folder (see the module docstring)."""

    def __init__(self, root: str, prefetch: int, agent_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = SpoolLayout(root)
        self.prefetch = max(1, prefetch)
        self.agent_id = agent_id
        self.queue = "spool"
        self.generation = 1
        self._clock = clock
        self._claims = OwnedFolder(self.layout.claimed, agent_id)
        self._dir = self._claims.dir
        self._held: dict[str, _Held] = {}
        self._intake = True
        self._key = secrets.token_urlsafe(24)
        self._server: Optional[_Recorder] = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self, wake: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Make the spool's folders, take this agent's claim folder, start the recorder.

        Nothing arrives from a thread (`take` claims from the inbox), so wake is not kept; claims
        outlive anything but this process, so on_lost is never called.
        """
        self.layout.make()
        self._claims.open()
        self._server = _Recorder(self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="spool-recorder",
                         daemon=True).start()
        self.queue = os.path.basename(self.layout.root)
        log.info("spool %s: claiming into %s", self.layout.root, self._dir)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def take(self) -> list[Delivery]:
        """Claim staged messages while fewer than prefetch are held (one listing of the inbox a turn)."""
        room = self.prefetch - len(self._held)
        if not self._intake or room <= 0:
            return []
        try:
            names = sorted(n for n in os.listdir(self.layout.inbox) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        got: list[Delivery] = []
        for name in names:
            mine = os.path.join(self._dir, name)
            try:
                os.rename(os.path.join(self.layout.inbox, name), mine)  # atomic: one agent wins
            except FileNotFoundError:
                continue
            fsync_dir(self._dir)
            got.append(self._claimed(name[:-5], mine))
            if len(got) >= room:
                break
        return got

    def _claimed(self, msg: str, path: str) -> Delivery:
        staged = SpoolLayout.read_json(path)
        fields = Message.fields_from_json(staged, self.queue)
        try:
            body = json.loads(fields["body"])
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("host"), str) and isinstance(body.get("secretKey"), str):
            shown = dict(body, host=f"{self.url}m/{msg}/", secretKey=self._key)
            fields["body"] = json.dumps(shown).encode()
        self._held[msg] = _Held(msg, staged, body if isinstance(body, dict) else {})
        shutil.rmtree(self.layout.result_dir(msg, partial=True), ignore_errors=True)
        os.makedirs(self.layout.result_dir(msg, partial=True), mode=0o700)
        return Delivery(**fields, redelivered=bool(fields["headers"].get(ATTEMPTS)), token=msg,
                        received_at=self._clock(), secured=True)

    @property
    def connected(self) -> bool:
        return True

    def stop_intake(self) -> None:
        self._intake = False

    def close(self) -> None:
        for msg in list(self._held):
            self._back_to_inbox(msg, None)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._claims.close()

    # -- settling --------------------------------------------------------------------------------
    def _claim_path(self, msg: str) -> str:
        return os.path.join(self._dir, msg + ".json")

    def _finish(self, msg: str, result: dict[str, Any]) -> None:
        """Seal the outbox with its result (atomic rename), then drop the claim."""
        held = self._held.pop(msg, None)
        partial, final = self.layout.result_dir(msg, partial=True), self.layout.result_dir(msg)
        os.makedirs(partial, mode=0o700, exist_ok=True)
        if held is not None:
            result.setdefault("placeholders", held.learned)
        result["host_shown"] = f"{self.url}m/{msg}/"  # the launcher puts the real host back in bodies
        SpoolLayout.write_json(os.path.join(partial, "result.json"), result)
        os.rename(partial, final)
        fsync_dir(self.layout.outbox)
        try:
            os.unlink(self._claim_path(msg))
        except FileNotFoundError:
            pass

    def _back_to_inbox(self, msg: str, reason: Optional[str]) -> None:
        held = self._held.pop(msg, None)
        shutil.rmtree(self.layout.result_dir(msg, partial=True), ignore_errors=True)
        claim = self._claim_path(msg)
        if reason is not None and held is not None:
            staged = held.staged
            bump_attempts(staged, reason)
            SpoolLayout.write_json(claim, staged)
        try:
            os.rename(claim, self.layout.staged(msg))
        except FileNotFoundError:
            pass

    def complete(self, delivery: Delivery) -> None:
        self._finish(delivery.token, {"outcome": "ok", "agent": self.agent_id, "time": time.time()})

    def release(self, delivery: Delivery) -> None:
        self._back_to_inbox(delivery.token, None)

    def retry(self, delivery: Delivery, attempts: int, reason: str) -> None:
        held = self._held.get(delivery.token)
        if held is not None:
            held.staged.setdefault("headers", {})[ATTEMPTS] = attempts - 1  # bump adds the one
        self._back_to_inbox(delivery.token, reason)

    def dead_letter(self, delivery: Delivery, reason: str, traceback: str, attempts: int) -> None:
        self._finish(delivery.token, {"outcome": "dead", "reason": reason[:REASON_LIMIT], "attempts": attempts,
                                      "traceback": traceback[-TRACEBACK_LIMIT:], "agent": self.agent_id,
                                      "time": time.time()})

    def secure(self, delivery: Delivery) -> Any:
        """Nothing to do: a claimed message is already on disk."""
        return delivery.token

    def publish_status(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        partial = self.layout.result_dir(delivery.token, partial=True)
        try:
            with open(os.path.join(partial, "statuses.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(payload) + "\n")
        except OSError:
            pass  # best effort, like every status

    def register(self, extractor_info: dict[str, Any], owner: Optional[str]) -> None:
        try:
            # "at": the launcher registers the extractor for us only while agents keep writing this.
            SpoolLayout.write_json(self.layout.info_file, {"extractor_info": extractor_info, "owner": owner or "",
                                                           "at": time.time()})
        except OSError as exc:
            log.debug("spool: cannot write %s: %s", self.layout.info_file, exc)

    def recover_orphans(self) -> int:
        return reclaim(self.layout, own=self.agent_id)

    def work_soon(self) -> Optional[float]:
        """Before leaving on idle: put back dead agents' claims now; stay if that (or anything) is claimable."""
        try:
            back = reclaim(self.layout, own=self.agent_id)
            waiting = any(n.endswith(".json") for n in os.listdir(self.layout.inbox))
        except OSError:
            return None
        return 0.0 if back or waiting else None

    # -- the recorder ------------------------------------------------------------------------------
    def _handle(self, h: _RecorderHandler) -> None:
        split = urlsplit(h.path)
        parts = split.path.split("/", 3)  # '', 'm', msg, rest
        length = int(h.headers.get("Content-Length") or 0)
        if len(parts) < 4 or parts[1] != "m" or parts[2] not in self._held:
            h.rfile.read(length)
            h.send_json(404, {"error": "no such message held by this agent"})
            return
        held = self._held[parts[2]]
        params = parse_qsl(split.query, keep_blank_values=True)
        key = next((v for k, v in params if k == "key"), None) or h.headers.get("X-API-Key")
        if key != self._key:
            h.rfile.read(length)
            h.send_json(401, {"error": "missing or invalid key"})
            return
        path, method = parts[3], h.command
        try:
            route = check(method, path, lease_scope(held.body, held.learned))
        except Refusal as exc:
            h.rfile.read(length)
            h.send_json(exc.status, {"error": exc.text})
            return
        staged_file = os.path.join(self.layout.root, held.staged["file"]) if held.staged.get("file") else None
        if method == "GET":
            h.rfile.read(length)
            self._answer_read(h, held, path, staged_file)
            return
        with held.lock:
            held.seq += 1
            seq = held.seq
        partial = self.layout.result_dir(held.msg, partial=True)
        body_name = f"{seq:05d}.body" if length else None
        if body_name:
            with open(os.path.join(partial, body_name), "wb") as fh:
                remaining = length
                while remaining > 0:
                    block = h.rfile.read(min(1 << 20, remaining))
                    if not block:
                        break
                    fh.write(block)
                    remaining -= len(block)
                fh.flush()
                os.fsync(fh.fileno())
        placeholder = None
        if route.learn and method in ("POST", "PUT"):
            placeholder = f"{PLACEHOLDER}{held.msg}-{seq}"
            held.learned.setdefault(route.learn, []).append(placeholder)
        SpoolLayout.write_json(os.path.join(partial, f"{seq:05d}.json"), {
            "method": method, "path": path, "query": [[k, v] for k, v in params if k != "key"],
            "by_query": any(k == "key" for k, _ in params), "content_type": h.headers.get("Content-Type"),
            "body": body_name, "placeholder": placeholder, "learn": route.learn})
        h.send_json(200, {"id": placeholder} if placeholder else {})

    def _answer_read(self, h: _RecorderHandler, held: _Held, path: str, staged_file: Optional[str]) -> None:
        file_id = held.body.get("id")
        if staged_file and path in (f"api/files/{file_id}/metadata", f"api/v2/files/{file_id}/metadata",
                                    f"api/v2/files/{file_id}/summary"):
            h.send_json(200, {"id": file_id, "filename": os.path.basename(staged_file), "filepath": staged_file,
                              "size": os.path.getsize(staged_file)})
            return
        if staged_file and path.rsplit("/", 1)[-1] in (held.body.get("id"), held.body.get("intermediateId")):
            size = os.path.getsize(staged_file)
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(size))
            h.end_headers()
            with open(staged_file, "rb") as fh:
                shutil.copyfileobj(fh, h.wfile, 1 << 20)
            return
        h.send_json(404, {"error": f"not available in spool mode (the spool holds only the message's file): {path}"})


def from_config(cfg: Any, agent_id: str) -> SpoolSource:
    """A SpoolSource from the agent's settings."""
    return SpoolSource(cfg.spool_dir, cfg.effective_prefetch(), agent_id)


__all__ = ["SpoolSource", "from_config"]
