"""Units of the extractor shapes: Dockerfile ENV reading, per-plugin settings, plugin kinds, launch."""
from __future__ import annotations

import json
import os
import sys

import pytest

from agent.config import ConfigError, load_config
from agent.dockerfile import DockerfileError, read_env
from agent.extractor_launch import BOOT, apply
from agent.plugin_loader import PluginError, discover, find_plugin
from agent.plugin_settings import command_prefix, entry_defaults, plugin_value


def _dockerfile(tmp_path, text: str) -> str:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return str(path)


def test_env_forms(tmp_path):
    path = _dockerfile(tmp_path, """# comment
ARG PYCLOWDER_PYTHON=""
FROM clowder/extractors-simple-extractor${PYCLOWDER_PYTHON}:onbuild
ARG LEVEL=3
ENV EXTRACTION_FUNC="wordcount"
env EXTRACTION_MODULE wordcount
ENV A=1 B="two words" C='single $A' D=escaped\\ space
ENV LEGACY the rest of the line
ENV MULTI=first \\
    # a comment inside a continuation
    SECOND=${A}-$LEVEL \\
    THIRD=${UNSET:-fallback} FOURTH=${A:+set}
ENV SAME_LINE=x SEES_OLD=$SAME_LINE EQ="a=b" EMPTY="" QUOTED="say \\"hi\\""
RUN echo ignored
""")
    assert read_env(path) == {
        "EXTRACTION_FUNC": "wordcount", "EXTRACTION_MODULE": "wordcount", "A": "1", "B": "two words",
        "C": "single $A", "D": "escaped space", "LEGACY": "the rest of the line", "MULTI": "first",
        "SECOND": "1-3", "THIRD": "fallback", "FOURTH": "set", "SAME_LINE": "x", "SEES_OLD": "",
        "EQ": "a=b", "EMPTY": "", "QUOTED": 'say "hi"'}


def test_env_of_the_last_stage_only(tmp_path):
    path = _dockerfile(tmp_path, "FROM a AS build\nENV X=1\nFROM b\nENV Y=$X\n")
    assert read_env(path) == {"Y": ""}


def test_env_errors_name_the_line(tmp_path):
    with pytest.raises(DockerfileError, match=r"Dockerfile:2: ENV 'lonely' is not KEY=VALUE"):
        read_env(_dockerfile(tmp_path, "FROM x\nENV A=1 lonely\n"))
    with pytest.raises(DockerfileError, match=r"Dockerfile:2: cannot read ENV"):
        read_env(_dockerfile(tmp_path, "FROM x\nENV A=\"open\n"))


def _folder(tmp_path, name="fn", dockerfile=None, module="mod.py", code="def run(path):\n    return {}\n"):
    folder = tmp_path / "plugins" / name
    folder.mkdir(parents=True)
    (folder / "extractor_info.json").write_text(json.dumps({"name": f"test.{name}", "process": {"file": []}}))
    if module:
        (folder / module).write_text(code)
    if dockerfile is not None:
        (folder / "Dockerfile").write_text(dockerfile)
    return str(tmp_path / "plugins")


def test_function_kind_from_dockerfile_or_settings(tmp_path):
    path = _folder(tmp_path, dockerfile="FROM x\nENV EXTRACTION_FUNC=run EXTRACTION_MODULE=mod\n")
    spec = find_plugin("test.fn", [path])
    assert (spec.kind, spec.entry, spec.class_name) == ("function", "mod:run", "")
    assert spec.script.endswith("/fn/mod.py")
    other = _folder(tmp_path / "b", name="plain")
    with pytest.raises(PluginError, match="no .py file defines a pyclowder Extractor subclass, and no "
                                          "EXTRACTION_FUNC/EXTRACTION_MODULE"):
        find_plugin("plain", [other])
    cfg = load_config({}, environ={"AGENT_PLUGINS": json.dumps({"test.plain": {"extraction_func": "run"}}),
                                   "EXTRACTION_MODULE": "mod"})
    assert find_plugin("plain", [other], entry_defaults(cfg)).entry == "mod:run"


def test_function_kind_errors(tmp_path):
    path = _folder(tmp_path, dockerfile="FROM clowder/extractors-simple-extractor:onbuild\n")
    found, problems = discover([path])
    assert found == [] and len(problems) == 1
    assert "needs EXTRACTION_FUNC and EXTRACTION_MODULE: set them with ENV in its Dockerfile" in problems[0]
    path = _folder(tmp_path / "b", dockerfile="FROM x\nENV EXTRACTION_FUNC=nope EXTRACTION_MODULE=mod\n")
    with pytest.raises(PluginError, match="EXTRACTION_FUNC 'nope' is not defined in module 'mod'"):
        find_plugin("fn", [path])
    # names brought in by import, or possibly by `import *`, are accepted (checked at start-up)
    path = _folder(tmp_path / "c", dockerfile="FROM x\nENV EXTRACTION_FUNC=run EXTRACTION_MODULE=mod\n",
                   code="from os.path import basename as run\n")
    assert find_plugin("fn", [path]).kind == "function"


def test_plugin_table_and_prefix():
    cfg = load_config({}, environ={"AGENT_COMMAND_PREFIX": "wrap --all",
                                   "AGENT_PLUGINS": json.dumps({"a": {"command_prefix": ["x y", "z"]}})})
    assert command_prefix(plugin_value(cfg, "command_prefix", "a")) == ["x y", "z"]
    assert command_prefix(plugin_value(cfg, "command_prefix", "b", "folder")) == ["wrap", "--all"]
    assert command_prefix("apptainer exec --bind '/a b:/c' img.sif") == [
        "apptainer", "exec", "--bind", "/a b:/c", "img.sif"]
    with pytest.raises(ConfigError, match="plugin a: unknown setting"):
        load_config({}, environ={"AGENT_PLUGINS": json.dumps({"a": {"slot": 2}})})
    with pytest.raises(ConfigError, match="env_build"):
        load_config({}, environ={"AGENT_ENV_BUILD": "maybe"})


def test_launch_keeps_agent_settings_and_adds_the_prefix(tmp_path):
    path = _folder(tmp_path, dockerfile="FROM x\nENV EXTRACTION_FUNC=run EXTRACTION_MODULE=mod "
                                        "RABBITMQ_URI=amqp://x AGENT_SLOTS=9 MY_SETTING=1 PATH=/nowhere\n")
    spec = find_plugin("fn", [path])
    cfg = load_config({}, environ={})
    init, env = apply(cfg, spec, {"t": "init", "plugin": spec.__dict__}, {"PATH": "/usr/bin"})
    assert "launch" not in init  # no requirements, no prefix: the plain `python -m` start
    assert init["plugin"]["docker_env"] == {} and init["plugin"]["function"] == "run"
    assert env == {"PATH": "/usr/bin", "MY_SETTING": "1", "EXTRACTION_FUNC": "run", "EXTRACTION_MODULE": "mod"}
    cfg = load_config({}, environ={"AGENT_COMMAND_PREFIX": "env -i"})
    init, _ = apply(cfg, spec, {"t": "init", "plugin": spec.__dict__}, {})
    code_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    assert init["launch"] == {"argv": ["env", "-i", sys.executable, "-c", BOOT, code_dir], "cwd": code_dir}
