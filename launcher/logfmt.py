"""Log lines a journal reader understands: one line per event, a level, nothing secret.

Under systemd (``JOURNAL_STREAM`` is set when stderr goes to the journal) each line starts with
the syslog priority ``<N>`` that journald turns into the entry's priority (``journalctl -p
warning`` works) and carries no timestamp (the journal adds its own). Elsewhere it is
``time name LEVEL message``. Tracebacks are folded onto the same line with `` | ``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from hpc_common.redact import redact_text

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class OneLineFormatter(logging.Formatter):
    """Redacted single-line records; syslog priority prefixes when writing to the journal."""

    def __init__(self, name: str, journal: Optional[bool] = None) -> None:
        super().__init__()
        self.name = name
        self.journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        text = " | ".join(line.rstrip() for line in redact_text(text).splitlines() if line.strip())
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.levelname} {text}"
        return f"{self.formatTime(record)} {self.name} {record.levelname} {text}"
