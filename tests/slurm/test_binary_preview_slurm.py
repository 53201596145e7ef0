"""README's "Deploying Clowder's own extractors", step 5, on the real single-node Slurm.

The binary-preview-shaped extractor of tests/data/extractors/site-image-preview, its compose settings in agent.yaml's `plugins:`
table, submitted with `AGENT_CONFIG=... sbatch pbs/agent_array.slurm` (the broker URI only in the
private env file): every image gets its thumbnail and preview.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers.agent_harness import REPO, harness  # noqa: F401 (fixture)
from helpers.services import require_imagemagick
from helpers.slurm_jobs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.xdist_group("slurm-cpus"),
              pytest.mark.usefixtures("slurm")]
EXTRACTORS = os.path.join(REPO, "tests", "data", "extractors")
CONFIG = """plugin: site.image.preview
plugins:
  site.image.preview:
    env:
      IMAGE_BINARY: {convert}
      IMAGE_TYPE: png
      IMAGE_THUMBNAIL_COMMAND: "@BINARY@ @INPUT@[0] -auto-orient -resize 225^ @OUTPUT@"
      IMAGE_PREVIEW_COMMAND: "@BINARY@ @INPUT@[0] -auto-orient -resize 800x600 @OUTPUT@"
"""


def _state(job: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"JobState=(\S+) .*ExitCode=(\S+)", out)
    return f"{match.group(1)} {match.group(2)}" if match else "?"


def test_sbatch_runs_the_image_preview_configured_in_the_plugins_table(harness, tmp_path):
    convert = require_imagemagick()
    ids = []
    for i in range(4):
        image = tmp_path / f"img{i}.png"
        subprocess.run([convert, "-size", f"{50 + i}x40", f"gradient:#{i:02x}0000-#0000ff", str(image)],
                       check=True, capture_output=True, timeout=60)
        fid = harness.add_file(image.read_bytes(), image.name)
        harness.publish(harness.v1_body(fid, image.name, routing_key="clowder.file.image.png"))
        ids.append(fid)
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG.format(convert=convert))
    env_file = tmp_path / "agent.env"
    env_file.write_text(f"RABBITMQ_URI={harness.url}\n")
    env_file.chmod(0o600)
    env = harness.env(AGENT_CONFIG=str(config), AGENT_PLUGIN_PATH=EXTRACTORS, AGENT_ENV_FILE=str(env_file),
                      AGENT_LOG_DIR=str(tmp_path / "logs"), AGENT_IDLE_EXIT="3")
    for name in ("RABBITMQ_URI", "AGENT_PLUGIN"):  # the URI from the env file, the plugin from agent.yaml
        del env[name]
    out = subprocess.run(["sbatch", "--array=1", "-o", str(tmp_path / "job-%A_%a.out"), "pbs/agent_array.slurm"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = re.search(r"(\d+)", out.stdout).group(1)
    try:
        finished = wait_for(lambda: _state(job).split()[0] not in ("?", "PENDING", "RUNNING", "CONFIGURING",
                                                                   "COMPLETING"), timeout=180, step=1)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").iterdir()) if (tmp_path / "logs").exists() else ""
    assert finished and _state(job) == "COMPLETED 0:0", f"{_state(job)}\n{logs}"
    for fid in ids:
        thumbs = harness.standin.records(kind="thumbnail", file_id=fid)
        previews = harness.standin.records(kind="preview", file_id=fid)
        assert len(thumbs) == 1 and len(previews) == 1, logs
        assert thumbs[0]["body"]["filename"].endswith(".png") and previews[0]["body"]["size"] > 0
    assert harness.depth() == 0 and harness.errors() == []
    assert "plugin site.image.preview" in logs and harness.url not in logs
