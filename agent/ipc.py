"""Length-prefixed JSON frames between the agent and its extractor processes.

A pipe, not a socket or shared memory: the child dies, the pipe closes, the parent sees EOF.
Each frame is a 4-byte big-endian length then that many bytes of UTF-8 JSON.
"""
from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Iterator, Optional

from .errors import ProtocolError

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class FrameError(ProtocolError):
    """The other side sent something that is not a frame, or went away mid-frame."""


def encode(obj: Any) -> bytes:
    """One frame as bytes (several may be written at once)."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(data)) + data


def write(stream: BinaryIO, data: bytes) -> None:
    """Write encoded frames and flush them (an unbuffered stream may take them in several writes)."""
    view = memoryview(data)
    while view:
        view = view[stream.write(view) or 0:]
    stream.flush()


def send(stream: BinaryIO, obj: Any) -> None:
    """Write one frame and flush it."""
    write(stream, encode(obj))


def take_frames(buf: bytearray) -> Iterator[Any]:
    """Yield the complete frames at the start of buf, removing each from it (a partial one stays).

    For a reader that gets bytes as they come (a non-blocking pipe); FrameError for a frame over
    the limit or one that is not JSON.
    """
    while len(buf) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buf)
        if size > MAX_FRAME:
            raise FrameError(f"frame of {size} bytes is over the limit")
        end = _HEADER.size + size
        if len(buf) < end:
            return
        try:
            frame = json.loads(bytes(buf[_HEADER.size:end]))
        except ValueError:
            raise FrameError("a frame that is not JSON") from None
        del buf[:end]
        yield frame


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
