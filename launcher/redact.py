"""Keep secrets out of the launcher's logs and error messages: the agent's rules, in one place."""
from __future__ import annotations

from agent.redact import Redactor, redact_uri

_REDACT = Redactor()


def redact_text(text: str) -> str:
    """Mask every secret shape (URI passwords, ?key=..., secretKey values) found in free text."""
    return _REDACT(text)


__all__ = ["redact_text", "redact_uri"]
