"""Stage-ahead: fetch a job's file and its file info while the extractor works on the one before.

Turned on with the stage_ahead setting (AGENT_STAGE_AHEAD): on MPI ranks (agent.rank_worker) and
in an agent's own slots (agent.stage_pool; auto, the default, turns it on where the agent leases
from a relay, whose every call is a round trip to the login node). A stager thread makes exactly
the requests pyclowder would make for the job, one file ahead: the file info (v1
`api/files/{id}/metadata?key=`, v2 `api/v2/files/{id}/metadata` with X-API-KEY) and the download
(v1 `api/files/{intermediateId or id}?key=`, v2 `api/v2/files/{intermediateId or id}`), the file into a private
folder. The job reaches the extractor with both under STAGED_KEY and STAGED_INFO_KEY. The
extractor process is `python -m agent.stage_ahead` instead of `python -m agent.worker_process`:
the same program with a connector that pops those keys, answers pyclowder's file-info GET for
that file with the staged answer, and hands pyclowder the local copy through its own local-file
hook (`_check_for_local_file`), so pyclowder skips the download and does not delete the file (the
agent does, after the job).

Everything else about the message is unchanged: pyclowder still asks for the file's info (and gets
Clowder's answer of a moment before), runs check_message and process_message, uploads and
reports. A staging failure is not an error: the job goes to the extractor without what failed and
pyclowder fetches it as usual, so failures are reported exactly as without stage-ahead.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from hpc_common.file_fetch import INFO_LIMIT, api_version, download_path, info_path, is_one_file, suffix

log = logging.getLogger("agent.stage")
STAGED_KEY = "_agent_staged_path"
STAGED_INFO_KEY = "_agent_staged_info"
_local = threading.local()


def usable(init: dict[str, Any]) -> bool:
    """Staging is pointless where pyclowder reads files from a shared disk (MOUNTED_PATHS)."""
    if init.get("mounted_paths"):
        log.info("stage-ahead off: files come from mounted paths")
        return False
    return True


def stageable(body: dict[str, Any], init: dict[str, Any]) -> bool:
    """True for a message pyclowder handles as one file to download (not a dataset, not metadata)."""
    return is_one_file(body, host_known=bool(init.get("clowder_url")))


def _http() -> Any:
    http = getattr(_local, "http", None)
    if http is None:
        from .clowder_http import ClowderHTTP
        # One attempt, short connect timeout: staging is only a head start, and pyclowder fetches
        # (with its own retries) whatever staging did not get. Retrying here held every job back
        # while Clowder was away.
        http = _local.http = ClowderHTTP(attempts=1, timeout=(5.0, 60.0))
    return http


def _where(body: dict[str, Any], init: dict[str, Any]) -> tuple[str, int, str]:
    """The Clowder host pyclowder would use for this message (ending in /), its API version, the key."""
    host = init.get("clowder_url") or body.get("host") or ""
    if not host.endswith("/"):
        host += "/"
    return host, api_version(body, int(init.get("clowder_version", 1))), str(body.get("secretKey", ""))


def _auth(version: int, key: str) -> dict[str, Any]:
    return {"headers": {"X-API-KEY": key}} if version == 2 else {"params": {"key": key}}


def usable_info(text: str) -> bool:
    """A file info worth handing pyclowder: JSON within INFO_LIMIT (anything else it fetches and reports itself)."""
    if len(text) > INFO_LIMIT:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def stage_info(body: dict[str, Any], init: dict[str, Any]) -> Optional[dict[str, str]]:
    """The file info pyclowder would fetch ({"path", "json"}), or None (pyclowder will fetch it)."""
    host, version, key = _where(body, init)
    path = info_path(body, version)
    try:
        response = _http().request("GET", host + path, verify=init.get("ssl_verify", True), **_auth(version, key))
        text = response.text
    except Exception as exc:  # noqa: BLE001 - pyclowder will try again and report it properly
        log.info("stage-ahead of file %s's info failed (%s); the extractor fetches it itself", body.get("id"),
                 exc.__class__.__name__)
        return None
    return {"path": path, "json": text} if response.status_code == 200 and usable_info(text) else None


def stage_file(body: dict[str, Any], init: dict[str, Any], folder: str) -> Optional[str]:
    """Download the message's file into folder; its path, or None (pyclowder will download it)."""
    host, version, key = _where(body, init)
    try:
        response = _http().request("GET", host + download_path(body, version), stream=True,
                                   verify=init.get("ssl_verify", True), **_auth(version, key))
        return _new_copy(body, folder, response.iter_content(chunk_size=1 << 16))
    except Exception as exc:  # noqa: BLE001 - pyclowder will try again and report it properly
        log.info("stage-ahead of file %s failed (%s); the extractor downloads it itself", body.get("id"),
                 exc.__class__.__name__)
        return None


def _new_copy(body: dict[str, Any], folder: str, chunks: Iterable[bytes]) -> str:
    """A new file in folder holding chunks, with the extension pyclowder gives its copy; nothing is left on failure."""
    fd, path = tempfile.mkstemp(suffix=suffix(body), dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
    except BaseException:
        _remove(path)
        raise
    return path


def stage(body: dict[str, Any], init: dict[str, Any], folder: str,
          have: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Stage what the job lacks of its file info and file: the keys to add to its body (none when both failed).

    have: what is staged already (inline_extras), kept and not fetched again.
    """
    extras: dict[str, Any] = dict(have or {})
    if STAGED_INFO_KEY not in extras:
        info = stage_info(body, init)
        if info is not None:
            extras[STAGED_INFO_KEY] = info
    if STAGED_KEY not in extras:
        path = stage_file(body, init, folder)
        if path is not None:
            extras[STAGED_KEY] = path
    return extras


def inline_extras(body: dict[str, Any], init: dict[str, Any], inline: dict[str, Any], folder: str) -> dict[str, Any]:
    """The keys for a job whose file info and file came with it (a relay's lease, launcher.relay.inline).

    inline: {"info_path", "info" (Clowder's answer, text), "file_path", "file" (bytes)}, either
    part missing. A part fetched from another path than pyclowder would ask is left out: it
    fetches that itself.
    """
    extras: dict[str, Any] = {}
    version = _where(body, init)[1]
    info = inline.get("info")
    if isinstance(info, str) and inline.get("info_path") == info_path(body, version) and usable_info(info):
        extras[STAGED_INFO_KEY] = {"path": inline["info_path"], "json": info}
    data = inline.get("file")
    if isinstance(data, bytes) and inline.get("file_path") == download_path(body, version):
        try:
            extras[STAGED_KEY] = _new_copy(body, folder, (data,))
        except OSError as exc:  # this node's scratch is full: pyclowder downloads it (and reports that)
            log.info("inline file %s not written (%s); the extractor downloads it itself", body.get("id"), exc)
    return extras


def discard(extras: dict[str, Any]) -> None:
    """Delete a job's staged file, if it has one."""
    path = extras.get(STAGED_KEY)
    if path:
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _install_staged_connector() -> None:
    """Make agent.worker_process use a connector that takes staged files.

    Imported here, before the init frame: the agent puts CLOWDER_VERSION in this process's
    environment (worker_settings.worker_env), so pyclowder reads the right version at this import too.
    """
    from . import connector

    base = connector.AgentConnector

    class StagedConnector(base):  # type: ignore[misc, valid-type]
        _staged: Optional[str] = None
        _info: Optional[dict[str, str]] = None
        _used = False

        def run(self, body: dict[str, Any]) -> dict[str, Any]:
            self._staged = body.pop(STAGED_KEY, None)
            info = body.pop(STAGED_INFO_KEY, None)
            self._info = info if isinstance(info, dict) else None
            offered, self._used = bool(self._staged or self._info), False
            try:
                outcome = super().run(body)
            finally:
                self._staged = self._info = None
            # Whether pyclowder took what was fetched for it (not when check_message skipped the
            # download): the agent stops staging for an extractor that never does (agent.stage_pool).
            return dict(outcome, staged_used=self._used) if offered else outcome

        def get(self, url: str, params: Any = None, raise_status: bool = True, **kwargs: Any) -> Any:
            info = self._info
            if info is not None and not params and urlsplit(url).path.endswith("/" + info["path"]):
                self._info, self._used = None, True  # once: a second look at the info goes to Clowder
                return _answer(url, info["json"])
            return super().get(url, params=params, raise_status=raise_status, **kwargs)

        def _check_for_local_file(self, file_metadata: Any) -> Optional[str]:
            if self._staged and os.path.isfile(self._staged):
                self._used = True
                return self._staged
            return super()._check_for_local_file(file_metadata)

    connector.AgentConnector = StagedConnector  # type: ignore[misc]


def _answer(url: str, text: str) -> Any:
    """A requests.Response carrying a staged JSON answer, as Clowder gave it."""
    import requests

    response = requests.Response()
    response.status_code, response.url, response.encoding = 200, url, "utf-8"
    response._content = text.encode()
    response.headers["Content-Type"] = "application/json"
    return response


def main() -> int:
    _install_staged_connector()
    from . import worker_process
    return worker_process.main()


if __name__ == "__main__":
    sys.exit(main())
