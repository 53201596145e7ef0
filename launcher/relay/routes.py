"""Which Clowder API calls a lease may make: the relay's rule against becoming an open proxy.

A forwarded request names a lease (`/clowder/<lease id>/api/...`) and is checked here against a
fixed list of the routes pyclowder 3.0.8 calls (v1 and v2), each allowed only for the ids that
belong to the lease:

  file     the message's `id` and `intermediateId`, plus files its own calls listed (a dataset's
           file list, for dataset extractors) or created (uploadToDataset)
  dataset  the message's `datasetId`, plus datasets its own calls created
  preview, thumbnail   ids returned by the lease's own preview/thumbnail uploads
  (none)   creation routes that name no id (api/previews, api/fileThumbnail, createempty, ...)

`learn` names the kind of id a route's JSON answer carries, so the relay can allow it for the
rest of the lease. Everything else is refused (403), and a path that could escape the API
(`..`, `//`, `%`, backslashes, control characters) is refused before any rule is looked at.
The upstream URL is always the lease's own Clowder host plus the checked path: the request
never chooses where it goes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from launcher.errors import RelayError

_ID = r"[A-Za-z0-9_.\-]{1,200}"


@dataclass(frozen=True)
class Route:
    """One allowed API call: method, path pattern, and what its answer teaches."""

    method: str
    pattern: re.Pattern
    learn: Optional[str] = None      # kind of id(s) in the JSON answer to allow for the lease


def _r(method: str, template: str, learn: Optional[str] = None) -> Route:
    regex = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>{_ID})", template.replace(".", r"\."))
    return Route(method, re.compile(regex), learn)


ROUTES: tuple[Route, ...] = (
    # Clowder v1 (api/...), as pyclowder.api.v1 and pyclowder.files/datasets call it
    _r("GET", "api/files/{file}"),
    _r("GET", "api/files/{file}/metadata"),
    _r("GET", "api/files/{file}/metadata.jsonld"),
    _r("POST", "api/files/{file}/metadata.jsonld"),
    _r("POST", "api/files/{file}/tags"),
    _r("POST", "api/files/{file}/extractions"),
    _r("POST", "api/previews", learn="preview"),
    _r("POST", "api/files/{file}/previews/{preview}"),
    _r("POST", "api/previews/{preview}/metadata"),
    _r("POST", "api/fileThumbnail", learn="thumbnail"),
    _r("POST", "api/files/{file}/thumbnails/{thumbnail}"),
    _r("POST", "api/uploadToDataset/{dataset}", learn="file"),
    _r("POST", "api/datasets/createempty", learn="dataset"),
    _r("GET", "api/datasets/{dataset}"),
    _r("GET", "api/datasets/{dataset}/files", learn="file"),
    _r("GET", "api/datasets/{dataset}/metadata.jsonld"),
    _r("POST", "api/datasets/{dataset}/metadata.jsonld"),
    _r("DELETE", "api/datasets/{dataset}/metadata.jsonld"),
    _r("POST", "api/datasets/{dataset}/tags"),
    _r("GET", "api/datasets/{dataset}/download"),
    _r("POST", "api/datasets/{dataset}/extractions"),
    # Clowder v2 (api/v2/...), as pyclowder.api.v2 calls it
    _r("GET", "api/v2/files/{file}"),
    _r("GET", "api/v2/files/{file}/summary"),
    _r("GET", "api/v2/files/{file}/metadata"),
    _r("POST", "api/v2/files/{file}/metadata"),
    _r("POST", "api/v2/files/{file}/extractions"),
    _r("PATCH", "api/v2/files/{file}/thumbnail/{thumbnail}"),
    _r("POST", "api/v2/thumbnails", learn="thumbnail"),
    _r("POST", "api/v2/visualizations/config"),
    _r("POST", "api/v2/visualizations"),
    _r("POST", "api/v2/datasets", learn="dataset"),
    _r("GET", "api/v2/datasets/{dataset}"),
    _r("GET", "api/v2/datasets/{dataset}/files", learn="file"),
    _r("POST", "api/v2/datasets/{dataset}/files", learn="file"),
    _r("GET", "api/v2/datasets/{dataset}/metadata"),
    _r("POST", "api/v2/datasets/{dataset}/metadata"),
    _r("DELETE", "api/v2/datasets/{dataset}/metadata"),
    _r("GET", "api/v2/datasets/{dataset}/download"),
    _r("POST", "api/v2/datasets/{dataset}/extractions"),
    _r("PATCH", "api/v2/datasets/{dataset}/thumbnail/{thumbnail}"),
)

_UNSAFE = re.compile(r"(\.\.|//|%|\\|[\x00-\x20\x7f])")


class Refusal(RelayError):
    """The call is not allowed; status is the HTTP answer (403 or 400) and the text says why."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def lease_scope(body: Mapping, learned: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The ids a lease may touch: from its message body plus what its calls taught."""
    scope: dict[str, set[str]] = {"file": set(), "dataset": set(), "preview": set(), "thumbnail": set()}
    for key in ("id", "intermediateId"):
        value = body.get(key)
        if isinstance(value, str) and value:
            scope["file"].add(value)
    value = body.get("datasetId")
    if isinstance(value, str) and value:
        scope["dataset"].add(value)
    if body.get("resource_type") == "dataset" and isinstance(body.get("id"), str):
        scope["dataset"].add(body["id"])  # v2 dataset messages name the dataset as `id`
    for kind, ids in learned.items():
        scope.setdefault(kind, set()).update(ids)
    return scope


def check(method: str, path: str, scope: Mapping[str, set[str]]) -> Route:
    """Return the route that allows `method path` for this scope, or raise Refusal.

    path is relative to the Clowder base URL (e.g. "api/files/abc/metadata"), without query.
    """
    if _UNSAFE.search(path) or path.startswith("/"):
        raise Refusal(400, "path not allowed (it must be a plain Clowder API path)")
    if not path.startswith("api/"):
        raise Refusal(403, "only Clowder API calls (api/...) are forwarded")
    known_path = False
    for route in ROUTES:
        match = route.pattern.fullmatch(path)
        if match is None:
            continue
        known_path = True
        if route.method != method:
            continue
        for kind, value in match.groupdict().items():
            if value not in scope.get(kind, ()):
                raise Refusal(403, f"this lease may not touch {kind} {value}")
        return route
    if known_path:
        raise Refusal(405, f"{method} is not allowed on this route")
    raise Refusal(403, "this Clowder API route is not forwarded by the relay")


def ids_in(answer: object) -> list[str]:
    """Ids named by a Clowder JSON answer: {"id"}, [{"id"}...], {"data": [{"id"}...]}."""
    out: list[str] = []
    if isinstance(answer, dict):
        if isinstance(answer.get("id"), str):
            out.append(answer["id"])
        for key in ("data", "files", "items"):
            if isinstance(answer.get(key), list):
                out.extend(ids_in(answer[key]))
    elif isinstance(answer, list):
        for item in answer:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                out.append(item["id"])
    return out
