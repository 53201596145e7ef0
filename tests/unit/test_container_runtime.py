"""The `container:` plugin setting: checking it, each runtime's argv and environment, image-only plugins.

Apptainer, Singularity and Podman do not run on this machine: their argv is checked against their
documented flags (`exec --cleanenv --bind src:dst[:ro]`, APPTAINERENV_/SINGULARITYENV_ variables,
which --cleanenv keeps; podman `run --rm -i -v src:dst[:ro] -e NAME`, -i and no -t to keep the
frames' pipe). Charliecloud runs for real in tests/integration/test_containers.py.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from agent import container_runtime as cr
from agent.config import ConfigError, load_config
from agent.extractor_launch import BOOT, apply
from agent.image_plugins import discover_all, find, inspect_image
from agent.plugin_loader import PluginError, find_plugin
from agent.worker_settings import queue_name, worker_env, worker_init

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_PLUGINS = os.path.join(REPO, "tests", "plugins")
PROBE = os.path.join(TEST_PLUGINS, "container_probe")
INNER = ["python3", "-c", BOOT, "/code"]
BINDS = [cr.Bind("/code/agent", "/code/agent", True), cr.Bind("/scratch/work", "/scratch/work")]
EXTRACTOR_ENV = {"CLOWDER_VERSION": "2", "IMAGE_BINARY": "/usr/bin/convert", "TOKEN": "s3cr3t value",
                 "PATH": "/host/venv/bin:/usr/bin", "PYTHONPATH": "/host/lib", "VIRTUAL_ENV": "/host/venv",
                 "LD_LIBRARY_PATH": "/host/lib", "HOME": "/home/me", "PMI_FD": "7"}
HOST_ENV = {"PATH": "/usr/local/bin:/usr/bin", "HOME": "/home/me", "USER": "me", "SECRET_OF_HOST": "x"}


def _cfg(plugins: dict, **environ: str):
    return load_config({}, environ={"AGENT_PLUGINS": json.dumps(plugins), **environ})


# -- the setting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("container, message", [
    ({"runtime": "docker", "image": "x"}, "runtime 'docker' is not one of apptainer, singularity"),
    ({"runtime": "apptainer"}, "needs an image"),
    ({"runtime": "charliecloud", "image": "relative/dir"}, "absolute folder path"),
    ({"runtime": "podman", "image": "x", "mounts": []}, "unknown key(s) mounts"),
    ({"runtime": "podman", "image": "x", "binds": "/a"}, "binds must be a list"),
    ({"runtime": "podman", "image": "x", "binds": ["/a:/b:rx"]}, "mode 'rx' is not ro or rw"),
    ({"runtime": "podman", "image": "x", "binds": ["a:/b"]}, "paths must be absolute"),
    ("apptainer x.sif", "expected a mapping"),
])
def test_bad_container_setting_is_a_configuration_error(container, message):
    with pytest.raises(ConfigError) as err:
        _cfg({"p": {"container": container}})
    assert "plugin p: container: " in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_setting_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=TEST_PLUGINS,
               AGENT_PLUGINS=json.dumps({"p": {"container": {"runtime": "lxc", "image": "/i"}}}))
    done = subprocess.run([sys.executable, "-m", "agent", "plugins"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "runtime 'lxc' is not one of" in done.stderr
    env["AGENT_PLUGINS"] = json.dumps({"p": {"env": {"A": {"nested": 1}}}})
    done = subprocess.run([sys.executable, "-m", "agent", "plugins"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "env A: a value must be a string or a number" in done.stderr


def test_setting_defaults_and_binds():
    setting = cr.parse_container({"runtime": "apptainer", "image": "x.sif",
                                  "binds": ["/data", "/opt/a:/a:ro", "/b/:/c:rw"]})
    assert setting.python == "python3"
    assert setting.binds == (cr.Bind("/data", "/data"), cr.Bind("/opt/a", "/a", True), cr.Bind("/b", "/c"))


# -- argv and environment per runtime --------------------------------------------------------------
def _assert_no_value_on_the_command_line(argv):
    for value in ("s3cr3t value", "/usr/bin/convert", "/host/lib"):
        assert not any(value in arg for arg in argv)


def test_apptainer_argv_and_environment():
    setting = cr.ContainerSetting("apptainer", "/images/x.sif", binds=(cr.Bind("/data", "/in", True),))
    binds = cr.same_path_binds(setting, ["/code/agent"], ["/scratch/work"])
    argv, env = cr.assemble(setting, INNER, binds, EXTRACTOR_ENV, HOST_ENV)
    assert argv[1:] == ["exec", "--cleanenv", "--bind", "/code/agent:/code/agent:ro",
                        "--bind", "/scratch/work:/scratch/work", "--bind", "/data:/in:ro",
                        "/images/x.sif", *INNER]
    assert os.path.basename(argv[0]) == "apptainer"
    _assert_no_value_on_the_command_line(argv)
    # --cleanenv keeps APPTAINERENV_* (documented): every extractor variable goes that way
    assert env["APPTAINERENV_IMAGE_BINARY"] == "/usr/bin/convert" and env["APPTAINERENV_TOKEN"] == "s3cr3t value"
    assert env["APPTAINERENV_CLOWDER_VERSION"] == "2"
    for host_only in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "HOME", "PMI_FD"):
        assert "APPTAINERENV_" + host_only not in env
    assert env["PATH"] == HOST_ENV["PATH"] and "SECRET_OF_HOST" not in env  # apptainer's own start only


def test_singularity_uses_its_own_prefix():
    argv, env = cr.assemble(cr.ContainerSetting("singularity", "x.sif"), INNER, BINDS, EXTRACTOR_ENV, HOST_ENV)
    assert argv[1:4] == ["exec", "--cleanenv", "--bind"] and os.path.basename(argv[0]) == "singularity"
    assert env["SINGULARITYENV_IMAGE_BINARY"] == "/usr/bin/convert"
    assert not any(k.startswith("APPTAINERENV_") for k in env)


def test_podman_argv_keeps_the_pipe_and_passes_names_only():
    argv, env = cr.assemble(cr.ContainerSetting("podman", "docker.io/clowder/x:1"), INNER, BINDS,
                            EXTRACTOR_ENV, HOST_ENV)
    assert os.path.basename(argv[0]) == "podman"
    assert argv[1:7] == ["run", "--rm", "-i", "--network=host", "--entrypoint", "python3"]
    assert "-t" not in argv and "--tty" not in argv
    i = argv.index("docker.io/clowder/x:1")
    assert argv[i + 1:] == INNER[1:]  # the interpreter is the entrypoint, the rest its arguments
    assert argv[7:11] == ["-v", "/code/agent:/code/agent:ro", "-v", "/scratch/work:/scratch/work"]
    names = [argv[j + 1] for j, a in enumerate(argv) if a == "-e"]
    assert names == ["CLOWDER_VERSION", "IMAGE_BINARY", "TOKEN"]  # -e NAME: podman takes the value from its env
    _assert_no_value_on_the_command_line(argv)
    assert env["TOKEN"] == "s3cr3t value" and env["IMAGE_BINARY"] == "/usr/bin/convert"
    assert env["PATH"] == HOST_ENV["PATH"]


def test_charliecloud_argv_and_environment(tmp_path):
    image = tmp_path / "img"
    (image / "ch").mkdir(parents=True)
    (image / "ch" / "environment").write_text("PATH=/opt/conda/bin:/usr/bin\nLANG=C.UTF-8\n"
                                              "IMAGE_BINARY=\nLD_LIBRARY_PATH=/opt/conda/lib\n")
    argv, env = cr.assemble(cr.ContainerSetting("charliecloud", str(image)), INNER, BINDS, EXTRACTOR_ENV, HOST_ENV)
    assert os.path.basename(argv[0]) == "ch-run"
    assert argv[1:] == ["-b", "/code/agent:/code/agent", "-b", "/scratch/work:/scratch/work", str(image), "--",
                        *INNER]
    _assert_no_value_on_the_command_line(argv)
    # ch-run passes its own environment in: the image's ENV as defaults (its PATH, LD_LIBRARY_PATH...),
    # the extractor's variables over them, USER for ch-run; nothing of the host's
    assert env == {"CLOWDER_VERSION": "2", "IMAGE_BINARY": "/usr/bin/convert", "TOKEN": "s3cr3t value",
                   "USER": "me", "PATH": "/opt/conda/bin:/usr/bin", "LANG": "C.UTF-8",
                   "LD_LIBRARY_PATH": "/opt/conda/lib"}


def test_charliecloud_makes_missing_mount_points(tmp_path):
    image = tmp_path / "img"
    image.mkdir()
    src_file = tmp_path / "ca.pem"
    src_file.write_text("x")
    binds = [cr.Bind(str(tmp_path), "/work/here"), cr.Bind(str(src_file), "/etc/ca.pem")]
    assert cr.missing_mount_points(str(image), binds) == []
    assert (image / "work" / "here").is_dir() and (image / "etc" / "ca.pem").is_file()
    blocked = tmp_path / "blocked-img"
    blocked.mkdir()
    # a folder where a file sits cannot be made: reported, not raised
    (blocked / "data").write_text("a file in the way")
    assert cr.missing_mount_points(str(blocked), [cr.Bind(str(tmp_path), "/data/sub")]) == ["/data/sub"]


# -- extractor_launch with a container --------------------------------------------------------------
def _fake_runtime(tmp_path, name: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    prog = bin_dir / name
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(prog.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def test_launch_in_apptainer_binds_what_the_frames_name(tmp_path, monkeypatch):
    bin_dir = _fake_runtime(tmp_path, "apptainer")
    monkeypatch.setenv("RABBITMQ_URI", "amqp://user:brokerpass@host/%2f")
    monkeypatch.setenv("EXTRACTOR_KEY", "privatekey")
    work = str(tmp_path / "work")
    cfg = _cfg({"test.container.probe": {"container": {"runtime": "apptainer", "image": "/img/x.sif",
                                                         "binds": ["/site/data:/data:ro"]},
                                           "env": {"PROBE_SITE": "v"}}},
               AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_WORK_DIR=work)
    spec = find(cfg, "test.container.probe")
    ca = tmp_path / "site-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {k: v for k, v in worker_env(cfg).items() if k not in cr.CA_ENV}
    env.update(PATH=bin_dir + ":/usr/bin", REQUESTS_CA_BUNDLE=str(ca), SSL_CERT_FILE=str(tmp_path / "absent.pem"))
    init, runtime_env = apply(cfg, spec, worker_init(cfg, spec, "q"), env)
    argv = init["launch"]["argv"]
    assert argv[0] == os.path.join(bin_dir, "apptainer") and argv[1:3] == ["exec", "--cleanenv"]
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == [f"{REPO}/agent:{REPO}/agent:ro", f"{REPO}/hpc_common:{REPO}/hpc_common:ro",
                     f"{ca}:{ca}:ro", f"{PROBE}:{PROBE}", f"{work}:{work}", "/site/data:/data:ro"]
    assert runtime_env["APPTAINERENV_REQUESTS_CA_BUNDLE"] == str(ca)  # the site's CA, at the same path
    assert argv[-5:] == ["/img/x.sif", "python3", "-c", BOOT, REPO] and init["launch"]["cwd"] == REPO
    assert runtime_env["APPTAINERENV_PROBE_SITE"] == "v"
    # broker secrets never reach the extractor; the Clowder key travels in job frames, not env or argv
    flat = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in runtime_env.items())
    assert "brokerpass" not in flat and "privatekey" not in flat
    assert not any("RABBITMQ_URI" in k or "EXTRACTOR_KEY" in k for k in runtime_env)


def test_launch_without_the_runtime_is_a_configuration_error(tmp_path):
    cfg = _cfg({"test.container.probe": {"container": {"runtime": "podman", "image": "x"}}},
               AGENT_PLUGIN_PATH=TEST_PLUGINS)
    spec = find(cfg, "test.container.probe")
    with pytest.raises(ConfigError, match="container runtime podman .podman. not found on PATH"):
        apply(cfg, spec, worker_init(cfg, spec, "q"), {"PATH": str(tmp_path)})


# -- image-only plugins ----------------------------------------------------------------------------
def _image(tmp_path, workdir: str = "/extractor", env: dict = None) -> str:
    """A directory image holding the probe in pyclowder's layout, with ch-image's metadata."""
    image = tmp_path / "image"
    folder = image / workdir.lstrip("/")
    folder.mkdir(parents=True)
    for name in ("extractor_info.json", "probe.py"):
        (folder / name).write_text(open(os.path.join(PROBE, name)).read())
    (folder / "requirements.txt").write_text("numpy\n")  # installed in the image already
    (image / "ch").mkdir()
    (image / "ch" / "metadata.json").write_text(json.dumps({"cwd": workdir, "env": env or {}}))
    return str(image)


def test_image_only_plugin_read_from_the_image(tmp_path):
    image = _image(tmp_path, "/home/clowder", {"RABBITMQ_QUEUE": "probe.queue", "PROBE_DEFAULT": "d"})
    empty = tmp_path / "none"
    empty.mkdir()
    cfg = _cfg({"probe": {"container": {"runtime": "charliecloud", "image": image}}}, AGENT_PLUGIN_PATH=str(empty))
    spec = find(cfg, "probe")
    assert (spec.name, spec.folder, spec.script, spec.class_name) == (
        "test.container.probe", "/home/clowder", "/home/clowder/probe.py", "Probe")
    assert spec.image == image and spec.requirements is None and spec.folder_name == "probe"
    assert spec.docker_env == {"RABBITMQ_QUEUE": "probe.queue", "PROBE_DEFAULT": "d"}
    assert queue_name(cfg, spec) == "probe.queue"  # the image's RABBITMQ_QUEUE, as pyclowder reads it
    assert find(cfg, "test.container.probe") == spec  # also by the extractor_info name it holds
    assert find(cfg, None) == spec  # the only plugin
    found, problems = discover_all(cfg)
    assert found == [spec] and problems == []


def test_image_without_metadata_uses_pyclowders_workdir(tmp_path):
    image = _image(tmp_path)
    os.remove(os.path.join(image, "ch", "metadata.json"))
    (tmp_path / "image" / "ch" / "environment").write_text("A=1\n")
    spec = inspect_image("p", cr.ContainerSetting("charliecloud", image))
    assert spec.folder == "/extractor" and spec.docker_env == {"A": "1"} and spec.queue == ""


def test_image_only_plugin_problems(tmp_path):
    with pytest.raises(PluginError, match="not a directory image"):
        inspect_image("p", cr.ContainerSetting("apptainer", str(tmp_path / "x.sif")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PluginError, match="holds no extractor_info.json"):
        inspect_image("p", cr.ContainerSetting("charliecloud", str(tmp_path / "empty")))


def test_a_plugin_folder_of_that_name_is_not_image_only(tmp_path):
    image = _image(tmp_path)
    cfg = _cfg({"test.container.probe": {"container": {"runtime": "charliecloud", "image": image}}},
               AGENT_PLUGIN_PATH=TEST_PLUGINS)
    spec = find(cfg, "test.container.probe")
    assert spec == find_plugin("test.container.probe", [TEST_PLUGINS]) and spec.image == ""
    found, _ = discover_all(cfg)
    assert [p.folder for p in found if p.name == "test.container.probe"] == [PROBE]


def test_agent_plugins_lists_image_only_plugins(tmp_path):
    image = _image(tmp_path)
    empty = tmp_path / "none"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=str(empty),
               AGENT_PLUGINS=json.dumps({"probe": {"container": {"runtime": "charliecloud", "image": image}}}))
    done = subprocess.run([sys.executable, "-m", "agent", "plugins"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = f"test.container.probe\t1.0\tclass\tprobe\t/extractor/probe.py:Probe\timage only charliecloud image {image}"
    assert expected in done.stdout.splitlines()
    done = subprocess.run([sys.executable, "-m", "agent", "plugins", "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    listed = json.loads(done.stdout)["plugins"]
    assert [(p["name"], p["folder"], p["image"]) for p in listed if p["image"]] == [
        ("test.container.probe", "/extractor", image)]


def test_prepare_and_plugins_for_a_folder_plugin_run_in_an_image(tmp_path):
    """A plugin with requirements.txt run in an image: no venv is built (the image holds its packages)."""
    env_dir = tmp_path / "envs"
    env = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_ENV_DIR=str(env_dir),
               AGENT_PLUGINS=json.dumps({"test.own.env": {"container": {"runtime": "podman", "image": "own:1"}}}))
    done = subprocess.run([sys.executable, "-m", "agent", "prepare", "--plugin", "test.own.env"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "test.own.env: runs in podman image own:1: nothing to prepare"
    assert not env_dir.exists() or not [p for p in env_dir.iterdir() if p.name.startswith("test.own.env")]
    done = subprocess.run([sys.executable, "-m", "agent", "plugins"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    line = next(x for x in done.stdout.splitlines() if x.startswith("test.own.env\t"))
    assert line.endswith("\truns in podman image own:1")


def test_charliecloud_image_without_room_for_a_mount_point_is_refused(tmp_path):
    bin_dir = _fake_runtime(tmp_path, "ch-run")
    image = tmp_path / "img"
    image.mkdir()
    work = tmp_path / "work"
    top = str(work).split("/")[1]  # a file where the work folder's top folder would go in the image
    (image / top).write_text("in the way")
    cfg = _cfg({"test.container.probe": {"container": {"runtime": "charliecloud", "image": str(image)}}},
               AGENT_PLUGIN_PATH=TEST_PLUGINS, AGENT_WORK_DIR=str(work))
    spec = find(cfg, "test.container.probe")
    with pytest.raises(ConfigError, match=f"lacks folders to bind at and this user cannot make them there: .*{work}"):
        apply(cfg, spec, worker_init(cfg, spec, "q"), {"PATH": bin_dir})


def test_agent_local_without_the_runtime_exits_2(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    env = dict(os.environ, PYTHONPATH=REPO, AGENT_PLUGIN_PATH=TEST_PLUGINS, PATH=os.path.dirname(sys.executable),
               AGENT_PLUGINS=json.dumps({"test.container.probe": {"container": {"runtime": "podman", "image": "x"}}}))
    done = subprocess.run([sys.executable, "-m", "agent", "local", "--plugin", "test.container.probe", "--out",
                           str(tmp_path / "out"), str(data)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "container runtime podman (podman) not found on PATH" in done.stderr
