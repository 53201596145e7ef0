"""`python -m launcher spool`: the login node's side of the spool transport (agent.sources.spool).

For sites whose compute nodes reach nothing but the shared filesystem. One loop, each pass:

1. reclaim: claims of agents that died go back to inbox/ with one more attempt; a message past
   --max-retries is dead-lettered instead;
2. collect: every sealed outbox/<msg>/ is replayed to the real Clowder in the order the
   extractor made its calls (placeholder ids from the agent's recorder mapped to the ids Clowder
   returns; progress is recorded after each call so a crash does not replay twice what was
   done), its status messages are published to the message's reply_to, and the message is
   forgotten; outcome "dead" goes to error.<queue> (original body, `x-error-reason` and
   `x-error-traceback` headers, publisher-confirmed). A 4xx from Clowder during the replay
   dead-letters the message; a 5xx or a lost connection leaves it for the next pass;
3. stage: while inbox/ holds fewer than --buffer messages, `basic_get` one, download its file
   from Clowder into files/<msg>/ (fsync'd), write inbox/<msg>.json (fsync'd, renamed into
   place), and only then acknowledge it. From then on the spool is the message's only copy
   (RabbitMQ's consumer_timeout never applies); a crash between the write and the ack makes a
   duplicate, never a loss. A file Clowder does not have (4xx) is dead-lettered at once; a 5xx
   or a lost connection puts the message back in the queue for a later pass.

File extractors only: dataset messages are staged without files and their extractors' reads of
Clowder fail in the agent (dead-lettered with the reason). The spool folder is local, or on a
login node reached with `--ssh HOST` (launcher.relay.spool_fs: one SSH connection, the file
operations done on the login node itself), for a launcher on a VM that reaches RabbitMQ and
Clowder but shares no filesystem with the cluster.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import Any, Optional

import requests

from hpc_common.file_fetch import download_id, download_path
from hpc_common.messages import LAST_ERROR, Message, attempts_of, dead_letter_headers
from hpc_common.redact import redact_uri
from hpc_common.retry_queues import DEFAULT_MAX_RETRIES
from launcher.broker import Link
from launcher.errors import BrokerError, RelayError

from .spool_fs import LocalSpoolFS, RemoteSpoolFS, SpoolFSError

log = logging.getLogger("launcher.relay.spool")


class Spooler:
    """Stage messages into a spool folder and collect their results (see the module docstring)."""

    def __init__(self, uri: str, queue: str, root: str, buffer: int = 20, max_retries: int = DEFAULT_MAX_RETRIES,
                 clowder_version: int = 1, clowder_url: Optional[str] = None, heartbeat: float = 60.0,
                 fs: Optional[Any] = None) -> None:
        self.uri = uri
        self.queue = queue
        self.fs = fs or LocalSpoolFS(root)  # or RemoteSpoolFS: the spool on a login node, over SSH
        self.buffer = max(1, buffer)
        self.max_retries = max_retries
        self.clowder_version = clowder_version
        self.clowder_url = clowder_url
        self.heartbeat = heartbeat
        self.http = requests.Session()
        self._link: Optional[Link] = None
        self._next_register = 0.0
        self.counts = {"staged": 0, "done": 0, "dead": 0, "reclaimed": 0}

    # -- broker ------------------------------------------------------------------------------------
    def connect(self) -> None:
        if self._link is not None and self._link.is_open:
            return
        self.close()
        link = Link(self.uri, heartbeat=None)
        try:
            link.declare_queues((self.queue, "error." + self.queue))
        except BrokerError:
            link.close()
            raise
        self._link = link
        log.info("connected to %s, staging %s into %s", redact_uri(self.uri), self.queue, self.fs.description)

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def shutdown(self) -> None:
        """Close the broker connection and the spool (an SSH connection, for a remote spool)."""
        self.close()
        self.fs.close()

    def _publish_dead(self, staged: dict[str, Any], reason: str, traceback: str, attempts: int) -> None:
        headers = dead_letter_headers(staged.get("headers") or {}, reason, traceback, attempts,
                                      staged.get("routing_key") or "", "spool")
        props = {"delivery_mode": 2, "reply_to": staged.get("reply_to"),
                 "correlation_id": staged.get("correlation_id"), "headers": headers,
                 "content_type": staged.get("content_type") or "application/json"}
        self._require().publish_confirmed("error." + self.queue, base64.b64decode(staged["body_b64"]), props)
        self.counts["dead"] += 1
        log.warning("spool: message dead-lettered to error.%s: %s", self.queue, reason[:300])

    # -- one pass ----------------------------------------------------------------------------------
    def step(self) -> dict[str, int]:
        """Reclaim, collect, stage once; return what this pass did."""
        self.fs.make()
        self.connect()
        return self._step()

    def _require(self) -> Link:
        if self._link is None:
            raise BrokerError("spool: not connected to the broker")
        return self._link

    def _step(self) -> dict[str, int]:
        before = dict(self.counts)
        self.counts["reclaimed"] += self.fs.reclaim()
        self._dead_letter_exhausted()
        for name in self.fs.listdir("outbox"):
            if not name.endswith(".partial") and ".tmp-" not in name and self.fs.isfile(f"outbox/{name}/result.json"):
                self._collect(name)
        self._stage()
        self._register()
        self._require().pump(time_limit=0)
        return {k: self.counts[k] - before[k] for k in self.counts}

    def idle(self) -> bool:
        """Nothing staged, claimed or waiting to be collected, and the queue is empty."""
        claimed = [n for d in self.fs.listdir("claimed") for n in self.fs.listdir(f"claimed/{d}") if n.endswith(".json")]
        depth = self._require().depth(self.queue)
        return not self.fs.listdir("inbox") and not claimed and not self.fs.listdir("outbox") and depth == 0

    def _dead_letter_exhausted(self) -> None:
        for name in self.fs.listdir("inbox"):
            if not name.endswith(".json"):
                continue
            path = f"inbox/{name}"
            try:
                staged = self.fs.read_json(path)
            except (OSError, ValueError):
                continue  # claimed meanwhile, or being written
            attempts = attempts_of(staged.get("headers") or {})
            if attempts > self.max_retries:
                if not self.fs.rename(path, path + ".dead"):  # out of reach of agents first
                    continue
                self._publish_dead(staged, f"gave up after {attempts} attempt(s): "
                                   f"{staged['headers'].get(LAST_ERROR, '')}", "", attempts)
                self.fs.unlink(path + ".dead")
                self._forget(name[:-5])

    def _forget(self, msg: str) -> None:
        for rel in (f"files/{msg}", f"outbox/{msg}", f"outbox/{msg}.partial"):
            self.fs.rmtree(rel)

    # -- collecting --------------------------------------------------------------------------------
    def _collect(self, msg: str) -> None:
        folder = f"outbox/{msg}"
        result = self.fs.read_json(f"{folder}/result.json")
        staged_path = f"{folder}/staged.json"
        if not self.fs.exists(staged_path):
            staged = self._staged_copy(msg)
            if staged is None:
                log.error("spool: outbox %s has no staged message; removing it", msg)
                self.fs.rmtree(folder)
                return
            self.fs.write_json(staged_path, staged)
        staged = self.fs.read_json(staged_path)
        if result.get("outcome") == "ok":
            try:
                self._replay(msg, folder, staged, str(result.get("host_shown") or ""))
            except _ReplayRefused as exc:
                self._publish_dead(staged, f"Clowder refused the extractor's results: {exc}", "",
                                   int(result.get("attempts") or 0))
                self._forget(msg)
                return
            except _ReplayLater as exc:
                log.warning("spool: results of %s not delivered yet (%s); trying again next pass", msg, exc)
                return
            self.counts["done"] += 1
        else:
            self._publish_dead(staged, str(result.get("reason") or "extractor error"),
                               str(result.get("traceback") or ""), int(result.get("attempts") or 0))
        self._publish_statuses(folder, staged)
        self._forget(msg)

    def _staged_copy(self, msg: str) -> Optional[dict[str, Any]]:
        """The staged message of msg, wherever its claim file is (the outbox keeps its own copy)."""
        for d in self.fs.listdir("claimed"):
            path = f"claimed/{d}/{msg}.json"
            if self.fs.exists(path):
                return self.fs.read_json(path)
        meta = f"files/{msg}/staged.json"
        return self.fs.read_json(meta) if self.fs.exists(meta) else None

    def _real(self, staged: dict[str, Any]) -> tuple[str, str]:
        body = json.loads(base64.b64decode(staged["body_b64"]))
        host = self.clowder_url or body["host"]
        return (host if host.endswith("/") else host + "/"), body["secretKey"]

    def _replay(self, msg: str, folder: str, staged: dict[str, Any], shown: str) -> None:
        host, key = self._real(staged)
        progress_path = f"{folder}/replayed.json"
        progress = self.fs.read_json(progress_path) if self.fs.exists(progress_path) else {"done": 0, "ids": {}}
        calls = [n for n in self.fs.listdir(folder) if re.fullmatch(r"\d{5}\.json", n)]
        for name in calls[progress["done"]:]:
            call = self.fs.read_json(f"{folder}/{name}")
            ids: dict[str, str] = progress["ids"]
            path = _substitute_text(call["path"], ids)
            query = [(k, _substitute_text(v, ids)) for k, v in call["query"]]
            headers = {"Content-Type": call["content_type"]} if call.get("content_type") else {}
            if call.get("by_query"):
                query.append(("key", key))
            else:
                headers["X-API-KEY"] = key
            data = b""
            if call.get("body"):
                data = _substitute_bytes(self.fs.read_bytes(f"{folder}/{call['body']}"), ids)
                if shown:  # pyclowder writes its host into metadata (extractor_id): the real one
                    data = data.replace(shown.encode(), host.encode()).replace(shown.rstrip("/").encode(),
                                                                               host.rstrip("/").encode())
            try:
                resp = self.http.request(call["method"], host + path, params=query, data=data, headers=headers,
                                         timeout=(10, 300))
            except requests.RequestException as exc:
                raise _ReplayLater(exc.__class__.__name__) from None
            if resp.status_code >= 500 or resp.status_code in (408, 429):
                raise _ReplayLater(f"{call['method']} {path}: {resp.status_code}")
            if resp.status_code >= 400:
                raise _ReplayRefused(f"{call['method']} {path}: {resp.status_code} {resp.text[:200]}")
            if call.get("placeholder"):
                try:
                    real = resp.json().get("id")
                except (ValueError, AttributeError):
                    real = None
                if isinstance(real, str):
                    ids[call["placeholder"]] = real
            progress["done"] += 1
            self.fs.write_json(progress_path, progress)

    def _publish_statuses(self, folder: str, staged: dict[str, Any]) -> None:
        path = f"{folder}/statuses.jsonl"
        if not staged.get("reply_to") or not self.fs.exists(path):
            return
        props = {"delivery_mode": 2, "correlation_id": staged.get("correlation_id"),
                 "content_type": "application/json"}
        self._require().publish_many(("", staged["reply_to"], line.strip(), props)
                                     for line in self.fs.read_bytes(path).splitlines() if line.strip())

    # -- staging -----------------------------------------------------------------------------------
    def _stage(self) -> None:
        link = self._require()
        while len([n for n in self.fs.listdir("inbox") if n.endswith(".json")]) < self.buffer:
            taken = link.get(self.queue)
            if taken is None:
                return
            msg = uuid.uuid4().hex
            props = taken.properties
            message = Message(taken.body, taken.routing_key or self.queue, props["reply_to"],
                              props["correlation_id"], dict(props["headers"] or {}), props["content_type"])
            staged = {"msg": msg, **message.fields_json(), "staged_at": time.time()}
            try:
                staged["file"] = self._download(msg, taken.body, taken.routing_key)
            except _ReplayLater as exc:
                log.warning("spool: cannot download a file now (%s); the message goes back to the queue", exc)
                link.nack(taken.tag, requeue=True)
                self.fs.rmtree(f"files/{msg}")
                return
            except _ReplayRefused as exc:
                self._publish_dead(staged, f"cannot stage the file: {exc}", "", 0)
                link.ack(taken.tag)
                self.fs.rmtree(f"files/{msg}")
                continue
            self.fs.makedirs(f"files/{msg}")
            self.fs.write_json(f"files/{msg}/staged.json", staged)
            self.fs.write_json(f"inbox/{msg}.json", staged)
            link.ack(taken.tag)
            self.counts["staged"] += 1

    def _download(self, msg: str, raw: bytes, routing_key: str) -> Optional[str]:
        """Fetch the message's file into files/<msg>/; its path relative to the spool (None: no file)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("id", "host", "secretKey")):
            return None  # the agent dead-letters it with the reason
        if body.get("resource_type") == "dataset" or ".dataset." in (body.get("routing_key") or routing_key):
            return None
        host = self.clowder_url or body["host"]
        host = host if host.endswith("/") else host + "/"
        file_id = download_id(body)
        if not isinstance(file_id, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,200}", file_id):
            return None
        url = host + download_path(body, self.clowder_version)  # what pyclowder would fetch (v2 too)
        if self.clowder_version == 1:
            params, headers = {"key": body["secretKey"]}, {}
        else:
            params, headers = {}, {"X-API-KEY": body["secretKey"]}
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", os.path.basename(str(body.get("filename") or "input"))) or "input"
        self.fs.makedirs(f"files/{msg}")
        target = f"files/{msg}/{name}"
        try:
            with self.http.get(url, params=params, headers=headers, stream=True, timeout=(10, 300)) as resp:
                if resp.status_code >= 500 or resp.status_code in (408, 429):
                    raise _ReplayLater(f"Clowder answered {resp.status_code}")
                if resp.status_code >= 400:
                    raise _ReplayRefused(f"Clowder answered {resp.status_code} for file {body['id']}")
                self.fs.write_file(target, resp.iter_content(1 << 20))  # streamed, fsync'd
        except requests.RequestException as exc:
            raise _ReplayLater(exc.__class__.__name__) from None
        return target

    def _register(self) -> None:
        now = time.monotonic()
        if now < self._next_register or not self.fs.exists("extractor_info.json"):
            return
        info = self.fs.read_json("extractor_info.json")
        written = info.get("at")
        if isinstance(written, (int, float)) and time.time() - written > 2 * max(self.heartbeat, 60.0):
            return  # no agent has written it lately: none is alive, so Clowder should not list one
        self._next_register = now + self.heartbeat
        message = {"id": f"spool-{socket.gethostname()}", "queue": self.queue, "owner": info.get("owner", ""),
                   "extractor_info": info.get("extractor_info", {})}
        link = self._require()
        link.declare_exchange("extractors", "fanout")
        link.publish("extractors", "", json.dumps(message).encode())


class _ReplayLater(RelayError):
    """Clowder or the network failed for now: try again on a later pass."""


class _ReplayRefused(RelayError):
    """Clowder refused (4xx): asking again will not help."""


def _substitute_text(text: str, ids: dict[str, str]) -> str:
    for placeholder, real in ids.items():
        text = text.replace(placeholder, real)
    return text


def _substitute_bytes(data: bytes, ids: dict[str, str]) -> bytes:
    for placeholder, real in ids.items():
        data = data.replace(placeholder.encode(), real.encode())
    return data


# -- command line -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The spool command's own flags."""
    p.add_argument("--dir", required=True, metavar="SPOOL", help="spool folder on the shared filesystem")
    p.add_argument("--buffer", type=int, default=20, help="staged messages waiting for agents at most (default 20)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between passes (default 1)")
    p.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                   help=f"failed attempts beyond which a message is dead-lettered (default {DEFAULT_MAX_RETRIES}, as pyclowder's MAX_RETRY)")
    p.add_argument("--clowder-version", metavar="1|2", help="Clowder API (env CLOWDER_VERSION, default 1)")
    p.add_argument("--clowder-url", metavar="URL",
                   help="reach Clowder here instead of the message's host (env CLOWDER_URL)")
    p.add_argument("--remote-home", metavar="DIR",
                   help="with --ssh: the project checkout on the login node (default: this checkout's path)")
    p.add_argument("--remote-python", metavar="PATH", default="python3",
                   help="with --ssh: Python 3.9+ on the login node (default python3)")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="seconds between registrations of the extractor while agents live "
                        "(env HEARTBEAT; default 60, inside Clowder v2's 300 s window)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--until-empty", action="store_true",
                   help="exit when the queue, the inbox, the claims and the outbox are all empty")


def main_from_cli(args: argparse.Namespace, settings: Any = None) -> int:
    """Run passes until a signal (or --once / --until-empty); exit 2 on bad settings."""
    import sys

    from launcher.errors import ConfigError
    from launcher.settings import from_args

    logging.getLogger("launcher.relay").setLevel(logging.INFO)
    try:
        settings = settings if settings is not None else from_args(args)
    except ConfigError as exc:
        print(f"launcher spool: error: {exc}", file=sys.stderr)
        return 2
    uri, queue = settings.rabbitmq_uri, settings.rabbitmq_queue
    if not uri or not queue:
        print("launcher spool: error: RABBITMQ_URI and RABBITMQ_QUEUE must be set", file=sys.stderr)
        return 2
    ssh = settings.ssh

    def open_remote() -> Any:
        return RemoteSpoolFS(ssh, args.dir, ssh_config=settings.ssh_config, remote_home=args.remote_home,
                             remote_python=args.remote_python)

    fs: Any = None
    if ssh:
        try:
            fs = open_remote()
        except OSError as exc:
            print(f"launcher spool: error: cannot open the spool on {ssh}: {exc}", file=sys.stderr)
            return 1
    try:
        heartbeat = float(args.heartbeat if args.heartbeat is not None else os.environ.get("HEARTBEAT") or 60.0)
    except ValueError:
        print("launcher spool: error: HEARTBEAT must be a number of seconds", file=sys.stderr)
        return 2
    spooler = Spooler(uri, queue, args.dir, buffer=args.buffer, max_retries=args.max_retries,
                      clowder_version=settings.clowder_version, clowder_url=settings.clowder_url, heartbeat=heartbeat,
                      fs=fs)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    delay = args.interval
    try:
        while not stop.is_set():
            try:
                summary = spooler.step()
                delay = args.interval
            except Exception as exc:  # noqa: BLE001 - broker or disk trouble: log, wait, try again
                if not isinstance(exc, (BrokerError, OSError)):
                    raise
                log.warning("spool pass stopped (%s: %s); trying again in %.0fs", exc.__class__.__name__,
                            str(exc)[:200], delay)
                spooler.close()
                if args.once:
                    return 1
                if ssh and isinstance(exc, SpoolFSError):  # the SSH connection broke: open a new one
                    spooler.fs.close()
                    try:
                        spooler.fs = open_remote()
                    except OSError:
                        pass
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            if any(summary.values()):
                print(" ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
            if args.once or (args.until_empty and spooler.idle()):
                return 0
            stop.wait(args.interval)
    finally:
        spooler.shutdown()
    return 0
