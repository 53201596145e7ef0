"""How a plugin's extractor process is started: interpreter, command prefix and environment.

Decided once per agent on the agent side and carried in the init frame's "launch" entry, so every
place that starts extractor processes (slots, MPI ranks, stage-ahead) starts them the same way:

    [*command_prefix, python, "-c", BOOT, code_dir, module]
    [*command_prefix, *runtime argv, image python, "-c", BOOT, code_dir, module]     (container:)

python is the plugin's own environment's interpreter when it has a requirements.txt
(agent.plugin_env), else the agent's. BOOT puts code_dir (the agent's code) first on sys.path
and runs the extractor module, so it works with neither PYTHONPATH nor the agent installed, even
under a prefix that clears the environment (`env -i`, `apptainer exec --cleanenv`). A plugin
with neither requirements nor a prefix keeps the agent's plain `python -m` start. A plugin with a
`container:` setting runs the image's interpreter under the runtime (agent.container_runtime): the
agent's worker packages and the folders the frames name are bound at the same paths; the image
holds the extractor's packages, so requirements.txt builds no environment for it.

The process's environment comes from agent.extractor_env (plugins table env > the agent's
environment > the Dockerfile's ENV, a default only; PROTECTED names never from the Dockerfile).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from . import container_runtime, extractor_env, plugin_env
from .config import AgentConfig
from .container_runtime import ContainerSetting
from .errors import ConfigError
from .plugin_loader import PluginSpec
from .plugin_settings import command_prefix, container_setting, plugin_value

log = logging.getLogger("agent.launch")
BOOT = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); module = sys.argv[2]; del sys.argv[1:3]; "
        "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def _say_not_applied(spec: PluginSpec) -> None:
    """Log the Dockerfile ENV names the extractor process does not get (agent.extractor_env decides)."""
    skipped = extractor_env.dockerfile_env(spec)[1]
    if skipped:
        log.info("%s: Dockerfile ENV %s not applied (the agent's own settings or this host's)", spec.name,
                 ", ".join(skipped))


def may_build(cfg: AgentConfig, spec: PluginSpec) -> bool:
    """env_build: yes / no / auto (build unless inside a batch job, where nodes lack network access)."""
    mode = str(plugin_value(cfg, "env_build", spec.name, spec.folder_name))
    if mode == "auto":
        from .jobenv import detect
        return not detect().scheduler
    return mode == "yes"


def apply(cfg: AgentConfig, spec: PluginSpec, init: dict[str, Any],
          env: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The init frame and environment for this plugin's extractor processes (EnvError: cannot run it).

    env is what the agent gives every extractor process (agent.worker_settings.worker_env); the
    plugin's own values are put in by agent.extractor_env.resolve (ConfigError: a plugins table
    env the agent refuses).
    """
    _say_not_applied(spec)
    entries = extractor_env.resolve(cfg, spec, env)
    env = extractor_env.values(entries)
    # The values reach the process through its environment; the frame need not carry them
    # (a Dockerfile may hold a broker password in an ENV line the agent does not apply).
    init = dict(init, plugin=dict(init["plugin"], docker_env={}))
    prefix = command_prefix(plugin_value(cfg, "command_prefix", spec.name, spec.folder_name))
    container = container_setting(cfg, spec.name, spec.folder_name)
    if container is not None:
        return _in_container(spec, container, prefix, init, env)
    if spec.requirements is None and not prefix:
        return init, env
    if spec.requirements is not None:
        env_python = plugin_value(cfg, "env_python", spec.name, spec.folder_name)
        penv = plugin_env.ensure(spec, cfg.env_dir, env_python, may_build(cfg, spec))
        python, code_dir = penv.python, plugin_env.agent_code_dir(cfg.env_dir)
        env = extractor_env.values(extractor_env.in_venv(entries, penv.path))
        log.info("%s: extractor processes run in %s", spec.name, penv.path)
    else:
        python, code_dir = sys.executable, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if prefix:
        log.info("%s: extractor processes start under %s", spec.name, " ".join(prefix))
    launch = {"argv": [*prefix, python, "-c", BOOT, code_dir], "cwd": code_dir}
    return dict(init, launch=launch), env


def _in_container(spec: PluginSpec, container: ContainerSetting, prefix: list[str], init: dict[str, Any],
                  env: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The init frame and the runtime's environment for extractor processes inside the plugin's image.

    ConfigError when the runtime program or a directory image is missing, or a bind target cannot
    be made in a Charliecloud image.
    """
    if shutil.which(container_runtime.RUNTIME_CLASSES[container.runtime].program, path=env.get("PATH")) is None:
        raise ConfigError(f"{spec.name}: container runtime {container.runtime} "
                          f"({container_runtime.RUNTIME_CLASSES[container.runtime].program}) not found on PATH")
    if container.runtime == "charliecloud" and not os.path.isdir(container.image):
        raise ConfigError(f"{spec.name}: charliecloud image {container.image} is not a folder")
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = [os.path.join(src, p) for p in plugin_env.WORKER_PACKAGES if os.path.isdir(os.path.join(src, p))]
    # Stage-ahead's folder and pyclowder's downloads are under the work folder (else TMPDIR).
    scratch = init.get("work_dir") or tempfile.gettempdir()
    os.makedirs(scratch, exist_ok=True)
    read_write = ([] if spec.image else [spec.folder]) + [scratch] + [
        p for p in (init.get("mounted_paths") or {}).values() if os.path.isdir(p)]
    binds = container_runtime.same_path_binds(container, code + container_runtime.ca_paths(env), read_write)
    if container.runtime == "charliecloud":
        missing = container_runtime.missing_mount_points(container.image, binds)
        if missing:
            raise ConfigError(f"{spec.name}: image {container.image} lacks folders to bind at and this user "
                              f"cannot make them there: {', '.join(missing)} (create them in the image)")
    if spec.requirements is not None:
        log.info("%s: requirements.txt ignored: its extractor runs in image %s, which holds its packages",
                 spec.name, container.image)
    # The runtime program starts with what it needs of the extractor's environment (PATH, HOME, USER).
    argv, runtime_env = container_runtime.assemble(container, [container.python, "-c", BOOT, src], binds, env,
                                                   host_env=env)
    log.info("%s: extractor processes run in %s image %s", spec.name, container.runtime, container.image)
    launch = {"argv": [*prefix, *argv], "cwd": src}
    return dict(init, launch=launch), runtime_env
