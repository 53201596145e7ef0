"""`python -m launcher report` after a real run: `launcher submit` on the local Slurm, agents
processing files from the real broker until idle, then the report rendered in headless Chromium.

Fixtures from tests/conftest.py and tests/helpers/agent_harness.py (with CI=true missing services fail).
"""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers.agent_harness import REPO, harness  # noqa: F401 (fixture)
from launcher.ledger import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.usefixtures("slurm"),
              pytest.mark.xdist_group("slurm-cpus")]  # two tasks on the 4-CPU node: see tests/slurm/test_launcher_slurm.py

FILES = 40
CAPS = """\
max_array_size: 4
max_running: 2
max_queued: 4
max_walltime: "00:05:00"
default_walltime: "00:04:00"
cores_per_task: 1
node_hours: {budget: 0.5, period: day}
"""
# bar / area colours the plots use for real data (launcher/report.py)
BLUE, GREEN, ORANGE = (0x31, 0x82, 0xbd), (0x31, 0xa3, 0x54), (0xfd, 0x8d, 0x3c)


def launcher(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pixels_of(path: Path, colour, tolerance=12) -> int:
    img = Image.open(path).convert("RGB")
    return sum(1 for px in img.get_flattened_data() if all(abs(a - b) <= tolerance for a, b in zip(px, colour)))


def cancel_all(state: Path) -> None:
    db = state / "ledger.sqlite"
    if db.exists():
        con = sqlite3.connect(str(db))
        ids = [r[0] for r in con.execute("SELECT job_id FROM submissions WHERE job_id IS NOT NULL")]
        con.close()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture
def run_env(harness, tmp_path):
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    caps.chmod(0o644)
    env = harness.env(LAUNCHER_CAPS=str(caps), LAUNCHER_STATE_DIR=str(tmp_path / "state"), LAUNCHER_SCHEDULER="slurm",
                      AGENT_IDLE_EXIT="6", AGENT_LOG_DIR=str(tmp_path / "logs"))
    yield env
    cancel_all(tmp_path / "state")


def test_report_after_a_real_slurm_run(harness, run_env, tmp_path):
    for i in range(FILES):
        harness.publish_file(f"sleep {0.2 + (i % 5) * 0.15:.2f}\n".encode(), name=f"f{i}.txt")
    sub = launcher(run_env, "submit", "--tasks", "2", "--walltime", "00:04:00")
    assert sub.returncode == 0, sub.stderr
    deadline = time.monotonic() + 300
    tasks = {}
    while time.monotonic() < deadline:
        st = launcher(run_env, "status", "--json")
        assert st.returncode == 0, st.stderr
        tasks = json.loads(st.stdout)["tasks"]
        if not tasks["queued"] and not tasks["running"] and not tasks["missing"]:
            break
        time.sleep(3)
    else:
        pytest.fail(f"the array did not finish: {tasks}")
    assert harness.depth() == 0

    out = tmp_path / "report"
    rep = launcher(run_env, "report", "--out", str(out))
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.strip() == str(out / "index.html")
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 3
    for src in srcs:
        assert "/" not in src and not src.startswith(("http", "data:")), src  # saved next to index.html
        with Image.open(out / src) as img:
            assert img.width >= 400, (src, img.size)
    # The plots show this run, not "no data yet": every file done, durations and task states drawn.
    ledger = Ledger(Path(run_env["LAUNCHER_STATE_DIR"]) / "ledger.sqlite")
    try:
        reports = ledger.agent_reports()
        assert sum(r["done"] for r in reports) == FILES
        assert sum(len(r["durations"]) for r in reports) == FILES
    finally:
        ledger.close()
    assert re.search(rf"<th>files done</th><td>{FILES}</td>", page)
    assert pixels_of(out / "files_per_minute.png", BLUE) > 500
    assert pixels_of(out / "durations.png", GREEN) > 500
    assert pixels_of(out / "tasks_by_state.png", GREEN) > 500  # the completed tasks
    assert pixels_of(out / "utilization.png", ORANGE) > 200
    assert "no data yet" not in page

    shot = render(out / "index.html", tmp_path / "shot.png")
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.width >= 1000
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 200, "the screenshot shows hardly any colours: plots not rendered"
    assert non_white > 0.05 * rgb.width * rgb.height
    for colour in (BLUE, GREEN, ORANGE):  # the plots' own colours reached the screen
        assert pixels_of(shot, colour) > 200, colour


def test_report_with_an_empty_ledger_is_valid(tmp_path):
    caps = tmp_path / "caps.yaml"
    caps.write_text(CAPS)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO, "LAUNCHER_CAPS": str(caps),
           "LAUNCHER_STATE_DIR": str(tmp_path / "state"), "LAUNCHER_SCHEDULER": "slurm", "HOME": str(tmp_path)}
    rep = launcher(env, "report", "--out", str(tmp_path / "r"), "--no-refresh")
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count("<img ") == 5 and "none recorded" in page
    bad = launcher(env, "report", "--out", str(tmp_path / "r"), "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def render(index: Path, shot: Path) -> Path:
    """Headless Chromium screenshot of the report, opened from disk (no server, no network)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (scripts/install.sh installs it)"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2000", f"file://{index}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    return shot
