"""Logging for the agent: one format, the task's identity on every line, secrets masked."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from hpc_common.redact import Redactor


class _RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, redactor: Redactor) -> None:
        super().__init__(fmt)
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor(super().format(record))


def setup_logging(level: str, redactor: Redactor, identity: str = "", log_file: Optional[str] = None) -> None:
    """Send all log records (the extractor's included) through one redacting handler."""
    ident = f" [{identity}]" if identity else ""
    fmt = f"%(asctime)s %(levelname)s{ident} %(name)s: %(message)s"
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(fmt, redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("urllib3").setLevel(logging.WARNING)
