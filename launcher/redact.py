"""Keep secrets out of logs and error messages."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")


def redact_uri(uri: str) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh`` (anything unparsable: ***)."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "***"


def redact_text(text: str) -> str:
    """Redact every ``scheme://user:password@`` found inside free text."""
    return _URI_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
