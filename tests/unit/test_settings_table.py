"""The one settings engine (hpc_common.settings_table) that the agent's and the launcher's tables declare into:
precedence, the one-line errors naming setting and source, defaults, secrets and the resolved record."""
import dataclasses
import json

import pytest

from hpc_common.settings_files import parse_bool
from hpc_common.settings_table import Setting, SettingsTable


class TableError(Exception):
    pass


def _count(value):
    return int(str(value).strip())


TABLE = SettingsTable((
    Setting("colour", str, "red", "a colour", env=("T_COLOUR", "COLOUR"), flag="--colour"),
    Setting("count", _count, 1, "how many", env=("T_COUNT",), flag="--count",
            check=lambda v: None if v >= 1 else "must be at least 1", type=int),
    Setting("loud", parse_bool, False, "env or file only", env=("T_LOUD",), type=bool),
    Setting("password", str, None, "a secret", env=("T_PASSWORD",), secret=True),
    Setting("items", lambda v: list(v), [], "a list", env=("T_ITEMS",), flag="--items"),
    Setting("home", str, None, "default from another variable", env=("T_HOME",), flag="--home",
            default_from_env=lambda environ: environ.get("BASE", "/base") + "/home"),
), TableError, "test file", "T_CONFIG", json.load, (json.JSONDecodeError,))


def _file(tmp_path, name="settings.json", **values):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


# name, flags, environment, file values, expected value
PRECEDENCE = [
    ("colour", {"colour": "flag"}, {"T_COLOUR": "env"}, {"colour": "file"}, "flag"),
    ("colour", {"colour": None}, {"T_COLOUR": "env"}, {"colour": "file"}, "env"),
    ("colour", {}, {"COLOUR": "second-env"}, {"colour": "file"}, "second-env"),
    ("colour", {}, {"T_COLOUR": "first", "COLOUR": "second"}, {}, "first"),
    ("colour", {}, {"T_COLOUR": "", "COLOUR": "second"}, {}, "second"),  # empty counts as unset
    ("colour", {}, {}, {"colour": "file"}, "file"),
    ("colour", {}, {}, {}, "red"),
    ("count", {"count": "7"}, {"T_COUNT": "3"}, {}, 7),
    ("loud", {"loud": "0"}, {"T_LOUD": "1"}, {}, True),    # no flag: a flag value is ignored
    ("loud", {"loud": "1"}, {}, {}, False),
    ("home", {}, {"BASE": "/x"}, {}, "/x/home"),
    ("home", {}, {"T_HOME": "/h", "BASE": "/x"}, {}, "/h"),
]


@pytest.mark.parametrize("name, flags, environ, file_values, expected", PRECEDENCE)
def test_precedence_flag_env_file_default(name, flags, environ, file_values, expected, tmp_path):
    config_file = _file(tmp_path, **file_values) if file_values else None
    assert TABLE.resolve(flags, environ, config_file)[name] == expected


def test_settings_file_comes_from_its_variable_when_not_given(tmp_path):
    path = _file(tmp_path, colour="blue")
    assert TABLE.resolve({}, {"T_CONFIG": path})["colour"] == "blue"
    assert TABLE.resolve({}, {"T_CONFIG": path}, _file(tmp_path, "given.json", colour="green"))["colour"] == "green"


# raw value, where it comes from, the start of the one error line
BAD = [
    ({"count": "x"}, {}, None, "count from --count: cannot use 'x': "),
    ({}, {"T_COUNT": "x"}, None, "count from T_COUNT: cannot use 'x': "),
    ({}, {"T_COUNT": "0"}, None, "count: must be at least 1 (from T_COUNT)"),
    ({}, {}, {"count": "0"}, "count: must be at least 1 (from test file "),
    ({}, {}, {"count": "many"}, "count from test file "),
    ({}, {"T_LOUD": "maybe"}, None, "loud from T_LOUD: cannot use 'maybe': not a boolean"),
    ({}, {}, {"colour": "red", "shade": "dark"}, "test file "),
]


@pytest.mark.parametrize("flags, environ, file_values, start", BAD)
def test_a_bad_value_is_one_line_naming_the_setting_and_its_source(flags, environ, file_values, start, tmp_path):
    config_file = _file(tmp_path, **file_values) if file_values else None
    with pytest.raises(TableError) as info:
        TABLE.resolve(flags, environ, config_file)
    text = str(info.value)
    assert text.startswith(start) and "\n" not in text, text
    if config_file:
        assert config_file in text
    if "shade" in (file_values or {}):
        assert "unknown setting(s) shade" in text


def test_a_secret_is_never_shown():
    secret_table = SettingsTable((Setting("password", _count, None, "a secret", env=("T_PASSWORD",), secret=True),),
                                 TableError, "test file", "T_CONFIG", json.load, (json.JSONDecodeError,))
    with pytest.raises(TableError) as info:
        secret_table.resolve({}, {"T_PASSWORD": "hunter2"})
    assert "hunter2" not in str(info.value) and "(hidden)" in str(info.value)
    record = TABLE.make_dataclass("Record", __name__, "test record")(**TABLE.resolve({}, {"T_PASSWORD": "hunter2"}))
    assert record.password == "hunter2" and "hunter2" not in repr(record)


def test_unreadable_and_unparsable_files_are_one_line(tmp_path):
    with pytest.raises(TableError, match=r"^test file .*missing\.json: "):
        TABLE.resolve({}, {}, str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TableError, match=r"not valid YAML \(JSONDecodeError\)"):
        TABLE.resolve({}, {}, str(broken))


def test_from_env_and_parse_alone():
    assert TABLE.from_env("count", {"T_COUNT": "4"}) == 4
    assert TABLE.from_env("count", {}) == 1
    assert TABLE.from_env("home", {"BASE": "/b"}) == "/b/home"
    assert TABLE.parse("count", "5", "somewhere") == 5
    with pytest.raises(TableError, match=r"^count: must be at least 1 \(from somewhere\)$"):
        TABLE.parse("count", "0", "somewhere")


def test_the_record_has_a_field_per_setting_and_no_shared_mutable_default():
    Record = TABLE.make_dataclass("Record", __name__, "test record", frozen=True)
    assert [f.name for f in dataclasses.fields(Record)] == [s.name for s in TABLE.settings]
    assert Record.__module__ == __name__ and Record.__doc__ == "test record"
    assert Record().items == [] and Record().items is not Record().items
    assert TABLE.resolve({}, {})["items"] is not TABLE.resolve({}, {})["items"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Record().colour = "blue"


def test_a_name_twice_is_refused():
    twice = (Setting("a", str, None, "x"), Setting("a", str, None, "y"))
    with pytest.raises(ValueError, match="twice"):
        SettingsTable(twice, TableError, "f", "F", json.load, (ValueError,))


def test_agent_and_launcher_tables_use_the_engine():
    from agent import config
    from launcher import settings
    for table, record in ((config.TABLE, config.AgentConfig), (settings.TABLE, settings.LauncherSettings)):
        assert isinstance(table, SettingsTable) and all(isinstance(s, Setting) for s in table.settings)
        assert [f.name for f in dataclasses.fields(record)] == [s.name for s in table.settings]
    assert config.TABLE.by_name["slots"].env == ("AGENT_SLOTS",)
    assert config.TABLE.by_name["rabbitmq_uri"].env == ("AGENT_RABBITMQ_URI", "RABBITMQ_URI")
    assert settings.TABLE.by_name["rabbitmq_uri"].flag is None
