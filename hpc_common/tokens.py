"""Bearer-token files: the relay reads its token from one, and so do the agents that lease from it."""
from __future__ import annotations

import os
import stat

MIN_TOKEN = 16


class TokenFileError(ValueError):
    """The token file is missing, unreadable, too open (not 0600) or too short."""


def read_token_file(path: str) -> str:
    """Read a bearer token from a file that only its owner can read or write (mode 0600 or 0400)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TokenFileError(f"token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"token file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise TokenFileError(f"token file {path} has mode {mode:04o}: others may read it; run chmod 600 {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"token file {path} cannot be read: {exc.__class__.__name__}") from None
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise TokenFileError(f"token file {path} must hold one token of at least {MIN_TOKEN} characters "
                             "without spaces (e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token
