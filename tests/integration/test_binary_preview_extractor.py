"""A production extractor configured as sites configure it, against a real RabbitMQ and the Clowder stand-in.

A preview extractor packaged as Clowder's production binary-preview extractors are
(tests/data/extractors/site-image-preview: its Dockerfile says `ENV IMAGE_BINARY="" IMAGE_TYPE="" ...`,
written for these tests in the same configuration shape) gets its binary and commands from the
agent's environment, as docker-compose's `environment:` gives them, and must make every image's
thumbnail and preview as it does under pyclowder. Two plugins in one agent get their own values
of one variable from the `plugins:` table's `env:`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers.agent_harness import REPO, AgentHarness, harness, second_harness  # noqa: F401 (fixtures)
from helpers.services import require_imagemagick

pytestmark = pytest.mark.integration
EXTRACTORS = os.path.join(REPO, "tests", "data", "extractors")
PREVIEW = "site.image.preview"


def _site_settings(convert: str, **extra: str) -> dict[str, str]:
    """The agent's environment as extractors-core's image preview deployment sets it (compose `environment:`)."""
    return {"IMAGE_BINARY": convert,
            "IMAGE_THUMBNAIL_COMMAND": "@BINARY@ @INPUT@[0] -auto-orient -resize 225^ @OUTPUT@",
            "IMAGE_PREVIEW_COMMAND": "@BINARY@ @INPUT@[0] -auto-orient -resize 800x600 @OUTPUT@", **extra}


def _images(tmp_path, convert: str, count: int) -> list[tuple[str, bytes]]:
    """Small PNG and JPEG files, each different, made with ImageMagick."""
    out = []
    for i in range(count):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        path = tmp_path / name
        subprocess.run([convert, "-size", f"{40 + i}x{30 + i}", f"gradient:#{i:02x}2040-#f0{i:02x}10", str(path)],
                       check=True, capture_output=True, timeout=60)
        out.append((name, path.read_bytes()))
    return out


def _publish_image(h: AgentHarness, name: str, data: bytes) -> str:
    fid = h.add_file(data, name)
    kind = "png" if name.endswith(".png") else "jpeg"
    h.publish(h.v1_body(fid, name, fileSize=str(len(data)), routing_key=f"clowder.file.image.{kind}"))
    return fid


def _uploads(h: AgentHarness, fid: str, kind: str) -> list[dict]:
    """What pyclowder linked to the file (kind "thumbnail" or "preview"), each checked against its upload POST."""
    linked = h.standin.records(kind=kind, file_id=fid)
    uploaded = {r["preview_id"]: r["body"] for r in h.standin.records(kind=f"{kind}_upload")}
    for record in linked:
        upload_id = record["thumbnail_id"] if kind == "thumbnail" else record["preview_id"]
        assert uploaded[upload_id] == record["body"]  # the bytes POSTed are the ones linked to the file
    return [r["body"] for r in linked]


def _statuses_by_file(*hs: AgentHarness) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h in hs:
        for s in h.statuses():
            out.setdefault(s["file_id"], []).append(s["status"])
    return out


def test_binary_preview_takes_its_binary_and_commands_from_the_agents_environment(harness, tmp_path):
    convert = require_imagemagick()
    ids = [_publish_image(harness, name, data) for name, data in _images(tmp_path, convert, 10)]
    code = harness.run_agent("--plugin", PREVIEW, "--idle-exit", "2", "--slots", "2", timeout=300,
                             AGENT_PLUGIN_PATH=EXTRACTORS, RABBITMQ_QUEUE=harness.queue,
                             **_site_settings(convert, IMAGE_TYPE="png"))
    assert code == 0, harness.log_text()
    statuses = _statuses_by_file(harness)
    for fid in ids:
        (thumb,) = _uploads(harness, fid, "thumbnail")
        (preview,) = _uploads(harness, fid, "preview")
        for upload in (thumb, preview):
            assert upload["filename"].endswith(".png") and upload["size"] > 0, upload
        assert thumb["sha256"] != preview["sha256"]  # two commands: 225^ and 800x600
        assert statuses[fid][-1] == "StatusMessage.done: Done processing.", statuses[fid]
        assert "StatusMessage.processing: made the thumbnail as png" in statuses[fid]
        assert "StatusMessage.processing: made the preview as png" in statuses[fid]
    assert harness.depth() == 0 and harness.errors() == []
    # The Dockerfile's RABBITMQ_QUEUE="" is the agent's, never applied over the queue it consumes.
    assert "Dockerfile ENV RABBITMQ_QUEUE not applied" in harness.log_text()


def _named_copy(tmp_path, name: str) -> str:
    """The preview extractor's folder under another extractor name (two plugins in one agent need two names)."""
    folder = tmp_path / "plugins" / name
    shutil.copytree(os.path.join(EXTRACTORS, "site-image-preview"), folder)
    info = json.loads((folder / "extractor_info.json").read_text())
    (folder / "extractor_info.json").write_text(json.dumps(dict(info, name=name)))
    return str(tmp_path / "plugins")


def test_two_plugins_in_one_agent_each_with_its_own_value(harness, second_harness, tmp_path):
    convert = require_imagemagick()
    a, b = "test.preview.png", "test.preview.jpg"
    _named_copy(tmp_path, a)
    path = _named_copy(tmp_path, b)
    table = json.dumps({a: {"rabbitmq_queue": harness.queue, "env": {"IMAGE_TYPE": "png"}},
                        b: {"rabbitmq_queue": second_harness.queue, "env": {"IMAGE_TYPE": "jpg"}}})
    env = dict(_site_settings(convert, IMAGE_TYPE="gif"), AGENT_PLUGIN_PATH=path, AGENT_PLUGINS=table,
               RABBITMQ_QUEUE="")
    images = _images(tmp_path, convert, 6)
    a_ids = [_publish_image(harness, name, data) for name, data in images[:3]]
    b_ids = [_publish_image(second_harness, name, data) for name, data in images[3:]]
    code = harness.run_agent("--plugin", f"{a},{b}", "--idle-exit", "2", timeout=300, **env)
    assert code == 0, harness.log_text()
    statuses = _statuses_by_file(harness, second_harness)
    for ids, h, kind in ((a_ids, harness, "png"), (b_ids, second_harness, "jpg")):
        for fid in ids:
            uploads = _uploads(h, fid, "thumbnail") + _uploads(h, fid, "preview")
            assert len(uploads) == 2 and all(u["filename"].endswith("." + kind) for u in uploads), uploads
            assert f"StatusMessage.processing: made the thumbnail as {kind}" in statuses[fid]
            assert statuses[fid][-1] == "StatusMessage.done: Done processing."
    assert harness.depth() == 0 and second_harness.depth() == 0

    # --show-env says the same, with where each value came from.
    shown = subprocess.run([sys.executable, "-m", "agent", "plugins", "--show-env", b, "--json"], cwd=REPO,
                           env=harness.env(**env), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)["env"]
    assert report["IMAGE_TYPE"] == {"value": "jpg", "source": "plugins table env", "overrides": [
        {"source": "Dockerfile ENV", "value": ""}, {"source": "agent environment", "value": "gif"}]}
    assert report["IMAGE_BINARY"]["source"] == "agent environment"
    assert report["IMAGE_PREVIEW_COMMAND"]["source"] == "agent environment"
    assert report["MAIN_SCRIPT"] == {"value": "command_previews.py", "source": "Dockerfile ENV", "overrides": []}
    assert report["RABBITMQ_QUEUE"] == {"value": second_harness.queue, "source": "set by the agent",
                                        "overrides": []}
    assert "RABBITMQ_URI" not in report
