"""The Clowder API routes in this tree: one table of the calls pyclowder 3.0.8 makes (v1 and v2), shared by
the relay's lease rule and by every Clowder this tree serves (`agent local`'s loopback Clowder, the test
stand-in and the benchmark stand-in in devtools).

Each route names its `action`, the same word for the v1 and the v2 spelling of one call
(`file_md_post` is POST api/files/{file}/metadata.jsonld and POST api/v2/files/{file}/metadata); a
Clowder that serves the table maps actions to its handlers and answers 404 for the rest. `counted` is
the route as the stand-ins count requests ("GET api/files/{id}").

The relay's rule against becoming an open proxy: a forwarded request names a lease
(`/clowder/<lease id>/api/...`) and is checked against the routes marked `lease` (all but deletes),
each allowed only for the ids that belong to the lease:

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
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

_ID = r"[A-Za-z0-9_.\-]{1,200}"
# How the stand-ins have always named an id in their request counts ("GET api/files/{id}").
_COUNTED = {"file": "{id}", "dataset": "{did}", "preview": "{pid}", "thumbnail": "{tid}"}


def api_version(path: str) -> str:
    """"v2" for a path under api/v2/, else "v1" (path relative to the Clowder base URL)."""
    return "v2" if path.startswith("api/v2/") else "v1"


@dataclass(frozen=True)
class Route:
    """One Clowder API call: method, path template, what it does, whether a lease may make it, what its
    answer teaches a lease."""

    method: str
    template: str                    # e.g. "api/files/{file}/metadata.jsonld"; {kind} is one id
    action: str                      # the call, named alike for v1 and v2 (a handler name)
    learn: Optional[str] = None      # kind of id(s) in the JSON answer to allow for the lease
    lease: bool = True               # a relay lease may make this call
    pattern: re.Pattern = field(init=False, repr=False, compare=False)
    api: str = field(init=False, repr=False, compare=False)      # "v2" for api/v2/... routes, else "v1"
    counted: str = field(init=False, repr=False, compare=False)  # as stand-ins count it: "GET api/files/{id}"

    def __post_init__(self) -> None:
        regex = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>{_ID})", self.template.replace(".", r"\."))
        object.__setattr__(self, "pattern", re.compile(regex))
        object.__setattr__(self, "api", api_version(self.template))
        object.__setattr__(self, "counted",
                           self.method + " " + re.sub(r"\{(\w+)\}", lambda m: _COUNTED[m.group(1)], self.template))


def _v1v2(method: str, v1: Optional[str], v2: Optional[str], action: str, learn: Optional[str] = None,
          lease: bool = True) -> tuple[Route, ...]:
    """One call in its v1 spelling (api/...) and its v2 spelling (api/v2/...), where Clowder has it."""
    return tuple(Route(method, t, action, learn, lease) for t in (v1, v2) if t)


# Clowder v1 (api/...) as pyclowder.api.v1 and pyclowder.files/datasets call it; v2 (api/v2/...) as
# pyclowder.api.v2 does. The deletes are served by the test stand-in only (tests tidy up with them).
CLOWDER_ROUTES: tuple[Route, ...] = (
    *_v1v2("GET", "api/files/{file}", "api/v2/files/{file}", "file_blob"),
    *_v1v2("DELETE", "api/files/{file}", "api/v2/files/{file}", "file_delete", lease=False),
    *_v1v2("GET", "api/files/{file}/metadata", "api/v2/files/{file}/summary", "file_info"),
    *_v1v2("GET", "api/files/{file}/metadata.jsonld", "api/v2/files/{file}/metadata", "file_md_get"),
    *_v1v2("POST", "api/files/{file}/metadata.jsonld", "api/v2/files/{file}/metadata", "file_md_post"),
    *_v1v2("POST", "api/files/{file}/tags", None, "file_tags"),
    *_v1v2("POST", "api/files/{file}/extractions", "api/v2/files/{file}/extractions", "file_extraction"),
    *_v1v2("POST", "api/previews", None, "preview_upload", learn="preview"),
    *_v1v2("POST", "api/files/{file}/previews/{preview}", None, "preview_link"),
    *_v1v2("POST", "api/previews/{preview}/metadata", None, "preview_metadata"),
    *_v1v2("POST", "api/fileThumbnail", "api/v2/thumbnails", "thumb_upload", learn="thumbnail"),
    Route("POST", "api/files/{file}/thumbnails/{thumbnail}", "file_thumb_link"),
    Route("PATCH", "api/v2/files/{file}/thumbnail/{thumbnail}", "file_thumb_link"),
    *_v1v2("POST", None, "api/v2/visualizations/config", "vis_config"),
    *_v1v2("POST", None, "api/v2/visualizations", "vis_upload"),
    *_v1v2("POST", "api/uploadToDataset/{dataset}", "api/v2/datasets/{dataset}/files", "ds_upload", learn="file"),
    *_v1v2("POST", "api/datasets/createempty", "api/v2/datasets", "ds_create", learn="dataset"),
    *_v1v2("GET", "api/datasets/{dataset}", "api/v2/datasets/{dataset}", "ds_info"),
    *_v1v2("DELETE", "api/datasets/{dataset}", "api/v2/datasets/{dataset}", "ds_delete", lease=False),
    *_v1v2("GET", "api/datasets/{dataset}/files", "api/v2/datasets/{dataset}/files", "ds_files", learn="file"),
    *_v1v2("GET", "api/datasets/{dataset}/metadata.jsonld", "api/v2/datasets/{dataset}/metadata", "ds_md_get"),
    *_v1v2("POST", "api/datasets/{dataset}/metadata.jsonld", "api/v2/datasets/{dataset}/metadata", "ds_md_post"),
    *_v1v2("DELETE", "api/datasets/{dataset}/metadata.jsonld", "api/v2/datasets/{dataset}/metadata",
           "ds_md_delete"),
    *_v1v2("POST", "api/datasets/{dataset}/tags", None, "ds_tags"),
    *_v1v2("GET", "api/datasets/{dataset}/download", "api/v2/datasets/{dataset}/download", "ds_zip"),
    *_v1v2("POST", "api/datasets/{dataset}/extractions", "api/v2/datasets/{dataset}/extractions", "ds_extraction"),
    Route("PATCH", "api/v2/datasets/{dataset}/thumbnail/{thumbnail}", "ds_thumb_link"),
)

# The calls a relay lease may make.
ROUTES: tuple[Route, ...] = tuple(r for r in CLOWDER_ROUTES if r.lease)


class RouteTable:
    """Finds the route of a request: one regular expression per method over the routes given, so one
    match serves any number of routes (the benchmark stand-in answers tens of thousands a second)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        branches: dict[str, list[str]] = {}
        self._groups: list[tuple[tuple[str, str], ...]] = []  # per route: (id kind, its group in the big pattern)
        for index, route in enumerate(self.routes):
            named = re.sub(r"\(\?P<(\w+)>", lambda m: f"(?P<r{index}_{m.group(1)}>", route.pattern.pattern)
            branches.setdefault(route.method, []).append(f"(?P<r{index}>{named})")
            self._groups.append(tuple((kind, f"r{index}_{kind}") for kind in route.pattern.groupindex))
        self._by_method = {m: re.compile("|".join(b)) for m, b in branches.items()}
        self._any = [pattern.fullmatch for pattern in self._by_method.values()]

    def find(self, method: str, path: str) -> Optional[tuple[Route, dict[str, str]]]:
        """(route, {kind: id}) for `method path` (path relative to the base URL, no query), or None."""
        combined = self._by_method.get(method)
        match = combined.fullmatch(path) if combined is not None else None
        if match is None:
            return None
        index = int(match.lastgroup[1:])  # type: ignore[index]  # the route's own group closes last
        return self.routes[index], {kind: match.group(name) for kind, name in self._groups[index]}

    def knows_path(self, path: str) -> bool:
        """Whether some method of some route has this path (a wrong method is then 405, not 403)."""
        return any(fullmatch(path) is not None for fullmatch in self._any)


CLOWDER = RouteTable(CLOWDER_ROUTES)
_LEASE = RouteTable(ROUTES)


_UNSAFE = re.compile(r"(\.\.|//|%|\\|[\x00-\x20\x7f])")


class Refusal(Exception):
    """A call answered with an error status: for a lease, one not allowed (403, 405 or 400); `text` says why."""

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
    found = _LEASE.find(method, path)
    if found is None:
        if _LEASE.knows_path(path):
            raise Refusal(405, f"{method} is not allowed on this route")
        raise Refusal(403, "this Clowder API route is not forwarded by the relay")
    route, ids = found
    for kind, value in ids.items():
        if value not in scope.get(kind, ()):
            raise Refusal(403, f"this lease may not touch {kind} {value}")
    return route


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
