"""Function extractors: pyclowder's SimpleExtractor calling a plain function (runs in the extractor process).

pyclowder's simple-extractor image wraps a function named by EXTRACTION_FUNC (from the module
EXTRACTION_MODULE) in a `pyclowder.extractors.SimpleExtractor`: pyclowder downloads the file (or
the dataset's files), the function gets the local path (or the list of paths) and returns a dict;
SimpleExtractor uploads its `metadata`, `previews`, `tags`, `outputs` and `new_dataset` and then
cleans up. FunctionExtractor is that same SimpleExtractor: only the two hooks are ours.

One difference, on purpose: bytes in the returned dict (what Python 2-era functions get from
subprocess output) are decoded as UTF-8 text, since json cannot encode bytes under Python 3 and
pyclowder would fail the upload.
"""
from __future__ import annotations

from typing import Any, Callable

from pyclowder.extractors import SimpleExtractor


def _text(value: Any) -> Any:
    """The value with every bytes inside it (dict values, list items) decoded as UTF-8."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


class FunctionExtractor(SimpleExtractor):
    """A pyclowder SimpleExtractor whose file and dataset hooks call one function."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function
        SimpleExtractor.__init__(self)

    def process_file(self, input_file: str) -> Any:
        """A file message: the function gets the downloaded file's path."""
        return _text(self.function(input_file))

    def process_dataset(self, input_files: list[str]) -> Any:
        """A dataset message: the function gets the list of the dataset's downloaded files."""
        return _text(self.function(input_files))
