"""Keep Clowder seeing the extractors `launcher scale` scales for, also while no agent runs.

pyclowder registers an extractor by publishing {id, queue, owner, extractor_info} to the durable
fanout exchange `extractors` every HEARTBEAT seconds; Clowder v2 counts an extractor alive only
while its last such message is under 5 minutes old (its UI disables it after that), and Clowder v1
lists extractors from the same messages. With the array scaled to zero no agent (so no pyclowder)
sends them, so the scale loop does, for each of its queues, every `heartbeat` seconds (default 60).

Which extractor a queue belongs to is read from the plugin folders the agents use
(hpc_common.plugin_folders: agent/plugins/, AGENT_PLUGIN_PATH, chosen by AGENT_PLUGIN): a queue
named like the extractor (RABBITMQ_QUEUE unset in the agents: the extractor's name, or
private.<EXTRACTOR_KEY>.<name>), or the only plugin when there is one queue (RABBITMQ_QUEUE renames
it). The message is pyclowder's: owner is CLOWDER_EMAIL (or ""), and with EXTRACTOR_KEY the
extractor_info carries `unique_key`, as pyclowder's Connector adds it.

What was last sent is kept in <state_dir>/registration.json for `launcher status` and metrics
(the scale loop holds the state directory's lock; status reads this file without it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from hpc_common.owned_folders import write_atomic
from hpc_common.plugin_folders import PluginInfoError, folder_matches, plugin_folders, read_info
from launcher.broker import BrokerError, announce

log = logging.getLogger("launcher")

EXCHANGE = "extractors"
RECORD_FILE = "registration.json"


@dataclasses.dataclass(frozen=True)
class Registration:
    """One queue's registration message, as pyclowder sends it."""

    queue: str
    folder: str
    extractor_info: dict[str, Any]
    owner: str = ""
    id: str = ""

    def message(self) -> dict[str, Any]:
        """The body published to the `extractors` exchange."""
        return {"id": self.id, "queue": self.queue, "owner": self.owner, "extractor_info": self.extractor_info}


def private_queue(name: str, extractor_key: Optional[str]) -> str:
    """The queue pyclowder consumes for an extractor name (private.<key>.<name> with a key)."""
    return f"private.{extractor_key}.{name}" if extractor_key else name


def find_registrations(queues: Sequence[str], plugins: Sequence[str], plugin_path: Sequence[str],
                       extractor_key: Optional[str] = None, owner: Optional[str] = None
                       ) -> tuple[list[Registration], list[str]]:
    """Each queue's registration, and one problem line per queue without an extractor (or broken plugin)."""
    problems: list[str] = []
    found: list[tuple[str, dict[str, Any]]] = []
    for folder in plugin_folders(plugin_path):
        try:
            info = read_info(folder)
        except PluginInfoError as exc:  # said only when it is a plugin the agents serve, or a queue's
            prefix = private_queue("", extractor_key)
            wanted = list(plugins) or [q[len(prefix):] if q.startswith(prefix) else q for q in queues]
            if any(folder_matches(name, folder) for name in wanted):
                problems.append(str(exc))
            continue
        found.append((folder, info))
    if plugins:  # the agents serve these (AGENT_PLUGIN): only they are candidates, in that order
        chosen = []
        for name in plugins:
            match = next(((f, i) for f, i in found if folder_matches(name, f, i)), None)
            if match is None:
                problems.append(f"plugin {name!r} (AGENT_PLUGIN) not found in the plugin folders")
            elif match not in chosen:
                chosen.append(match)
        found = chosen
    host = socket.gethostname()
    result: list[Registration] = []
    for queue in queues:
        match = next(((f, i) for f, i in found
                      if queue in (private_queue(i["name"], extractor_key), private_queue(os.path.basename(f), extractor_key))),
                     None)
        if match is None and len(queues) == 1 and len(found) == 1:
            match = found[0]  # one queue, one plugin: RABBITMQ_QUEUE renames the extractor's queue
        if match is None:
            problems.append(f"queue {queue!r}: no plugin's extractor_info names it (set AGENT_PLUGIN and "
                            "AGENT_PLUGIN_PATH as the agents have them); not registered")
            continue
        folder, info = match
        info = dict(info)
        if extractor_key:
            info["unique_key"] = extractor_key  # as pyclowder's Connector does
        ident = str(uuid.uuid5(uuid.NAMESPACE_URL, f"clowder-hpc-launcher:{host}:{queue}"))
        result.append(Registration(queue, folder, info, owner or "", ident))
    return result, problems


def read_record(state_dir: str) -> dict[str, Any]:
    """What the scale loop last registered ({} when it never did): see Registrar.record."""
    try:
        with open(os.path.join(state_dir, RECORD_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Registrar:
    """Publishes the registrations every `interval` seconds on its own thread (or once, with send())."""

    def __init__(self, uri: str, registrations: Sequence[Registration], interval: float, state_dir: str,
                 problems: Sequence[str] = (), publish: Callable[..., None] = announce,
                 clock: Callable[[], float] = time.time) -> None:
        self.uri = uri
        self.registrations = list(registrations)
        self.interval = interval
        self.state_dir = state_dir
        self.problems = list(problems)
        self._publish = publish
        self._clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_at: Optional[float] = None
        self.last_error: Optional[str] = None

    def send(self) -> bool:
        """Publish every registration now; False (logged, recorded) when the broker could not take them."""
        if not self.registrations:
            self._save()
            return False
        bodies = [json.dumps(r.message()).encode() for r in self.registrations]
        try:
            self._publish(self.uri, EXCHANGE, "fanout", bodies, connection_name="clowder-launcher registration")
        except BrokerError as exc:
            self.last_error = str(exc)
            log.warning("registration on the %r exchange failed: %s", EXCHANGE, exc)
        else:
            self.last_at, self.last_error = self._clock(), None
        self._save()
        return self.last_error is None

    def record(self) -> dict[str, Any]:
        """What status and metrics show: when it last registered, each queue's extractor, problems."""
        return {"interval_s": self.interval, "last_at": self.last_at, "last_error": self.last_error,
                "queues": {r.queue: {"extractor": r.extractor_info.get("name"),
                                     "version": r.extractor_info.get("version"), "folder": r.folder}
                           for r in self.registrations},
                "problems": self.problems}

    def _save(self) -> None:
        try:
            write_atomic(os.path.join(self.state_dir, RECORD_FILE), json.dumps(self.record()).encode())
        except OSError as exc:  # status loses a line; registration itself goes on
            log.warning("cannot write %s: %s", RECORD_FILE, exc)

    def start(self) -> None:
        """Register now and then every interval until stop()."""
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.send()
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """End the thread (a registration being sent finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
