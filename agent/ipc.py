"""Length-prefixed JSON frames between the agent and its extractor processes.

A pipe, not a socket or shared memory: the child dies, the pipe closes, the parent sees EOF.
Each frame is a 4-byte big-endian length then that many bytes of UTF-8 JSON.
"""
from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Optional

from .errors import ProtocolError

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class FrameError(ProtocolError):
    """The other side sent something that is not a frame, or went away mid-frame."""


def encode(obj: Any) -> bytes:
    """One frame as bytes (several may be written at once)."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(data)) + data


def send(stream: BinaryIO, obj: Any) -> None:
    """Write one frame and flush it (an unbuffered stream may take it in several writes)."""
    view = memoryview(encode(obj))
    while view:
        view = view[stream.write(view) or 0:]
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> Optional[bytes]:
    chunks = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if remaining == size:
                return None
            raise FrameError("stream closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv(stream: BinaryIO) -> Optional[Any]:
    """Read one frame; None when the stream closed cleanly between frames."""
    header = _read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is over the limit")
    data = _read_exact(stream, size)
    if data is None:
        raise FrameError("stream closed mid-frame")
    return json.loads(data.decode("utf-8"))
