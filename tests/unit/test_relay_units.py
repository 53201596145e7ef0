"""Relay pure parts: the route rules, the lease table's life cycle, token files, agent settings."""
from __future__ import annotations

import os
import threading
import time

import pytest

from agent.config import ConfigError, load_config
from hpc_common.tokens import TokenFileError, read_token_file
from hpc_common.routes import Refusal, check, ids_in, lease_scope
from hpc_common.messages import Message
from launcher.relay.store import LeaseStore

BODY = {"id": "f1", "intermediateId": "f1i", "datasetId": "d1", "host": "http://clowder/", "secretKey": "k"}


@pytest.mark.parametrize("method, path, learned, allowed", [
    ("GET", "api/files/f1", {}, True),
    ("GET", "api/files/f1i", {}, True),                     # v1 downloads the intermediate id
    ("GET", "api/files/f1/metadata", {}, True),
    ("POST", "api/files/f1/metadata.jsonld", {}, True),
    ("POST", "api/files/f1/tags", {}, True),
    ("GET", "api/files/f2", {}, False),                     # another file
    ("POST", "api/previews", {}, True),
    ("POST", "api/files/f1/previews/p1", {}, False),        # a preview this lease did not upload
    ("POST", "api/files/f1/previews/p1", {"preview": ["p1"]}, True),
    ("POST", "api/uploadToDataset/d1", {}, True),
    ("POST", "api/uploadToDataset/d2", {}, False),
    ("GET", "api/datasets/d1/files", {}, True),
    ("GET", "api/files/f9", {"file": ["f9"]}, True),        # listed by the lease's own dataset call
    ("POST", "api/datasets/createempty", {}, True),
    ("GET", "api/v2/files/f1", {}, True),
    ("POST", "api/v2/files/f1/metadata", {}, True),
    ("POST", "api/v2/datasets/d1/files", {}, True),
    ("GET", "api/collections", {}, False),
    ("GET", "api/users", {}, False),
    ("DELETE", "api/files/f1", {}, False),
])
def test_route_rules(method, path, learned, allowed):
    scope = lease_scope(BODY, learned)
    if allowed:
        check(method, path, scope)
    else:
        with pytest.raises(Refusal) as info:
            check(method, path, scope)
        assert info.value.status in (403, 405)


@pytest.mark.parametrize("path", ["api/files/../users", "api//files/f1", "api/files/%66%31", "/api/files/f1",
                                  "api/files/f1\\..", "api/files/f1 x", "http://evil/api/files/f1"])
def test_paths_that_could_escape_are_refused(path):
    with pytest.raises(Refusal) as info:
        check("GET", path, lease_scope(BODY, {}))
    assert info.value.status in (400, 403)


def test_ids_in_answers():
    assert ids_in({"id": "a"}) == ["a"]
    assert ids_in([{"id": "a"}, {"id": "b"}, {"x": 1}]) == ["a", "b"]
    assert ids_in({"data": [{"id": "c"}]}) == ["c"]
    assert ids_in("nope") == []


def _store(tmp_path, now):
    return LeaseStore(str(tmp_path / "l.sqlite3"), clock=lambda: now[0])


def test_lease_lifecycle_and_restart(tmp_path):
    now = [1000.0]
    store = _store(tmp_path, now)
    assert store.add([Message(body=b'{"id": "a"}', routing_key="q"), Message(body=b'{"id": "b"}', routing_key="q",
                                                                             headers={"x-agent-attempts": 2})]) == 2
    assert store.ready_count() == 2
    leases = store.lease("agent-1", 5, 10.0, lambda i: f"http://relay/clowder/{i}/")
    assert len(leases) == 2 and leases[1].attempts == 2
    assert store.live(leases[0].lease_id) is not None
    assert store.complete(leases[0].lease_id) and not store.complete(leases[0].lease_id)
    store.close()
    # A restart keeps the live lease, its key and host.
    store = _store(tmp_path, now)
    kept = store.live(leases[1].lease_id)
    assert kept is not None and kept.lease_key == leases[1].lease_key and kept.lease_host == leases[1].lease_host
    assert store.release(leases[1].lease_id)
    again = store.lease("agent-2", 5, 10.0, lambda i: "h")
    assert len(again) == 1 and again[0].attempts == 2  # a release is not a failure
    now[0] += 11  # expired
    assert store.live(again[0].lease_id) is None
    assert store.extend([again[0].lease_id], 10.0) == ([], [again[0].lease_id])
    assert store.expire(max_retries=2) == (0, 1)  # third attempt > 2 retries: dead
    dead = store.dead_rows()
    assert len(dead) == 1 and "expired" in dead[0].reason and dead[0].body == b'{"id": "b"}'
    assert store.delete(dead[0].row, only_state="dead")
    assert store.counts() == {"ready": 0, "leased": 0, "dead": 0}


def test_complete_then_lease_settles_and_leases_in_one_commit(tmp_path):
    now = [0.0]
    store = _store(tmp_path, now)
    store.add([Message(body=f'{{"id": "{i}"}}'.encode(), routing_key="q") for i in range(3)])
    first = store.lease("a", 2, 60.0, lambda i: "h")
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    done, more = store.complete_then_lease([first[0].lease_id, "not-a-lease"], "a", 5, 60.0, lambda i: "h")
    assert done == [first[0].lease_id] and [m.body for m in more] == [b'{"id": "2"}']
    assert commits == ["COMMIT"]  # the completion and the new lease: one transaction
    assert store.live(first[0].lease_id) is None and store.live(more[0].lease_id) is not None
    assert store.route(first[0].lease_id) is not None  # a late status still finds its reply_to
    assert store.counts() == {"ready": 0, "leased": 2, "dead": 0}
    assert store.complete_then_lease([first[0].lease_id], "a", 5, 60.0, lambda i: "h") == ([], [])
    store.close()
    # Both survive a restart: the completed row is gone, the new lease is kept.
    store = _store(tmp_path, now)
    assert store.live(more[0].lease_id) is not None and store.counts()["leased"] == 2


def test_fail_backs_off_then_dead_letters(tmp_path):
    now = [0.0]
    store = _store(tmp_path, now)
    store.add([Message(body=b"x", routing_key="q")])
    lease = store.lease("a", 1, 60.0, lambda i: "h")[0]
    assert store.fail(lease.lease_id, 1, "boom", max_retries=1, backoff=lambda n: 5.0) == "retry"
    assert store.lease("a", 1, 60.0, lambda i: "h") == []  # in backoff
    now[0] += 6
    lease = store.lease("a", 1, 60.0, lambda i: "h")[0]
    assert lease.attempts == 1
    assert store.fail(lease.lease_id, 0, "boom again", max_retries=1, backoff=lambda n: 5.0) == "dead"
    assert "gave up after 2 attempt(s): boom again" in store.dead_rows()[0].reason
    assert store.fail("nope", 1, "x", 1, lambda n: 0.0) is None


def test_learned_ids_persist(tmp_path):
    now = [0.0]
    store = _store(tmp_path, now)
    store.add([Message(body=b"x", routing_key="q")])
    lease = store.lease("a", 1, 60.0, lambda i: "h")[0]
    store.learn(lease.lease_id, "preview", ["p1", "p1", "p2"])
    store.close()
    assert _store(tmp_path, now).live(lease.lease_id).learned == {"preview": ["p1", "p2"]}


def test_token_file_must_be_private(tmp_path):
    path = tmp_path / "t"
    path.write_text("a" * 40 + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_token_file(str(path))
    os.chmod(path, 0o600)
    assert read_token_file(str(path)) == "a" * 40
    path.write_text("short")
    with pytest.raises(TokenFileError, match="at least"):
        read_token_file(str(path))
    with pytest.raises(TokenFileError):
        read_token_file(str(tmp_path / "missing"))


def test_relay_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AGENT_") or name in ("CLOWDER_URL",):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AGENT_SOURCE", "relay")
    with pytest.raises(ConfigError, match="relay_url and relay_token_file"):
        load_config({})
    monkeypatch.setenv("AGENT_RELAY_URL", "http://login1:8765")
    monkeypatch.setenv("AGENT_RELAY_TOKEN_FILE", "/x")
    cfg = load_config({})
    assert (cfg.source, cfg.relay_url, cfg.relay_token_file) == ("relay", "http://login1:8765", "/x")
    assert load_config({"relay_url": "https://other:1"}).relay_url == "https://other:1"  # flag wins
    monkeypatch.setenv("CLOWDER_URL", "http://clowder")
    with pytest.raises(ConfigError, match="clowder_url"):
        load_config({})
    monkeypatch.delenv("CLOWDER_URL")
    monkeypatch.setenv("AGENT_SOURCE", "carrier-pigeon")
    with pytest.raises(ConfigError, match="known: amqp, relay"):
        load_config({})


def test_relay_settings_from_yaml(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AGENT_") or name == "CLOWDER_URL":
            monkeypatch.delenv(name, raising=False)
    path = tmp_path / "agent.yaml"
    path.write_text("source: relay\nrelay_url: http://10.0.0.1:8765\nrelay_token_file: ~/.relay-token\n")
    cfg = load_config({}, config_file=str(path))
    assert (cfg.source, cfg.relay_url, cfg.relay_token_file) == ("relay", "http://10.0.0.1:8765", "~/.relay-token")


def test_spool_paths_stay_inside_the_spool(tmp_path):
    from launcher.relay.spool_fs import LocalSpoolFS, SpoolFSError

    fs = LocalSpoolFS(str(tmp_path / "spool"))
    fs.make()
    fs.write_json("inbox/a.json", {"x": 1})
    assert fs.listdir("inbox") == ["a.json"] and fs.read_json("inbox/a.json") == {"x": 1}
    for bad in ("../escape", "/etc/passwd", "inbox/../../x"):
        with pytest.raises(SpoolFSError):
            fs.read_json(bad)
    assert fs.rename("inbox/a.json", "inbox/b.json") and not fs.rename("inbox/a.json", "inbox/c.json")


def test_placeholders_are_replaced_in_paths_and_bodies():
    from launcher.relay.spool import _substitute_bytes, _substitute_text

    ids = {"spool-m1-2": "5f0c"}
    assert _substitute_text("api/files/f1/previews/spool-m1-2", ids) == "api/files/f1/previews/5f0c"
    assert _substitute_bytes(b'{"preview": "spool-m1-2"}', ids) == b'{"preview": "5f0c"}'


def test_a_dead_agents_claim_goes_back_with_one_more_attempt(tmp_path):
    from hpc_common.owned_folders import try_lock
    from hpc_common.spool_layout import SpoolLayout, reclaim

    layout = SpoolLayout(str(tmp_path / "spool"))
    layout.make()
    dead = os.path.join(layout.claimed, "dead-agent")
    os.makedirs(dead)
    SpoolLayout.write_json(os.path.join(dead, "m1.json"), {"body_b64": "", "headers": {}})
    os.makedirs(layout.result_dir("m1", partial=True))
    alive = os.path.join(layout.claimed, "live-agent")
    os.makedirs(alive)
    fd = try_lock(os.path.join(alive, "lock"))  # held: this agent is alive
    SpoolLayout.write_json(os.path.join(alive, "m2.json"), {"body_b64": "", "headers": {}})
    open(os.path.join(dead, "lock"), "w").close()
    assert reclaim(layout) == 1
    assert SpoolLayout.read_json(layout.staged("m1"))["headers"]["x-agent-attempts"] == 1
    assert not os.path.exists(dead) and not os.path.exists(layout.result_dir("m1", partial=True))
    assert os.path.exists(os.path.join(alive, "m2.json"))
    os.close(fd)


def test_a_lease_being_completed_frees_its_place_within_a_bound():
    from agent.messages import Delivery
    from agent.sources.relay import RelaySource

    source = RelaySource("http://127.0.0.1:9", "token", prefetch=2, agent_id="a1", reconnect_timeout=0.5)
    try:
        source._held.update({"l1", "l2"})
        assert source._room_left() == 0
        source.complete(Delivery(body=b"{}", routing_key="q", token="l1"))  # queued for the completion thread
        assert source._room_left() == 1 and "l1" in source._held  # still held: heartbeats keep extending it
        source._held.update(f"x{i}" for i in range(6))
        source._completing.update(f"x{i}" for i in range(6))
        assert source._room_left() == 0  # 8 held (4x prefetch): no more until completions get through
    finally:
        source.close()


class _FakeRelay:
    """A relay's work API over real HTTP, recording what agents send (features and answers set per test)."""

    def __init__(self, features: list[str], answer_done: bool) -> None:
        import base64
        import http.server
        import json
        import threading

        self.calls: list[tuple[str, dict]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(200, {"queue": "q", "lease_ttl": 15, "max_wait": 0.2, "features": features})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.calls.append((self.path, body))
                if self.path == "/v1/lease":
                    leases = []
                    if sum(1 for p, _ in fake.calls if p == "/v1/lease") == 1:
                        leases = [{"lease_id": "lease-0001", "body_b64": base64.b64encode(b'{"id": "f1"}').decode()}]
                    else:
                        time.sleep(min(float(body.get("wait", 0)), 0.2))
                    answer = {"leases": leases}
                    if "complete" in body and answer_done:
                        answer.update(done=list(body["complete"]), gone=[])
                    self._answer(200, answer)
                elif self.path == "/v1/complete":
                    self._answer(200, {"done": body.get("lease_ids", []), "gone": []})
                else:
                    self._answer(200, {"extended": [], "gone": []})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self, path: str) -> list[dict]:
        return [body for p, body in self.calls if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("features, answer_done, carried", [
    (["lease_complete"], True, True),    # the relay settles it in the lease call: no /v1/complete
    ([], True, False),                   # an older relay: never sent with a lease call
    (["lease_complete"], False, False),  # sent along, but not settled in the answer: /v1/complete after all
])
def test_completions_ride_on_lease_calls_only_where_the_relay_settles_them(features, answer_done, carried):
    from agent.sources.relay import RelaySource

    fake = _FakeRelay(features, answer_done)
    source = RelaySource(fake.url, "token", prefetch=1, agent_id="a1", lease_wait=0.2)
    got: list = []
    try:
        woken = threading.Event()
        source.open(woken.set, lambda: None)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            woken.wait(0.1)  # the lease thread wakes the agent's loop when leases arrived
            woken.clear()
            got += source.take()
        assert got and got[0].token == "lease-0001"
        source.complete(got[0])
        while source._held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not source._held and not source._completing  # settled and forgotten
        with_lease = [b for b in fake.paths("/v1/lease") if "complete" in b]
        completes = fake.paths("/v1/complete")
        if carried:
            assert with_lease == [{"agent": "a1", "max": 1, "wait": 0, "complete": ["lease-0001"]}] and not completes
        else:
            assert completes == [{"lease_ids": ["lease-0001"]}]
            assert len(with_lease) == (1 if features else 0)
    finally:
        source.close()
        fake.close()
