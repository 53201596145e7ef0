"""Captured outputs the tests replay, kept as files under tests/data/ (see tests/data/README.md)."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def read(name: str) -> str:
    """The text of ``tests/data/<name>``, exactly as captured."""
    return (DATA / name).read_text(encoding="utf-8")
