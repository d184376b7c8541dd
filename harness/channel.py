"""Messages between the trusted harness and a process that runs agent code: a JSON line, then raw bytes.

    {"op": "batch", "rows": 8, "bytes": 0}\\n            a request, no payload
    {"rows": 8, "bytes": 4112}\\n<4112 bytes>             an answer with a payload (token ids)

Never pickle: what comes from the untrusted side is data, read with bounded sizes, and checked by the reader.
"""
from __future__ import annotations

import json
import os
from typing import Any, BinaryIO

MAX_HEADER = 64 * 1024  # bytes of one JSON line


class ChannelError(RuntimeError):
    """The other side closed the channel, or sent something that is not a message."""


class Channel:
    """One direction in, one direction out; `receive` bounds what it accepts."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO):
        self.reader, self.writer = reader, writer

    @classmethod
    def from_fds(cls, read_fd: int, write_fd: int) -> Channel:
        return cls(os.fdopen(read_fd, "rb", buffering=1 << 16), os.fdopen(write_fd, "wb", buffering=0))

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        data = memoryview(payload).cast("B")
        line = json.dumps({**header, "bytes": data.nbytes}).encode() + b"\n"
        try:
            self.writer.write(line)
            if data.nbytes:
                self.writer.write(data)
            self.writer.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise ChannelError(f"the other side is gone ({e})") from None

    def receive(self, max_payload: int = 0) -> tuple[dict[str, Any], bytes]:
        """The next message and its payload; ChannelError on end of stream, bad JSON or a payload over max_payload."""
        try:
            line = self.reader.readline(MAX_HEADER)
        except (ValueError, OSError) as e:
            raise ChannelError(f"cannot read ({e})") from None
        if not line:
            raise ChannelError("the other side closed the channel")
        if not line.endswith(b"\n"):
            raise ChannelError(f"a message header over {MAX_HEADER} bytes")
        try:
            header = json.loads(line)
        except ValueError:
            raise ChannelError("a message that is not JSON") from None
        size = header.get("bytes", 0) if isinstance(header, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_payload:
            raise ChannelError(f"a message of {size!r} bytes (at most {max_payload} expected)")
        payload = self.reader.read(size) if size else b""
        if len(payload) != size:
            raise ChannelError("the other side closed the channel mid-message")
        return header, payload

    def close(self) -> None:
        for f in (self.reader, self.writer):
            try:
                f.close()
            except OSError:
                pass
