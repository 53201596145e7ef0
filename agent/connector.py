"""The pyclowder Connector the agent hands to unchanged extractors (runs in the extractor process).

pyclowder's Connector._process_message does what an extractor expects: STARTED status,
check_message, file info and download (or a local path via MOUNTED_PATHS), process_message,
then message_ok / message_error / message_resubmit. This subclass keeps all of that and only
changes where the results go: status updates and the outcome are handed to `emit` (the pipe to
the agent), and HTTP goes through one kept-alive session with retries.

pyclowder numbers its retry statuses from body['retry_count'] and sends its error status once
that reaches max_retry. The agent sets retry_count to the attempts made so far (its
`x-agent-attempts` header, counted across workers) and max_retry to its max_retries, so the
statuses Clowder sees are pyclowder's own: "(#1) ...", "(#2) ...", then the extractor's message
as ERROR. The outcome says whether that status was sent ("reported") and whether pyclowder gave
up for the count ("exhausted"); what happens to the message is the agent's decision
(agent.retry_policy).
"""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable, Dict, Optional

import pyclowder.connectors
import pyclowder.utils

from hpc_common.retry_queues import DEFAULT_MAX_RETRIES

from . import frames
from .clowder_http import ClowderHTTP, is_final_client_error, is_transient
from .frames import JobResult, Outcome
from .messages import status_payload

Emit = Callable[[Dict[str, Any]], None]  # typing.Dict: evaluated at import, on Python 3.8 too
# Failures pyclowder sends to the error queue whatever the count.
# (PyClowderExtractionAbort is missing from old pyclowder releases that plugin venvs may pin.)
_NOT_RETRIED = tuple(c for c in (subprocess.CalledProcessError,
                                 getattr(pyclowder.connectors, "PyClowderExtractionAbort", None)) if c is not None)


class AgentConnector(pyclowder.connectors.Connector):
    """Connector whose statuses and outcome flow to the agent instead of a RabbitMQ channel."""

    def __init__(self, extractor_name: str, extractor_info: dict[str, Any], check_message: Any,
                 process_message: Any, emit: Emit, ssl_verify: bool = True,
                 mounted_paths: Optional[dict[str, str]] = None, clowder_url: Optional[str] = None,
                 http: Optional[ClowderHTTP] = None, max_retry: Optional[int] = None) -> None:
        """max_retry: the agent's max_retries for this plugin (default pyclowder's MAX_RETRY default)."""
        super().__init__(extractor_name, extractor_info, check_message=check_message,
                         process_message=process_message, ssl_verify=ssl_verify,
                         mounted_paths=mounted_paths, clowder_url=clowder_url or None,
                         max_retry=DEFAULT_MAX_RETRIES if max_retry is None else max_retry)
        self._emit = emit
        self.http = http or ClowderHTTP()
        self.job_id: Optional[str] = None
        self.outcome: Optional[JobResult] = None
        self._retry_count = 0

    # -- one message -------------------------------------------------------------------------
    def run(self, body: dict[str, Any]) -> JobResult:
        """Process one message body through pyclowder; return its outcome (the fields of a DONE frame)."""
        self.outcome = None
        job = body.get("jobid", body.get("job_id"))
        self.job_id = job if isinstance(job, str) else None
        count = body.get("retry_count", 0)
        self._retry_count = count if isinstance(count, int) else 0
        short = self._scratch_shortage(body)
        if short:
            return frames.result(Outcome.RELEASE, short)
        try:
            self._process_message(body)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # pyclowder already reported a resubmit; the extractor tried to end the process.
            if self.outcome is None:
                self._set_outcome(Outcome.RETRY, f"extractor raised {exc.__class__.__name__}")
        if self.outcome is None:
            # pyclowder returns silently when it cannot build a resource (empty host, ...): no
            # status, as under pyclowder ("reported" so that the agent sends none either).
            self._set_outcome(Outcome.ERROR, "pyclowder could not process this message (no resource or host)",
                              reported=True)
        return self.outcome

    def _scratch_shortage(self, body: dict[str, Any]) -> Optional[str]:
        """Why the file cannot be downloaded here (too little scratch space), or None."""
        if self.mounted_paths:
            return None  # files may be read in place: nothing to download
        try:
            size = int(body.get("fileSize") or 0)
        except (TypeError, ValueError):
            return None
        scratch = tempfile.gettempdir()
        free = shutil.disk_usage(scratch).free
        if size > free:
            return f"scratch space: the file needs {size} bytes, {scratch} has {free} free"
        return None

    def _set_outcome(self, kind: Outcome, reason: str, with_traceback: bool = False, reported: bool = False,
                     exhausted: bool = False) -> None:
        tb = traceback.format_exc() if with_traceback and sys.exc_info()[0] is not None else ""
        if self.outcome is None or self.outcome["outcome"] == Outcome.OK:
            self.outcome = frames.result(kind, reason, tb, reported=reported, exhausted=exhausted)

    def _not_the_files_fault(self) -> bool:
        """Set a release/defer outcome when the exception being handled is this node's or Clowder's
        problem, not the file's (then no status is sent and no attempt is spent)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            # A full scratch disk is this node's problem, not the file's: hand it to another node.
            self.outcome = frames.result(Outcome.RELEASE, f"scratch space: {exc}")
            return True
        if exc is not None and is_transient(exc):
            # Clowder down or the connection cut (retried already): not the file's fault.
            self.outcome = frames.result(Outcome.DEFER, f"Clowder unavailable: {exc}")
            return True
        return False

    # -- pyclowder hooks ---------------------------------------------------------------------
    def status_update(self, status: Any, resource: dict[str, Any], message: str) -> None:
        self._emit(frames.status(status_payload(
            self.extractor_info["name"], resource.get("id"), self.job_id, status, message,
            pyclowder.utils.iso8601time())))

    def message_ok(self, resource: dict[str, Any], message: str = "Done processing.") -> None:
        super().message_ok(resource, message)
        if self.outcome is None:
            self.outcome = frames.result(Outcome.OK)

    def message_error(self, resource: dict[str, Any], message: str = "Error processing message.") -> None:
        exc = sys.exc_info()[1]
        # pyclowder calls this for the last allowed attempt too: a full disk or Clowder being
        # away is still not the file's fault then.
        if exc is not None and not isinstance(exc, _NOT_RETRIED) and self._not_the_files_fault():
            return
        super().message_error(resource, message)
        exhausted = exc is not None and not isinstance(exc, _NOT_RETRIED) and self._retry_count >= self.max_retry
        self._set_outcome(Outcome.ERROR, message, with_traceback=True, reported=True, exhausted=exhausted)

    def message_resubmit(self, resource: dict[str, Any], retry_count: int, message: Optional[str] = None) -> None:
        if self._not_the_files_fault():
            return
        exc = sys.exc_info()[1]
        if exc is not None and is_final_client_error(exc):
            # A 4xx from Clowder (unknown file, no permission) will not change on retry.
            reason = f"Clowder refused the request: {exc}"
            super().message_error(resource, reason)
            self._set_outcome(Outcome.ERROR, reason, with_traceback=True, reported=True)
            return
        super().message_resubmit(resource, retry_count, message or "Resubmitting message.")
        self._set_outcome(Outcome.RETRY, message or "extractor failed", with_traceback=True, reported=True)

    # -- HTTP through the kept-alive session -------------------------------------------------
    def get(self, url: str, params: Any = None, raise_status: bool = True, **kwargs: Any) -> Any:
        return self.http.request("GET", url, raise_status=raise_status, params=params, **kwargs)

    def post(self, url: str, data: Any = None, json_data: Any = None, raise_status: bool = True,
             **kwargs: Any) -> Any:
        return self.http.request("POST", url, raise_status=raise_status, data=data, json=json_data, **kwargs)

    def put(self, url: str, data: Any = None, raise_status: bool = True, **kwargs: Any) -> Any:
        return self.http.request("PUT", url, raise_status=raise_status, data=data, **kwargs)

    def patch(self, url: str, data: Any = None, json_data: Any = None, raise_status: bool = True,
              **kwargs: Any) -> Any:
        return self.http.request("PATCH", url, raise_status=raise_status, data=data, json=json_data, **kwargs)

    def delete(self, url: str, raise_status: bool = True, **kwargs: Any) -> Any:
        return self.http.request("DELETE", url, raise_status=raise_status, **kwargs)
