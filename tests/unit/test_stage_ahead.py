"""Stage-ahead without a network: the shared fetch rules, inline parts, and the Runner's stage pool."""
import base64
import json
import os

from agent.messages import Delivery
from agent.stage_ahead import STAGED_INFO_KEY, STAGED_KEY, discard, inline_extras, stageable
from agent.stage_pool import StagePool
from hpc_common.file_fetch import api_version, download_path, info_path, is_one_file, size_hint
from hpc_common.relay_api import inline_json, inline_of
from launcher.relay.inline import INLINE_MAX, INLINE_TOTAL, per_file_limit

V1 = {"id": "f1", "intermediateId": "f1i", "host": "http://c/", "routing_key": "clowder.file.text.plain",
      "datasetId": "d1", "filename": "a.txt", "fileSize": "12"}
V2 = {"id": "f2", "host": "http://c/", "resource_type": "file", "fileSize": 7, "clowderVersion": 2}


def test_the_requests_pyclowder_would_make_for_a_file_message():
    assert (info_path(V1, 1), download_path(V1, 1)) == ("api/files/f1/metadata", "api/files/f1i")
    assert (info_path(V2, 2), download_path(V2, 2)) == ("api/v2/files/f2/metadata", "api/v2/files/f2")
    assert api_version(V2) == 2 and api_version(V1, 2) == 2 and api_version({"clowderVersion": "x"}) == 1
    assert size_hint(V1) == 12 and size_hint(V2) == 7
    assert size_hint({"fileSize": ""}) is None and size_hint({}) is None and size_hint({"fileSize": True}) is None


def test_only_single_file_messages_are_fetched_ahead():
    assert is_one_file(V1) and is_one_file(V2)
    dataset = dict(V1, routing_key="clowder.dataset.file.added", id="d1")
    assert not is_one_file(dataset)
    assert is_one_file(dict(V1, routing_key="extractors.q")) and not is_one_file(dict(V1, routing_key="extractors.q",
                                                                                       id="d1"))
    assert not is_one_file(dict(V1, host="")) and is_one_file(dict(V1, host=""), host_known=True)
    assert stageable(dict(V1, host=""), {"clowder_url": "http://c/"})
    assert not is_one_file(dict(V1, id=5))


def test_inline_parts_become_the_staged_keys_only_for_the_paths_pyclowder_asks(tmp_path):
    info = json.dumps({"id": "f1", "filename": "a.txt"})
    extras = inline_extras(V1, {}, {"info_path": "api/files/f1/metadata", "info": info,
                                    "file_path": "api/files/f1i", "file": b"hello"}, str(tmp_path))
    assert extras[STAGED_INFO_KEY] == {"path": "api/files/f1/metadata", "json": info}
    path = extras[STAGED_KEY]
    assert path.endswith(".txt") and open(path, "rb").read() == b"hello"
    discard(extras)
    assert not os.path.exists(path)
    # another path than the extractor's own version would ask, or an answer pyclowder cannot read: left out
    v2_init = {"clowder_version": 2}
    assert inline_extras(V1, v2_init, {"info_path": "api/files/f1/metadata", "info": info,
                                       "file_path": "api/files/f1i", "file": b"x"}, str(tmp_path)) == {}
    assert inline_extras(V1, {}, {"info_path": "api/files/f1/metadata", "info": "{not json"}, str(tmp_path)) == {}
    assert os.listdir(tmp_path) == []


def test_malformed_inline_items_are_dropped_not_errors():
    assert inline_of(None) is None and inline_of("x") is None and inline_of({}) is None
    assert inline_of({"file_b64": "%%%", "file_path": "api/files/a"}) is None
    assert inline_of({"info": 3, "info_path": "p"}) is None
    good = inline_of({"info": "{}", "info_path": "p", "file_b64": base64.b64encode(b"ab").decode(), "file_path": "q"})
    assert good == {"info": "{}", "info_path": "p", "file": b"ab", "file_path": "q"}


def test_inline_items_round_trip_from_the_relay_to_the_agent():
    assert inline_json(None, None) is None
    sent = inline_json(("p", "{}"), ("q", b"\x00ab"))
    assert inline_of(sent) == {"info": "{}", "info_path": "p", "file": b"\x00ab", "file_path": "q"}
    assert inline_of(inline_json(None, ("q", b"x"))) == {"file": b"x", "file_path": "q"}


def test_the_relay_bounds_what_one_lease_answer_carries():
    assert per_file_limit(0, 3) == 0 and per_file_limit(1000, 0) == 0
    assert per_file_limit(1000, 3) == 1000
    assert per_file_limit(10 << 20, 1) == INLINE_MAX
    assert per_file_limit(INLINE_MAX, 100) == INLINE_TOTAL // 100


def _pool(tmp_path):
    posted = []
    staged = []
    pool = StagePool({"work_dir": str(tmp_path)}, 1, posted.append, lambda: staged.append(1))
    return pool, posted, staged


def test_a_delivery_with_its_file_inline_is_ready_at_once_and_its_copy_removed(tmp_path):
    pool, posted, staged = _pool(tmp_path)
    pool.start()
    try:
        delivery = Delivery(body=b"", routing_key="q", token="t1")
        pool.take(delivery, dict(V1), {"info_path": "api/files/f1/metadata", "info": "{}",
                                       "file_path": "api/files/f1i", "file": b"data"})
        assert pool.ready(delivery) and posted == []  # no thread, no round trip
        body = pool.body_for(delivery, dict(V1))
        path = body[STAGED_KEY]
        assert open(path, "rb").read() == b"data" and body[STAGED_INFO_KEY]["json"] == "{}"
        pool.forget(delivery)
        assert not os.path.exists(path)
        other = Delivery(body=b"", routing_key="q", token="t2")
        dataset = dict(V1, routing_key="clowder.dataset.file.added", id="d1")
        pool.take(other, dataset)  # not a file message: nothing to stage, ready as it is
        assert pool.ready(other) and pool.body_for(other, dataset) == dataset
    finally:
        pool.close()
    assert [p for p in os.listdir(tmp_path) if p.startswith("agent-stage-")] == []


def test_staging_stops_after_a_run_of_unused_files(tmp_path):
    from agent.stage_pool import UNUSED_LIMIT

    offs = []
    pool = StagePool({"work_dir": str(tmp_path)}, 1, lambda fn: None, lambda: None, on_off=lambda: offs.append(1))
    pool.start()
    try:
        for used in [False] * (UNUSED_LIMIT - 1) + [True] + [False] * (UNUSED_LIMIT - 1):
            pool.note_use(used)  # a used file in the run starts the count again
        assert offs == []
        pool.note_use(False)
        assert offs == [1]
        inline = {"info_path": "api/files/f1/metadata", "info": "{}", "file_path": "api/files/f1i", "file": b"x"}
        delivery = Delivery(body=b"", routing_key="q", token="t")
        pool.take(delivery, dict(V1), inline)
        assert pool.body_for(delivery, dict(V1)) == V1
        assert [f for d in tmp_path.iterdir() for f in d.iterdir()] == []  # not written, not staged
        pool.note_use(False)
        assert offs == [1]  # said once
    finally:
        pool.close()


def test_a_job_waits_for_its_staging_only_as_long_as_the_pools_patience(tmp_path):
    now = [100.0]
    pool = StagePool({"work_dir": str(tmp_path)}, 1, lambda fn: None, lambda: None, patience=2.0,
                     clock=lambda: now[0])  # never started: its staging never ends
    pool._folder = str(tmp_path)  # take() without threads
    delivery = Delivery(body=b"", routing_key="q", token="t")
    pool.take(delivery, dict(V1))
    assert not pool.ready(delivery)
    now[0] += 2.0
    assert pool.ready(delivery)
    assert pool.body_for(delivery, dict(V1)) == V1  # goes without: pyclowder fetches it itself
