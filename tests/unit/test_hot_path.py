"""The per-file hot path's shortcuts keep their guarantees: wake-ups, memoised masking, status order."""
import threading
from unittest import mock

from agent.config import AgentConfig
from agent.runner import Runner
from hpc_common.redact import Redactor


class _IdleSlot:
    busy_with = None


def _runner():
    posts = []
    source = mock.MagicMock(connected=True, agent_id="agent-x", queue="q")

    def make_slot(_index, post, _on_frame):
        posts.append(post)
        return _IdleSlot()

    return Runner(AgentConfig(), source, make_slot, Redactor()), source, posts[0]


def test_one_wake_per_batch_and_none_for_quiet_posts():
    runner, source, post = _runner()
    ran = []
    post.quiet(lambda: ran.append("status"))
    assert source.wake.call_count == 0          # a status waits for the next turn
    post(lambda: ran.append("done 1"))
    post(lambda: ran.append("done 2"))
    assert source.wake.call_count == 1          # one wake-up for what is queued before the drain
    runner._drain_calls()
    assert ran == ["status", "done 1", "done 2"]  # in the order posted
    post(lambda: ran.append("done 3"))
    assert source.wake.call_count == 2          # after a drain the next post wakes again
    runner._drain_calls()
    assert ran[-1] == "done 3"


def test_posts_from_threads_are_never_left_undrained():
    runner, source, post = _runner()
    ran = []
    lock = threading.Lock()

    def add(i):
        with lock:
            ran.append(i)

    def producer(base):
        for i in range(2000):
            post(lambda i=base + i: add(i))

    threads = [threading.Thread(target=producer, args=(k * 10000,)) for k in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        runner._drain_calls()
    for t in threads:
        t.join()
    # whatever is still queued must have a wake-up pending, so the main loop's poll returns
    assert runner._calls.empty() or runner._wake_due
    runner._drain_calls()
    assert len(ran) == 6000


def test_memoised_redaction_learns_new_secrets():
    r = Redactor()
    line = "upload failed for token-1234567"
    assert r(line) == line                     # not a secret yet, and now remembered
    r.add("token-1234567")
    assert "token-1234567" not in r(line)      # a new literal forgets what was remembered
    assert r("GET /x?key=abcdef") == r("GET /x?key=abcdef") == "GET /x?key=***"
    long_line = "x" * 500 + " key=1"
    assert r(long_line) == long_line and long_line not in r._memo
