"""Small files carried inline with their lease (the relay's "inline_files" feature).

Why: through the relay each of an extractor's Clowder calls is a round trip agent -> relay ->
Clowder, and with short files those round trips, not the extractor, set a slot's pace. An agent
that stages ahead (agent.stage_pool) asks for files up to `inline` bytes with its leases; for
each leased file message the relay then makes the two requests pyclowder would make first (the
file info and the download, hpc_common.file_fetch), through the same checks as a forwarded call
(Forwarder.fetch: the lease's own file, its own Clowder host and key), and puts the answers in the
lease item (hpc_common.relay_api.inline_json):

  "inline": {"info_path": ..., "info": <Clowder's JSON answer, as text>,
             "file_path": ..., "file_b64": <the file's bytes>}

Either part may be missing (not a file message, not 200, larger than the limit, Clowder slow):
the extractor then makes that call itself, through the relay, and sees what Clowder says. A file
whose message states a larger `fileSize` is not fetched; one that states none and turns out too
large is abandoned at its headers. The
agent hands pyclowder the file info and a local copy of the file exactly as if it had fetched
them a moment before. Bounds: at most INLINE_MAX bytes per file whatever the agent asks, at most
INLINE_TOTAL per lease answer (the per-file limit shrinks with the batch), and the fetches of one
answer get DEADLINE seconds: what has not arrived by then is left out. The limits are part of the
relay's API (hpc_common.relay_api).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from hpc_common.file_fetch import INFO_LIMIT, api_version, download_path, info_path, is_one_file, size_hint
from hpc_common.relay_api import INLINE_MAX, INLINE_TOTAL, inline_json

from .forward import Forwarder
from .store import Lease

DEADLINE = 2.0           # seconds for one lease answer's fetches

__all__ = ["DEADLINE", "INLINE_MAX", "INLINE_TOTAL", "inline_parts", "per_file_limit"]


def per_file_limit(asked: int, leases: int) -> int:
    """The largest file to carry inline in an answer of this many leases (0: none)."""
    if asked <= 0 or leases <= 0:
        return 0
    return min(asked, INLINE_MAX, INLINE_TOTAL // leases)


async def inline_parts(forwarder: Forwarder, leases: Sequence[Lease], asked: int,
                       default_version: int) -> list[Optional[dict[str, Any]]]:
    """For each lease (in order), its "inline" item, or None when nothing could be carried."""
    limit = per_file_limit(asked, len(leases))
    if not limit:
        return [None] * len(leases)
    plans: list[list[tuple[str, str, asyncio.Task]]] = []
    for lease in leases:
        body = lease.original()
        fetches: list[tuple[str, str, asyncio.Task]] = []
        if is_one_file(body, host_known=bool(forwarder.clowder_url)):
            version = api_version(body, default_version)
            wanted = [("info", info_path(body, version), INFO_LIMIT)]
            stated = size_hint(body)
            if stated is None or stated <= limit:  # a file the message says is larger is not fetched at all
                wanted.append(("file", download_path(body, version), limit))
            for kind, path, most in wanted:
                task = asyncio.ensure_future(forwarder.fetch(lease.lease_id, lease.lease_key, path, version, most))
                fetches.append((kind, path, task))
        plans.append(fetches)
    tasks = [task for fetches in plans for _, _, task in fetches]
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=DEADLINE)
        for task in late:
            task.cancel()
    return [_item(fetches) for fetches in plans]


def _item(fetches: list[tuple[str, str, asyncio.Task]]) -> Optional[dict[str, Any]]:
    info: Optional[tuple[str, str]] = None
    file: Optional[tuple[str, bytes]] = None
    for kind, path, task in fetches:
        if not task.done() or task.cancelled() or task.exception() is not None:
            continue
        data = task.result()
        if data is None:
            continue
        if kind == "info":
            try:
                info = (path, data.decode("utf-8"))
            except UnicodeDecodeError:
                continue  # not the JSON pyclowder expects: it asks Clowder itself
        else:
            file = (path, data)
    return inline_json(info, file)
