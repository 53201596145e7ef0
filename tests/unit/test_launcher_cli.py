"""CLI settings: flag > environment > default; clear errors; redaction in logs."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import cli
from hpc_common.redact import redact_text, redact_uri

REPO = Path(__file__).resolve().parents[2]


def args(*argv):
    return cli.parser().parse_args(list(argv))


def test_flag_beats_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "env"))
    assert cli._state_dir(args("status", "--state-dir", str(tmp_path / "flag"))) == tmp_path / "flag"
    assert cli._state_dir(args("--state-dir", str(tmp_path / "flag"), "status")) == tmp_path / "flag"
    assert cli._state_dir(args("status")) == tmp_path / "env"
    monkeypatch.delenv("LAUNCHER_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert cli._state_dir(args("status")) == tmp_path / "xdg" / "clowder-launcher"


def test_scheduler_flag_and_env(monkeypatch):
    monkeypatch.setenv("LAUNCHER_SCHEDULER", "torque")
    assert cli._scheduler_name(args("status", "--scheduler", "pbs"), None) == "pbs"
    assert cli._scheduler_name(args("status"), None) == "torque"


def test_missing_caps_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("LAUNCHER_CAPS", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CAPS", tmp_path / "none.yaml")
    with pytest.raises(cli.ConfigError, match="pass --caps FILE or set LAUNCHER_CAPS"):
        cli._caps_path(args("status"))


def test_cli_exit_code_for_config_error(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LAUNCHER_CAPS": str(tmp_path / "nope.yaml"),
           "LAUNCHER_STATE_DIR": str(tmp_path / "s"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "submit", "--tasks", "1"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("launcher: error: caps file")


def test_cancel_refuses_a_job_it_did_not_submit(tmp_path):
    caps = tmp_path / "caps.yaml"
    caps.write_text('max_array_size: 1\nmax_running: 1\nmax_queued: 1\nmax_walltime: "01:00:00"\n')
    caps.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "LAUNCHER_CAPS": str(caps), "LAUNCHER_SCHEDULER": "slurm",
           "LAUNCHER_STATE_DIR": str(tmp_path / "s"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "cancel", "4242"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "was not submitted by this launcher" in proc.stderr


@pytest.mark.parametrize("uri,shown", [
    ("amqp://clowder:s3cr%2Ft@mq.example.org:5671/prod", "amqp://clowder:***@mq.example.org:5671/prod"),
    ("amqps://u:p@h/", "amqps://u:***@h/"),
    ("amqp://h/", "amqp://h/"),
])
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_text(f"cannot connect to {uri} now") == f"cannot connect to {shown} now"


def test_log_lines_are_redacted(caplog):
    handler_filter = cli._RedactFilter()
    record = logging.LogRecord("launcher", logging.ERROR, __file__, 1, "broker %s down",
                               ("amqp://u:hunter2@h/",), None)
    handler_filter.filter(record)
    assert record.getMessage() == "broker amqp://u:***@h/ down"
