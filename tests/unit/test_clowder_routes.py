"""The one Clowder route table (hpc_common.routes): what it holds, how a route is found, and that the three
Clowders served in this tree (the test stand-in, `agent local`'s loopback Clowder, the benchmark stand-in)
answer from it: every route reaches a handler, none is answered by a second table of their own."""
from __future__ import annotations

import re

import pytest
import requests

from agent.local_clowder import LocalClowder
from devtools import bench_clowder
from devtools.clowder_standin import ClowderStandin
from hpc_common.clowder_serving import ClowderError, ClowderRequest, error_body, lookup
from hpc_common.routes import CLOWDER, CLOWDER_ROUTES, ROUTES, Refusal, RouteTable, api_version, check

IDS = {"file": "f0000", "dataset": "d0000", "preview": "p0000", "thumbnail": "t0000"}


def _fill(route, ids=IDS) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], route.template)


def test_table_holds_each_call_once_with_its_v1_and_v2_spellings():
    keys = [(r.method, r.template) for r in CLOWDER_ROUTES]
    assert len(keys) == len(set(keys)) == 44
    assert len({r.counted for r in CLOWDER_ROUTES}) == 44
    assert [r for r in CLOWDER_ROUTES if not r.lease] == [r for r in CLOWDER_ROUTES if r.method == "DELETE"
                                                         and r.action in ("file_delete", "ds_delete")]
    assert ROUTES == tuple(r for r in CLOWDER_ROUTES if r.lease) and len(ROUTES) == 40
    by_action: dict[str, set[str]] = {}
    for r in CLOWDER_ROUTES:
        by_action.setdefault(r.action, set()).add(r.api)
        assert r.api == api_version(r.template) and r.counted.startswith(r.method + " api/")
    assert by_action["file_md_post"] == {"v1", "v2"} and by_action["file_tags"] == {"v1"}
    assert by_action["vis_config"] == {"v2"}


# method, path, action found (None: no route), ids
FIND = [
    ("GET", "api/files/abc", "file_blob", {"file": "abc"}),
    ("GET", "api/files/abc/metadata", "file_info", {"file": "abc"}),
    ("GET", "api/v2/files/abc/summary", "file_info", {"file": "abc"}),
    ("GET", "api/files/abc/metadata.jsonld", "file_md_get", {"file": "abc"}),
    ("GET", "api/files/abc/metadataXjsonld", None, None),  # the dot is literal
    ("POST", "api/v2/files/abc/metadata", "file_md_post", {"file": "abc"}),
    ("PATCH", "api/v2/datasets/d1/thumbnail/t1", "ds_thumb_link", {"dataset": "d1", "thumbnail": "t1"}),
    ("POST", "api/datasets/createempty", "ds_create", {}),
    ("GET", "api/datasets/createempty", "ds_info", {"dataset": "createempty"}),
    ("POST", "api/files/abc", None, None),
    ("GET", "api/files/a%2Fb", None, None),
    ("GET", "api/files/a/b", None, None),
    ("GET", "api/files/", None, None),
    ("PUT", "api/files/abc", None, None),
    ("GET", "api/v2/files/abc/summary/x", None, None),
]


@pytest.mark.parametrize("method, path, action, ids", FIND)
def test_find(method, path, action, ids):
    found = CLOWDER.find(method, path)
    assert (found[0].action, found[1]) == (action, ids) if action else found is None


def test_every_route_is_found_as_itself():
    for route in CLOWDER_ROUTES:
        found = CLOWDER.find(route.method, _fill(route))
        assert found is not None and found[0] is route, route
        assert found[1] == {k: IDS[k] for k in re.findall(r"\{(\w+)\}", route.template)}


def test_a_table_of_some_routes_knows_only_those():
    table = RouteTable(r for r in CLOWDER_ROUTES if r.action == "file_blob")
    assert table.find("GET", "api/v2/files/x")[0].api == "v2"
    assert table.find("GET", "api/files/x/metadata") is None and table.find("DELETE", "api/files/x") is None
    assert table.knows_path("api/files/x") and not table.knows_path("api/files/x/metadata")


def test_the_lease_rule_leaves_out_the_deletes():
    scope = {"file": {"f1"}, "dataset": {"d1"}}
    assert check("GET", "api/files/f1", scope).action == "file_blob"
    for path in ("api/files/f1", "api/v2/datasets/d1"):
        with pytest.raises(Refusal) as info:
            check("DELETE", path, scope)
        assert info.value.status == 405


def test_serving_helpers():
    req = ClowderRequest("GET", "api/v2/files/x", {"key": ["k"]}, {"X-API-Key": None}, b"")
    assert req.api == "v2" and req.api_key() is None  # v2: header only
    assert ClowderRequest("GET", "api/files/x", {"key": ["k"]}, {}, b"").api_key() == "k"
    with pytest.raises(ClowderError) as info:
        req.json()
    assert info.value.status == 400 and isinstance(info.value, Refusal)
    assert error_body("v2", "m") == {"detail": "m"} and error_body("v1", "m") == {"error": "m"}
    import threading
    with pytest.raises(ClowderError, match="^file nope not found$"):
        lookup({"a": 1}, "nope", "file", threading.Lock())


def _serves(status: int, answer: dict) -> bool:
    """Whether an answer came from a route handler (a missing id, a bad body) rather than 'no such route'."""
    text = str(answer.get("error") or answer.get("detail") or "")
    return status != 404 or "not found" in text


def test_the_stand_in_serves_every_route_of_the_table():
    with ClowderStandin() as cs:
        for route in CLOWDER_ROUTES:
            r = requests.request(route.method, cs.url + _fill(route), headers={"X-API-Key": "secret"}, timeout=10)
            body = r.json() if r.headers.get("Content-Type") == "application/json" else {}
            assert _serves(r.status_code, body if isinstance(body, dict) else {}), (route, r.status_code, r.text)
            assert r.status_code != 500 and callable(getattr(cs, "_" + route.action)), (route, r.text)
        assert set(cs.request_counts()) == {r.counted for r in CLOWDER_ROUTES}
        assert requests.get(cs.url + "api/files/x/nothing", params={"key": "secret"}, timeout=10).status_code == 404
        assert "GET <unknown>" in cs.request_counts()


LOCAL_ACTIONS = {"file_blob", "file_info", "file_md_get", "file_md_post", "file_tags", "preview_upload",
                 "preview_link", "preview_metadata", "thumb_upload", "file_thumb_link", "vis_config", "vis_upload",
                 "ds_info", "ds_files", "ds_upload"}


def test_the_loopback_clowder_serves_its_actions_from_the_table():
    with LocalClowder("k") as local:
        for route in CLOWDER_ROUTES:
            r = requests.request(route.method, local.url + _fill(route), headers={"X-API-Key": "k"}, timeout=10)
            served = r.status_code != 404 or "not found" in r.text
            assert r.status_code != 500, (route, r.text)
            assert served == (route.action in LOCAL_ACTIONS), (route, r.status_code, r.text)
        dataset = local.add_dataset("d")
        fid = local.add_file("a.txt", None, dataset, content=b"abc")
        assert requests.get(local.url + f"api/v2/files/{fid}", headers={"X-API-Key": "k"}, timeout=10).content == b"abc"
        assert requests.get(local.url + f"api/files/{fid}", timeout=10).status_code == 401


def test_the_benchmark_stand_in_serves_the_per_file_routes_of_the_table():
    app = bench_clowder.BenchClowder()
    fid = app.add_file("a.txt", b"abc")
    served = set()
    for route in CLOWDER_ROUTES:
        body = b'{"content": {"n": 1}}' if route.method == "POST" else b""
        status, _, _, _ = app.handle(route.method, "/" + _fill(route, dict(IDS, file=fid)), {"x-api-key": "secret"},
                                     body)
        if status == 200:
            served.add((route.action, route.api))
    assert served == {(a, v) for a in ("file_blob", "file_info", "file_md_post") for v in ("v1", "v2")} | \
        {("file_md_get", "v2")}
    assert served == {(r.action, r.api) for r in bench_clowder._SERVED}
    assert app.counts["GET api/files/{id}"] == 1 and app.counts["DELETE <unknown>"] == 6
