"""The pyclowder Connector the agent hands to unchanged extractors (runs in the extractor process).

pyclowder's Connector._process_message does what an extractor expects: STARTED status,
check_message, file info and download (or a local path via MOUNTED_PATHS), process_message,
then message_ok / message_error / message_resubmit. This subclass keeps all of that and only
changes where the results go: status updates and the outcome are handed to `emit` (the pipe to
the agent), and HTTP goes through one kept-alive session with retries.

pyclowder decides retries itself from body['retry_count'] and max_retry; the agent counts
attempts across workers in a message header instead, so max_retry is set out of reach and
every retryable failure is reported as "retry" for the agent to count.
"""
from __future__ import annotations

import errno
import shutil
import sys
import tempfile
import traceback
from typing import Any, Callable, Dict, Optional

import pyclowder.connectors
import pyclowder.utils

from .clowder_http import ClowderHTTP, is_final_client_error, is_transient
from .messages import status_payload

Emit = Callable[[Dict[str, Any]], None]  # typing.Dict: evaluated at import, on Python 3.8 too
_NEVER = 1 << 30


class AgentConnector(pyclowder.connectors.Connector):
    """Connector whose statuses and outcome flow to the agent instead of a RabbitMQ channel."""

    def __init__(self, extractor_name: str, extractor_info: dict[str, Any], check_message: Any,
                 process_message: Any, emit: Emit, ssl_verify: bool = True,
                 mounted_paths: Optional[dict[str, str]] = None, clowder_url: Optional[str] = None,
                 http: Optional[ClowderHTTP] = None) -> None:
        super().__init__(extractor_name, extractor_info, check_message=check_message,
                         process_message=process_message, ssl_verify=ssl_verify,
                         mounted_paths=mounted_paths, clowder_url=clowder_url or None, max_retry=_NEVER)
        self._emit = emit
        self.http = http or ClowderHTTP()
        self.job_id: Optional[str] = None
        self.outcome: Optional[dict[str, Any]] = None

    # -- one message -------------------------------------------------------------------------
    def run(self, body: dict[str, Any]) -> dict[str, Any]:
        """Process one message body through pyclowder; return the outcome dict."""
        self.outcome = None
        job = body.get("jobid", body.get("job_id"))
        self.job_id = job if isinstance(job, str) else None
        short = self._scratch_shortage(body)
        if short:
            return {"outcome": "release", "reason": short, "traceback": ""}
        try:
            self._process_message(body)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # pyclowder already reported a resubmit; the extractor tried to end the process.
            if self.outcome is None:
                self._set_outcome("retry", f"extractor raised {exc.__class__.__name__}")
        if self.outcome is None:
            # pyclowder returns silently when it cannot build a resource (empty host, ...).
            self._set_outcome("error", "pyclowder could not process this message (no resource or host)")
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

    def _set_outcome(self, kind: str, reason: str, with_traceback: bool = False) -> None:
        tb = traceback.format_exc() if with_traceback and sys.exc_info()[0] is not None else ""
        if self.outcome is None or self.outcome["outcome"] == "ok":
            self.outcome = {"outcome": kind, "reason": reason, "traceback": tb}

    # -- pyclowder hooks ---------------------------------------------------------------------
    def status_update(self, status: Any, resource: dict[str, Any], message: str) -> None:
        self._emit({"t": "status", "payload": status_payload(
            self.extractor_info["name"], resource.get("id"), self.job_id, status, message,
            pyclowder.utils.iso8601time())})

    def message_ok(self, resource: dict[str, Any], message: str = "Done processing.") -> None:
        super().message_ok(resource, message)
        if self.outcome is None:
            self.outcome = {"outcome": "ok", "reason": "", "traceback": ""}

    def message_error(self, resource: dict[str, Any], message: str = "Error processing message.") -> None:
        super().message_error(resource, message)
        self._set_outcome("error", message, with_traceback=True)

    def message_resubmit(self, resource: dict[str, Any], retry_count: int, message: Optional[str] = None) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            # A full scratch disk is this node's problem, not the file's: hand it to another node.
            self.outcome = {"outcome": "release", "reason": f"scratch space: {exc}", "traceback": ""}
            return
        if exc is not None and is_transient(exc):
            # Clowder down or the connection cut (retried already): not the file's fault.
            self.outcome = {"outcome": "defer", "reason": f"Clowder unavailable: {exc}", "traceback": ""}
            return
        if exc is not None and is_final_client_error(exc):
            # A 4xx from Clowder (unknown file, no permission) will not change on retry.
            reason = f"Clowder refused the request: {exc}"
            super().message_error(resource, reason)
            self._set_outcome("error", reason, with_traceback=True)
            return
        super().message_resubmit(resource, retry_count, message or "Resubmitting message.")
        self._set_outcome("retry", message or "extractor failed", with_traceback=True)

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
