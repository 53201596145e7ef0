"""The relay's API records (hpc_common.relay_api): what the relay writes, the agent reads, and back."""
import json

import pytest

from hpc_common import relay_api as api
from hpc_common.messages import ATTEMPTS, REASON_LIMIT, TRACEBACK_LIMIT, Message


def _wire(obj):
    """Through JSON text, as over HTTP."""
    return json.loads(json.dumps(obj))


def test_a_leased_message_carries_the_message_record_fields_and_the_lease_keys():
    message = Message(b'{"id": "f1"}', "clowder.file.text.plain", "clowder.x", "c-1", {ATTEMPTS: 2}, "application/json")
    item = api.LeaseItem("L" * 24, message, attempts=2, expires_in=14.5, inline={"info_path": "p", "info": "{}"})
    sent = _wire(item.to_json())
    assert set(sent) == set(message.fields_json()) | {"lease_id", "attempts", "expires_in", "inline"}
    got = api.LeaseItem.from_json(sent, "default-queue")
    assert got == item
    # an item without a routing key takes the agent's queue; no inline item: none
    bare = dict(sent, routing_key=None)
    del bare["inline"]
    read = api.LeaseItem.from_json(bare, "default-queue")
    assert read.message.routing_key == "default-queue" and read.inline is None


def test_a_lease_answer_says_what_was_settled_only_when_completions_were_sent():
    item = api.LeaseItem("a" * 12, Message(b"{}", "q"))
    plain = _wire(api.LeaseAnswer([item]).to_json())
    assert "done" not in plain and api.LeaseAnswer.from_json(plain, "q").settled is None
    settled = api.Settled.of(["x", "y", "z"], ["z", "x"])
    assert settled == api.Settled(["x", "z"], ["y"])
    answer = api.LeaseAnswer.from_json(_wire(api.LeaseAnswer([], settled).to_json()), "q")
    assert answer.leases == [] and answer.settled == settled


def test_lease_requests_round_trip_and_bad_fields_are_refused_by_name():
    asked = api.LeaseRequest("agent-1", 5, 20.0, complete=["l1", "l2"], inline=4096, clowder_version=2)
    assert api.LeaseRequest.from_json(_wire(asked.to_json())) == asked
    minimal = api.LeaseRequest("agent-1").to_json()
    assert minimal == {"agent": "agent-1", "max": 1, "wait": 0.0}
    assert api.LeaseRequest.from_json({"agent": "a", "wait": 3}).wait == 3.0  # an int is a float
    for body, field in (({}, "agent"), ({"agent": "a", "max": 0}, "max"), ({"agent": "a", "max": 101}, "max"),
                        ({"agent": "a", "max": True}, "max"), ({"agent": "a", "wait": -1}, "wait"),
                        ({"agent": "a", "clowder_version": 3}, "clowder_version"),
                        ({"agent": "a", "complete": ["ok", 7]}, "complete"),
                        ({"agent": "a", "complete": ["x" * 65]}, "complete")):
        with pytest.raises(api.BadRequest) as refused:
            api.LeaseRequest.from_json(body)
        assert field in refused.value.text and refused.value.status == 400
    assert len(api.LeaseRequest.from_json({"agent": "a" * 500}).agent) == api.AGENT_LIMIT


def test_fail_and_dead_letter_requests_keep_the_limits_on_both_sides():
    failed = api.FailRequest("l" * 20, 3, "r" * (REASON_LIMIT + 50), delay=7)
    sent = failed.to_json()
    assert len(sent["reason"]) == REASON_LIMIT and sent["delay"] == 7.0
    assert api.FailRequest.from_json(_wire(sent)) == api.FailRequest("l" * 20, 3, "r" * REASON_LIMIT, 7.0)
    assert "delay" not in api.FailRequest("l" * 20).to_json()
    with pytest.raises(api.BadRequest, match="delay"):
        api.FailRequest.from_json({"lease_id": "l" * 20, "delay": api.MAX_DELAY_S + 1})
    with pytest.raises(api.BadRequest, match="lease_id"):
        api.FailRequest.from_json({"lease_id": "l" * (api.LEASE_ID_LIMIT + 1)})
    traceback = "head" + "t" * TRACEBACK_LIMIT + "END"
    dead = api.DeadLetterRequest("l" * 20, "why", traceback, 4, "agent-1").to_json()
    assert dead["traceback"].endswith("END") and len(dead["traceback"]) == TRACEBACK_LIMIT
    assert api.DeadLetterRequest.from_json(_wire(dead)).agent == "agent-1"
    assert api.DeadLetterRequest.from_json({"lease_id": "l" * 20, "agent": ""}).agent is None


def test_an_older_relays_hello_means_no_features_and_defaults():
    hello = api.Hello.from_json({"queue": "q", "lease_ttl": 15})
    assert hello.features == () and hello.max_wait is None and hello.lease_ttl == 15.0
    full = api.Hello("q", 10.0, 30.0, 1 << 30, True, api.FEATURES)
    assert api.Hello.from_json(_wire(full.to_json())) == full
    assert set(full.to_json()["features"]) == {"lease_complete", "inline_files"}


def test_backlog_counts_total_pending_and_read_leniently():
    counts = api.BacklogCounts(ready=1, backoff=2, stale=3, leased=4, dead=5, retry_after=1.5)
    sent = counts.to_json()
    assert sent["pending"] == 5 and "on_the_way" not in sent
    assert api.BacklogCounts.from_json(_wire(sent)) == counts
    odd = api.BacklogCounts.from_json({"ready": "lots", "stale": None, "retry_after": "soon", "on_the_way": 2})
    assert (odd.ready, odd.stale, odd.retry_after, odd.on_the_way) == (0, 0, None, 2)


def test_status_items_are_checked_and_register_requests_round_trip():
    items = [api.status_item("l1", {"status": "x"})]
    assert api.status_items_of({"items": items}) == [("l1", {"status": "x"})]
    with pytest.raises(api.BadRequest, match="payload"):
        api.status_items_of({"items": [{"lease_id": "l1", "payload": "x"}]})
    reg = api.RegisterRequest("a", {"name": "x"}, "")
    assert api.RegisterRequest.from_json(_wire(reg.to_json())) == reg
    assert api.clowder_base("http://relay:1", "abc") == "http://relay:1/clowder/abc/"


def test_the_relay_serves_every_path_of_the_api_and_its_metrics_name_them(tmp_path):
    from launcher.relay.metrics import ENDPOINTS
    from launcher.relay.server import Relay, RelaySettings
    from launcher.relay.store import LeaseStore

    store = LeaseStore(str(tmp_path / "leases.sqlite3"))
    try:
        relay = Relay(RelaySettings("127.0.0.1", 0, "t" * 32, "q"), store, broker=None, forwarder=None)
        assert set(relay.routes) == set(api.PATHS)
        assert ENDPOINTS == set(api.PATHS) - {api.BACKLOG}  # backlog polls are counted under "other"
    finally:
        store.close()
