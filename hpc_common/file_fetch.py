"""The two requests pyclowder makes to fetch a file message's input: its file info and its bytes.

One place for them because two sides make them ahead of pyclowder: the agent's stage-ahead
(agent.stage_ahead, agent.stage_pool) and the relay, which carries small files inline with their
lease (launcher.relay.inline). Both must ask Clowder exactly what pyclowder would ask, so that
the answer they hand the extractor is the one it would have fetched itself.

Paths are relative to the Clowder base URL, without the key: v1 passes it as `?key=`, v2 as an
`X-API-KEY` header (pyclowder 3.0.8, `files.download_info` / `files.download`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

INFO_LIMIT = 1 << 20  # a file info larger than this is not fetched ahead: pyclowder fetches it itself


def is_one_file(body: Mapping[str, Any], host_known: bool = False) -> bool:
    """True for a message pyclowder handles as one file to download (not a dataset, not metadata).

    host_known: the Clowder URL is set apart from the message (its `host` may then be missing).
    """
    if not isinstance(body.get("id"), str) or not (body.get("host") or host_known):
        return False
    if body.get("resource_type") == "file":
        return True
    key = str(body.get("routing_key") or "")
    if ".dataset." in key:  # pyclowder's order: `*.dataset.file.added` is a dataset message
        return False
    if ".file." in key:
        return True
    return key.startswith("extractors.") and body.get("datasetId") != body.get("id")


def api_version(body: Mapping[str, Any], default: int = 1) -> int:
    """The Clowder API version the message asks for (`clowderVersion`), else default."""
    try:
        return int(body.get("clowderVersion", default))
    except (TypeError, ValueError):
        return default


def info_path(body: Mapping[str, Any], version: int) -> str:
    """The file-info request pyclowder makes before processing this file message."""
    return f"api/v2/files/{body['id']}/metadata" if version == 2 else f"api/files/{body['id']}/metadata"


def download_id(body: Mapping[str, Any]) -> Any:
    """The file pyclowder downloads for this message: its intermediate file where it names one (v1 and v2)."""
    return body.get("intermediateId") or body["id"]


def download_path(body: Mapping[str, Any], version: int) -> str:
    """The download pyclowder makes for this file message."""
    file_id = download_id(body)
    return f"api/v2/files/{file_id}" if version == 2 else f"api/files/{file_id}"


def size_hint(body: Mapping[str, Any]) -> Optional[int]:
    """The file's size as the message states it (`fileSize`: v1 a string, v2 a number), None if it does not."""
    raw = body.get("fileSize")
    if isinstance(raw, bool):
        return None
    try:
        size = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return size if size >= 0 else None


def suffix(body: Mapping[str, Any]) -> str:
    """The extension pyclowder gives its temporary copy of the file (from the message's filename)."""
    return os.path.splitext(str(body.get("filename", "")))[1]
