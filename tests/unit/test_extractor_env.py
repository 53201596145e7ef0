"""Units of agent.extractor_env (precedence as Docker has it) and `plugins --show-env`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.config import ConfigError, load_config
from agent.extractor_env import (AGENT_ENVIRONMENT, DOCKERFILE, PLUGINS_TABLE, SET_BY_AGENT, EnvValue, in_venv,
                                 resolve, values)
from agent.extractor_launch import apply
from agent.plugin_loader import find_plugin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plugin(tmp_path, name: str = "site.preview", dockerfile: str = "") -> str:
    folder = tmp_path / "plugins" / name.replace(".", "_")
    folder.mkdir(parents=True)
    (folder / "extractor_info.json").write_text(json.dumps({"name": name, "version": "1"}))
    (folder / "ex.py").write_text("from pyclowder.extractors import Extractor\n\n\nclass Ex(Extractor):\n"
                                  "    pass\n\n\nif __name__ == '__main__':\n    Ex().start()\n")
    (folder / "Dockerfile").write_text(dockerfile or 'FROM x\nENV IMAGE_BINARY="" IMAGE_TYPE="" KEEP=image '
                                                      'RABBITMQ_QUEUE="" PATH=/image/bin\n')
    return str(tmp_path / "plugins")


def _cfg(table: dict, **environ: str):
    return load_config({}, environ={"AGENT_PLUGINS": json.dumps(table), **environ})


def test_precedence_plugins_table_over_agent_environment_over_dockerfile(tmp_path):
    spec = find_plugin("site.preview", [_plugin(tmp_path)])
    cfg = _cfg({"site.preview": {"env": {"IMAGE_TYPE": "png", "NOTE": 1, "FLAG": True}}})
    agent_env = {"PATH": "/usr/bin", "IMAGE_BINARY": "/usr/bin/convert", "IMAGE_TYPE": "gif", "CLOWDER_VERSION": "2"}
    environ = {"PATH": "/usr/bin", "IMAGE_BINARY": "/usr/bin/convert", "IMAGE_TYPE": "gif"}  # CLOWDER_VERSION: the agent's
    got = resolve(cfg, spec, agent_env, environ)
    assert got["IMAGE_BINARY"] == EnvValue("/usr/bin/convert", AGENT_ENVIRONMENT, ((DOCKERFILE, ""),))
    assert got["IMAGE_TYPE"] == EnvValue("png", PLUGINS_TABLE, ((DOCKERFILE, ""), (AGENT_ENVIRONMENT, "gif")))
    assert got["KEEP"] == EnvValue("image", DOCKERFILE)
    assert got["CLOWDER_VERSION"] == EnvValue("2", SET_BY_AGENT)
    assert got["PATH"] == EnvValue("/usr/bin", AGENT_ENVIRONMENT)  # a Dockerfile never sets PATH
    assert "RABBITMQ_QUEUE" not in got  # nor the agent's settings
    assert (got["NOTE"].value, got["FLAG"].value) == ("1", "true")


def test_what_the_agent_sets_wins_over_the_plugins_table(tmp_path):
    spec = find_plugin("site.preview", [_plugin(tmp_path)])
    cfg = _cfg({"site_preview": {"env": {"NO_PROXY": "site.example"}}})  # by folder name
    got = resolve(cfg, spec, {"NO_PROXY": "a,127.0.0.1"}, {"NO_PROXY": "a"})
    assert got["NO_PROXY"] == EnvValue("a,127.0.0.1", SET_BY_AGENT, ((PLUGINS_TABLE, "site.example"),))


def test_two_plugins_one_settings_each_its_own_value(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_TYPE", "gif")  # the agent's environment (apply's env is worker_env's)
    path = _plugin(tmp_path, "site.a")
    _plugin(tmp_path, "site.b")
    cfg = _cfg({"site.a": {"env": {"IMAGE_TYPE": "png"}}, "site.b": {"env": {"IMAGE_TYPE": "jpg"}}})
    env = {"IMAGE_TYPE": "gif"}
    got = {name: apply(cfg, find_plugin(name, [path]), {"t": "init", "plugin": {}}, env)[1]["IMAGE_TYPE"]
           for name in ("site.a", "site.b")}
    assert got == {"site.a": "png", "site.b": "jpg"}
    assert env == {"IMAGE_TYPE": "gif"}  # the agent's own is untouched


@pytest.mark.parametrize("entry, expected", [
    ({"RABBITMQ_URI": "amqp://x"}, "env RABBITMQ_URI is the agent's own setting or secret"),
    ({"EXTRACTOR_KEY": "k"}, "env EXTRACTOR_KEY is the agent's own setting or secret"),
    ({"AGENT_SLOTS": "2"}, "env AGENT_SLOTS is the agent's own"),
    ({"CLOWDER_URL": "http://x"}, "env CLOWDER_URL is the agent's own"),
    ({"EXTRACTION_FUNC": "f"}, "set it with the plugins table's extraction_func"),
    ({"MAX_RETRY": "3"}, "set it with the plugins table's max_retries"),
    ({"X": ["a"]}, "env X: a value must be a string or a number"),
    (["X=1"], "env must be a mapping of NAME: value"),
])
def test_plugins_table_env_refuses_the_agents_names(entry, expected):
    with pytest.raises(ConfigError, match="plugins: plugin p: ") as caught:
        _cfg({"p": {"env": entry}})
    assert expected in str(caught.value) and "from AGENT_PLUGINS" in str(caught.value)


def test_plugins_table_env_from_the_yaml_file(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("plugins:\n  p:\n    env:\n      IMAGE_TYPE: png\n      HEARTBEAT: 10\n")
    with pytest.raises(ConfigError, match="env HEARTBEAT is the agent's own"):
        load_config({}, environ={}, config_file=str(config))


def test_a_broker_secret_never_reaches_the_extractor_under_another_name(tmp_path):
    spec = find_plugin("site.preview", [_plugin(tmp_path)])
    cfg = _cfg({"site.preview": {"env": {"MY_URL": "amqp://u:s3cret-pw@host/"}}},
               RABBITMQ_URI="amqp://u:s3cret-pw@host/")
    with pytest.raises(ConfigError, match="env MY_URL holds a broker secret") as caught:
        apply(cfg, spec, {"t": "init", "plugin": {}}, {})
    assert "s3cret-pw" not in str(caught.value)


def test_a_plugin_venv_goes_first_on_path():
    entries = {"PATH": EnvValue("/site/bin", PLUGINS_TABLE), "PYTHONPATH": EnvValue("/x", AGENT_ENVIRONMENT)}
    got = in_venv(entries, "/envs/p-1")
    assert values(got) == {"PATH": "/envs/p-1/bin:/site/bin", "VIRTUAL_ENV": "/envs/p-1"}
    assert got["PATH"] == EnvValue("/envs/p-1/bin:/site/bin", SET_BY_AGENT, ((PLUGINS_TABLE, "/site/bin"),))


def _show(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "RABBITMQ_", "IMAGE_"))}
    full.update(PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-m", "agent", "plugins", *args], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_show_env_says_where_each_value_came_from_with_secrets_masked(tmp_path):
    path = _plugin(tmp_path)
    table = {"site.preview": {"env": {"IMAGE_TYPE": "png", "SITE_API_TOKEN": "tok-123456",
                                      "STORE": "https://user:pw-987654@store.example/x"}}}
    env = dict(AGENT_PLUGIN_PATH=path, AGENT_PLUGINS=json.dumps(table), IMAGE_BINARY="/usr/bin/convert",
               RABBITMQ_URI="amqp://guest:broker-pw-1@127.0.0.1/", EXTRACTOR_KEY="the-extractor-key")
    text = _show("--show-env", "site.preview", **env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert 'IMAGE_BINARY=/usr/bin/convert\t[agent environment] over Dockerfile ENV ""' in lines
    assert 'IMAGE_TYPE=png\t[plugins table env] over Dockerfile ENV ""' in lines
    assert "KEEP=image\t[Dockerfile ENV]" in lines
    assert "SITE_API_TOKEN=***\t[plugins table env]" in lines
    assert "STORE=https://user:***@store.example/x\t[plugins table env]" in lines
    assert "# Dockerfile ENV not applied (the agent's own settings or this host's): PATH, RABBITMQ_QUEUE" in lines
    for secret in ("tok-123456", "pw-987654", "broker-pw-1", "the-extractor-key"):
        assert secret not in text.stdout
    assert not any(line.startswith(("RABBITMQ_URI=", "EXTRACTOR_KEY=")) for line in lines)
    as_json = _show("--show-env", "site_preview", "--json", **env)
    report = json.loads(as_json.stdout)
    assert report["plugin"] == "site.preview" and report["venv"] is None
    assert report["env"]["IMAGE_TYPE"] == {"value": "png", "source": "plugins table env",
                                           "overrides": [{"source": "Dockerfile ENV", "value": ""}]}
    assert report["env"]["CLOWDER_VERSION"]["source"] == "set by the agent"


def test_show_env_of_an_unknown_plugin_is_exit_3_and_one_line(tmp_path):
    done = _show("--show-env", "no.such", AGENT_PLUGIN_PATH=_plugin(tmp_path))
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith("agent plugins: plugin 'no.such' not found") and done.stderr.count("\n") == 1


def test_run_refuses_a_broker_secret_in_a_plugins_table_env_before_connecting(tmp_path):
    table = {"site.preview": {"env": {"MIRROR": "amqp://u:s3cret-9@elsewhere/"}}}
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "RABBITMQ_"))}
    full.update(PYTHONPATH=REPO, AGENT_PLUGIN_PATH=_plugin(tmp_path), AGENT_PLUGINS=json.dumps(table),
                RABBITMQ_URI="amqp://u:s3cret-9@127.0.0.1:1/")  # port 1: nothing listens
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--plugin", "site.preview"], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "env MIRROR holds a broker secret" in done.stderr and "s3cret-9" not in done.stderr + done.stdout
