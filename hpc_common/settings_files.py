"""What the agent's and the launcher's settings tables share: reading a settings file into a
mapping of known names, and parsing one value with the place it came from, so that a bad value
from any source is one line naming the setting and that source.

The YAML parser is passed in (`load`, `syntax_errors`): this layer stays standard library only.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, TextIO


def parse_bool(value: Any) -> bool:
    """A boolean setting: 1/0, true/false, yes/no, on/off (empty is false); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean (1 or 0, true or false): {value!r}")


def first_set(names: Iterable[str], environ: Mapping[str, str]) -> Optional[str]:
    """The first of a setting's environment variables that is set and not empty (None: none is)."""
    return next((name for name in names if environ.get(name) not in (None, "")), None)


def read_settings_file(path: str, known: Collection[str], error: type[Exception], label: str,
                       load: Callable[[TextIO], Any], syntax_errors: tuple[type[BaseException], ...]) -> dict[str, Any]:
    """The file's {setting: value} mapping; `error` (one line: label, path and why) when it cannot be
    read, does not parse, is not a mapping or names a setting not in `known`."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            data = load(fh)
    except OSError as exc:
        raise error(f"{label} {path}: {exc.strerror}") from None
    except syntax_errors as exc:
        raise error(f"{label} {path}: not valid YAML ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{label} {path}: expected a mapping of setting: value")
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise error(f"{label} {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def parse_value(name: str, parse: Callable[[Any], Any], raw: Any, origin: str, secret: bool,
                error: type[Exception]) -> Any:
    """parse(raw), or `error` naming the setting and where the value came from (a secret is not shown)."""
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        if secret:  # the parser's own message may quote the value (int() does): say only what kind failed
            raise error(f"{name} from {origin}: cannot use (hidden): not a valid value "
                        f"({exc.__class__.__name__})") from None
        raise error(f"{name} from {origin}: cannot use {raw!r}: {exc}") from None
