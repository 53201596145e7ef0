"""Stage-ahead: download a rank's next file while its extractor works on the current one.

Turned on with the stage_ahead setting, AGENT_STAGE_AHEAD=1 (MPI path). The rank's RankWorker then takes two jobs per
extractor process; a stager thread downloads each job's file (exactly the request pyclowder's
download would make: v1 `api/files/{intermediateId or id}?key=`, v2 `api/v2/files/{id}` with
X-API-KEY) into a private folder, and the job reaches the extractor with that path in the body
under STAGED_KEY. The extractor process is `python -m agent.stage_ahead` instead of
`python -m agent.worker_process`: the same program with a connector that pops STAGED_KEY and
hands pyclowder the local copy through its own local-file hook (`_check_for_local_file`), so
pyclowder skips the download and does not delete the file (the rank does, after the job).

Everything else about the message is unchanged: pyclowder still fetches the file's info, runs
check_message and process_message, uploads and reports. A staging failure is not an error: the
job goes to the extractor without a staged file and pyclowder downloads it as usual, so failures
are reported exactly as without stage-ahead.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from typing import Any, Optional

log = logging.getLogger("agent.stage")
STAGED_KEY = "_agent_staged_path"
_local = threading.local()


def usable(init: dict[str, Any]) -> bool:
    """Staging is pointless where pyclowder reads files from a shared disk (MOUNTED_PATHS)."""
    if init.get("mounted_paths"):
        log.info("stage-ahead off: files come from mounted paths")
        return False
    return True


def stageable(body: dict[str, Any], init: dict[str, Any]) -> bool:
    """True for a message pyclowder handles as one file to download (not a dataset, not metadata)."""
    if not isinstance(body.get("id"), str) or not body.get("host") and not init.get("clowder_url"):
        return False
    if body.get("resource_type") == "file":
        return True
    key = str(body.get("routing_key") or "")
    if ".file." in key:
        return True
    return key.startswith("extractors.") and body.get("datasetId") != body.get("id")


def _http() -> Any:
    http = getattr(_local, "http", None)
    if http is None:
        from .clowder_http import ClowderHTTP
        http = _local.http = ClowderHTTP(attempts=2)
    return http


def stage_file(body: dict[str, Any], init: dict[str, Any], folder: str) -> Optional[str]:
    """Download the message's file into folder; its path, or None (pyclowder will download it)."""
    host = init.get("clowder_url") or body.get("host") or ""
    if not host.endswith("/"):
        host += "/"
    key = body.get("secretKey", "")
    version = int(body.get("clowderVersion", init.get("clowder_version", 1)))
    file_id = body.get("intermediateId") or body["id"]
    ext = os.path.splitext(str(body.get("filename", "")))[1]
    if version == 2:
        url, kwargs = f"{host}api/v2/files/{file_id}", {"headers": {"X-API-KEY": key}}
    else:
        url, kwargs = f"{host}api/files/{file_id}", {"params": {"key": key}}
    fd, path = tempfile.mkstemp(suffix=ext, dir=folder)
    try:
        response = _http().request("GET", url, stream=True, verify=init.get("ssl_verify", True), **kwargs)
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 16):
                out.write(chunk)
        return path
    except Exception as exc:  # noqa: BLE001 - pyclowder will try again and report it properly
        log.info("stage-ahead of file %s failed (%s); the extractor downloads it itself", body.get("id"),
                 exc.__class__.__name__)
        try:
            os.remove(path)
        except OSError:
            pass
        return None


def _install_staged_connector() -> None:
    """Make agent.worker_process use a connector that takes staged files.

    Imported here, before the init frame: the agent puts CLOWDER_VERSION in this process's
    environment (worker_settings.worker_env), so pyclowder reads the right version at this import too.
    """
    from . import connector

    base = connector.AgentConnector

    class StagedConnector(base):  # type: ignore[misc, valid-type]
        _staged: Optional[str] = None

        def run(self, body: dict[str, Any]) -> dict[str, Any]:
            self._staged = body.pop(STAGED_KEY, None)
            try:
                return super().run(body)
            finally:
                self._staged = None

        def _check_for_local_file(self, file_metadata: Any) -> Optional[str]:
            if self._staged and os.path.isfile(self._staged):
                return self._staged
            return super()._check_for_local_file(file_metadata)

    connector.AgentConnector = StagedConnector  # type: ignore[misc]


def main() -> int:
    _install_staged_connector()
    from . import worker_process
    return worker_process.main()


if __name__ == "__main__":
    sys.exit(main())
