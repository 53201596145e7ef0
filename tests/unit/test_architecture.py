"""The layer rules (.importlinter) hold, checked by import-linter, and one walltime parser exists."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), f"{lint} missing: pip install -e '.[test]'"
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's packages, not an installed copy
    done = subprocess.run([str(lint), "--no-cache", str(REPO / ".importlinter")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_one_parse_walltime_in_the_product():
    found = [str(path.relative_to(REPO)) for package in ("agent", "launcher", "hpc_common")
             for path in (REPO / package).rglob("*.py")
             if re.search(r"^\s*def parse_walltime\b", path.read_text(encoding="utf-8"), re.M)]
    assert found == ["hpc_common/walltime.py"]
