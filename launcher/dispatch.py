"""``dispatch``: one batch job per message, for rare heavy extractors.

Ownership of a message moves broker -> ledger -> job, never leaving a gap:

1. basic.get; the body and properties are committed to the ledger (state ``received``); only
   then is the delivery acknowledged (held for milliseconds, never near consumer_timeout). A
   crash before the commit: the broker redelivers. A crash between commit and ack: the
   redelivered copy has the same body hash as an open row and is acknowledged as a duplicate.
2. The message is written to ``<state>/dispatch/<id>.json`` and one single-task job is submitted
   with ``CLOWDER_MESSAGE_FILE`` pointing at it (intent first, like every submission). The
   ledger records job id <-> file id.
3. When the job ends with exit 0 the message is done (its work is in Clowder). Otherwise the
   body is republished (publisher confirm) to the queue with ``x-dispatch-attempts`` + 1 and
   ``x-dispatch-reason``, or, after ``max_attempts``, to ``error.<queue>`` with the reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from launcher.broker import BrokerError, QueueClient
from launcher.caps import Request
from launcher.operations import Launcher, Refused
from launcher.schedulers.base import SubmitFailed
from launcher.states import JobState

log = logging.getLogger("launcher")


@dataclasses.dataclass
class Dispatcher:
    """Moves messages from a queue into one batch job each, and settles them when jobs end."""

    launcher: Launcher
    client: Callable[[], QueueClient]
    queue: str
    message_dir: Path
    walltime_s: int
    max_jobs: int = 10
    max_attempts: int = 3
    sched_queue: Optional[str] = None
    account: Optional[str] = None

    def step(self) -> Dict[str, int]:
        """Settle finished jobs, then take new messages while caps and max_jobs allow."""
        summary = {"taken": 0, "done": 0, "requeued": 0, "dead_lettered": 0, "duplicates": 0}
        ledger = self.launcher.ledger
        ok = self.launcher.reconcile()
        client = self.client()
        try:
            if ok:
                self._settle(client, summary)
            for row in ledger.dispatch_rows("received"):  # crashed before their submission
                self._submit(row["id"], row["file_id"])
            while len(ledger.dispatch_rows("received", "submitted")) < self.max_jobs:
                allowed = self.launcher.allowance(
                    Request(1, self.walltime_s, self.sched_queue, self.account))
                if allowed.refused:
                    log.info("dispatch: %s", allowed.reasons[-1])
                    break
                delivery = client.get(self.queue)
                if delivery is None:
                    break
                digest = hashlib.sha256(delivery.body).hexdigest()
                if delivery.redelivered and ledger.dispatch_open_by_hash(digest):
                    client.ack(delivery.tag)  # we already own it (crash before the ack)
                    summary["duplicates"] += 1
                    continue
                file_id = _file_id(delivery.body)
                attempts = int(delivery.properties["headers"].get("x-dispatch-attempts", 0))
                row_id = ledger.dispatch_receive(digest, file_id, delivery.body,
                                                 delivery.properties, attempts)
                client.ack(delivery.tag)
                summary["taken"] += 1
                self._submit(row_id, file_id)
        finally:
            client.close()
        return summary

    def _submit(self, row_id: int, file_id: Optional[str]) -> None:
        ledger = self.launcher.ledger
        row = ledger.db.execute("SELECT * FROM dispatch WHERE id=?", (row_id,)).fetchone()
        self.message_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.message_dir / f"{row_id}.json"
        tmp = path.with_suffix(".tmp")
        body = bytes(row["body"])
        # the body holds the Clowder secretKey: readable by the owner only
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            # "queue" lets an agent serving several plugins run the one that consumes it
            json.dump({"body": body.decode("utf-8", "replace"),
                       "properties": json.loads(row["properties"]), "queue": self.queue}, fh)
        tmp.rename(path)
        try:
            job_id, name = self.launcher.submit_one(
                Request(1, self.walltime_s, self.sched_queue, self.account),
                extra_env={"CLOWDER_MESSAGE_FILE": str(path)}, kind="dispatch",
                on_intent=lambda n: ledger.dispatch_update(row_id, job_name=n))
        except (SubmitFailed, Refused) as exc:
            log.error("dispatch of file %s not submitted yet: %s", file_id, exc)
            return
        ledger.dispatch_update(row_id, state="submitted", job_id=job_id)
        log.info("dispatched file %s as job %s", file_id, job_id)

    def _settle(self, client: QueueClient, summary: Dict[str, int]) -> None:
        ledger = self.launcher.ledger
        # jobs adopted after a crash between qsub and the ledger update
        for row in ledger.dispatch_rows("received"):
            if row["job_name"]:
                sub = ledger.db.execute("SELECT job_id FROM submissions WHERE job_name=?",
                                        (row["job_name"],)).fetchone()
                if sub and sub["job_id"]:
                    ledger.dispatch_update(row["id"], state="submitted", job_id=sub["job_id"])
        for row in ledger.dispatch_rows("submitted"):
            tasks = ledger.tasks(row["job_id"])
            if not tasks or not tasks[0]["final"]:
                continue
            task = tasks[0]
            if task["state"] == JobState.COMPLETED.value:
                ledger.dispatch_update(row["id"], state="done")
                summary["done"] += 1
                continue
            reason = f"job {row['job_id']} ended {task['state']}" + (
                f" (exit {task['exit_status']})" if task["exit_status"] is not None else "")
            attempts = row["attempts"] + 1
            props = json.loads(row["properties"])
            headers = {"x-dispatch-attempts": attempts, "x-dispatch-reason": reason,
                       "x-dispatch-job": row["job_id"]}
            try:
                if attempts < self.max_attempts:
                    client.publish(self.queue, bytes(row["body"]), props, headers)
                    state = "requeued"
                else:
                    client.publish(f"error.{self.queue}", bytes(row["body"]), props, headers,
                                   declare=True)
                    state = "dead_lettered"
            except BrokerError as exc:
                log.error("cannot hand back file %s yet: %s", row["file_id"], exc)
                continue
            ledger.dispatch_update(row["id"], state=state, reason=reason, attempts=attempts)
            summary[state] += 1
            log.warning("file %s %s: %s", row["file_id"], state.replace("_", "-"), reason)


def _file_id(body: bytes) -> Optional[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return str(value) if value is not None else None
