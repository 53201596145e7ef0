"""Reading the ENV lines of a plugin's Dockerfile, and nothing else of it.

An extractor packaged for Docker names its settings in `ENV` lines (pyclowder's simple extractors
name their entry point there: EXTRACTION_FUNC, EXTRACTION_MODULE). Those variables are defaults for
the extractor process, as an image's ENV is under Docker: the agent's environment and the plugins
table override them (agent.extractor_env). No other instruction runs (no RUN, COPY, USER, WORKDIR,
ENTRYPOINT or CMD).

What is read, from the last build stage (after the last FROM):
- `ENV KEY=VALUE [KEY2=VALUE2 ...]`, values quoted with "..." or '...' or backslash-escaped;
- `ENV KEY VALUE` (the legacy form: the value is the rest of the line);
- lines continued with a trailing backslash, comments (# at the start of a line), any case of ENV;
- `$NAME` and `${NAME}` in values (not inside '...'), expanded from ENV lines above (not from the same line, as in
  Docker) and from `ARG NAME=default` lines of the same stage; a name neither defines becomes
  empty, as in `docker build`.
`${NAME:-word}` / `${NAME:+word}` are expanded the same way; other ARG values (--build-arg) are unknown.
"""
from __future__ import annotations

import re
from typing import Optional

_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:[-+])?(?P<word>[^}]*)\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class DockerfileError(ValueError):
    """An ENV line the agent cannot read; the message names the file and line."""


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuation lines joined, comments dropped: (first line number, text)."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") and not pending:
            continue
        if pending and (not stripped or stripped.startswith("#")):
            continue  # Docker skips empty and comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        line = " ".join(p.strip() for p in pending).strip()
        pending = []
        if line:
            out.append((start, line))
    if pending:
        out.append((start, " ".join(p.strip() for p in pending).strip()))
    return out


def _substitute(match: "re.Match[str]", known: dict[str, str]) -> str:
    current = known.get(match.group("braced") or match.group("plain") or "", "")
    op = match.group("op")
    if op == ":-":
        return current or match.group("word")
    if op == ":+":
        return match.group("word") if current else ""
    return current


def _words(text: str, known: dict[str, str]) -> list[str]:
    """Split like Docker does: quotes group, backslash escapes, $VAR expands (not inside '...')."""
    words: list[str] = []
    current: list[str] = []
    started = False  # a quoted empty string is still a word
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote == "'":
            if char == "'":
                quote = ""
            else:
                current.append(char)
        elif char == "\\" and i + 1 < len(text):
            current.append(text[i + 1])
            i += 1
        elif char == "$" and _VAR.match(text, i):
            match = _VAR.match(text, i)
            assert match is not None
            current.append(_substitute(match, known))
            i = match.end()
            continue
        elif quote == '"':
            if char == '"':
                quote = ""
            else:
                current.append(char)
        elif char in "'\"":
            quote, started = char, True
        elif char.isspace():
            if current or started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
        i += 1
    if quote:
        raise ValueError(f"no closing {quote}")
    if current or started:
        words.append("".join(current))
    return words


def _pairs(body: str, known: dict[str, str], where: str) -> list[tuple[str, str]]:
    """`K=V K2="v 2"` or the legacy `K rest of line` into (key, value) pairs, values expanded."""
    first = body.split(None, 1)
    if not first:
        raise DockerfileError(f"{where}: ENV without a variable")
    try:
        if "=" not in first[0]:  # legacy form: ENV KEY the rest is the value
            return [(first[0], " ".join(_words(first[1], known)) if len(first) > 1 else "")]
        words = _words(body, known)
    except ValueError as exc:
        raise DockerfileError(f"{where}: cannot read ENV ({exc})") from None
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise DockerfileError(f"{where}: ENV {word!r} is not KEY=VALUE")
        pairs.append((key, value))
    return pairs


def read_env(path: str) -> dict[str, str]:
    """The variables the Dockerfile's last stage sets with ENV, in order, values expanded."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    for number, line in _logical_lines(text):
        keyword, _, body = line.partition(" ")
        keyword = keyword.upper()
        where = f"{path}:{number}"
        if keyword == "FROM":
            env, args = {}, {}  # a new stage starts with nothing of the previous one
        elif keyword == "ARG":
            name, sep, default = body.strip().partition("=")
            if sep and _NAME.match(name):
                try:
                    args[name] = " ".join(_words(default, {**args, **env}))
                except ValueError as exc:
                    raise DockerfileError(f"{where}: cannot read ARG ({exc})") from None
        elif keyword == "ENV":
            before = {**args, **env}  # as in Docker: one ENV line sees the values set before it
            for key, value in _pairs(body.strip(), before, where):
                if not _NAME.match(key):
                    raise DockerfileError(f"{where}: {key!r} is not a variable name")
                env[key] = value
    return env


def base_image(path: str) -> Optional[str]:
    """The image the last stage builds FROM (without --platform or AS), or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    image = None
    for _, line in _logical_lines(text):
        keyword, _, body = line.partition(" ")
        if keyword.upper() == "FROM":
            words = [w for w in body.split() if not w.startswith("--")]
            image = words[0] if words else None
    return image
