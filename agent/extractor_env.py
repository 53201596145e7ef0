"""The environment a plugin's extractor processes get, each value with where it came from.

Precedence, as Docker has it (ENV in an image is a default; `docker run -e` and compose's
`environment:` override it), highest first:

1. set by the agent: the names it sets for this run (CLOWDER_VERSION, RABBITMQ_QUEUE, a work
   source's own, a plugin environment's VIRTUAL_ENV and PATH);
2. plugins table env: `plugins: {NAME: {env: {K: V}}}` in the agent's YAML (or AGENT_PLUGINS),
   so several plugins in one agent can each have their own value of one variable;
3. agent environment: what the agent itself was started with (a job script's `export`), broker
   secrets left out (agent.worker_settings);
4. Dockerfile ENV: the plugin folder's Dockerfile, a default only, never for PROTECTED names.

A plugins table env may set any name except the agent's own settings and secrets
(`plugin_env_problem`): those have settings of their own (per plugin in the same table where it
makes sense), and a broker secret must never reach an extractor process, whatever its name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from .config import SETTINGS
from .errors import ConfigError
from .plugin_loader import PluginSpec
from .plugin_settings import own_value

PLUGINS_TABLE = "plugins table env"
AGENT_ENVIRONMENT = "agent environment"
DOCKERFILE = "Dockerfile ENV"
SET_BY_AGENT = "set by the agent"
#: sources from the highest precedence to the lowest
SOURCES = (SET_BY_AGENT, PLUGINS_TABLE, AGENT_ENVIRONMENT, DOCKERFILE)

#: pyclowder's connection settings and the agent's own: the agent sets or withholds them
AGENT_OWNED = frozenset({env for s in SETTINGS for env in s.env} | {
    "RABBITMQ_URI", "RABBITMQ_QUEUE", "RABBITMQ_EXCHANGE", "EXTRACTOR_KEY", "REGISTRATION_ENDPOINTS",
    "MOUNTED_PATHS", "HEARTBEAT", "MAX_RETRY"})
AGENT_OWNED_PREFIXES = ("AGENT_", "CLOWDER_", "RABBITMQ_")
#: what a Dockerfile ENV never sets: the agent's settings and secrets (its entry point names excepted:
#: they are what a simple extractor's Dockerfile is for) and what ties the process to this host
PROTECTED = frozenset((AGENT_OWNED - {"EXTRACTION_FUNC", "EXTRACTION_MODULE"}) | {
    "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "HOME", "USER", "LOGNAME", "SHELL", "PWD", "TMPDIR", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NO_PROXY",
    "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"})
PROTECTED_PREFIXES = AGENT_OWNED_PREFIXES + ("SLURM_", "PBS_", "PMI_", "OMPI_", "HYDRA_")
_KNOWN_KEYS = {"EXTRACTION_FUNC": "extraction_func", "EXTRACTION_MODULE": "extraction_module",
               "RABBITMQ_QUEUE": "rabbitmq_queue", "MAX_RETRY": "max_retries"}


@dataclass(frozen=True)
class EnvValue:
    """One variable's value, where it came from, and the (source, value) pairs it won over."""

    value: str
    source: str
    overrides: tuple[tuple[str, str], ...] = ()


def plugin_env_problem(plugin: str, table_env: Any) -> Optional[str]:
    """Why a plugins table `env:` cannot be used (None: it can): a mapping of names to scalars, none the agent's."""
    if not isinstance(table_env, Mapping):
        return f"plugin {plugin}: env must be a mapping of NAME: value"
    for key, value in table_env.items():
        key = str(key)
        if not key or "=" in key or "\0" in key:
            return f"plugin {plugin}: env: {key!r} is not a variable name"
        if isinstance(value, (Mapping, list, tuple)):
            return f"plugin {plugin}: env {key}: a value must be a string or a number"
        if key in AGENT_OWNED or key.startswith(AGENT_OWNED_PREFIXES):
            hint = (f"the plugins table's {_KNOWN_KEYS[key]}" if key in _KNOWN_KEYS
                    else "the agent's settings (AGENT_*)")
            return (f"plugin {plugin}: env {key} is the agent's own setting or secret, not the extractor's: "
                    f"set it with {hint}")
    return None


def _text(value: Any) -> str:
    if isinstance(value, bool):  # YAML's yes/no; compose wants them quoted, we say what they meant
        return "true" if value else "false"
    return "" if value is None else str(value)


def table_env(cfg: Any, spec: PluginSpec) -> dict[str, str]:
    """The plugin's own `env:` from the plugins table (by extractor_info name, then folder name)."""
    own = own_value(cfg, "env", spec.name, spec.folder_name) or {}
    return {str(k): _text(v) for k, v in own.items()}


def _broker_secrets(cfg: Any) -> list[str]:
    """Literal secrets no extractor may see: the broker's password and the extractor key."""
    secrets = [getattr(cfg, "extractor_key", None) or ""]
    try:
        secrets.append(urlsplit(getattr(cfg, "rabbitmq_uri", "") or "").password or "")
    except ValueError:
        pass
    return [s for s in secrets if len(s) >= 4]


def dockerfile_env(spec: PluginSpec) -> tuple[dict[str, str], list[str]]:
    """The Dockerfile ENV values an extractor may get, and the names left out (PROTECTED)."""
    kept = {k: v for k, v in spec.docker_env.items() if k not in PROTECTED and not k.startswith(PROTECTED_PREFIXES)}
    return kept, sorted(set(spec.docker_env) - set(kept))


def resolve(cfg: Any, spec: PluginSpec, env: Mapping[str, str],
            agent_environment: Optional[Mapping[str, str]] = None) -> dict[str, EnvValue]:
    """Every variable the plugin's extractor processes get, with its source (see the module's precedence).

    env is what the agent gives every extractor process (agent.worker_settings.worker_env); a name
    whose value there is the agent's own environment's is from the agent environment, any other
    was set by the agent. ConfigError when the plugins table would hand a broker secret over.
    """
    environ = os.environ if agent_environment is None else agent_environment
    own = table_env(cfg, spec)
    problem = plugin_env_problem(spec.name, own)
    if problem:
        raise ConfigError(f"plugins: {problem}")
    for key, value in own.items():
        if any(secret in value for secret in _broker_secrets(cfg)):
            raise ConfigError(f"plugins: plugin {spec.name}: env {key} holds a broker secret; extractor processes "
                              "never get those")
    layers = [(DOCKERFILE, dockerfile_env(spec)[0]),
              (AGENT_ENVIRONMENT, {k: v for k, v in env.items() if environ.get(k) == v}),
              (PLUGINS_TABLE, own),
              (SET_BY_AGENT, {k: v for k, v in env.items() if environ.get(k) != v})]
    out: dict[str, EnvValue] = {}
    for source, values in layers:  # lowest precedence first: each layer overrides the ones before
        for key, value in values.items():
            before = out.get(key)
            shadowed = before.overrides + ((before.source, before.value),) if before else ()
            out[key] = EnvValue(value, source, shadowed)
    return out


def in_venv(entries: Mapping[str, EnvValue], venv: str) -> dict[str, EnvValue]:
    """The entries for a process of the plugin's own venv: its bin first on PATH, no PYTHONPATH/PYTHONHOME."""
    out = {k: v for k, v in entries.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    for key, value in (("VIRTUAL_ENV", venv),
                       ("PATH", os.pathsep.join(filter(None, [os.path.join(venv, "bin"),
                                                              entries["PATH"].value if "PATH" in entries else ""])))):
        before = out.get(key)
        out[key] = EnvValue(value, SET_BY_AGENT, before.overrides + ((before.source, before.value),) if before else ())
    return out


def values(entries: Mapping[str, EnvValue]) -> dict[str, str]:
    """The plain environment (name -> value) for starting a process."""
    return {k: v.value for k, v in entries.items()}
