"""The agent against a real RabbitMQ and the Clowder stand-in: processing, failures, bad input."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from helpers.agent_harness import AgentHarness, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration



def _by_file(statuses):
    out = {}
    for s in statuses:
        out.setdefault(s["file_id"], []).append(s["status"])
    return out


@pytest.mark.parametrize("internals", ["1", "0"])
def test_v1_messages_with_unchanged_wordcount(harness, internals):
    # AGENT_AMQP_INTERNALS=0: pika's public API only (slots on threads), the path the benchmark compares.
    ids = [harness.publish_file(b"one two three\nfour\n", name=f"w{i}.txt") for i in range(5)]
    code = harness.run_agent("--plugin", "ncsa.wordcount.hpc", "--idle-exit", "2", "--slots", "2",
                             AGENT_AMQP_INTERNALS=internals)
    assert code == 0, harness.log_text()
    for fid in ids:
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1
        assert md[0]["content"] == {"lines": 2, "words": 4, "characters": 19}
        assert md[0]["attachedTo"] == {"resourceType": "file", "id": fid}
    statuses = _by_file(harness.statuses())
    for fid in ids:
        assert statuses[fid][0].startswith("StatusMessage.start")
        assert statuses[fid][-1] == "StatusMessage.done: Done processing."
    assert harness.depth() == 0 and harness.errors() == []


def test_v1_status_carries_correlation_id_and_job_id(harness):
    fid = harness.add_file(b"ok\n")
    harness.publish(harness.v1_body(fid))
    assert harness.run_agent("--idle-exit", "2") == 0
    msgs = harness.drain(harness.reply_queue)
    assert msgs, harness.log_text()
    for props, body in msgs:
        payload = json.loads(body)
        assert props.correlation_id  # the same id the request carried
        assert payload["job_id"] == "job-" + fid and payload["file_id"] == fid
        assert payload["extractor_id"] == harness.queue


def test_v2_messages(harness):
    ids = [harness.publish_file(b"ok v2\n", v2=True) for _ in range(3)]
    code = harness.run_agent("--idle-exit", "2", CLOWDER_VERSION="2")
    assert code == 0, harness.log_text()
    for fid in ids:
        recs = harness.standin.records(kind="metadata", file_id=fid)
        assert len(recs) == 1 and recs[0]["api"] == "v2"
        assert recs[0]["body"]["content"]["directive"] == "ok"
    statuses = harness.statuses()
    done = [s for s in statuses if s["status"].startswith("StatusMessage.done")]
    assert sorted(s["job_id"] for s in done) == sorted("job-" + f for f in ids)
    for s in statuses:  # Clowder v2 parses start as %Y-%m-%dT%H:%M:%S%z
        time.strptime(s["start"][:19], "%Y-%m-%dT%H:%M:%S")


def test_bad_input_is_dead_lettered_with_reasons_and_agent_carries_on(harness):
    harness.publish(None, raw=b"\xff\xfe not json")
    harness.publish(None, raw=b"[1, 2, 3]")
    harness.publish({"host": harness.standin.url, "secretKey": "secret"})                 # no id
    harness.publish({"id": 42, "host": harness.standin.url, "secretKey": "secret"})       # id not a string
    harness.publish({"id": "abc", "host": "ftp://nowhere", "secretKey": "secret"})         # host not http
    harness.publish(harness.v1_body("no-such-file"))                                     # Clowder answers 404
    good = harness.publish_file(b"ok\n")
    code = harness.run_agent("--idle-exit", "2", AGENT_MAX_RETRIES="5")
    assert code == 0, harness.log_text()
    assert len(harness.standin.metadata_for(good)) == 1
    errors = harness.errors()
    reasons = [props.headers["x-error-reason"] for props, _ in errors]
    assert len(errors) == 6, reasons
    assert any("not JSON" in r for r in reasons)
    assert any("not an object" in r for r in reasons)
    assert any("missing field 'id'" in r for r in reasons)
    assert any("'id' must be a string" in r for r in reasons)
    assert any("'host'" in r for r in reasons)
    assert any("404" in r for r in reasons), reasons
    assert errors[0][1] == b"\xff\xfe not json"  # body unchanged
    assert "secret" not in "".join(reasons)
    # A 404 never fixes itself: no retries were spent on it.
    assert [r for r in reasons if "404" in r] and all(p.headers["x-agent-attempts"] == 1
                                                      for p, _ in errors if "404" in p.headers["x-error-reason"])


def test_transient_clowder_5xx_is_retried(harness):
    fid = harness.publish_file(b"ok\n")
    harness.standin.fail_next(3, status=503, route_contains="metadata.jsonld")
    assert harness.run_agent("--idle-exit", "2") == 0, harness.log_text()
    assert len(harness.standin.metadata_for(fid)) == 1
    assert harness.errors() == []


def test_failure_retried_then_succeeds(harness, tmp_path):
    fid = harness.publish_file(f"raise-once {tmp_path / 'marker'}\n".encode())
    assert harness.run_agent("--idle-exit", "3") == 0
    assert len(harness.standin.metadata_for(fid)) == 1
    assert [r[2] for r in harness.runs()] == ["raise-once", "raise-once"]
    statuses = [s["status"] for s in harness.statuses()]
    assert any(s.startswith("StatusMessage.retry") for s in statuses)
    assert statuses[-1].startswith("StatusMessage.done")


@pytest.mark.parametrize("verb", ["raise", "crash", "segv", "exit"])
def test_poison_is_bounded_then_dead_lettered(harness, verb):
    poison = harness.publish_file(f"{verb}\n".encode())
    good = harness.publish_file(b"ok\n")
    code = harness.run_agent("--idle-exit", "3", AGENT_MAX_RETRIES="2")
    assert code == 0, harness.log_text()
    assert len(harness.standin.metadata_for(good)) == 1
    assert [r[0] for r in harness.runs()].count(poison) == 3  # first attempt + 2 retries
    errors = harness.errors()
    assert len(errors) == 1
    props, body = errors[0]
    assert json.loads(body)["id"] == poison
    assert props.headers["x-agent-attempts"] == 3
    assert "gave up after 3 attempt(s)" in props.headers["x-error-reason"]
    statuses = [s["status"] for s in harness.statuses() if s["file_id"] == poison]
    assert statuses[-1].startswith("StatusMessage.error")


def test_abort_is_not_retried(harness):
    poison = harness.publish_file(b"abort\n")
    assert harness.run_agent("--idle-exit", "2") == 0
    errors = harness.errors()
    assert len(errors) == 1 and "directive says abort" in errors[0][0].headers["x-error-reason"]
    assert len(harness.runs()) == 1 and harness.runs()[0][0] == poison


def test_printing_extractor_does_not_corrupt_the_pipe(harness):
    fid = harness.publish_file(b"print\n")
    assert harness.run_agent("--idle-exit", "2") == 0
    assert len(harness.standin.metadata_for(fid)) == 1
    assert "hello from an extractor that prints" in harness.log_text()


def test_max_messages_leaves_the_rest_in_the_queue(harness):
    ids = [harness.publish_file(b"ok\n") for _ in range(5)]
    assert harness.run_agent("--max-messages", "2") == 0
    done = [f for f in ids if harness.standin.metadata_for(f)]
    assert len(done) == 2
    harness.wait_for(lambda: harness.depth() == 3, 10, "3 messages back in the queue")


def test_sigterm_hands_back_in_flight_work_without_counting_a_failure(harness):
    fid = harness.publish_file(b"sleep 60\n")
    proc = harness.start_agent(AGENT_STOP_GRACE="1")
    harness.wait_for(lambda: harness.runs(), 30, "extraction to start")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, harness.log_text()
    assert time.monotonic() - t0 < 10
    harness.wait_for(lambda: harness.depth() == 1, 10, "message back in the queue")
    method, props, body = harness.ch.basic_get(harness.queue, auto_ack=True)
    assert json.loads(body)["id"] == fid
    assert not (props.headers or {}).get("x-agent-attempts")  # handing back is not a failure
    assert harness.errors() == []


def test_kill_9_mid_extraction_loses_nothing(harness):
    fid = harness.publish_file(b"sleep 4\n")
    first = harness.start_agent()
    harness.wait_for(lambda: harness.runs(), 30, "extraction to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert harness.run_agent("--idle-exit", "3") == 0, harness.log_text()
    assert len(harness.standin.metadata_for(fid)) == 1
    assert [r[0] for r in harness.runs()] == [fid, fid]


def test_kill_9_after_journaling_is_recovered_from_the_journal(harness):
    fid = harness.publish_file(b"sleep 6\n")
    first = harness.start_agent(AGENT_JOURNAL_AFTER="1")
    harness.wait_for(lambda: "journaled and acknowledged" in harness.log_text(), 30, "journaling")
    assert harness.depth() == 0  # acknowledged: the journal holds the only copy now
    first.kill()  # kill -9 of the agent alone; its extractor process dies with it
    first.wait()
    assert harness.run_agent("--idle-exit", "4") == 0, harness.log_text()
    assert len(harness.standin.metadata_for(fid)) >= 1
    assert "journaled by agents that died" in harness.log_text()
    assert not any(name.endswith(".msg.json") for _, _, names in os.walk(harness.journal_dir) for name in names)


def test_secrets_never_reach_the_log(harness):
    harness.publish(harness.v1_body("missing-file"))  # the 404 URL carries ?key=
    harness.publish_file(b"raise\n")
    assert harness.run_agent("--idle-exit", "2", AGENT_MAX_RETRIES="0", AGENT_LOG_LEVEL="DEBUG") == 0
    text = harness.log_text()
    assert "404" in text
    assert "key=secret" not in text and '"secret"' not in text
    for props, _ in harness.errors():
        assert "key=secret" not in props.headers["x-error-reason"] + props.headers["x-error-traceback"]
    for s in harness.statuses():
        assert "key=secret" not in s["status"]


def test_time_limit_kills_a_hung_extractor_and_counts_an_attempt(harness):
    fid = harness.publish_file(b"sleep 300\n")
    good = harness.publish_file(b"ok\n")
    assert harness.run_agent("--idle-exit", "2", AGENT_TIME_LIMIT="2", AGENT_MAX_RETRIES="1") == 0
    assert len(harness.standin.metadata_for(good)) == 1
    errors = harness.errors()
    assert len(errors) == 1 and json.loads(errors[0][1])["id"] == fid
    assert "time limit of 2s exceeded" in errors[0][0].headers["x-error-reason"]
    assert errors[0][0].headers["x-agent-attempts"] == 2


def test_memory_limit_kills_a_hog(harness):
    fid = harness.publish_file(b"leak 300\n")
    assert harness.run_agent("--idle-exit", "2", AGENT_MEMORY_LIMIT="150", AGENT_MAX_RETRIES="0") == 0
    errors = harness.errors()
    assert len(errors) == 1 and json.loads(errors[0][1])["id"] == fid
    assert "memory limit of 150 MB exceeded" in errors[0][0].headers["x-error-reason"]


def test_extractor_process_is_recycled_after_n_files(harness):
    ids = [harness.publish_file(b"ok\n") for _ in range(4)]
    assert harness.run_agent("--idle-exit", "2", AGENT_RECYCLE_AFTER="2") == 0
    assert all(harness.standin.metadata_for(f) for f in ids)
    assert len({pid for _, pid, _ in harness.runs()}) == 2


def test_file_larger_than_scratch_is_handed_back_and_the_agent_stops(harness):
    fid = harness.add_file(b"ok\n")
    harness.publish(harness.v1_body(fid, fileSize=str(10 ** 18)))
    assert harness.run_agent("--idle-exit", "5") == 6  # exitcodes.NO_SCRATCH
    assert harness.runs() == [] and harness.errors() == []
    harness.wait_for(lambda: harness.depth() == 1, 10, "the message back in the queue")
    _method, props, _body = harness.ch.basic_get(harness.queue, auto_ack=True)
    assert not (props.headers or {}).get("x-agent-attempts")
    assert "scratch space" in harness.log_text()


def test_clowder_down_for_a_while_does_not_spend_attempts(harness):
    fid = harness.publish_file(b"ok\n")
    harness.standin.fail_next(12, status=502, route_contains="metadata.jsonld")  # three rounds of retries
    assert harness.run_agent("--idle-exit", "3", AGENT_MAX_RETRIES="0") == 0, harness.log_text()
    assert len(harness.standin.metadata_for(fid)) == 1
    assert harness.errors() == []
    assert "deferred" in harness.log_text()


def test_download_cut_mid_file_is_retried_not_handed_over_truncated(harness):
    fid = harness.publish_file(b"ok " + b"x" * 200000 + b"\n")
    harness.standin.drop_next(2, route_contains=f"api/files/{fid}")
    assert harness.run_agent("--idle-exit", "3", AGENT_MAX_RETRIES="0") == 0, harness.log_text()
    md = harness.standin.metadata_for(fid)
    assert len(md) == 1 and md[0]["content"]["bytes"] == 200004  # the whole file, never a prefix
    assert harness.errors() == []
