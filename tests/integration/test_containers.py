"""Extractor processes inside a container image, for real: Charliecloud (ch-run) and the test image.

The image (scripts/build_test_image.sh) is Debian bookworm from mmdebstrap with pyclowder 3.0.8 from
PyPI and tests/plugins/container_probe in pyclowder's layout under /extractor. The probe uploads
what it sees (interpreter, /etc/os-release, pyclowder, PROBE_* variables), so each test checks
in Clowder's metadata that the extractor really ran inside the image with the variables it was
given, not only that a job ended DONE.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from helpers.agent_harness import TEST_PLUGINS, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

IMAGE_OS = "Debian GNU/Linux 12 (bookworm)"
IMAGE_MARKER = "clowder-hpc-agent test image (mmdebstrap bookworm, pyclowder 3.0.8)"


def _config(tmp_path, plugins: dict, **settings) -> str:
    """The agent's YAML settings file (AGENT_CONFIG) with this `plugins:` table."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(dict(settings, plugins=plugins), default_flow_style=False))
    return str(path)


def _probe_metadata(harness, file_id: str) -> dict:
    records = harness.standin.metadata_for(file_id)
    assert len(records) == 1, harness.log_text()
    return records[0]["content"]


def test_folder_plugin_runs_in_the_image_with_its_env(harness, charliecloud, tmp_path):
    config = _config(tmp_path, {"test.container.probe": {
        "container": {"runtime": "charliecloud", "image": charliecloud},
        "env": {"PROBE_SITE": "from the plugins table", "PROBE_OVERRIDDEN": "site value"}}},
        work_dir=str(tmp_path / "work"))
    ids = [harness.publish_file(b"one two three\n", name=f"f{i}.txt") for i in range(2)]
    code = harness.run_agent("--plugin", "test.container.probe", "--idle-exit", "2", "--slots", "2",
                             AGENT_CONFIG=config, AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             PROBE_AGENT_ENV="from the agent's environment")
    assert code == 0, harness.log_text()
    for fid in ids:
        content = _probe_metadata(harness, fid)
        assert content["image_marker"] == IMAGE_MARKER  # a file only the image has
        assert content["os"] == IMAGE_OS
        assert content["python"] == "/usr/bin/python3" and content["pyclowder"] == "3.0.8"
        assert content["cwd"] == os.path.join(TEST_PLUGINS, "container_probe")  # bound at the same path
        assert content["words"] == 3
        assert content["env"]["PROBE_SITE"] == "from the plugins table"
        assert content["env"]["PROBE_OVERRIDDEN"] == "site value"  # over the image's ENV default
        assert content["env"]["PROBE_IMAGE_DEFAULT"] == "from the image ENV"
        assert content["env"]["PROBE_AGENT_ENV"] == "from the agent's environment"
    done = [s for s in harness.statuses() if s["status"].startswith("StatusMessage.done")]
    assert len(done) == 2 and harness.depth() == 0 and harness.errors() == []
    assert "extractor processes run in charliecloud image" in harness.log_text()


def test_image_only_plugin_with_stage_ahead(harness, charliecloud, tmp_path):
    """The plugin is only the image (/extractor in pyclowder's layout); its files are staged ahead by the
    agent into the work folder, which the extractor reads at the same path inside."""
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    work = str(tmp_path / "work")
    config = _config(tmp_path, {"probe-image": {"container": {"runtime": "charliecloud", "image": charliecloud},
                                                "env": {"PROBE_OVERRIDDEN": "site value"}}},
                     work_dir=work, stage_ahead=True)
    fid = harness.publish_file(b"a b c d\n")
    code = harness.run_agent("--plugin", "probe-image", "--idle-exit", "2", AGENT_CONFIG=config,
                             AGENT_PLUGIN_PATH=str(empty))
    assert code == 0, harness.log_text()
    content = _probe_metadata(harness, fid)
    assert content["image_marker"] == IMAGE_MARKER and content["cwd"] == "/extractor" and content["words"] == 4
    assert content["input"].startswith(os.path.join(work, "agent-stage-")), content["input"]
    assert content["env"]["PROBE_IMAGE_DEFAULT"] == "from the image ENV"  # the image's ENV: a default
    assert content["env"]["PROBE_OVERRIDDEN"] == "site value"  # ... that the plugins table overrides
    assert harness.errors() == [] and harness.depth() == 0


def test_crash_and_time_limit_inside_the_container_cost_one_attempt(harness, charliecloud, tmp_path):
    config = _config(tmp_path, {"test.container.probe": {
        "container": {"runtime": "charliecloud", "image": charliecloud}, "time_limit": 3, "max_retries": 0}})
    crash = harness.publish_file(b"crash\n", name="crash.txt")
    slow = harness.publish_file(b"sleep 60\n", name="slow.txt")
    good = harness.publish_file(b"fine words\n", name="good.txt")
    code = harness.run_agent("--plugin", "test.container.probe", "--idle-exit", "3", AGENT_CONFIG=config,
                             AGENT_PLUGIN_PATH=TEST_PLUGINS, timeout=180)
    assert code == 0, harness.log_text()
    assert _probe_metadata(harness, good)["words"] == 2  # the agent carried on after both
    assert harness.standin.metadata_for(crash) == [] and harness.standin.metadata_for(slow) == []
    dead = {json.loads(body)["id"]: props.headers for props, body in harness.errors()}
    assert set(dead) == {crash, slow}, harness.log_text()
    assert dead[crash]["x-agent-attempts"] == 1 and dead[slow]["x-agent-attempts"] == 1
    assert "time limit of 3s exceeded" in dead[slow]["x-error-reason"]
    assert harness.depth() == 0


# -- under MPI ---------------------------------------------------------------------------------------
@pytest.fixture
def mpi_harness(rabbitmq, mpi, amqp_queue, tmp_path):
    from helpers.mpi_harness import mpi_harness as running

    with running(rabbitmq, mpi, amqp_queue, tmp_path) as h:
        yield h


@pytest.mark.mpi
def test_mpi_ranks_run_their_extractors_in_the_image(mpi_harness, charliecloud, tmp_path):
    h = mpi_harness
    config = _config(tmp_path, {"test.container.probe": {
        "container": {"runtime": "charliecloud", "image": charliecloud}, "env": {"PROBE_SITE": "mpi"}}},
        work_dir=str(tmp_path / "work"), stage_ahead=True)
    ids = [h.publish_file(f"file {i} words\n".encode(), name=f"m{i}.txt") for i in range(4)]
    proc = h.start_mpi(2, "--plugin", "test.container.probe", "--idle-exit", "2", AGENT_CONFIG=config,
                       AGENT_PLUGIN_PATH=TEST_PLUGINS)
    assert h.wait_exit(proc, 300) == 0, h.log_text()
    assert h.unprocessed(ids) == [] and h.depth() == 0 and h.errors() == []
    for fid in ids:
        content = h.standin.metadata_for(fid)[0]["content"]
        assert content["image_marker"] == IMAGE_MARKER and content["env"]["PROBE_SITE"] == "mpi"
        assert content["words"] == 3
    assert h.log_text().count("extractor processes run in charliecloud image") == 2  # every rank
