"""The launcher's log lines: one per event, a level the journal reads, secrets redacted."""
import logging

from launcher.logfmt import OneLineFormatter


def _record(level, msg, exc=False):
    exc_info = None
    if exc:
        try:
            raise RuntimeError("broker at amqp://user:hunter2@host/ went away")
        except RuntimeError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord("launcher", level, __file__, 1, msg, (), exc_info)


def test_journal_lines_carry_a_syslog_priority_and_one_line():
    fmt = OneLineFormatter("launcher", journal=True)
    line = fmt.format(_record(logging.WARNING, "scheduler query failed\nsecond line", exc=True))
    assert line.startswith("<4>WARNING scheduler query failed | second line | Traceback")
    assert "\n" not in line and "hunter2" not in line
    assert fmt.format(_record(logging.ERROR, "x")).startswith("<3>ERROR ")
    assert fmt.format(_record(logging.INFO, "x")).startswith("<6>INFO ")


def test_terminal_lines_have_time_name_and_level():
    line = OneLineFormatter("launcher", journal=False).format(_record(logging.INFO, "submitted 42"))
    parts = line.split(" ")
    assert parts[2:5] == ["launcher", "INFO", "submitted"], line
