"""Where extractor plugins live and what their extractor_info.json says, without running them.

The agent finds its plugins with these rules (agent.plugin_loader adds the rest: which script or
function is the extractor); the launcher reads the same folders to register the extractors it
scales for on Clowder's `extractors` exchange while no agent runs.

A plugin folder holds an extractor_info.json with a "name". Folders are searched in agent/plugins/
of this checkout first, then in each folder of AGENT_PLUGIN_PATH (a plugin folder itself may also
be named there directly). A plugin is chosen by its extractor_info name or its folder's name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Optional

#: the plugins that ship with the agent (a path in this checkout, not an import of the agent)
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agent", "plugins")
INFO_FILE = "extractor_info.json"


class PluginInfoError(ValueError):
    """A folder's extractor_info.json cannot be read, is not JSON, or has no "name"."""


def search_dirs(plugin_path: Iterable[str]) -> list[str]:
    """The folders searched for plugins, in order: built-in first, then AGENT_PLUGIN_PATH's."""
    dirs = [BUILTIN_DIR]
    for entry in plugin_path:
        full = os.path.abspath(os.path.expanduser(entry))
        if full not in dirs:
            dirs.append(full)
    return dirs


def plugin_folders(plugin_path: Iterable[str]) -> Iterator[str]:
    """Every folder that holds an extractor_info.json, in search order (broken ones included)."""
    for base in search_dirs(plugin_path):
        if not os.path.isdir(base):
            continue
        if os.path.isfile(os.path.join(base, INFO_FILE)):
            yield base
            continue
        for entry in sorted(os.listdir(base)):
            if os.path.isfile(os.path.join(base, entry, INFO_FILE)):
                yield os.path.join(base, entry)


def read_info(folder: str) -> dict[str, Any]:
    """The folder's extractor_info.json; PluginInfoError (saying why) when unusable."""
    path = os.path.join(folder, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except OSError as exc:
        raise PluginInfoError(f"{folder}: cannot read {INFO_FILE}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PluginInfoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise PluginInfoError(f"{path}: not UTF-8 ({exc.reason})") from None
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
        raise PluginInfoError(f"{path}: needs a \"name\"")
    return info


def info_name(folder: str) -> str:
    """The extractor_info name of a (possibly broken) plugin folder, or ""."""
    try:
        return read_info(folder)["name"]
    except PluginInfoError:
        return ""


def folder_matches(name: str, folder: str, info: Optional[dict[str, Any]] = None) -> bool:
    """True when name chooses this plugin: its extractor_info name or its folder's name."""
    known = info["name"] if info is not None else info_name(folder)
    return name in (known, os.path.basename(folder.rstrip("/")))
