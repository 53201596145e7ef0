"""Finding extractor plugins and bringing one to life, unchanged.

A plugin is a folder holding an untouched pyclowder extractor: its .py files and its
extractor_info.json. Folders are searched under agent/plugins/ and under each folder in
AGENT_PLUGIN_PATH (a plugin folder itself may also be named there directly). A plugin may also be
only a container image holding the extractor (agent.image_plugins): its paths are inside the image.

Two kinds: "class", a .py defining a pyclowder Extractor subclass (run as `python main.py`
would), and "function", pyclowder's simple-extractor packaging: a plain function named by
EXTRACTION_FUNC in module EXTRACTION_MODULE, wrapped in agent.simple_extractor. Those two names
come from the folder's Dockerfile ENV lines (agent.dockerfile) when it sets them, else from the
agent's settings (extraction_func / extraction_module, per plugin or for all).

pyclowder's Extractor.__init__ reads extractor_info.json from the current directory (else from
dirname(sys.argv[0])) and setup() parses sys.argv; so the extractor is instantiated with cwd set
to its folder and sys.argv set to its main script, exactly as `python main.py` would see it.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Tuple

# search_dirs, BUILTIN_DIR and INFO_FILE stay importable from here (agent.cli, tests)
from hpc_common.plugin_folders import (BUILTIN_DIR, INFO_FILE, PluginInfoError, folder_matches, info_name,
                                       plugin_folders, read_info, search_dirs)

from .dockerfile import DockerfileError, base_image, read_env
from .errors import PluginError

DOCKERFILE = "Dockerfile"
REQUIREMENTS = "requirements.txt"
ENTRY_VARS = ("EXTRACTION_FUNC", "EXTRACTION_MODULE")
#: (extractor_info name, folder name) -> (EXTRACTION_FUNC, EXTRACTION_MODULE) from the agent's settings
EntryDefaults = Callable[[str, str], Tuple[Optional[str], Optional[str]]]  # typing.Tuple: Python 3.8 images
_EXTRACTOR_BASES = {"Extractor", "SimpleExtractor"}


@dataclass(frozen=True)
class PluginSpec:
    """Where a plugin lives and what its extractor is: a class in a script, or a function in a module."""

    name: str            # extractor_info name
    folder: str
    script: str          # absolute path of the .py holding the extractor class (or the function)
    class_name: str      # "" for a function extractor
    info: dict[str, Any]
    kind: str = "class"  # "class" or "function"
    module: str = ""     # function extractors: EXTRACTION_MODULE
    function: str = ""   # function extractors: EXTRACTION_FUNC
    docker_env: dict[str, str] = field(default_factory=dict)  # the Dockerfile's ENV lines
    requirements: Optional[str] = None  # requirements.txt: the plugin runs in an environment of its own
    image: str = ""      # image-only plugin (agent.image_plugins): the image holding folder; paths are inside it
    alias: str = ""      # image-only plugin: its name in the `plugins:` table
    queue: str = ""      # image-only plugin: the image's RABBITMQ_QUEUE, when its ENV sets one

    @property
    def entry(self) -> str:
        """What runs: script:Class or module:function."""
        if self.kind == "function":
            return f"{self.module}:{self.function}"
        return f"{self.script}:{self.class_name}"

    @property
    def folder_name(self) -> str:
        """The plugin's other name: its folder's, or an image-only plugin's name in the `plugins:` table."""
        return self.alias or os.path.basename(self.folder.rstrip("/"))



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


def _defines(tree: ast.Module, name: str) -> bool:
    """True when the module defines name at top level (or may, through `from x import *`)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name:
                    return True
    return False


def _function_spec(folder: str, info: dict[str, Any], func: Optional[str], module: Optional[str],
                   docker_env: dict[str, str], requirements: Optional[str]) -> PluginSpec:
    """A function extractor's spec; PluginError when its entry point is unset or absent."""
    missing = [var for var, value in zip(ENTRY_VARS, (func, module)) if not value]
    if missing:
        raise PluginError(f"{folder}: a function extractor needs {' and '.join(missing)}: set "
                          f"{'them' if len(missing) > 1 else 'it'} with ENV in its {DOCKERFILE} or as "
                          f"{' / '.join('AGENT_' + m for m in missing)}")
    assert func and module
    rel = module.replace(".", os.sep)
    script = next((p for p in (os.path.join(folder, rel + ".py"), os.path.join(folder, rel, "__init__.py"))
                   if os.path.isfile(p)), "")
    if script:  # the module is the plugin's own: check the function is there before any message
        try:
            with open(script, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=script)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise PluginError(f"{script}: cannot parse: {exc}") from None
        if not _defines(tree, func.split(".")[0]):
            raise PluginError(f"{script}: EXTRACTION_FUNC {func!r} is not defined in module {module!r}")
    else:  # an installed module (in the plugin's environment): checked when the extractor starts
        script = os.path.join(folder, rel + ".py")
    return PluginSpec(name=info["name"], folder=os.path.abspath(folder), script=os.path.abspath(script),
                      class_name="", info=info, kind="function", module=module, function=func,
                      docker_env=docker_env, requirements=requirements)


def inspect_folder(folder: str, entry_defaults: Optional[EntryDefaults] = None,
                   image_env: Optional[dict[str, str]] = None) -> PluginSpec:
    """Read a plugin folder's extractor_info.json and find its extractor without running code.

    image_env: the ENV of the image the folder is in (agent.image_plugins), used instead of a Dockerfile's.
    """
    try:
        info = read_info(folder)
    except PluginInfoError as exc:
        raise PluginError(str(exc)) from None
    dockerfile = os.path.join(folder, DOCKERFILE)
    docker_env: dict[str, str] = {}
    if image_env is not None:
        docker_env = dict(image_env)
    elif os.path.isfile(dockerfile):
        try:
            docker_env = read_env(dockerfile)
        except (OSError, UnicodeDecodeError) as exc:
            raise PluginError(f"{dockerfile}: cannot read: {exc}") from None
        except DockerfileError as exc:
            raise PluginError(str(exc)) from None
    requirements = os.path.join(os.path.abspath(folder), REQUIREMENTS)
    requirements_or_none = requirements if os.path.isfile(requirements) else None
    set_func, set_module = (entry_defaults(info["name"], os.path.basename(os.path.abspath(folder)))
                            if entry_defaults else (None, None))
    func = docker_env.get("EXTRACTION_FUNC") or set_func
    module = docker_env.get("EXTRACTION_MODULE") or set_module
    names_function = any(docker_env.get(v) for v in ENTRY_VARS) or "simple-extractor" in (base_image(dockerfile) or "")
    candidates = []
    if not names_function:
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
    if names_function or (not candidates and (func or module)):
        return _function_spec(folder, info, func, module, docker_env, requirements_or_none)
    if not candidates:
        raise PluginError(f"{folder}: no .py file defines a pyclowder Extractor subclass, and no "
                          f"EXTRACTION_FUNC/EXTRACTION_MODULE names a function (in a {DOCKERFILE} ENV or the settings)")
    # Prefer the script that instantiates its extractor under __main__ (the one people run).
    candidates.sort(key=lambda c: (not c[0], c[1]))
    _, script, class_name = candidates[0]
    return PluginSpec(name=info["name"], folder=os.path.abspath(folder), script=os.path.abspath(script),
                      class_name=class_name, info=info, docker_env=docker_env,
                      requirements=requirements_or_none)



def _scan(plugin_path: Iterable[str], entry_defaults: Optional[EntryDefaults]
          ) -> tuple[list[PluginSpec], list[tuple[str, str, str]]]:
    """Plugins found, and (folder, extractor_info name, problem) per broken plugin folder."""
    found: list[PluginSpec] = []
    broken: list[tuple[str, str, str]] = []
    for folder in plugin_folders(plugin_path):
        try:
            found.append(inspect_folder(folder, entry_defaults))
        except PluginError as exc:
            broken.append((folder, info_name(folder), str(exc)))
    return found, broken


def discover(plugin_path: Iterable[str],
             entry_defaults: Optional[EntryDefaults] = None) -> tuple[list[PluginSpec], list[str]]:
    """All plugins found, and one problem line per folder that looked like a plugin but is broken."""
    found, broken = _scan(plugin_path, entry_defaults)
    return found, [problem for _, _, problem in broken]


def find_plugin(name: Optional[str], plugin_path: Iterable[str],
                entry_defaults: Optional[EntryDefaults] = None) -> PluginSpec:
    """The plugin called name (extractor_info name or folder name); the only one when name is None."""
    found, broken = _scan(plugin_path, entry_defaults)
    problems = [problem for _, _, problem in broken]
    if name is None:
        if len(found) == 1:
            return found[0]
        known = ", ".join(p.name for p in found) or "none"
        raise PluginError(f"no plugin chosen (use --plugin or AGENT_PLUGIN); found: {known}")
    for spec in found:
        if folder_matches(name, spec.folder, spec.info):
            return spec
    for folder, _, problem in broken:  # the plugin asked for is there but broken: say why
        if folder_matches(name, folder):
            raise PluginError(f"plugin {name}: {problem}")
    known = ", ".join(sorted({p.name for p in found})) or "none"
    detail = ("; broken plugin folders: " + "; ".join(problems)) if problems else ""
    raise PluginError(f"plugin {name!r} not found in {':'.join(search_dirs(plugin_path))} "
                      f"(found: {known}){detail}")


def _load_function(spec: PluginSpec) -> Any:
    """Import EXTRACTION_MODULE as the simple-extractor image does (plugin folder first on sys.path)."""
    try:
        target: Any = importlib.import_module(spec.module)
        for part in spec.function.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise PluginError(f"module {spec.module!r} has no function {spec.function!r} (EXTRACTION_FUNC)") from None
    except ImportError as exc:
        raise PluginError(f"cannot import EXTRACTION_MODULE {spec.module!r}: {exc}") from None
    if not callable(target):
        raise PluginError(f"{spec.module}.{spec.function} (EXTRACTION_FUNC) is not a function")
    from .simple_extractor import FunctionExtractor
    return FunctionExtractor(target)


def instantiate(spec: PluginSpec) -> Any:
    """Import the plugin's script and construct its extractor as if run as `python script`.

    Leaves the process's cwd in the plugin folder, where extractors expect to run.
    """
    os.chdir(spec.folder)
    sys.argv = [spec.script]
    if spec.folder not in sys.path:
        sys.path.insert(0, spec.folder)
    if spec.kind == "function":
        try:
            return _load_function(spec)
        except SystemExit as exc:
            raise PluginError(f"{spec.script}: the extractor exited while starting (code {exc.code}); "
                              f"is {INFO_FILE} valid?") from None
        except PluginError:
            raise
        except Exception as exc:  # the plugin's own code failed: report it, do not crash the agent
            raise PluginError(f"{spec.script}: loading {spec.entry} failed: "
                              f"{exc.__class__.__name__}: {exc}") from exc
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
