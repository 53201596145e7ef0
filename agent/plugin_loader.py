"""Finding extractor plugins and bringing one to life, unchanged.

A plugin is a folder holding an untouched pyclowder extractor: its .py files and its
extractor_info.json. Folders are searched under agent/plugins/ and under each folder in
AGENT_PLUGIN_PATH (a plugin folder itself may also be named there directly).

pyclowder's Extractor.__init__ reads extractor_info.json from the current directory (else from
dirname(sys.argv[0])) and setup() parses sys.argv; so the extractor is instantiated with cwd set
to its folder and sys.argv set to its main script, exactly as `python main.py` would see it.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .errors import PluginError

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
INFO_FILE = "extractor_info.json"
_EXTRACTOR_BASES = {"Extractor", "SimpleExtractor"}


@dataclass(frozen=True)
class PluginSpec:
    """Where a plugin lives and which class in which script is its extractor."""

    name: str            # extractor_info name
    folder: str
    script: str          # absolute path of the .py holding the extractor class
    class_name: str
    info: dict[str, Any]

    @property
    def folder_name(self) -> str:
        return os.path.basename(self.folder.rstrip("/"))


def search_dirs(plugin_path: Iterable[str]) -> list[str]:
    """The folders searched for plugins, in order: built-in first, then AGENT_PLUGIN_PATH."""
    dirs = [BUILTIN_DIR]
    for entry in plugin_path:
        full = os.path.abspath(os.path.expanduser(entry))
        if full not in dirs:
            dirs.append(full)
    return dirs


def _extractor_classes(tree: ast.Module) -> list[str]:
    """Names of classes in a module whose bases look like pyclowder extractors (directly or locally)."""
    local: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases = []
            for base in node.bases:
                if isinstance(base, ast.Name):
                    bases.append(base.id)
                elif isinstance(base, ast.Attribute):
                    bases.append(base.attr)
            local[node.name] = bases

    def is_extractor(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in seen:
            return False
        return any(b in _EXTRACTOR_BASES or (b in local and is_extractor(b, seen | {name}))
                   for b in local.get(name, []))

    return [name for name in local if is_extractor(name)]


def _main_block_calls(tree: ast.Module) -> set[str]:
    """Names called inside `if __name__ == "__main__":`, where scripts instantiate their extractor."""
    calls: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
                    calls.add(sub.func.id)
    return calls


def inspect_folder(folder: str) -> PluginSpec:
    """Read a plugin folder's extractor_info.json and find its extractor class without running code."""
    info_path = os.path.join(folder, INFO_FILE)
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except OSError as exc:
        raise PluginError(f"{folder}: cannot read {INFO_FILE}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PluginError(f"{info_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
        raise PluginError(f"{info_path}: needs a \"name\"")
    candidates = []
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".py"):
            continue
        path = os.path.join(folder, entry)
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise PluginError(f"{path}: cannot parse: {exc}") from None
        classes = _extractor_classes(tree)
        if classes:
            called = _main_block_calls(tree)
            chosen = [c for c in classes if c in called] or classes[-1:]
            candidates.append((bool(called & set(classes)), path, chosen[0]))
    if not candidates:
        raise PluginError(f"{folder}: no .py file defines a pyclowder Extractor subclass")
    # Prefer the script that instantiates its extractor under __main__ (the one people run).
    candidates.sort(key=lambda c: (not c[0], c[1]))
    _, script, class_name = candidates[0]
    return PluginSpec(name=info["name"], folder=os.path.abspath(folder), script=os.path.abspath(script),
                      class_name=class_name, info=info)


def discover(plugin_path: Iterable[str]) -> tuple[list[PluginSpec], list[str]]:
    """All plugins found, and one problem line per folder that looked like a plugin but is broken."""
    found: list[PluginSpec] = []
    problems: list[str] = []
    for base in search_dirs(plugin_path):
        if not os.path.isdir(base):
            continue
        folders = [base] if os.path.isfile(os.path.join(base, INFO_FILE)) else [
            os.path.join(base, d) for d in sorted(os.listdir(base))
            if os.path.isfile(os.path.join(base, d, INFO_FILE))]
        for folder in folders:
            try:
                found.append(inspect_folder(folder))
            except PluginError as exc:
                problems.append(str(exc))
    return found, problems


def find_plugin(name: Optional[str], plugin_path: Iterable[str]) -> PluginSpec:
    """The plugin called name (extractor_info name or folder name); the only one when name is None."""
    found, problems = discover(plugin_path)
    if name is None:
        if len(found) == 1:
            return found[0]
        known = ", ".join(p.name for p in found) or "none"
        raise PluginError(f"no plugin chosen (use --plugin or AGENT_PLUGIN); found: {known}")
    for spec in found:
        if name in (spec.name, spec.folder_name):
            return spec
    known = ", ".join(sorted({p.name for p in found})) or "none"
    detail = ("; broken plugin folders: " + "; ".join(problems)) if problems else ""
    raise PluginError(f"plugin {name!r} not found in {':'.join(search_dirs(plugin_path))} "
                      f"(found: {known}){detail}")


def instantiate(spec: PluginSpec) -> Any:
    """Import the plugin's script and construct its extractor as if run as `python script`.

    Leaves the process's cwd in the plugin folder, where extractors expect to run.
    """
    os.chdir(spec.folder)
    sys.argv = [spec.script]
    if spec.folder not in sys.path:
        sys.path.insert(0, spec.folder)
    module_name = "clowder_plugin_" + "".join(c if c.isalnum() else "_" for c in spec.folder_name)
    module_spec = importlib.util.spec_from_file_location(module_name, spec.script)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"{spec.script}: cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
        cls = getattr(module, spec.class_name)
        return cls()
    except SystemExit as exc:
        raise PluginError(f"{spec.script}: the extractor exited while starting (code {exc.code}); "
                          f"is {INFO_FILE} valid?") from None
    except Exception as exc:  # the plugin's own code failed: report it, do not crash the agent
        raise PluginError(f"{spec.script}: loading {spec.class_name} failed: "
                          f"{exc.__class__.__name__}: {exc}") from exc
