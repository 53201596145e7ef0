"""An environment per extractor: a venv holding a plugin's requirements.txt and pyclowder.

Built ahead of time by `python -m agent prepare` on a machine with network access (compute nodes
usually have none), under env_dir (default ~/.clowder-hpc-agent/envs, which every node sees):
one venv per plugin and requirements content, named <plugin>-<hash>, so editing requirements.txt
makes a new one and two plugins never share one. pyclowder is added at the agent's own version
unless requirements.txt names pyclowder itself. The agent is never installed there: its extractor
process reaches the agent's code through a folder of links (agent_code_dir).

A finished venv holds MARKER (JSON: plugin, requirements hash, Python version and interpreter,
packages); it is written last, so a venv without it is an interrupted build and is rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from .errors import PluginError
from .plugin_loader import PluginSpec

log = logging.getLogger("agent.env")
MARKER = "clowder-agent-env.json"
#: top-level packages of this source tree the extractor process imports (those present are linked)
WORKER_PACKAGES = ("agent", "hpc_common")
_SMOKE = "import agent.worker_process, agent.connector, agent.simple_extractor, agent.stage_ahead"


class EnvError(PluginError):
    """A plugin environment is missing, stale, for another Python or cannot be built (one line)."""


@dataclass(frozen=True)
class PluginEnv:
    """Where a plugin's environment is (or would be) and what it was built from."""

    plugin: str
    path: str
    requirements_sha256: str
    extra: tuple[str, ...]       # what is installed beside requirements.txt (pyclowder)

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")

    def marker(self) -> Optional[dict]:
        try:
            with open(os.path.join(self.path, MARKER), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None


def prepare_command(spec: PluginSpec) -> str:
    return f"python -m agent prepare --plugin {spec.name}"


def _mentions_pyclowder(requirements: str) -> bool:
    for line in requirements.splitlines():
        name = line.split("#", 1)[0].strip().lower().replace("_", "-")
        if name.startswith("pyclowder") and not name[len("pyclowder"):][:1].isalnum():
            return True
    return False


def locate(spec: PluginSpec, env_dir: str) -> PluginEnv:
    """The environment for the plugin's current requirements.txt (it may not exist yet)."""
    assert spec.requirements is not None
    with open(spec.requirements, "rb") as fh:
        content = fh.read()
    extra: tuple[str, ...] = ()
    if not _mentions_pyclowder(content.decode("utf-8", "replace")):
        extra = (f"pyclowder=={metadata.version('pyclowder')}",)
    digest = hashlib.sha256(content + b"\0" + "\n".join(extra).encode()).hexdigest()
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.name)
    path = os.path.join(os.path.abspath(os.path.expanduser(env_dir)), f"{safe}-{digest[:12]}")
    return PluginEnv(spec.name, path, digest, extra)


def python_version(interpreter: str) -> str:
    """X.Y.Z of an interpreter (EnvError when it does not run)."""
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        return "%d.%d.%d" % sys.version_info[:3]
    try:
        out = subprocess.run([interpreter, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvError(f"interpreter {interpreter} does not run: {exc}") from None
    return out.stdout.strip()


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check(spec: PluginSpec, env_dir: str, env_python: Optional[str]) -> tuple[PluginEnv, str]:
    """(env, state): state is "ready", "missing" (or interrupted) or a one-line reason it is unusable."""
    env = locate(spec, env_dir)
    marker = env.marker()
    if marker is None or marker.get("requirements_sha256") != env.requirements_sha256:
        return env, "missing"
    wanted = python_version(env_python or sys.executable)
    built = str(marker.get("python", "?"))
    if _minor(built) != _minor(wanted):
        return env, (f"{spec.name}: environment {env.path} was built for Python {built}, but env_python "
                     f"{env_python or sys.executable} is Python {wanted}: run `{prepare_command(spec)}`")
    if not os.access(env.python, os.X_OK):
        return env, f"{spec.name}: environment {env.path} has no interpreter: run `{prepare_command(spec)}`"
    return env, "ready"


def _pip_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:400]


def build(spec: PluginSpec, env_dir: str, env_python: Optional[str]) -> PluginEnv:
    """Build (or rebuild) the plugin's environment; one writer at a time per environment (flock)."""
    env = locate(spec, env_dir)
    root = os.path.dirname(env.path)
    os.makedirs(root, exist_ok=True)
    with open(env.path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other agents (MPI ranks) wait here, then find it ready
        _, state = check(spec, env_dir, env_python)
        if state == "ready":
            return env
        interpreter = env_python or sys.executable
        version = python_version(interpreter)
        shutil.rmtree(env.path, ignore_errors=True)
        log.info("%s: building its environment in %s (Python %s, pip needs network access)", spec.name,
                 env.path, version)
        steps = [([interpreter, "-m", "venv", env.path], f"cannot create a venv with {interpreter}"),
                 ([env.python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r",
                   spec.requirements or "", *env.extra], f"pip cannot install {spec.requirements}")]
        for argv, what in steps:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=spec.folder,
                                  stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                shutil.rmtree(env.path, ignore_errors=True)
                raise EnvError(f"{spec.name}: {what}: {_pip_error(done.stderr + done.stdout)}")
        code_dir = agent_code_dir(env_dir)
        smoke = subprocess.run([env.python, "-c", f"import sys; sys.path.insert(0, {code_dir!r}); {_SMOKE}"],
                               capture_output=True, text=True, cwd=code_dir, env=_clean_env(env.path))
        if smoke.returncode != 0:
            shutil.rmtree(env.path, ignore_errors=True)
            raise EnvError(f"{spec.name}: the agent's extractor process cannot start in the environment "
                           f"(requirements.txt conflicts with pyclowder?): {_pip_error(smoke.stderr)}")
        freeze = subprocess.run([env.python, "-m", "pip", "freeze", "--disable-pip-version-check"],
                                capture_output=True, text=True)
        marker = {"plugin": spec.name, "requirements": spec.requirements,
                  "requirements_sha256": env.requirements_sha256, "extra": list(env.extra),
                  "python": version, "python_executable": os.path.realpath(interpreter),
                  "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "packages": freeze.stdout.split()}
        tmp = os.path.join(env.path, MARKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
        os.replace(tmp, os.path.join(env.path, MARKER))
        return env


def _clean_env(env_path: str) -> dict[str, str]:
    """The environment for a process of the plugin's venv: nothing of the agent's Python leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["VIRTUAL_ENV"] = env_path
    env["PATH"] = os.pathsep.join(filter(None, [os.path.join(env_path, "bin"), env.get("PATH")]))
    return env


def agent_code_dir(env_dir: str) -> str:
    """A folder holding only links to the agent's own packages, for the extractor process's sys.path.

    Not the folder the agent package sits in: when the agent is installed, that is its venv's
    site-packages, whose packages (another requests...) would shadow the plugin's.
    """
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = hashlib.sha256(src.encode()).hexdigest()[:12]
    folder = os.path.join(os.path.abspath(os.path.expanduser(env_dir)), ".agent-code", tag)
    os.makedirs(folder, exist_ok=True)
    for package in WORKER_PACKAGES:
        target = os.path.join(src, package)
        link = os.path.join(folder, package)
        if not os.path.isdir(target) or os.path.realpath(link) == os.path.realpath(target):
            continue
        tmp = f"{link}.{os.getpid()}"
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return folder


def ensure(spec: PluginSpec, env_dir: str, env_python: Optional[str], may_build: bool) -> PluginEnv:
    """The plugin's ready environment: built when allowed and missing, else EnvError naming prepare."""
    env, state = check(spec, env_dir, env_python)
    if state == "ready":
        return env
    if state != "missing":
        raise EnvError(state)
    if not may_build:
        raise EnvError(f"{spec.name}: no environment for its requirements.txt at {env.path}: run "
                       f"`{prepare_command(spec)}` on a machine with network access (a login node)")
    try:
        return build(spec, env_dir, env_python)
    except EnvError as exc:
        raise EnvError(f"{exc} (build it with `{prepare_command(spec)}`)") from None


def missing_apt(folder: str) -> Optional[list[str]]:
    """Entries of the plugin's packages.apt that dpkg does not list as installed (None: no dpkg here)."""
    path = os.path.join(folder, "packages.apt")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        wanted = [w for line in fh for w in line.split("#", 1)[0].split()]
    missing = []
    for package in wanted:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                                 text=True, timeout=30)
            installed = out.returncode == 0 and out.stdout.strip().endswith(" installed")
        except FileNotFoundError:
            return None
        except (OSError, subprocess.SubprocessError):
            installed = False
        if not installed:
            missing.append(package)
    return missing


def prepare_plugins(cfg, names: list[str]) -> int:
    """`python -m agent prepare`: build each named plugin's environment (all plugins when none named).

    Prints one line per plugin saying where its environment is; exit 0 when every one is ready.
    """
    from . import exitcodes
    from .logs import setup_logging
    from .image_plugins import discover_all, find
    from .plugin_loader import PluginError
    from .plugin_settings import container_setting, plugin_value
    from hpc_common.redact import Redactor

    setup_logging(cfg.log_level, Redactor())
    specs = []
    try:
        if names:
            specs = [find(cfg, name) for name in names]
        else:
            specs, problems = discover_all(cfg)
            for problem in problems:
                print(f"broken: {problem}", file=sys.stderr)
    except PluginError as exc:
        print(f"agent prepare: {exc}", file=sys.stderr)
        return exitcodes.PLUGIN_ERROR
    code = exitcodes.OK
    for spec in specs:
        container = container_setting(cfg, spec.name, spec.folder_name)
        if container is not None:  # its image holds its system and Python packages
            print(f"{spec.name}: runs in {container.runtime} image {container.image}: nothing to prepare")
            continue
        apt = missing_apt(spec.folder)
        if apt is None:
            print(f"{spec.name}: packages.apt not checked (no dpkg-query here)", file=sys.stderr)
        elif apt:
            print(f"{spec.name}: packages.apt entries not installed (ask the site for them, or use a "
                  f"command_prefix with a container that has them): {' '.join(apt)}", file=sys.stderr)
        if spec.requirements is None:
            print(f"{spec.name}: no requirements.txt: runs in the agent's own environment")
            continue
        env_python = plugin_value(cfg, "env_python", spec.name, spec.folder_name)
        try:
            env = build(spec, cfg.env_dir, env_python)
        except EnvError as exc:
            print(f"agent prepare: {exc}", file=sys.stderr)
            code = exitcodes.PLUGIN_ERROR
            continue
        marker = env.marker() or {}
        print(f"{spec.name}: environment ready: {env.path} (Python {marker.get('python', '?')}, "
              f"{len(marker.get('packages', []))} packages)")
    return code
