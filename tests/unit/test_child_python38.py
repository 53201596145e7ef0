"""The code an extractor process runs works on the Pythons extractor images carry (3.8 and later).

Inside a container image the agent's worker code runs on the image's interpreter with the image's
pyclowder (agent.container_runtime). So every module the extractor process can import (its static
closure, lazy imports in functions included) must parse as Python 3.8, use no 3.9+ feature that
only fails when the line runs, and import nothing beyond the standard library, pyclowder and what
pyclowder itself needs (no psutil, yaml, or the agent's other dependencies).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the modules an extractor process starts from (python -c BOOT CODE_DIR MODULE)
ENTRY_MODULES = ("agent.worker_process", "agent.stage_ahead")
OWN_PACKAGES = ("agent", "hpc_common")
#: what an image with pyclowder has besides the standard library
IMAGE_PACKAGES = {"pyclowder", "requests"}
BUILTIN_GENERICS = {"dict", "list", "tuple", "set", "frozenset", "type"}
NEWER_TYPING = {"Annotated", "ParamSpec", "Concatenate", "TypeAlias", "TypeGuard", "Self", "Never",
                "LiteralString", "Unpack", "TypeVarTuple", "Required", "NotRequired", "assert_never",
                "reveal_type", "dataclass_transform", "override", "is_typeddict"}
NEWER_STDLIB = {"zoneinfo", "graphlib", "tomllib"}
NEWER_METHODS = {"removeprefix", "removesuffix", "is_relative_to", "bit_count", "with_stem"}


def _path(module: str) -> str:
    base = os.path.join(REPO, *module.split("."))
    return base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Absolute names of every module the source imports, at top level or inside functions."""
    package = module if _path(module).endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from . import x` may name modules
    return out


def child_closure() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every agent/hpc_common module the extractor process may import."""
    seen: dict[str, ast.Module] = {}
    todo = list(ENTRY_MODULES)
    while todo:
        module = todo.pop()
        if module in seen or not os.path.isfile(_path(module)):
            continue
        with open(_path(module), encoding="utf-8") as fh:
            seen[module] = ast.parse(fh.read(), filename=_path(module))
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        todo += [name for name in _imports(module, seen[module]) if name.split(".")[0] in OWN_PACKAGES]
    return seen


def _annotation_nodes(tree: ast.Module) -> set[int]:
    """ids of every node inside an annotation (not evaluated under `from __future__ import annotations`)."""
    inside = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            roots += [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs if a.annotation]
            roots += [a.annotation for a in (args.vararg, args.kwarg) if a is not None and a.annotation]
            roots += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        for root in roots:
            inside.update(id(sub) for sub in ast.walk(root))
    return inside


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
               any(a.name == "annotations" for a in n.names) for n in tree.body)


def problems_for_38(module: str, tree: ast.Module) -> list[str]:
    """What in this module would fail on Python 3.8 (empty: nothing found)."""
    path = _path(module)
    with open(path, encoding="utf-8") as fh:
        try:
            ast.parse(fh.read(), filename=path, feature_version=(3, 8))
        except SyntaxError as exc:
            return [f"{module}:{exc.lineno}: not Python 3.8 syntax: {exc.msg}"]
    out = []
    annotations = _annotation_nodes(tree) if _has_future_annotations(tree) else set()
    for node in ast.walk(tree):
        line = f"{module}:{getattr(node, 'lineno', '?')}"
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id in BUILTIN_GENERICS and id(node) not in annotations):
            out.append(f"{line}: {node.value.id}[...] is evaluated at run time (typing.{node.value.id.title()})")
        elif isinstance(node, ast.Attribute) and node.attr in NEWER_METHODS:
            out.append(f"{line}: .{node.attr} is Python 3.9+")
        elif isinstance(node, ast.ImportFrom) and node.module == "typing":
            out += [f"{line}: typing.{a.name} is newer than 3.8" for a in node.names if a.name in NEWER_TYPING]
        elif isinstance(node, ast.ImportFrom) and node.module == "functools":
            out += [f"{line}: functools.cache is 3.9+" for a in node.names if a.name == "cache"]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [f"{line}: {n} is newer than 3.8" for n in names if n.split(".")[0] in NEWER_STDLIB]
        elif isinstance(node, ast.Call):
            keywords = {k.arg for k in node.keywords}
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func == "zip" and "strict" in keywords:
                out.append(f"{line}: zip(strict=) is 3.10+")
            if func == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                out.append(f"{line}: dataclass({', '.join(sorted(keywords))}) is 3.10+")
        elif (isinstance(node, ast.AnnAssign) and not _has_future_annotations(tree)
              and any(isinstance(s, ast.Subscript) and isinstance(s.value, ast.Name)
                      and s.value.id in BUILTIN_GENERICS for s in ast.walk(node.annotation))):
            out.append(f"{line}: builtin generic annotation without `from __future__ import annotations`")
    return out


def test_the_closure_is_found():
    closure = child_closure()
    for module in ("agent.worker_process", "agent.stage_ahead", "agent.connector", "agent.plugin_loader",
                   "agent.ipc", "agent.simple_extractor", "agent.clowder_http", "hpc_common.file_fetch"):
        assert module in closure
    assert "agent.config" not in closure and "agent.runner" not in closure  # the agent's side only


def test_every_child_module_is_python_38():
    found = [p for module, tree in sorted(child_closure().items()) for p in problems_for_38(module, tree)]
    assert found == []


def test_the_checks_catch_what_fails_on_38(tmp_path, monkeypatch):
    """The checker itself: each construct that breaks 3.8 is reported (a check that cannot fail is none)."""
    package = tmp_path / "probe38"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text(
        "from __future__ import annotations\n"
        "from typing import Callable, TypeAlias\n"
        "Emit = Callable[[dict[str, int]], None]\n"
        "def f(x: dict[str, int]) -> list[int]:\n"   # annotations: fine
        "    return 'ab'.removeprefix('a'), zip([], [], strict=True)\n")
    (package / "syntax.py").write_text("match 1:\n    case 1:\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    with open(package / "bad.py") as fh:
        found = problems_for_38("probe38.bad", ast.parse(fh.read()))
    assert sorted(p.split(": ", 1)[1].split(" ")[0] for p in found) == [
        ".removeprefix", "dict[...]", "typing.TypeAlias", "zip(strict=)"]
    assert "not Python 3.8 syntax" in problems_for_38("probe38.syntax", ast.parse("x = 1"))[0]


def test_the_child_imports_only_what_an_image_has():
    stdlib = set(sys.stdlib_module_names)
    outside = sorted({f"{module}: {name}" for module, tree in child_closure().items()
                      for name in _imports(module, tree)
                      if name and name.split(".")[0] not in stdlib | set(OWN_PACKAGES) | IMAGE_PACKAGES})
    assert outside == []


def test_importing_the_entry_modules_loads_nothing_outside_the_closure():
    """Import-check: what Python really loads of agent/hpc_common is in the static closure, and no psutil/yaml."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            + "; ".join(f"import {m}" for m in ENTRY_MODULES)
            + "; print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-I", "-c", code, REPO], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    import json
    loaded = json.loads(done.stdout)
    own = {m for m in loaded if m.split(".")[0] in OWN_PACKAGES}
    assert own <= set(child_closure())
    assert not {"psutil", "yaml", "agent.config"} & set(loaded)
