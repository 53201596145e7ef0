"""`python -m agent local`: run an extractor on local files with no broker and no Clowder.

The files are served by an in-process loopback Clowder (agent/local_clowder.py; as on-disk paths, so pyclowder reads
them in place), and each is processed through the same extractor process and pyclowder
connector as in production. What the extractor uploaded (metadata, previews, tags, new files)
is written as JSON under the output folder, one file per input, with its status messages.
"""
from __future__ import annotations

import collections
import json
import logging
import mimetypes
import os
import secrets
from typing import Any

from hpc_common.redact import Redactor

from . import exitcodes, extractor_launch, image_plugins
from .config import AgentConfig, ConfigError
from .event_loop import SelectLoop
from .frames import KIND, Kind, Outcome, result as job_result
from .local_clowder import LocalClowder
from .logs import setup_logging
from .plugin_env import EnvError
from .plugin_loader import PluginError
from .slots import Slot
from .worker_settings import worker_env, worker_init

log = logging.getLogger("agent.local")


def _message(cfg: AgentConfig, url: str, key: str, file_id: str, name: str, size: int, dataset: str) -> dict:
    mime = (mimetypes.guess_type(name)[0] or "application/octet-stream").replace("/", ".")
    body: dict[str, Any] = {"id": file_id, "host": url, "secretKey": key, "filename": name,
                            "datasetId": dataset}
    if cfg.clowder_version == 2:
        body.update({"fileSize": size, "retry_count": 0, "resource_type": "file", "job_id": file_id})
    else:
        body.update({"fileSize": str(size), "jobid": file_id, "intermediateId": file_id,
                     "routing_key": f"clowder.file.{mime}"})
    return body


def run_local(cfg: AgentConfig, out_dir: str, files: list[str]) -> int:
    """Process each file; write <out>/<name>.json; return 0 when every file succeeded."""
    redactor = Redactor()
    setup_logging(cfg.log_level, redactor)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        log.error("not a file: %s", ", ".join(missing))
        return exitcodes.CONFIG_ERROR
    try:
        spec = image_plugins.find(cfg, cfg.plugin)
        init, env = extractor_launch.apply(cfg, spec, worker_init(cfg, spec, spec.name), worker_env(cfg))
    except (PluginError, EnvError, ConfigError) as exc:  # ConfigError: a plugins table env refused
        log.error("%s", exc)
        return exitcodes.for_error(exc)
    os.makedirs(out_dir, exist_ok=True)
    key = secrets.token_hex(16)
    redactor.add(key)
    frames: "collections.deque[dict[str, Any]]" = collections.deque()
    failures = 0
    loop = SelectLoop()  # this thread reads the extractor's frames, as an agent's main thread does

    def next_frame() -> dict[str, Any]:
        while not frames:
            loop.run_once(0.5)
        return frames.popleft()

    with LocalClowder(key) as clowder:
        slot = Slot(0, init, loop, lambda _s, f: frames.append(f), redactor, env=env)
        slot.start()
        try:
            slot.wait_ready(timeout=120)
        except RuntimeError as exc:
            log.error("extractor failed to start: %s", exc)
            return exitcodes.PLUGIN_ERROR
        try:
            for number, path in enumerate(files, 1):
                name = os.path.basename(path)
                dataset = clowder.add_dataset(f"local-{number}")  # one per file: its new files are its own
                file_id = clowder.add_file(name, os.path.abspath(path), dataset)
                slot.assign(path, _message(cfg, clowder.url, key, file_id, name, os.path.getsize(path), dataset),
                            number)
                statuses, outcome = [], job_result(Outcome.ERROR, "no answer")
                while True:
                    frame = next_frame()
                    if frame[KIND] == Kind.STATUS:
                        statuses.append(redactor(frame["payload"]["status"]))
                        continue
                    outcome = frame if frame[KIND] == Kind.DONE else job_result(Outcome.ERROR,
                                                                                          frame.get("reason") or "")
                    break
                slot.busy_with = None
                ok = outcome.get("outcome") == Outcome.OK
                failures += 0 if ok else 1
                result = {
                    "file": os.path.abspath(path), "outcome": outcome.get("outcome"),
                    "reason": redactor(outcome.get("reason") or ""),
                    "metadata": clowder.metadata_for(file_id),
                    "uploads": [r for r in clowder.records(file_id=file_id) if r.get("kind") != "metadata"],
                    "new_files": clowder.records(kind="upload", dataset_id=dataset),
                    "statuses": statuses,
                }
                target = os.path.join(out_dir, f"{number:04d}-{name}.json")
                with open(target, "w", encoding="utf-8") as fh:
                    json.dump(result, fh, indent=2, default=str)
                log.info("%s: %s -> %s", name, result["outcome"], target)
        finally:
            slot.close()
            loop.close()
    return exitcodes.OK if failures == 0 else exitcodes.LOCAL_FAILURES
