"""Settings tables of the agent and the launcher: every bad value is one line naming the setting and its
source (exit 2); the launcher's precedence; the agent's work-source registry."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent.config import SETTINGS as AGENT_SETTINGS, AgentConfig, ConfigError as AgentConfigError, load_config
from agent.sources import registry
from agent.worker_settings import worker_env
from launcher import cli as launcher_cli
from launcher.errors import ConfigError as LauncherConfigError
from launcher.settings import SETTINGS as LAUNCHER_SETTINGS, resolve

REPO = Path(__file__).resolve().parents[2]

# One unusable value per agent setting that has any (free text such as plugin or log_file has none).
AGENT_BAD = {
    "source": "carrier-pigeon", "clowder_version": "3", "mounted_paths": "[1]", "ssl_verify": "maybe",
    "max_retries": "-1", "retry_backoff": "soon", "heartbeat": "-5", "slots": "0", "time_limit": "x",
    "memory_limit": "-1", "recycle_after": "1.5", "prefetch": "-2", "relay_inline": "-1", "idle_exit": "never", "max_messages": "-1",
    "stop_grace": "-1", "walltime": "tomorrow", "walltime_margin": "-1", "journal_after": "0",
    "connect_timeout": "-1", "reconnect_timeout": "x", "log_level": "LOUD", "mpi": "sometimes",
    "mpi_leader": "rack", "mpi_rank_timeout": "0", "stage_ahead": "perhaps", "amqp_internals": "somewhat",
    "env_build": "sometimes", "plugins": "{\"x\": {\"colour\": 1}}",
}
FREE_TEXT = {s.name for s in AGENT_SETTINGS if s.name not in AGENT_BAD}


def test_every_checked_agent_setting_has_a_bad_value_here():
    free_parsers = ("str", "_to_optional_str", "_to_path_list", "_to_plugins")
    checked = {s.name for s in AGENT_SETTINGS if s.check is not None or s.parse.__name__ not in free_parsers}
    assert checked <= set(AGENT_BAD), checked - set(AGENT_BAD)
    assert FREE_TEXT == {"plugin", "plugin_path", "relay_url", "relay_token_file", "relay_ca", "message_file",
                         "spool_dir", "rabbitmq_uri", "rabbitmq_queue", "extractor_key", "clowder_url",
                         "clowder_email", "journal_dir", "work_dir", "log_file", "extraction_func",
                         "extraction_module", "env_dir", "env_python", "command_prefix"}


@pytest.mark.parametrize("name", sorted(AGENT_BAD))
def test_bad_agent_setting_from_env_yaml_and_flag_names_the_setting_and_source(name, tmp_path):
    setting = next(s for s in AGENT_SETTINGS if s.name == name)
    bad = AGENT_BAD[name]
    with pytest.raises(AgentConfigError) as from_env:
        load_config({}, {setting.env[0]: bad})
    assert name in str(from_env.value) and setting.env[0] in str(from_env.value)
    yaml_file = tmp_path / "agent.yaml"
    yaml_file.write_text(f"{name}: '{bad}'\n")
    with pytest.raises(AgentConfigError) as from_file:
        load_config({}, {}, str(yaml_file))
    assert name in str(from_file.value) and str(yaml_file) in str(from_file.value)
    with pytest.raises(AgentConfigError) as from_flag:
        load_config({name: bad}, {})
    assert name in str(from_flag.value) and setting.flag in str(from_flag.value)
    assert "\n" not in str(from_env.value) + str(from_file.value) + str(from_flag.value)


@pytest.mark.parametrize("argv, env", [
    (["run"], {"AGENT_SLOTS": "x"}),
    (["run"], {"AGENT_MPI_LEADER": "rack"}),
    (["run"], {"AGENT_STAGE_AHEAD": "perhaps"}),
    (["run", "--slots", "0"], {}),
    (["run", "--mpi-rank-timeout", "-1"], {}),
])
def test_agent_bad_setting_is_one_line_and_exit_2(argv, env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agent", *argv], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent: configuration error: ") and "Traceback" not in proc.stderr


def test_agent_config_is_made_from_the_table_and_replace_keeps_working():
    names = [f.name for f in dataclasses.fields(AgentConfig)]
    assert names == [s.name for s in AGENT_SETTINGS]
    cfg = AgentConfig()
    assert all(getattr(cfg, s.name) == s.default for s in AGENT_SETTINGS)
    other = dataclasses.replace(cfg, slots=3, plugin_path=["/p"])
    assert other.slots == 3 and other.effective_prefetch() == 6 and cfg.plugin_path == []
    assert AgentConfig().plugin_path is not AgentConfig().plugin_path  # no shared mutable default
    assert "guest" not in repr(cfg)  # secrets stay out of reprs (and so out of logs)


def test_mpi_and_stage_ahead_settings_keep_their_env_names():
    cfg = load_config({}, {"AGENT_MPI_LEADER": "Allocation", "AGENT_MPI_RANK_TIMEOUT": "7",
                           "AGENT_STAGE_AHEAD": "1", "AGENT_MPI": "0"})
    assert (cfg.mpi_leader, cfg.mpi_rank_timeout, cfg.stage_ahead, cfg.mpi) == ("allocation", 7.0, True, False)
    from agent.mpi_ranks import MpiSettings
    assert MpiSettings.from_config(cfg) == MpiSettings("allocation", 7.0, True)


# -- launcher --------------------------------------------------------------------------------------------
LAUNCHER_BAD = {"scheduler": ("lsf", "--scheduler"), "rabbitmq_management": ("ftp://mq", "--rabbitmq-management"),
                "clowder_url": ("clowder.example.org", None), "clowder_version": ("x", None),
                "relay_debug": ("loud", None)}


@pytest.mark.parametrize("name", sorted(LAUNCHER_BAD))
def test_bad_launcher_setting_from_env_file_and_flag_is_one_line_exit_2(name, tmp_path, capsys, monkeypatch):
    for s in LAUNCHER_SETTINGS:
        for env in s.env:
            monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("LAUNCHER_CONFIG", raising=False)
    setting = next(s for s in LAUNCHER_SETTINGS if s.name == name)
    bad, flag = LAUNCHER_BAD[name]
    settings_file = tmp_path / "launcher.yaml"
    settings_file.write_text(f"{name}: '{bad}'\n")
    runs = [([], {setting.env[0]: bad}, setting.env[0]),
            (["--config", str(settings_file)], {}, f"settings file {settings_file}")]
    if flag:
        runs.append(([flag, bad], {}, flag))
    for argv, env, origin in runs:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = launcher_cli.main(["status", *argv])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith(f"launcher: error: {name} from {origin}: "), err
        for key in env:
            monkeypatch.delenv(key)


def test_launcher_status_with_bad_clowder_version_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher", "status"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CLOWDER_VERSION": "x"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "clowder_version from CLOWDER_VERSION" in proc.stderr


def test_launcher_bad_command_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        launcher_cli.main(["submit", "--tasks", "many"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--tasks" in err


def test_launcher_precedence_flag_env_file_default(tmp_path):
    settings_file = tmp_path / "launcher.yaml"
    settings_file.write_text("scheduler: torque\nrabbitmq_queue: from-file\nssh: login1\n")
    env = {"LAUNCHER_SCHEDULER": "pbs", "RABBITMQ_QUEUE": "from-env", "XDG_STATE_HOME": str(tmp_path / "xdg")}
    s = resolve({"scheduler": "slurm"}, env, str(settings_file))
    assert s.scheduler == "slurm"                       # flag > environment
    assert s.rabbitmq_queue == "from-env"               # environment > file
    assert s.ssh == "login1"                            # file > default
    assert s.state_dir == str(tmp_path / "xdg" / "clowder-launcher")  # default (from XDG_STATE_HOME)
    assert s.clowder_version == 1 and s.relay_debug is False
    assert resolve({}, {"LAUNCHER_CONFIG": str(settings_file)}).scheduler == "torque"


def test_launcher_settings_file_refuses_unknown_keys(tmp_path):
    settings_file = tmp_path / "launcher.yaml"
    settings_file.write_text("schedular: slurm\n")
    with pytest.raises(LauncherConfigError, match="unknown setting.*schedular"):
        resolve({}, {}, str(settings_file))


def test_launcher_secret_never_shown_and_has_no_flag():
    uri = next(s for s in LAUNCHER_SETTINGS if s.name == "rabbitmq_uri")
    assert uri.secret and uri.flag is None
    assert "hunter2" not in repr(resolve({}, {"RABBITMQ_URI": "amqp://u:hunter2@h/"}))


# -- the work-source registry ---------------------------------------------------------------------------
def test_registry_holds_the_four_sources_with_their_needs():
    assert list(registry.SOURCES) == ["amqp", "relay", "spool", "file"]
    assert [k.name for k in registry.SOURCES.values() if k.uses_journal] == ["amqp"]
    assert registry.source_kind("file").forced == {"max_messages": 1, "idle_exit": 0.0}
    with pytest.raises(AgentConfigError, match="known: amqp, relay, spool, file"):
        registry.source_kind("pigeon")


def test_a_registered_source_is_accepted_built_and_checked(monkeypatch):
    built = []

    def build(req):
        built.append(req)
        return "a source"

    kind = registry.SourceKind("test-pigeon", build, check=lambda cfg: None if cfg.rabbitmq_queue else "needs a queue",
                               extractor_env=lambda cfg, env: env.__setitem__("PIGEON", "1"))
    monkeypatch.setitem(registry.SOURCES, "test-pigeon", kind)
    with pytest.raises(AgentConfigError, match="needs a queue"):
        load_config({"source": "test-pigeon"}, {})
    cfg = load_config({"source": "test-pigeon", "rabbitmq_queue": "q"}, {})
    assert worker_env(cfg)["PIGEON"] == "1"
    assert registry.source_kind(cfg.source).build(registry.SourceRequest(cfg, "q", "agent-1")) == "a source"
    assert built[0].queue == "q" and built[0].journal is None


def test_cmd_run_has_no_source_special_cases():
    import inspect
    text = inspect.getsource(agent_cli.cmd_run)
    assert "cfg.source ==" not in text and "getattr(" not in text


# -- mpi4py is optional ------------------------------------------------------------------------------------
def _without_mpi4py(tmp_path):
    hidden = tmp_path / "hide" / "mpi4py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{hidden.parent}:{REPO}",
            "AGENT_PLUGIN_PATH": str(REPO / "tests" / "plugins"), "AGENT_PLUGIN": "directive"}


def test_mpi_run_without_mpi4py_is_one_line_naming_the_extra(tmp_path):
    env = {**_without_mpi4py(tmp_path), "AGENT_MPI": "1"}
    proc = subprocess.run([sys.executable, "-m", "agent", "run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'clowder-hpc-agent[mpi]'" in lines[0], proc.stderr


def test_plain_run_needs_no_mpi4py(tmp_path):
    """Not under mpiexec, the agent gets as far as its work source without importing mpi4py."""
    env = {**_without_mpi4py(tmp_path), "AGENT_SOURCE": "file", "AGENT_MESSAGE_FILE": str(tmp_path / "none.json")}
    proc = subprocess.run([sys.executable, "-m", "agent", "run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "message file" in proc.stderr and "clowder-hpc-agent[mpi]" not in proc.stderr, proc.stderr
