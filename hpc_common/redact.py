"""Scrubbing secrets (Clowder keys, broker passwords) out of any text that leaves the process.

Everything the agent and the launcher write to a log, a message header or a status message passes through
a Redactor: pattern rules catch the shapes secrets take in URLs and JSON, and the literal
set catches keys the agent has seen in messages wherever else they turn up.
"""
from __future__ import annotations

import re
import threading
from typing import Iterable

MASK = "***"
_MEMO_SIZE = 256   # distinct short texts remembered
_MEMO_TEXT = 200   # longer texts (log lines with ids and times) rarely repeat

_PATTERNS = [
    # amqp://user:password@host -> amqp://user:***@host (also http basic auth in URLs)
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/\s@]+:)[^@\s/]+@"), r"\1" + MASK + "@"),
    # ?key=... / &key=... (Clowder v1 auth) and similar query parameters
    (re.compile(r"([?&;](?:key|secretKey|secret_key|token|password)=)[^&\s'\"#]+", re.I), r"\1" + MASK),
    # "secretKey": "..." in JSON or Python reprs
    (re.compile(r"""((?:["'])(?:secretKey|secret_key|password|X-API-KEY|X-API-Key)(?:["'])\s*:\s*["'])[^"']*""", re.I),
     r"\1" + MASK),
    # X-API-KEY: value in header dumps
    (re.compile(r"(X-API-KEY\s*[:=]\s*)\S+", re.I), r"\1" + MASK),
]


class Redactor:
    """Masks secrets in text: known secret shapes plus literal secrets registered at run time."""

    def __init__(self, literals: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._literals: set[str] = set()
        self._literal_re: re.Pattern[str] | None = None
        # Results for short texts seen before (the same status lines come back for every file).
        # Replaced, never cleared in place, when a literal is added: a caller still computing
        # with the old literals then writes into the old dict, which nobody reads any more.
        self._memo: dict[str, str] = {}
        for lit in literals:
            self.add(lit)

    def add(self, secret: str | None) -> None:
        """Remember a literal secret (ignored when too short to be one)."""
        if not secret or not isinstance(secret, str) or len(secret) < 4:
            return
        with self._lock:
            if secret in self._literals:
                return
            # Bound memory on agents that see many distinct keys over days.
            if len(self._literals) > 1000:
                self._literals.clear()
            self._literals.add(secret)
            alts = sorted(self._literals, key=len, reverse=True)
            self._literal_re = re.compile("|".join(re.escape(s) for s in alts))
            self._memo = {}

    def __call__(self, text: str) -> str:
        """Return text with every known secret masked."""
        if not text:
            return text
        memo = self._memo
        done = memo.get(text)
        if done is not None:
            return done
        original = text
        literal_re = self._literal_re
        if literal_re is not None:
            text = literal_re.sub(MASK, text)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        if len(original) <= _MEMO_TEXT:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[original] = text
        return text


def redact_uri(uri: str) -> str:
    """Mask the password of a URI such as amqp://user:pass@host/vhost."""
    return _PATTERNS[0][0].sub(_PATTERNS[0][1], uri)


_SHAPES = Redactor()


def redact_text(text: str) -> str:
    """Mask every secret shape (URI passwords, ?key=..., secretKey values) in free text.

    For callers with no literal secrets to register (the launcher's logs and error lines).
    """
    return _SHAPES(text)
