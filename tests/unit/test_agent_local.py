"""`python -m agent local`: a real extractor process against the loopback Clowder, no services."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGINS = os.path.join(REPO, "tests", "plugins")


def _local(tmp_path, *files: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENT_PLUGIN_PATH=PLUGINS)
    return subprocess.run([sys.executable, "-m", "agent", "local", "--plugin", "directive",
                           "--out", str(tmp_path / "out"), *files],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_local_mode_reports_metadata_tags_previews_and_new_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("outputs\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("abort\n")
    proc = _local(tmp_path, str(good), str(bad))
    assert proc.returncode == 5, proc.stderr  # exitcodes.LOCAL_FAILURES: one file failed
    first = json.loads((tmp_path / "out" / "0001-good.txt.json").read_text())
    assert first["outcome"] == "ok"
    assert [m["content"]["directive"] for m in first["metadata"]] == ["outputs"]
    kinds = sorted(r["kind"] for r in first["uploads"])
    assert kinds == ["preview", "tags"], kinds
    assert [r["body"]["filename"] for r in first["new_files"]] == ["made-by-directive.txt"]
    assert first["new_files"][0]["body"]["size"] == len("new file\n")
    second = json.loads((tmp_path / "out" / "0002-bad.txt.json").read_text())
    assert second["outcome"] != "ok" and second["metadata"] == [] and second["new_files"] == []
    assert any("abort" in s for s in second["statuses"] + [second["reason"]])


def test_local_mode_refuses_a_missing_file_in_one_line(tmp_path):
    proc = _local(tmp_path, str(tmp_path / "nope.txt"))
    assert proc.returncode != 0
    assert "not a file" in proc.stderr and "Traceback" not in proc.stderr
