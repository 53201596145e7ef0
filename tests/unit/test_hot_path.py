"""The per-file hot path's shortcuts keep their guarantees: memoised masking (the event loop's wake-ups:
test_event_loop)."""
from hpc_common.redact import Redactor


def test_memoised_redaction_learns_new_secrets():
    r = Redactor()
    line = "upload failed for token-1234567"
    assert r(line) == line                     # not a secret yet, and now remembered
    r.add("token-1234567")
    assert "token-1234567" not in r(line)      # a new literal forgets what was remembered
    assert r("GET /x?key=abcdef") == r("GET /x?key=abcdef") == "GET /x?key=***"
    long_line = "x" * 500 + " key=1"
    assert r(long_line) == long_line and long_line not in r._memo
