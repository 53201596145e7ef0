"""Extractor processes inside a container image: the `container:` plugin setting and each runtime's argv.

    plugins:
      ncsa.image.preview:
        container: {runtime: apptainer, image: /scratch/images/preview.sif, python: python3,
                    binds: [/scratch/shared, /opt/data:/data:ro]}

The agent stays on the host; each extractor process is the image's own interpreter running the
agent's worker code, started by the runtime as the agent's child on a pipe (limits, kills and
redelivery as without a container). Bound at the SAME path inside, so every path in an init or
job frame means the same file on both sides: the agent's worker packages (read-only), the plugin
folder, the work folder (stage-ahead's files are there), MOUNTED_PATHS folders, the CA bundles
REQUESTS_CA_BUNDLE & co. name (read-only), and `binds`.

The extractor's environment reaches the process by name through each runtime's own mechanism,
and no value is ever put on a command line (a site's own variables may hold tokens):

    apptainer / singularity  exec --cleanenv, each variable as APPTAINERENV_K / SINGULARITYENV_K
    podman                   run --rm -i (no tty), each variable as -e K (podman reads K's value
                             from its own environment)
    charliecloud             ch-run is given exactly the extractor's environment (ch-run passes its
                             own environment in, unless told --unset-env) over the image's ENV
                             (ch/metadata.json), which ch-run does not apply itself, plus USER

Host-only variables (PATH, PYTHONPATH, VIRTUAL_ENV, LD_*, HOME...) are never passed: they name
this host's files. Standard library only, like all code near the extractor process.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

RUNTIMES = ("apptainer", "singularity", "charliecloud", "podman")
CONTAINER_KEYS = ("runtime", "image", "python", "binds")
DEFAULT_PYTHON = "python3"
#: variables that describe this host's files or shell, not the extractor's settings
HOST_ONLY_ENV = frozenset({
    "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "VIRTUAL_ENV",
    "CONDA_PREFIX", "LD_LIBRARY_PATH", "LD_PRELOAD", "HOME", "PWD", "OLDPWD", "SHELL", "SHLVL", "_"})
#: prefixes of host-only variables: the loader's, and an MPI launcher's wiring (it belongs to the rank)
HOST_ONLY_PREFIXES = ("LD_", "PMI_", "PMIX_", "OMPI_", "HYDRA_")
#: variables naming the host's CA certificates: passed in, and what they name bound read-only at the same
#: path, so the extractor trusts the Clowder the agent trusts (a site's own CA included)
CA_ENV = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE")
#: PATH inside an image whose metadata gives none (Debian's and the python images')
IMAGE_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Bind:
    """A host folder or file made visible inside the container."""

    src: str
    dst: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSetting:
    """One plugin's `container:` setting, checked."""

    runtime: str
    image: str
    python: str = DEFAULT_PYTHON
    binds: Tuple[Bind, ...] = field(default_factory=tuple)


def parse_bind(text: Any) -> Bind:
    """`src`, `src:dst` or `src:dst:ro|rw` (absolute paths); ValueError when malformed."""
    parts = str(text).split(":")
    if not 1 <= len(parts) <= 3 or not all(parts[:2]):
        raise ValueError(f"bind {text!r}: expected src[:dst[:ro]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 else src
    mode = parts[2] if len(parts) > 2 else "rw"
    if mode not in ("ro", "rw"):
        raise ValueError(f"bind {text!r}: mode {mode!r} is not ro or rw")
    if not (os.path.isabs(src) and os.path.isabs(dst)):
        raise ValueError(f"bind {text!r}: paths must be absolute")
    return Bind(os.path.normpath(src), os.path.normpath(dst), mode == "ro")


def parse_container(value: Any) -> ContainerSetting:
    """A `container:` mapping (YAML, or JSON in AGENT_PLUGINS) checked; ValueError saying what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError("container: expected a mapping {runtime, image, python, binds}")
    unknown = sorted(set(map(str, value)) - set(CONTAINER_KEYS))
    if unknown:
        raise ValueError(f"container: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONTAINER_KEYS)})")
    runtime = str(value.get("runtime") or "")
    if runtime not in RUNTIMES:
        raise ValueError(f"container: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    image = str(value.get("image") or "")
    if not image:
        raise ValueError("container: needs an image (a path, or a name for podman)")
    if runtime == "charliecloud" and not os.path.isabs(image):
        raise ValueError(f"container: charliecloud needs the image as an absolute folder path, not {image!r}")
    python = str(value.get("python") or DEFAULT_PYTHON)
    binds = value.get("binds") or []
    if isinstance(binds, str) or not isinstance(binds, (list, tuple)):
        raise ValueError("container: binds must be a list of src[:dst[:ro]]")
    try:
        return ContainerSetting(runtime, image, python, tuple(parse_bind(b) for b in binds))
    except ValueError as exc:
        raise ValueError(f"container: {exc}") from None


# -- the image's own metadata (directory images) -------------------------------------------------
def image_metadata(image: str) -> Dict[str, Any]:
    """What ch-image recorded of the Dockerfile (ch/metadata.json: cwd, env), {} when absent or unreadable."""
    try:
        with open(os.path.join(image, "ch", "metadata.json"), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def image_env(image: str) -> Dict[str, str]:
    """The image's ENV defaults: ch/metadata.json "env", else ch/environment (KEY=VALUE lines)."""
    env = image_metadata(image).get("env")
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items()}
    out: Dict[str, str] = {}
    try:
        with open(os.path.join(image, "ch", "environment"), encoding="utf-8") as fh:
            for line in fh:
                key, sep, val = line.rstrip("\n").partition("=")
                if sep and key.strip():
                    out[key.strip()] = val
    except OSError:
        pass
    return out


# -- argv and environment per runtime -------------------------------------------------------------
def passed_env(env: Mapping[str, str]) -> Dict[str, str]:
    """The part of the extractor's environment that goes into the container (host-only names left out)."""
    return {k: v for k, v in env.items() if k not in HOST_ONLY_ENV and not k.startswith(HOST_ONLY_PREFIXES)}


def _runtime_host_env(env: Mapping[str, str]) -> Dict[str, str]:
    """What the runtime program itself needs from the host to start (not passed into the container)."""
    keep = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
            "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")
    out = {k: env[k] for k in keep if k in env}
    out.setdefault("USER", os.environ.get("USER") or _user_name())
    return out


def _user_name() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


class Runtime:
    """How one container runtime is started: its program, its argv and its environment."""

    name = ""
    program = ""
    env_prefix = ""  # apptainer-style: variables passed as <prefix>K in the runtime's environment

    def argv(self, setting: ContainerSetting, binds: List[Bind], names: List[str], inner: List[str]) -> List[str]:
        raise NotImplementedError

    def environment(self, passed: Mapping[str, str], host: Mapping[str, str], setting: ContainerSetting
                    ) -> Dict[str, str]:
        """The runtime process's environment: what it needs itself and the extractor's variables."""
        out = _runtime_host_env(host)
        out.update({self.env_prefix + k: v for k, v in passed.items()})
        return out


class Apptainer(Runtime):
    name = program = "apptainer"
    env_prefix = "APPTAINERENV_"  # passed in even under --cleanenv (documented)

    def argv(self, setting: ContainerSetting, binds: List[Bind], names: List[str], inner: List[str]) -> List[str]:
        out = [self.program, "exec", "--cleanenv"]
        for b in binds:
            out += ["--bind", f"{b.src}:{b.dst}:ro" if b.read_only else f"{b.src}:{b.dst}"]
        return [*out, setting.image, *inner]


class Singularity(Apptainer):
    name = program = "singularity"
    env_prefix = "SINGULARITYENV_"


class Podman(Runtime):
    name = program = "podman"

    def argv(self, setting: ContainerSetting, binds: List[Bind], names: List[str], inner: List[str]) -> List[str]:
        # -i keeps stdin open (the frames' pipe); no -t: a tty would mangle the binary frames.
        # Host network: the extractor reaches Clowder (or the agent's relay) as the agent does.
        # --entrypoint: an image's ENTRYPOINT (entrypoint.sh in older extractor images) must not wrap it.
        out = [self.program, "run", "--rm", "-i", "--network=host", "--entrypoint", inner[0]]
        for b in binds:
            out += ["-v", f"{b.src}:{b.dst}:ro" if b.read_only else f"{b.src}:{b.dst}"]
        for name in names:
            out += ["-e", name]  # the value comes from podman's own environment, never the command line
        return [*out, setting.image, *inner[1:]]


class Charliecloud(Runtime):
    name = "charliecloud"
    program = "ch-run"

    def argv(self, setting: ContainerSetting, binds: List[Bind], names: List[str], inner: List[str]) -> List[str]:
        out = [self.program]
        for b in binds:  # ch-run 0.31 binds read-write only; the image itself stays read-only
            out += ["-b", f"{b.src}:{b.dst}"]
        return [*out, setting.image, "--", *inner]

    def environment(self, passed: Mapping[str, str], host: Mapping[str, str], setting: ContainerSetting
                    ) -> Dict[str, str]:
        # ch-run hands its own environment to the container: give it the image's ENV as defaults (what
        # docker, apptainer and podman apply themselves, PATH and PYTHONPATH of the image included)
        # under exactly the extractor's variables.
        defaults = image_env(setting.image)
        out = dict(defaults)
        out.update(passed)
        out["USER"] = host.get("USER") or os.environ.get("USER") or _user_name()  # ch-run refuses to start without
        out["PATH"] = defaults.get("PATH") or IMAGE_DEFAULT_PATH
        return out


RUNTIME_CLASSES: Dict[str, Runtime] = {r.name: r for r in (Apptainer(), Singularity(), Podman(), Charliecloud())}


def ca_paths(env: Mapping[str, str]) -> List[str]:
    """The host's CA files and folders the extractor's environment names (those that exist)."""
    return [env[k] for k in CA_ENV if env.get(k, "").startswith("/") and os.path.exists(env[k])]


def same_path_binds(setting: ContainerSetting, read_only: List[str], read_write: List[str]) -> List[Bind]:
    """The agent's folders at the same path inside, then the configured binds; duplicates dropped."""
    out: List[Bind] = []
    seen = set()
    for paths, ro in ((read_only, True), (read_write, False)):
        for path in paths:
            path = os.path.normpath(path)
            if path not in seen:
                seen.add(path)
                out.append(Bind(path, path, ro))
    for b in setting.binds:
        if b.dst not in seen:
            seen.add(b.dst)
            out.append(b)
    return out


def missing_mount_points(image: str, binds: List[Bind]) -> List[str]:
    """Charliecloud: bind targets absent from a directory image, created when the image is writable.

    ch-run can bind only onto a folder that exists in the image (it is mounted read-only);
    directory images are usually their user's own, so the agent makes the folders. Returns those
    it could not make.
    """
    missing = []
    for b in binds:
        target = os.path.join(image, b.dst.lstrip("/"))
        if os.path.isdir(target) or (os.path.exists(target) and not os.path.isdir(b.src)):
            continue
        try:
            if os.path.isdir(b.src):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
        except OSError:
            missing.append(b.dst)
    return missing


def assemble(setting: ContainerSetting, inner: List[str], binds: List[Bind], env: Mapping[str, str],
             host_env: Optional[Mapping[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """The runtime's argv (ending with inner, the in-image command) and the runtime process's environment.

    env: the extractor's environment as the agent computed it; host_env: the agent's own (for
    what the runtime program needs to start; default os.environ).
    """
    runtime = RUNTIME_CLASSES[setting.runtime]
    passed = passed_env(env)
    host = dict(os.environ if host_env is None else host_env)
    argv = runtime.argv(setting, binds, sorted(passed), list(inner))
    program = shutil.which(runtime.program, path=host.get("PATH"))
    if program:
        argv[0] = program  # the runtime's own environment may carry the image's PATH, not the host's
    return argv, runtime.environment(passed, host, setting)
