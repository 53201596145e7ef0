"""The one settings engine: a table of settings resolved from flag > environment > settings file > default.

The agent (agent/config.py) and the launcher (launcher/settings.py) each declare a table of `Setting`s
into a `SettingsTable`, which resolves them, makes the dataclass holding the values and turns every bad
value, from any source, into one line naming the setting and its source (a secret's value is never shown).
Standard library only: the YAML parser is injected by the caller (`load`, `syntax_errors`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, TextIO

from hpc_common.settings_files import first_set, parse_value, read_settings_file

# A check of one parsed value: None when fine, else what is wrong (the engine adds the setting and source).
Check = Callable[[Any], Optional[str]]


@dataclass(frozen=True)
class Setting:
    """One setting: its name, parser, default, help, environment names (first set wins) and flag."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    env: tuple[str, ...] = ()
    flag: Optional[str] = None          # None: environment or settings file only
    secret: bool = False                # value never shown in errors or reprs
    check: Optional[Check] = None
    type: Any = Any                     # the field's annotation in the resolved dataclass
    default_from_env: Optional[Callable[[Mapping[str, str]], Any]] = None

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with a parsed value, or None."""
        return self.check(value) if self.check is not None else None

    def fresh_default(self) -> Any:
        """The default value; a list or dict is copied so that no two resolved records share one."""
        return type(self.default)(self.default) if isinstance(self.default, (list, dict)) else self.default

    def default_value(self, environ: Mapping[str, str]) -> Any:
        """The default when no source sets the value; some depend on other variables (XDG_STATE_HOME)."""
        return self.default_from_env(environ) if self.default_from_env else self.fresh_default()


class SettingsTable:
    """A table of settings and how its values are read: the error type, the settings file's label and
    the environment variable naming that file, and the YAML loader the caller injects."""

    def __init__(self, settings: Iterable[Setting], error: type[Exception], file_label: str, file_env: str,
                 load: Callable[[TextIO], Any], syntax_errors: tuple[type[BaseException], ...]) -> None:
        self.settings: tuple[Setting, ...] = tuple(settings)
        self.by_name: dict[str, Setting] = {s.name: s for s in self.settings}
        if len(self.by_name) != len(self.settings):
            raise ValueError("a settings table names a setting twice")
        self.error = error
        self.file_label = file_label
        self.file_env = file_env
        self._load = load
        self._syntax_errors = syntax_errors

    def make_dataclass(self, name: str, module: str, doc: str, bases: tuple[type, ...] = (),
                       frozen: bool = False) -> type:
        """The record of resolved values: one field per setting, secrets left out of its repr."""
        fields = [(s.name, s.type, dataclasses.field(default_factory=s.fresh_default, repr=not s.secret))
                  for s in self.settings]
        cls = dataclasses.make_dataclass(name, fields, bases=bases, frozen=frozen)
        cls.__module__, cls.__doc__ = module, doc
        return cls

    def read_file(self, path: str) -> dict[str, Any]:
        """The settings file's {setting: value} mapping (unknown names refused)."""
        return read_settings_file(path, self.by_name, self.error, self.file_label, self._load, self._syntax_errors)

    def parse(self, name: str, raw: Any, origin: str) -> Any:
        """Parse and check a raw value of the setting `name`; a bad one is the table's error naming origin."""
        setting = self.by_name[name]
        value = parse_value(setting.name, setting.parse, raw, origin, setting.secret, self.error)
        problem = setting.problem(value)
        if problem:
            raise self.error(f"{setting.name}: {problem} (from {origin})")
        return value

    def from_env(self, name: str, environ: Mapping[str, str]) -> Any:
        """One setting from the environment alone (its default when unset), parsed and checked."""
        setting = self.by_name[name]
        env_name = first_set(setting.env, environ)
        return self.parse(name, environ[env_name], env_name) if env_name else setting.default_value(environ)

    def resolve(self, flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None,
                config_file: Optional[str] = None) -> dict[str, Any]:
        """{name: value} for every setting: flag > environment > settings file > default.

        The settings file is `config_file`, else the one named by the table's file variable. A flag counts
        only for a setting that has one, and only when it is not None (argparse leaves absent flags None).
        """
        flags = flags or {}
        environ = os.environ if environ is None else environ
        config_file = config_file or environ.get(self.file_env) or None
        file_values = self.read_file(config_file) if config_file else {}
        values: dict[str, Any] = {}
        for s in self.settings:
            env_name = first_set(s.env, environ)
            if s.flag and flags.get(s.name) is not None:
                values[s.name] = self.parse(s.name, flags[s.name], s.flag)
            elif env_name is not None:
                values[s.name] = self.parse(s.name, environ[env_name], env_name)
            elif s.name in file_values:
                values[s.name] = self.parse(s.name, file_values[s.name], f"{self.file_label} {config_file}")
            else:
                values[s.name] = s.default_value(environ)
        return values
