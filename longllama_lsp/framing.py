"""LSP base-protocol framing (`Content-Length: N\\r\\n\\r\\n` + N bytes of JSON), without pygls: the TCP
server (tcp.py, asyncio), the CLI's client of a running server (remote.py, blocking sockets) and the
tests' raw client read and write frames through this one module.

A frame's length is checked as its headers arrive, before any of its body is read: a missing, bad
or negative Content-Length, or a header line over MAX_HEADER_BYTES, is a FrameError; a body over
the reader's limit is never read.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

MAX_HEADER_BYTES = 8 << 10  # one header line
MAX_MESSAGE_BYTES = 16 << 20  # a 4M-character document (documents.MAX_DOCUMENT_CHARS) fits


class FrameError(ValueError):
    """A frame that cannot be read: the connection ends."""


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def frame_message(message: dict[str, Any]) -> bytes:
    return frame(json.dumps(message).encode())


class FrameHeader:
    """The header lines of one frame, fed one at a time as they arrive."""

    def __init__(self) -> None:
        self.length: int | None = None

    def feed(self, line: bytes) -> bool:
        """True at the blank line that ends the headers (`length` is then set), else False."""
        if line.strip() == b"":
            if self.length is None:
                raise FrameError("a frame without Content-Length")
            return True
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise FrameError(f"bad Content-Length {value.strip()[:20]!r}") from None
            if length < 0:
                raise FrameError("negative Content-Length")
            self.length = length
        return False


def read_frame(reader: BinaryIO, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes | None:
    """The body of the next frame from a blocking binary file, or None at end of input. A body over
    `max_bytes` is a FrameError, raised before it is read."""
    header = FrameHeader()
    while True:
        line = reader.readline(MAX_HEADER_BYTES + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_HEADER_BYTES:
                raise FrameError(f"a header line longer than {MAX_HEADER_BYTES} bytes")
            return None  # end of input (possibly mid-header)
        if header.feed(line):
            break
    assert header.length is not None
    if header.length > max_bytes:
        raise FrameError(f"a message of {header.length} bytes (limit {max_bytes})")
    body = reader.read(header.length)
    return body if len(body) == header.length else None
