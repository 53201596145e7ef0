"""Extractors as Clowder ships them, against a real RabbitMQ and the Clowder stand-in.

Function (simple) extractors named by their Dockerfile, for files and datasets; a plugin with
requirements of its own, prepared into its own venv and run there; a command prefix that changes
the extractor process's world; bad input refused before any message is taken; one case under MPI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from helpers.agent_harness import REPO, TEST_PLUGINS, harness  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def _agent(*args: str, env_dir: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_ENV_DIR=env_dir)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "agent", *args], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _freeze() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


@pytest.fixture(scope="session")
def agent_freeze_before() -> list[str]:
    return _freeze()


@pytest.fixture(scope="session")
def prepared_env_dir(tmp_path_factory, agent_freeze_before) -> str:
    """One prepared environment for tests/plugins/own_env, shared by the tests of this session."""
    env_dir = str(tmp_path_factory.mktemp("plugin-envs"))
    done = _agent("prepare", "--plugin", "test.own.env", env_dir=env_dir)
    assert done.returncode == 0, done.stderr
    assert "test.own.env: environment ready: " + env_dir in done.stdout
    return env_dir


def _plugin_copy(tmp_path, source: str, name: str, **files: str) -> str:
    """A copy of a test plugin under a new extractor name, with files replaced or added."""
    folder = tmp_path / "plugins" / name
    shutil.copytree(os.path.join(TEST_PLUGINS, source), folder)
    info = json.loads((folder / "extractor_info.json").read_text())
    info["name"] = name
    (folder / "extractor_info.json").write_text(json.dumps(info))
    for file_name, text in files.items():
        (folder / file_name.replace("__", ".")).write_text(text)
    return str(tmp_path / "plugins")


# -- function extractors -----------------------------------------------------------------------
def test_function_extractor_named_by_its_dockerfile(harness):
    ids = [harness.publish_file(b"one two three\nfour\n", name=f"t{i}.txt") for i in range(3)]
    code = harness.run_agent("--plugin", "test.simple.wc", "--idle-exit", "2",
                             AGENT_PLUGIN_PATH=TEST_PLUGINS)
    assert code == 0, harness.log_text()
    for fid in ids:
        md = harness.standin.metadata_for(fid)
        assert len(md) == 1, harness.log_text()
        content = md[0]["content"]
        # wc's bytes reach Clowder as text; the Dockerfile's other ENV lines reached the process
        assert (content["lines"], content["words"], content["characters"]) == ("2", "4", "19")
        assert content["greeting"] == "hello from the image"
        assert content["label"] == "hello from the image, again"
        assert content["broker_from_dockerfile"] is False  # the agent's settings are never overridden
        assert harness.standin.records(kind="tags", file_id=fid)[0]["body"] == {"tags": ["counted"]}
    statuses = {}
    for s in harness.statuses():
        statuses.setdefault(s["file_id"], []).append(s["status"])
    assert all(statuses[f][-1] == "StatusMessage.done: Done processing." for f in ids)
    assert harness.depth() == 0 and harness.errors() == []
    assert "RABBITMQ_URI not applied" in harness.log_text()


def test_function_extractor_for_a_dataset(harness):
    """Clowder v2 (pyclowder 3.0.8's v1 dataset download is broken: FACTS.md)."""
    did = harness.standin.add_dataset(name="two texts")
    harness.standin.add_file(name="a.txt", content=b"alpha\n", dataset_id=did)
    harness.standin.add_file(name="b.txt", content=b"beta\n", dataset_id=did)
    body = dict(harness.v2_body(did), resource_type="dataset", datasetId=did, datasetName="two texts")
    del body["filename"]
    harness.publish(body, v2=True)
    code = harness.run_agent("--plugin", "test.simple.dataset", "--idle-exit", "2",
                             AGENT_PLUGIN_PATH=TEST_PLUGINS, CLOWDER_VERSION="2")
    assert code == 0, harness.log_text()
    md = harness.standin.records(kind="dataset_metadata", dataset_id=did)
    assert len(md) == 1, harness.log_text()
    assert md[0]["body"]["content"] == {"text_files": 2, "names": ["a.txt", "b.txt"]}
    assert harness.standin.records(kind="dataset_tags", dataset_id=did)[0]["body"] == {"tags": ["summarized"]}
    uploads = harness.standin.records(kind="upload", dataset_id=did)
    assert len(uploads) == 1, harness.log_text()
    done = [s for s in harness.statuses() if s["status"].startswith("StatusMessage.done")]
    assert len(done) == 1 and harness.depth() == 0 and harness.errors() == []


def test_entry_point_from_the_settings_when_there_is_no_dockerfile(harness, tmp_path):
    path = _plugin_copy(tmp_path, "simple_wc", "test.simple.nodocker")
    os.remove(os.path.join(path, "test.simple.nodocker", "Dockerfile"))
    fid = harness.publish_file(b"a b\n")
    code = harness.run_agent("--plugin", "test.simple.nodocker", "--idle-exit", "2", AGENT_PLUGIN_PATH=path,
                             EXTRACTION_FUNC="count_text", AGENT_EXTRACTION_MODULE="textcount")
    assert code == 0, harness.log_text()
    assert harness.standin.metadata_for(fid)[0]["content"]["words"] == "2"


@pytest.mark.parametrize("dockerfile, env, expected", [
    ("FROM clowder/extractors-simple-extractor:onbuild\n", {},
     "needs EXTRACTION_FUNC and EXTRACTION_MODULE"),
    ("FROM clowder/extractors-simple-extractor:onbuild\nENV EXTRACTION_MODULE=textcount\n", {},
     "needs EXTRACTION_FUNC: set it with ENV in its Dockerfile or as AGENT_EXTRACTION_FUNC"),
    ("FROM clowder/extractors-simple-extractor:onbuild\nENV EXTRACTION_FUNC=no_such EXTRACTION_MODULE=textcount\n",
     {}, "EXTRACTION_FUNC 'no_such' is not defined in module 'textcount'"),
    ("FROM x\nENV EXTRACTION_FUNC=count_text EXTRACTION_MODULE=not_here\n", {},
     "cannot import EXTRACTION_MODULE 'not_here'"),
])
def test_bad_function_extractors_are_refused_before_any_message(harness, tmp_path, dockerfile, env, expected):
    path = _plugin_copy(tmp_path, "simple_wc", "test.simple.bad", Dockerfile=dockerfile)
    fid = harness.publish_file(b"x\n")
    code = harness.run_agent("--plugin", "test.simple.bad", "--idle-exit", "2", AGENT_PLUGIN_PATH=path, **env)
    log = harness.log_text()
    assert code == 3, log
    assert expected in log and "Traceback" not in log
    assert harness.depth() == 1 and not harness.standin.metadata_for(fid)


# -- an environment per extractor --------------------------------------------------------------
def test_prepared_environment_runs_the_pinned_versions(harness, prepared_env_dir, agent_freeze_before):
    ids = [harness.publish_file(b"some text\n", name=f"v{i}.txt") for i in range(2)]
    code = harness.run_agent("--plugin", "test.own.env", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             AGENT_ENV_DIR=prepared_env_dir, AGENT_ENV_BUILD="no")
    assert code == 0, harness.log_text()
    for fid in ids:
        content = harness.standin.metadata_for(fid)[0]["content"]
        assert content["requests"] == "2.31.0" and content["humanize"] == "4.9.0"
        assert content["prefix"].startswith(os.path.join(prepared_env_dir, "test.own.env-"))
        assert content["size"] == "10 Bytes"
    agent_packages = _freeze()
    assert agent_packages == agent_freeze_before  # the agent's own venv is unchanged
    assert not any(p.lower().startswith("humanize==") for p in agent_packages)
    assert "requests==2.31.0" not in agent_packages


def test_prepare_says_where_and_is_idempotent(prepared_env_dir):
    done = _agent("prepare", "--plugin", "test.own.env,test.simple.wc", env_dir=prepared_env_dir)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("test.own.env: environment ready: " + prepared_env_dir)
    assert lines[1] == "test.simple.wc: no requirements.txt: runs in the agent's own environment"
    listing = _agent("plugins", env_dir=prepared_env_dir).stdout
    assert "test.own.env\t1.0\tclass\town_env\t" in listing and "own environment" in listing
    assert "test.simple.wc\t1.0\tfunction\tsimple_wc\ttextcount:count_text" in listing


def test_missing_environment_is_refused_with_the_prepare_command(harness, tmp_path):
    harness.publish_file(b"x\n")
    code = harness.run_agent("--plugin", "test.own.env", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             AGENT_ENV_DIR=str(tmp_path / "none"), AGENT_ENV_BUILD="no")
    log = harness.log_text()
    assert code == 3 and "run `python -m agent prepare --plugin test.own.env`" in log, log
    assert harness.depth() == 1


def test_requirements_pip_cannot_satisfy(harness, tmp_path):
    missing = f"clowder-agent-no-such-package-{uuid.uuid4().hex[:6]}==0.0.1"
    path = _plugin_copy(tmp_path, "own_env", "test.own.unsatisfiable", requirements__txt=missing + "\n")
    done = _agent("prepare", "--plugin", "test.own.unsatisfiable", env_dir=str(tmp_path / "envs"),
                  AGENT_PLUGIN_PATH=path)
    assert done.returncode == 3, done.stderr
    assert "test.own.unsatisfiable: pip cannot install" in done.stderr and "Traceback" not in done.stderr
    harness.publish_file(b"x\n")
    code = harness.run_agent("--plugin", "test.own.unsatisfiable", "--idle-exit", "2", AGENT_PLUGIN_PATH=path,
                             AGENT_ENV_DIR=str(tmp_path / "envs"), AGENT_ENV_BUILD="yes")
    log = harness.log_text()
    assert code == 3 and "pip cannot install" in log and "python -m agent prepare --plugin" in log, log
    assert harness.depth() == 1
    assert not [d for d in os.listdir(tmp_path / "envs") if not d.endswith(".lock") and not d.startswith(".")]


def test_environment_built_for_another_python(harness, prepared_env_dir, tmp_path):
    env_dir = tmp_path / "envs"
    shutil.copytree(prepared_env_dir, env_dir, symlinks=True)
    (marker_path,) = [os.path.join(env_dir, d, "clowder-agent-env.json") for d in os.listdir(env_dir)
                      if d.startswith("test.own.env-") and not d.endswith(".lock")]
    with open(marker_path) as fh:
        marker = json.load(fh)
    marker["python"] = "3.6.15"  # as if built by a Python the site has since replaced
    with open(marker_path, "w") as fh:
        json.dump(marker, fh)
    harness.publish_file(b"x\n")
    code = harness.run_agent("--plugin", "test.own.env", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             AGENT_ENV_DIR=str(env_dir), AGENT_ENV_BUILD="no")
    log = harness.log_text()
    assert code == 3 and "was built for Python 3.6.15" in log and "prepare --plugin test.own.env" in log, log
    assert harness.depth() == 1


# -- a command prefix --------------------------------------------------------------------------
def _wrapper(tmp_path) -> str:
    """A real wrapper that empties the process's environment (as `apptainer exec --cleanenv` would)."""
    script = tmp_path / "cleanenv-wrapper"
    script.write_text('#!/bin/sh\nexec env -i PATH=/usr/bin:/bin TEST_WRAPPED="by $(basename "$0")" "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_command_prefix_per_plugin_with_its_environment(harness, prepared_env_dir, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"plugins": {"test.own.env": {"command_prefix": [_wrapper(tmp_path)]},
                                              "test.other": {"command_prefix": "false"}}}))
    fid = harness.publish_file(b"wrapped\n")
    code = harness.run_agent("--plugin", "test.own.env", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             AGENT_ENV_DIR=prepared_env_dir, AGENT_ENV_BUILD="no", AGENT_CONFIG=str(config))
    assert code == 0, harness.log_text()
    content = harness.standin.metadata_for(fid)[0]["content"]
    assert content["wrapped"] == "by cleanenv-wrapper" and content["requests"] == "2.31.0"
    assert content["agent_settings_seen"] == []  # env -i: nothing of the agent's environment got through


def test_command_prefix_from_the_environment_with_the_agents_interpreter(harness, tmp_path):
    fid = harness.publish_file(b"a b c\n")
    code = harness.run_agent("--plugin", "test.simple.wc", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                             AGENT_COMMAND_PREFIX=f"unshare --user --map-root-user {_wrapper(tmp_path)}")
    if code != 0 and "unshare failed" in harness.log_text():
        pytest.fail("unshare --user does not work here: " + harness.log_text()[-500:])
    assert code == 0, harness.log_text()
    content = harness.standin.metadata_for(fid)[0]["content"]
    assert content["words"] == "3"
    assert content["uid_map"] == "0 0 1"  # a user namespace of its own (unshare)
    assert content["greeting"] is None    # env -i in the wrapper cleared even the Dockerfile's ENV


# -- under MPI ---------------------------------------------------------------------------------
@pytest.fixture
def mpi_harness(rabbitmq, mpi, amqp_queue, tmp_path):
    from helpers.mpi_harness import mpi_harness as running

    with running(rabbitmq, mpi, amqp_queue, tmp_path) as h:
        yield h


@pytest.mark.mpi
def test_mpi_ranks_with_stage_ahead_run_the_plugins_environment(mpi_harness, prepared_env_dir):
    h = mpi_harness
    ids = [h.publish_file(f"file {i}\n".encode(), name=f"m{i}.txt") for i in range(6)]
    proc = h.start_mpi(2, "--plugin", "test.own.env", "--idle-exit", "2", AGENT_PLUGIN_PATH=TEST_PLUGINS,
                       AGENT_ENV_DIR=prepared_env_dir, AGENT_ENV_BUILD="no", AGENT_STAGE_AHEAD="1")
    assert h.wait_exit(proc, 300) == 0, h.log_text()
    assert h.unprocessed(ids) == [] and h.depth() == 0 and h.errors() == []
    for fid in ids:
        content = h.standin.metadata_for(fid)[0]["content"]
        assert content["requests"] == "2.31.0"
        assert content["prefix"].startswith(os.path.join(prepared_env_dir, "test.own.env-"))
    assert h.log_text().count("extractor processes run in " + prepared_env_dir) == 2  # every rank
    # the extractor processes were agent.stage_ahead's (StagedSlot), started in the plugin's venv
    assert "stage-ahead on" in h.log_text()


def test_prepare_reports_apt_packages_that_are_not_installed(tmp_path):
    path = _plugin_copy(tmp_path, "simple_wc", "test.simple.apt",
                        packages__apt="coreutils  # installed everywhere\nclowder-agent-no-such-deb\n")
    done = _agent("prepare", "--plugin", "test.simple.apt", env_dir=str(tmp_path / "envs"), AGENT_PLUGIN_PATH=path)
    assert done.returncode == 0, done.stderr
    assert ("test.simple.apt: packages.apt entries not installed (ask the site for them, or use a "
            "command_prefix with a container that has them): clowder-agent-no-such-deb") in done.stderr
    assert "coreutils" not in done.stderr
