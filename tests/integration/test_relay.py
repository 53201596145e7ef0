"""The relay end to end: agents in a network namespace that reaches only the relay.

Each test that needs isolation runs the agent with `ip netns exec`: the namespace has its own
loopback and one veth link whose other end (on the host) carries the relay's address. Nothing
else is reachable from inside: not RabbitMQ, not the Clowder stand-in (both on the host's
127.0.0.1, which inside the namespace is the namespace's own, empty loopback). The messages name
the stand-in as their host, so every Clowder call has to go through the relay's forwarding.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from helpers import services
from helpers.certs import self_signed
from helpers.agent_harness import (REPO, TEST_PLUGINS, AgentHarness, assert_each_to_its_plugin,  # noqa: F401
                                   harness, second_harness)
from helpers.relay_harness import Netns, RelayProc, start_agent_in, unprocessed, wait_exit, write_token

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def netns():
    """A namespace reaching only its veth peer; needs root and iproute2 (fails in CI without them)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        services.unavailable("network namespaces need root and iproute2 (scripts/install.sh installs iproute2)")
    # Parallel workers (pytest-xdist) pick a free 10.231.x.0/30 from `ip addr`: one at a time.
    with open("/tmp/clowder-hpc-agent-test-netns.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ns = Netns()
        try:
            ns.create()
        except RuntimeError as exc:
            ns.delete()
            services.unavailable(f"cannot create a network namespace: {exc}")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def relay(harness, netns, tmp_path):
    r = RelayProc(harness, netns.host_ip, tmp_path, "--lease-ttl", "4", "--retry-backoff", "0.1").start()
    try:
        yield r
    finally:
        r.stop()


# -- end to end in the namespace --------------------------------------------------------------------
def test_agent_in_netns_reaches_only_the_relay_and_processes_v1_and_v2(harness, netns, relay):
    assert netns.can_connect(relay.host, relay.port)
    assert not netns.can_connect("127.0.0.1", 5672), "RabbitMQ must not be reachable from the namespace"
    assert not netns.can_connect("127.0.0.1", harness.standin.port), "Clowder must not be reachable either"
    v1 = [harness.publish_file(b"ok\n", name=f"a{i}.txt") for i in range(4)] + [harness.publish_file(b"tags\n")]
    proc = start_agent_in(harness, netns, "--idle-exit", "2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, v1) == []
    for fid in v1:
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1
        # pyclowder writes its host into extractor_id: the relay puts the real Clowder back
        assert md[0]["agent"]["extractor_id"].startswith(harness.standin.url)
    assert harness.standin.records(kind="tags", file_id=v1[-1])
    statuses = harness.drain(harness.reply_queue)
    done = [(p, json.loads(b)) for p, b in statuses if json.loads(b)["status"].startswith("StatusMessage.done")]
    assert sorted(s["file_id"] for _, s in done) == sorted(v1)
    assert all(p.correlation_id for p, _ in done)  # v1 statuses carry the request's correlation id

    v2 = [harness.publish_file(b"ok v2\n", v2=True) for _ in range(2)]
    proc = start_agent_in(harness, netns, "--idle-exit", "2", CLOWDER_VERSION="2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    for fid in v2:
        recs = harness.standin.records(kind="metadata", file_id=fid)
        assert len(recs) == 1 and recs[0]["api"] == "v2"
    assert harness.depth() == 0 and harness.errors() == []
    text = harness.log_text() + relay.log()
    assert relay.token not in text


def test_poison_and_abort_are_dead_lettered_with_the_original_body(harness, netns, relay):
    poison = harness.add_file(b"raise\n")
    abort = harness.add_file(b"abort\n")
    bodies = {poison: harness.v1_body(poison), abort: harness.v1_body(abort)}
    for body in bodies.values():
        harness.publish(body)
    harness.publish(None, raw=b"\xff not json")
    good = harness.publish_file(b"ok\n")
    proc = start_agent_in(harness, netns, "--idle-exit", "2", AGENT_MAX_RETRIES="1", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, [good]) == []
    all_errors = harness.errors()
    assert [b for _, b in all_errors if b == b"\xff not json"], "a bad body is dead-lettered unchanged"
    errors = {json.loads(body)["id"]: (props, body) for props, body in all_errors if body != b"\xff not json"}
    assert set(errors) == {poison, abort}
    for fid, (props, body) in errors.items():
        assert json.loads(body) == bodies[fid]  # unchanged: the real host and key, not the relay's
        assert props.headers["x-error-reason"]
    assert "gave up after 2 attempt(s)" in errors[poison][0].headers["x-error-reason"]
    assert len([r for r in harness.runs() if r[0] == poison]) == 2


@pytest.mark.chaos
def test_agent_killed_mid_lease_loses_nothing(harness, netns, relay):
    slow = harness.publish_file(b"sleep 2\n")
    others = [harness.publish_file(b"ok\n") for _ in range(3)]
    first = start_agent_in(harness, netns, **relay.agent_env())
    harness.wait_for(lambda: any(r[0] == slow for r in harness.runs()), 30, "the slow file to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Its leases expire (lease ttl 4 s) and go to the next agent.
    second = start_agent_in(harness, netns, "--idle-exit", "7", **relay.agent_env())
    assert wait_exit(harness, second) == 0, harness.log_text()
    assert unprocessed(harness, [slow, *others]) == []
    assert harness.depth() == 0 and harness.errors() == []
    assert "expired lease(s) returned" in relay.log()
    assert len([r for r in harness.runs() if r[0] == slow]) == 2  # started again by the second agent


@pytest.mark.chaos
def test_relay_killed_mid_run_loses_nothing(harness, netns, relay):
    ids = [harness.publish_file(b"sleep 0.1\n") for _ in range(30)]
    agent = start_agent_in(harness, netns, "--idle-exit", "4", "--slots", "2", **relay.agent_env())
    harness.wait_for(lambda: len(harness.runs()) >= 5, 30, "some files done")
    relay.kill9()
    time.sleep(1.0)
    relay.start()  # same state folder and address: the leases are still there
    assert wait_exit(harness, agent, timeout=120) == 0, harness.log_text() + relay.log()
    assert unprocessed(harness, ids) == []
    assert harness.depth() == 0 and harness.errors() == []
    assert "survived the last run" in relay.log()  # leases in flight at the kill were kept


def test_walltime_drain_hands_back_and_the_next_agent_finishes(harness, netns, relay):
    ids = [harness.publish_file(b"sleep 1.5\n") for _ in range(6)]
    proc = start_agent_in(harness, netns, AGENT_WALLTIME="6", AGENT_WALLTIME_MARGIN="2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert "walltime drain" in harness.log_text()
    done_first = len(ids) - len(unprocessed(harness, ids))
    assert 1 <= done_first < len(ids)
    proc = start_agent_in(harness, netns, "--idle-exit", "2", **relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, ids) == [] and harness.errors() == []


@pytest.mark.mpi
def test_mpi_ranks_in_the_namespace_share_one_relay_source(harness, netns, relay, mpi):
    ids = [harness.publish_file(b"sleep 0.3\n") for _ in range(8)]
    log_path = str(harness.tmp / "mpi.log")
    harness.logs.append(log_path)
    env = harness.env(**relay.agent_env())
    env["PATH"] = os.path.dirname(str(mpi)) + os.pathsep + env.get("PATH", "")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns.name, str(mpi), "-n", "2", sys.executable, "-m",
                                 "agent", "run", "--idle-exit", "2"], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    harness.procs.append(proc)
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, ids) == [] and harness.errors() == []
    assert len({pid for _, pid, _ in harness.runs()}) == 2  # both ranks' extractors worked


def test_one_agent_serves_two_plugins_each_leasing_from_its_own_relay(harness, second_harness, tmp_path):
    """Plugin a leases from one relay with the agent-wide token, plugin b from another with its own token."""
    a_name, b_name = "test.directive", "test.simple.wc"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    relays = [RelayProc(harness, "127.0.0.1", tmp_path / "a").start(),
              RelayProc(second_harness, "127.0.0.1", tmp_path / "b").start()]
    try:
        a_ids = [harness.publish_file(b"ok\n", name=f"a{i}.txt") for i in range(2)]
        b_ids = [second_harness.publish_file(b"one two three\n", name=f"b{i}.txt") for i in range(2)]
        table = {a_name: {"relay_url": relays[0].url},
                 b_name: {"relay_url": relays[1].url, "relay_token_file": relays[1].token_file}}
        proc = start_agent_in(harness, None, "--plugin", f"{a_name},{b_name}", "--idle-exit", "2",
                              **relays[0].agent_env(AGENT_RELAY_URL="", RABBITMQ_QUEUE="",
                                                    AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_PLUGINS=json.dumps(table)))
        assert wait_exit(harness, proc) == 0, harness.log_text()
        # each relay's files went to its own plugin's extractor only
        assert_each_to_its_plugin(harness.standin, a_ids, b_ids, "ok")
        assert harness.errors() == [] and second_harness.errors() == []
        assert relays[0].token not in harness.log_text() and relays[1].token not in harness.log_text()
    finally:
        for relay in relays:
            relay.stop()
    assert harness.depth() == 0 and second_harness.depth() == 0  # each relay settled its leases


# -- refusals -----------------------------------------------------------------------------------------
@pytest.fixture
def local_relay(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--lease-ttl", "30", "--max-upload", "100000").start()
    try:
        yield r
    finally:
        r.stop()


def _lease_one(relay: RelayProc) -> dict[str, Any]:
    resp = relay.call("POST", "/v1/lease", {"agent": "test", "max": 1, "wait": 5})
    assert resp.status_code == 200, resp.text
    leases = resp.json()["leases"]
    assert len(leases) == 1
    return leases[0]


def test_fail_with_a_delay_holds_the_retry_that_long(harness, local_relay):
    """/v1/fail's delay replaces the relay's backoff; out of 0..24 h it is refused and the lease stays."""
    r = local_relay
    harness.publish_file(b"ok\n")
    lease = _lease_one(r)
    for bad in (-1, 24 * 3600 + 1, "soon"):
        refused = r.call("POST", "/v1/fail", {"lease_id": lease["lease_id"], "attempts": 1, "delay": bad})
        assert refused.status_code == 400 and "delay" in refused.json()["error"], refused.text
    ok = r.call("POST", "/v1/fail", {"lease_id": lease["lease_id"], "attempts": 1, "reason": "x", "delay": 600})
    assert ok.status_code == 200 and ok.json()["outcome"] == "retry", ok.text
    backlog = r.call("GET", "/v1/backlog").json()
    assert backlog["ready"] == 0 and backlog["backoff"] == 1 and 590 <= backlog["retry_after"] <= 600, backlog
    assert r.call("POST", "/v1/lease", {"agent": "test", "max": 1, "wait": 0}).json()["leases"] == []


def test_completions_ride_on_a_lease_call_settled_before_it_leases(harness, local_relay):
    """POST /v1/lease {complete: [...]}: done/gone answered beside the leases, done leases forget their key."""
    r = local_relay
    assert "lease_complete" in r.call("GET", "/v1/hello").json()["features"]
    for _ in range(2):
        harness.publish_file(b"ok\n")
    first = _lease_one(r)
    resp = r.call("POST", "/v1/lease", {"agent": "test", "max": 1, "wait": 5,
                                       "complete": [first["lease_id"], "no-such-lease"]})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["done"] == [first["lease_id"]] and answer["gone"] == ["no-such-lease"], answer
    assert len(answer["leases"]) == 1 and answer["leases"][0]["lease_id"] != first["lease_id"]
    assert r.call("POST", "/v1/complete", {"lease_id": first["lease_id"]}).status_code == 409  # settled once
    body = json.loads(base64.b64decode(first["body_b64"]))
    assert requests.get(f"{body['host']}api/files/{body['id']}?key={body['secretKey']}", timeout=10).status_code == 401
    bad = r.call("POST", "/v1/lease", {"agent": "test", "max": 1, "complete": "all of them"})
    assert bad.status_code == 400 and "'complete'" in bad.json()["error"], bad.text
    plain = r.call("POST", "/v1/lease", {"agent": "test", "max": 1, "wait": 0}).json()
    assert "done" not in plain and plain["leases"] == []  # not asked: not answered


def test_small_files_come_inline_with_their_lease_within_the_limits(harness, local_relay):
    """POST /v1/lease {inline}: each file message's file info and (small) file ride in its lease item."""
    from prometheus_client.parser import text_string_to_metric_families

    r = local_relay
    assert "inline_files" in r.call("GET", "/v1/hello").json()["features"]
    small = {harness.publish_file(b"small %d\n" % i, name=f"s{i}.txt"): b"small %d\n" % i for i in range(2)}
    large = harness.publish_file(b"L" * 5000, name="large.bin")
    v2 = harness.publish_file(b"version two\n", v2=True)
    unsized = harness.add_file(b"U" * 5000)
    harness.publish(harness.v1_body(unsized, fileSize=""))  # no size stated: fetched, abandoned at its headers
    bad = r.call("POST", "/v1/lease", {"agent": "test", "max": 1, "inline": -1})
    assert bad.status_code == 400 and "'inline'" in bad.json()["error"], bad.text
    leases: list = []
    deadline = time.monotonic() + 20
    while len(leases) < 5 and time.monotonic() < deadline:
        leases += r.call("POST", "/v1/lease", {"agent": "test", "max": 5, "wait": 2, "inline": 1000}).json()["leases"]
    by_id = {json.loads(base64.b64decode(x["body_b64"]))["id"]: x for x in leases}
    assert set(by_id) == set(small) | {large, v2, unsized}
    for fid, content in small.items():
        inline = by_id[fid]["inline"]
        assert inline["file_path"] == f"api/files/{fid}" and base64.b64decode(inline["file_b64"]) == content
        assert inline["info_path"] == f"api/files/{fid}/metadata"
        assert json.loads(inline["info"])["id"] == fid  # Clowder's answer, as pyclowder would get it
    for fid in (large, unsized):
        assert "file_b64" not in by_id[fid]["inline"] and "info" in by_id[fid]["inline"]  # over 1000 bytes
    # a v2 message leased by a v1 agent: fetched the v1 way (what that extractor would ask)
    assert by_id[v2]["inline"]["info_path"] == f"api/files/{v2}/metadata"
    samples = {s.name: s.value for fam in text_string_to_metric_families(r.call("GET", "/metrics").text)
               for s in fam.samples}
    assert samples["clowder_hpc_relay_inline_files_total"] == 3
    harness.publish_file(b"not asked\n")
    plain = _lease_one(r)
    assert "inline" not in plain  # not asked: not sent


def test_a_silent_clowder_holds_a_lease_answer_only_to_the_inline_deadline(harness, tmp_path):
    """Inline fetches that get no answer are given up; meanwhile the backlog tells that agent its lease is coming."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts, never answers
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--clowder-url", f"http://127.0.0.1:{silent.getsockname()[1]}/")
    r.start()
    try:
        harness.publish_file(b"x\n")
        got: dict[str, Any] = {}
        asking = threading.Thread(target=lambda: got.update(resp=r.call(
            "POST", "/v1/lease", {"agent": "slow-one", "max": 1, "wait": 10, "inline": 1000})))
        asking.start()
        seen = []
        deadline = time.monotonic() + 10
        while asking.is_alive() and time.monotonic() < deadline:
            seen.append(r.call("GET", "/v1/backlog?agent=slow-one").json().get("on_the_way"))
            time.sleep(0.05)
        asking.join(20)
        assert 1 in seen, seen  # leased to it, its answer not yet written: an idle agent waits for it
        assert r.call("GET", "/v1/backlog?agent=another").json()["on_the_way"] == 0
        assert r.call("GET", "/v1/backlog?agent=slow-one").json()["on_the_way"] == 0
        leases = got["resp"].json()["leases"]
        assert len(leases) == 1 and "inline" not in leases[0]  # nothing arrived in time: the extractor asks itself
    finally:
        r.stop()
        silent.close()


def test_agent_through_the_relay_stages_ahead_and_downloads_each_file_once(harness, local_relay, tmp_path):
    """Source relay stages ahead by default: small files come inline, large ones are fetched ahead; each once."""
    contents = [b"line %d\n" % i * (1 + i) for i in range(8)] + [b"B" * 400_000]
    ids = [harness.publish_file(c, name=f"f{i}.txt") for i, c in enumerate(contents)]
    work = tmp_path / "work"
    proc = start_agent_in(harness, None, "--idle-exit", "2", AGENT_PLUGIN="ncsa.wordcount.hpc",
                          AGENT_WORK_DIR=str(work), **local_relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    for fid, content in zip(ids, contents):
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1 and md[0]["content"]["characters"] == len(content), (fid, md)
    counts = harness.standin.request_counts()
    blob_gets = sum(n for route, n in counts.items() if route.startswith("GET api/files/{") and route.endswith("}"))
    info_gets = sum(n for route, n in counts.items() if route.startswith("GET api/files/{") and route.endswith("metadata"))
    assert blob_gets == len(ids) and info_gets == len(ids), counts  # once each: ahead of pyclowder, not again
    assert "stage-ahead on" in harness.log_text()
    assert [p for p in work.iterdir() if p.name.startswith("agent-stage-")] == []  # staged copies removed


def test_staging_stops_for_an_extractor_that_bypasses_the_download(harness, local_relay):
    """check_message says bypass: after UNUSED_LIMIT files whose fetched copy went unused, nothing is fetched ahead."""
    from agent.stage_pool import UNUSED_LIMIT

    ids = [harness.publish_file(b"ok\n", name=f"f{i}.bypass") for i in range(30)]
    proc = start_agent_in(harness, None, "--idle-exit", "2", **local_relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert all(harness.standin.metadata_for(fid)[0]["content"]["directive"] == "bypass" for fid in ids)
    counts = harness.standin.request_counts()
    blob_gets = sum(n for route, n in counts.items() if route.startswith("GET api/files/{") and route.endswith("}"))
    # the files staged before the switch: UNUSED_LIMIT, those already waiting (3) and a lease answer on its way (3)
    assert UNUSED_LIMIT <= blob_gets <= UNUSED_LIMIT + 6, counts
    assert "stage-ahead off: the extractor used none of the last" in harness.log_text()


def test_bad_tokens_and_malformed_requests_get_clear_errors(harness, local_relay):
    r = local_relay
    assert r.call("GET", "/v1/hello", token=None).status_code == 401
    wrong = r.call("GET", "/v1/hello", token="x" * 43)
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    assert r.call("GET", "/v1/hello").json()["queue"] == harness.queue
    bad = r.call("POST", "/v1/lease", data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    assert r.call("POST", "/v1/lease", [1, 2]).status_code == 400
    missing = r.call("POST", "/v1/lease", {"max": 1})
    assert missing.status_code == 400 and "'agent'" in missing.json()["error"]
    typed = r.call("POST", "/v1/lease", {"agent": "a", "max": "many"})
    assert typed.status_code == 400 and "'max'" in typed.json()["error"]
    big = r.call("POST", "/v1/status", data=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    chunked = r.call("POST", "/v1/complete", data=iter([b'{"lease_id": "x"}']))
    assert chunked.status_code == 411
    assert r.call("GET", "/v1/nowhere").status_code == 404
    assert r.call("GET", "/v1/lease").status_code == 405
    gone = r.call("POST", "/v1/complete", {"lease_id": "no-such-lease"})
    assert gone.status_code == 409 and gone.json()["gone"] is True


def test_forwarding_is_not_an_open_proxy(harness, local_relay):
    r = local_relay
    fid = harness.publish_file(b"ok\n")
    other = harness.add_file(b"someone else's file\n")
    lease = _lease_one(r)
    body = json.loads(base64.b64decode(lease["body_b64"]))
    assert body["host"] == f"{r.url}/clowder/{lease['lease_id']}/" and body["secretKey"] != harness.key
    base, key = body["host"], body["secretKey"]
    ok = requests.get(f"{base}api/files/{fid}?key={key}", timeout=10)
    assert ok.status_code == 200 and ok.content == b"ok\n"
    assert requests.get(f"{base}api/files/{fid}/metadata", headers={"X-API-Key": key}, timeout=10).status_code == 200
    assert requests.get(f"{base}api/files/{fid}?key={harness.key}", timeout=10).status_code == 401  # real key: no
    assert requests.get(f"{base}api/files/{fid}", timeout=10).status_code == 401
    assert requests.get(f"{base}api/files/{other}?key={key}", timeout=10).status_code == 403
    assert requests.get(f"{base}api/collections?key={key}", timeout=10).status_code == 403
    assert requests.delete(f"{base}api/files/{fid}?key={key}", timeout=10).status_code == 405
    for path in ("api/files/../../etc/passwd", "api/files/%2e%2e/x", "http://example.org/", "api//files/x"):
        resp = requests.get(f"{base}{path}?key={key}", timeout=10)
        assert resp.status_code in (400, 403, 404), (path, resp.status_code)
    raw = socket.create_connection(("127.0.0.1", r.port))
    raw.sendall(b"GET http://127.0.0.1:5672/ HTTP/1.1\r\nHost: x\r\n\r\n")  # proxy-style request
    assert raw.recv(4096).startswith(b"HTTP/1.1 401")
    raw.close()
    big = requests.post(f"{base}api/uploadToDataset/{'ds-' + harness.queue}?key={key}",
                        files={"File": ("big.bin", b"x" * 200000)}, timeout=10)
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert harness.standin.records(kind="upload") == []
    assert r.call("POST", "/v1/complete", {"lease_id": lease["lease_id"]}).status_code == 200
    # A settled lease forwards nothing any more.
    assert requests.get(f"{base}api/files/{fid}?key={key}", timeout=10).status_code == 401
    assert harness.depth() == 0


def test_open_token_files_are_refused_on_both_sides(harness, tmp_path):
    loose = tmp_path / "loose.token"
    write_token(loose, 0o644)
    out = subprocess.run([sys.executable, "-m", "launcher", "relay", "--bind", "127.0.0.1:0", "--token-file",
                          str(loose), "--state-dir", str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, RABBITMQ_URI=harness.url, RABBITMQ_QUEUE=harness.queue,
                                  PYTHONPATH=REPO), timeout=30)
    assert out.returncode == 2 and "chmod 600" in out.stderr
    code = harness.run_agent("--idle-exit", "1", AGENT_SOURCE="relay", AGENT_RELAY_URL="http://127.0.0.1:9",
                             AGENT_RELAY_TOKEN_FILE=str(loose))
    assert code == 2 and "chmod 600" in harness.log_text()
    assert open(str(loose)).read().strip() not in harness.log_text() + out.stderr


def test_tls_relay_with_a_self_signed_certificate(harness, tmp_path):
    cert, key = self_signed(tmp_path)
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--cert", cert, "--key", key).start()
    try:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(r.url + "/v1/hello", timeout=10)  # not trusted without the CA
        ids = [harness.publish_file(b"ok\n") for _ in range(2)]
        code = harness.run_agent("--idle-exit", "2", **r.agent_env(AGENT_RELAY_CA=cert))
        assert code == 0, harness.log_text()
        assert unprocessed(harness, ids) == []
    finally:
        r.stop()


def test_large_files_stream_both_ways(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--max-upload", str(64 << 20)).start()
    try:
        blob = os.urandom(12 << 20)
        fid = harness.publish_file(blob, name="big.bin")
        lease = _lease_one(r)
        body = json.loads(base64.b64decode(lease["body_b64"]))
        base, key = body["host"], body["secretKey"]
        with requests.get(f"{base}api/files/{fid}", params={"key": key}, stream=True, timeout=30) as resp:
            assert resp.status_code == 200 and int(resp.headers["Content-Length"]) == len(blob)
            assert b"".join(resp.iter_content(1 << 20)) == blob
        dataset = "ds-" + harness.queue
        up = requests.post(f"{base}api/uploadToDataset/{dataset}", params={"key": key},
                           files={"File": ("out.bin", blob)}, timeout=60)
        assert up.status_code == 200, up.text
        chunks = (blob[i:i + (1 << 20)] for i in range(0, len(blob), 1 << 20))  # no Content-Length: chunked
        md = requests.post(f"{base}api/files/{fid}/metadata.jsonld", params={"key": key}, data=chunks,
                           headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert md.status_code in (200, 400), md.text  # forwarded (the stand-in judges the body)
        uploads = harness.standin.records(kind="upload")
        assert len(uploads) == 1 and uploads[0]["body"]["size"] == len(blob)
        # The new file id came back through the relay, so this lease may now touch it.
        new_id = up.json()["id"]
        assert requests.get(f"{base}api/files/{new_id}/metadata", params={"key": key}, timeout=10).status_code == 200
        assert r.call("POST", "/v1/release", {"lease_id": lease["lease_id"]}).status_code == 200
    finally:
        r.stop()


def test_chunked_and_close_delimited_answers_from_clowder_reach_the_agent_whole(harness, tmp_path):
    """Clowder's answer framing is not the relay's to choose: chunked, to-the-end and kept-alive all forward."""
    import http.server
    import threading

    blob = os.urandom(3 << 20)
    seen: list[str] = []

    class Clowder(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            if "/metadata" in self.path:  # to the connection's end, HTTP/1.0 style
                self.protocol_version = "HTTP/1.0"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id": "x", "filename": "big.bin"}')
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(blob), 700_000):
                part = blob[i:i + 700_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

    clowder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Clowder)
    threading.Thread(target=clowder.serve_forever, daemon=True).start()
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--clowder-url",
                  f"http://127.0.0.1:{clowder.server_address[1]}/").start()
    try:
        fid = harness.publish_file(b"the relay asks the scripted Clowder instead\n")
        lease = _lease_one(r)
        body = json.loads(base64.b64decode(lease["body_b64"]))
        base, key = body["host"], body["secretKey"]
        for _ in range(2):  # the second time on kept-alive connections on both sides
            info = requests.get(f"{base}api/files/{fid}/metadata", params={"key": key}, timeout=10)
            assert info.status_code == 200 and info.json()["filename"] == "big.bin"
            with requests.get(f"{base}api/files/{fid}", params={"key": key}, stream=True, timeout=30) as resp:
                assert resp.status_code == 200, resp.text
                assert b"".join(resp.iter_content(1 << 20)) == blob
        assert len(seen) == 4 and all("key=" + harness.key in p for p in seen)  # the real key went upstream
    finally:
        r.stop()
        clowder.shutdown()
        clowder.server_close()


def test_relay_metrics_behind_the_token(harness, tmp_path):
    """GET /metrics with the bearer token: messages by state, requests, forwarding errors (Clowder down)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = RelayProc(harness, "127.0.0.1", tmp_path, "--clowder-url", "http://127.0.0.1:1/").start()
    try:
        for _ in range(2):
            harness.publish_file(b"x\n")
        lease = _lease_one(r)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and harness.depth():  # the relay takes the second one too
            time.sleep(0.2)
        body = json.loads(base64.b64decode(lease["body_b64"]))
        down = requests.get(f"{body['host']}api/files/{body['id']}?key={body['secretKey']}", timeout=30)
        assert down.status_code >= 500
        assert r.call("GET", "/metrics", token=None).status_code == 401
        resp = r.call("GET", "/metrics")
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(resp.text) for s in fam.samples}
    finally:
        r.stop()
    q = ("queue", harness.queue)
    assert samples[("clowder_hpc_relay_messages", (q, ("state", "leased")))] == 1
    assert samples[("clowder_hpc_relay_messages", (q, ("state", "ready")))] == 1
    assert samples[("clowder_hpc_relay_messages", (q, ("state", "dead")))] == 0
    assert samples[("clowder_hpc_relay_broker_connected", (q,))] == 1
    assert samples[("clowder_hpc_relay_requests_total", (("code", "200"), ("endpoint", "/v1/lease"), q))] == 1
    assert samples[("clowder_hpc_relay_requests_total", (("code", "401"), ("endpoint", "/metrics"), q))] == 1
    assert samples[("clowder_hpc_relay_forward_errors_total", (q,))] == 1


# -- backlog truth, fast recovery, retries held by the relay, registration for agents -----------------
def _launcher_env(harness: AgentHarness, relay: RelayProc, tmp: Any, **extra: str) -> dict[str, str]:
    caps = tmp / "caps.yaml"
    caps.write_text('max_array_size: 5\nmax_running: 4\nmax_queued: 6\nmax_walltime: "00:05:00"\n'
                    'default_walltime: "00:03:00"\ncores_per_task: 1\n')
    caps.chmod(0o644)
    script = tmp / "sleep.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\nsleep 120\n")
    env = dict(os.environ, RABBITMQ_URI=harness.url, RABBITMQ_QUEUE=harness.queue, LAUNCHER_CAPS=str(caps),
               LAUNCHER_STATE_DIR=relay.state, LAUNCHER_SCRIPT=str(script), LAUNCHER_SCHEDULER="slurm",
               AGENT_JOURNAL_DIR=harness.journal_dir, PYTHONPATH=REPO)
    env.update(extra)
    return env


def _launcher(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"launcher {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _relay_holds(harness: AgentHarness, relay: RelayProc, n: int) -> None:
    harness.wait_for(lambda: harness.depth() == 0 and relay.call("GET", "/v1/backlog").json()["ready"] == n, 30,
                     f"the relay to take all {n} messages from RabbitMQ")


@pytest.fixture
def plain_relay(harness, tmp_path):
    """A relay on 127.0.0.1 with the default lease ttl (15 s)."""
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--retry-backoff", "0.1").start()
    try:
        yield r
    finally:
        r.stop()


def test_status_backlog_counts_what_the_relay_holds(harness, plain_relay, tmp_path, slurm):
    ids = [harness.publish_file(b"ok\n") for _ in range(12)]
    _relay_holds(harness, plain_relay, 12)
    env = _launcher_env(harness, plain_relay, tmp_path)
    status = json.loads(_launcher(env, "status", "--json").stdout)
    assert status["broker"]["ready"] == 0
    assert status["backlog"]["total"] == 12, status["backlog"]
    assert status["backlog"]["relay_ready"] == 12 and status["backlog"]["rabbitmq_ready"] == 0
    assert "backlog    12 waiting (relay ready 12)" in _launcher(env, "status").stdout
    # The same counts from the relay's API, as a launcher on another host gets them.
    remote = dict(env, LAUNCHER_STATE_DIR=str(tmp_path / "elsewhere"), LAUNCHER_RELAY_URL=plain_relay.url,
                  LAUNCHER_RELAY_TOKEN_FILE=plain_relay.token_file)
    assert json.loads(_launcher(remote, "status", "--json").stdout)["backlog"]["relay_ready"] == 12
    assert plain_relay.call("GET", "/v1/backlog", token="wrong-token-1234567").status_code == 401
    # Agents take the work; the backlog goes to zero.
    proc = start_agent_in(harness, None, "--idle-exit", "2", **plain_relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, ids) == []
    assert json.loads(_launcher(env, "status", "--json").stdout)["backlog"]["total"] == 0


@pytest.mark.slurm
def test_scale_submits_a_task_for_work_only_the_relay_holds(harness, plain_relay, tmp_path, slurm):
    from helpers.slurm_jobs import cleanup, tasks_of, wait_for

    for _ in range(12):
        harness.publish_file(b"ok\n")
    _relay_holds(harness, plain_relay, 12)
    env = _launcher_env(harness, plain_relay, tmp_path)
    try:
        out = _launcher(env, "scale", "--once", "--files-per-task", "5", "--idle-grace", "0").stdout
        assert out.startswith("scale_up: submit 3: backlog 12"), out
        job = json.loads(_launcher(env, "status", "--json").stdout)["jobs"][0]["job_id"]
        assert wait_for(lambda: len(tasks_of(job)) == 3)
    finally:
        cleanup(Path(plain_relay.state))


def test_agent_killed_under_the_relay_its_leases_run_in_the_next_agents_run(harness, netns, tmp_path):
    """The contract: kill -9 three seconds into a 30-file run, a second agent at once with --idle-exit 5."""
    relay = RelayProc(harness, netns.host_ip, tmp_path).start()  # default lease ttl
    try:
        ids = [harness.publish_file(b"sleep 0.2\n") for _ in range(30)]
        first = start_agent_in(harness, netns, **relay.agent_env())
        harness.wait_for(lambda: harness.runs(), 60, "the first file to start")
        time.sleep(3.0)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = start_agent_in(harness, netns, "--idle-exit", "5", **relay.agent_env())
        assert wait_exit(harness, second, timeout=120) == 0, harness.log_text() + relay.log()
        assert unprocessed(harness, ids) == [], harness.log_text() + relay.log()
        assert harness.depth() == 0 and harness.errors() == []
        assert "expired lease(s) returned" in relay.log()
    finally:
        relay.stop()


def test_idle_agent_waits_for_a_dead_agents_lease(harness, plain_relay):
    """Nothing else to do: the agent stays (--idle-exit 2) until the silent lease expires, then runs it."""
    fid = harness.publish_file(b"ok\n")
    _relay_holds(harness, plain_relay, 1)
    ghost = plain_relay.call("POST", "/v1/lease", {"agent": "ghost", "max": 1, "wait": 5}).json()["leases"]
    assert len(ghost) == 1  # leased, and never extended: as if its agent died at once
    # one missed heartbeat (ttl/4 + 1 s): the relay calls it stale
    harness.wait_for(lambda: plain_relay.call("GET", "/v1/backlog").json()["stale"] == 1, 30,
                     "the relay to count the silent lease as stale")
    proc = start_agent_in(harness, None, "--idle-exit", "2", **plain_relay.agent_env())
    assert wait_exit(harness, proc) == 0, harness.log_text()
    assert unprocessed(harness, [fid]) == [], harness.log_text() + plain_relay.log()
    assert "source holds work deliverable" in harness.log_text()


def test_retries_wait_in_the_relay_not_in_the_agent(harness, plain_relay):
    """AGENT_RETRY_BACKOFF=10 through the relay: the good files run at once, the failing ones end in error.<queue>."""
    failing = [harness.publish_file(b"raise\n") for _ in range(2)]
    good = [harness.publish_file(b"ok\n") for _ in range(20)]
    proc = start_agent_in(harness, None, "--idle-exit", "3", AGENT_RETRY_BACKOFF="10", AGENT_MAX_RETRIES="1",
                          **plain_relay.agent_env())
    assert wait_exit(harness, proc, timeout=120) == 0, harness.log_text()
    runs = [r[0] for r in harness.runs()]
    second_attempts = [i for i, f in enumerate(runs) if f in failing and runs[:i].count(f) == 1]
    assert len(second_attempts) == 2 and max(runs.index(f) for f in good) < min(second_attempts), \
        (runs, failing, harness.log_text())
    assert "source holds work deliverable" in harness.log_text()  # it stayed for the retries
    errors = {json.loads(body)["id"]: props for props, body in _wait_errors(harness, 2)}
    assert set(errors) == set(failing)
    assert all(p.headers["x-agent-attempts"] == 2 for p in errors.values())
    assert unprocessed(harness, good) == []


def _wait_errors(h: AgentHarness, n: int, timeout: float = 20.0) -> list:
    """error.<queue> is published by the relay's broker link shortly after the dead-letter call."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += h.errors()
        time.sleep(0.2)
    return got


def test_relay_registers_for_its_agents_while_they_live(harness, tmp_path):
    relay = RelayProc(harness, "127.0.0.1", tmp_path, "--heartbeat", "1").start()
    listen = harness.registrations()
    try:
        seen: list[float] = []  # when registrations were seen (listen() gives only the new ones)

        def ours() -> int:
            seen.extend(listen())
            return len(seen)

        proc = start_agent_in(harness, None, "--idle-exit", "6", AGENT_HEARTBEAT="600", **relay.agent_env())
        harness.wait_for(lambda: ours() > 0, 60, "the agent's own registration")
        first = len(seen)
        # the relay, every second, while the agent long-polls (the agent itself only every 600 s)
        harness.wait_for(lambda: ours() >= first + 3, 30, "three registrations by the relay")
        assert wait_exit(harness, proc) == 0, harness.log_text()

        def quiet_for(seconds: float) -> bool:
            ours()
            return time.monotonic() - seen[-1] >= seconds

        # One interval after the agent's last call (its long poll noticed gone) the relay stops:
        # three heartbeat intervals without one says it has.
        harness.wait_for(lambda: quiet_for(3.0), 30, "the relay to stop registering for the gone agent")
    finally:
        relay.stop()


# -- the HTTP stack's limits ----------------------------------------------------------------------------
def _raw_hello(r: RelayProc) -> socket.socket:
    """A kept-alive raw connection that has been answered once (so the relay counts it as open)."""
    sock = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    sock.sendall(f"GET /v1/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {r.token}\r\n\r\n".encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return sock


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(harness, tmp_path):
    r = RelayProc(harness, "127.0.0.1", tmp_path, "--max-connections", "5").start()
    held = []
    try:
        held = [_raw_hello(r) for _ in range(5)]
        over = r.call("GET", "/v1/hello")
        assert over.status_code == 503 and "too many connections" in over.json()["error"]
        held.pop().close()
        # once the relay has seen the close, the freed place takes a new connection
        harness.wait_for(lambda: r.call("GET", "/v1/hello").status_code == 200, 10,
                         "the relay to free the closed connection's place")
    finally:
        for sock in held:
            sock.close()
        r.stop()


def test_size_limits(harness, local_relay):
    r = local_relay
    harness.publish_file(b"ok\n")
    lease = _lease_one(r)
    body = json.loads(base64.b64decode(lease["body_b64"]))
    base, key = body["host"], body["secretKey"]
    dataset = "ds-" + harness.queue
    # A chunked upload (no Content-Length) is cut off at --max-upload too.
    chunks = (b"x" * 50000 for _ in range(4))
    big = requests.post(f"{base}api/uploadToDataset/{dataset}", params={"key": key}, data=chunks,
                        headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert big.status_code == 413 and "limit" in big.json()["error"], big.text
    assert harness.standin.records(kind="upload") == []
    # The work API's JSON limit holds with any Content-Length, and oversized headers are refused.
    exact = r.call("POST", "/v1/status", data=b" " * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert exact.status_code == 413
    assert r.call("POST", "/v1/status", {"items": []}).status_code == 202  # the limit is not the default
    huge = r.call("GET", "/v1/hello", headers={"X-Filler": "y" * 20000})
    assert huge.status_code == 400
    long_line = r.call("GET", "/v1/hello?" + "z" * 70000)
    assert long_line.status_code in (400, 414)
    assert r.call("POST", "/v1/release", {"lease_id": lease["lease_id"]}).status_code == 200


def test_300_agents_long_polling_at_once_each_get_one_lease(harness, local_relay):
    import asyncio

    import aiohttp

    r = local_relay
    n = 300
    auth = {"Authorization": f"Bearer {r.token}"}

    async def one(i: int, session: aiohttp.ClientSession) -> str:
        async with session.post(r.url + "/v1/lease", json={"agent": f"a{i}", "max": 1, "wait": 25}) as resp:
            assert resp.status == 200, await resp.text()
            leases = (await resp.json())["leases"]
        assert len(leases) == 1
        lease_id = leases[0]["lease_id"]
        async with session.post(r.url + "/v1/complete", json={"lease_ids": [lease_id]}) as resp:
            assert (await resp.json())["done"] == [lease_id]
        return lease_id

    async def main() -> list[str]:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector, headers=auth) as session:
            polls = [asyncio.ensure_future(one(i, session)) for i in range(n)]
            await asyncio.sleep(2.0)  # every agent is waiting on its own connection now
            assert not any(p.done() for p in polls)
            await asyncio.get_running_loop().run_in_executor(None, publish_all)
            return await asyncio.wait_for(asyncio.gather(*polls), 90)

    def publish_all() -> None:
        for i in range(n):
            harness.publish({"id": f"f{i}", "host": harness.standin.url, "secretKey": harness.key})

    got = asyncio.run(main())
    assert len(set(got)) == n
    harness.wait_for(lambda: harness.depth() == 0, 10, "the queue to be empty")
    assert r.call("POST", "/v1/lease", {"agent": "late", "max": 1, "wait": 0}).json()["leases"] == []


def test_expect_100_continue_is_answered_only_within_the_limits(harness, local_relay):
    r = local_relay
    body = b'{"items": []}'
    head = (f"POST /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {r.token}\r\n"
            f"Content-Type: application/json\r\nExpect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 202")
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {2 << 20}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")  # refused before the body is sent
