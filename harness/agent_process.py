"""A process that runs agent code: started in its jail, spoken to over a channel, its output kept in a bounded log.

Messages from it arrive on a reader thread, so that the trusted side waits with deadlines and never blocks on
a process that stopped talking. Its stdout and stderr go to the trial's log through another thread, head and
tail kept (a trial that prints without end cannot fill the disk) and scrubbed of secrets when written.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from harness.channel import Channel, ChannelError
from harness.sandbox import Jail, kill
from harness.scrub import scrub

LOG_HEAD = 1 << 20   # bytes of a trial's output kept from its start
LOG_TAIL = 1 << 18   # and from its end
CLOSED = {"op": "closed"}  # what receive() returns once the process closed the channel or died


class TrialLog:
    """One trial's output, from all its processes: its head written to `path` line by line as it comes (scrubbed, so
    `tail -f` works during a trial), head and tail written again when closed."""

    def __init__(self, path: Path):
        self.path, self.head, self.tail, self.cut = path, bytearray(), deque(), 0
        self._lock = threading.Lock()
        self._tail_bytes = 0
        self._written: int | None = 0  # bytes of the head already in the file (up to a line's end); None: unwritable
        try:
            path.write_text("")
        except OSError:  # close() says so, where the runner turns it into the trial's failure
            self._written = None

    def write(self, data: bytes) -> None:
        with self._lock:
            room = LOG_HEAD - len(self.head)
            self.head += data[:room]
            rest = data[room:]
            if rest:
                self.tail.append(rest)
                self._tail_bytes += len(rest)
                while self._tail_bytes - len(self.tail[0]) >= LOG_TAIL:
                    self._tail_bytes -= len(self.tail[0])
                    self.cut += len(self.tail.popleft())
            end = self.head.rfind(b"\n") + 1
            if self._written is not None and end > self._written:
                try:
                    with self.path.open("a") as f:
                        f.write(scrub(self.head[self._written:end].decode("utf-8", errors="replace")))
                    self._written = end
                except OSError:
                    self._written = None

    def note(self, line: str) -> None:
        self.write(f"harness: {line}\n".encode())

    def text(self) -> str:
        with self._lock:
            cut = f"\n[... {self.cut:,} bytes of output cut ...]\n".encode() if self.cut else b""
            return scrub((bytes(self.head) + cut + b"".join(self.tail)).decode("utf-8", errors="replace"))

    def close(self) -> None:
        self.path.write_text(self.text())


class AgentProcess:
    """`python -m MODULE ARGS... IN_FD OUT_FD` in `jail`; messages from it through receive()."""

    def __init__(self, jail: Jail, module: str, args: list[str], log: TrialLog, name: str,
                 env: dict[str, str] | None = None):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        out_r, out_w = os.pipe()
        argv = [sys.executable, "-m", module, *args, str(to_child_r), str(from_child_w)]
        try:
            self.proc = jail.popen(argv, env=env, pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                                   stdout=out_w, stderr=out_w)
        finally:
            for fd in (to_child_r, from_child_w, out_w):
                os.close(fd)
        self.name, self.log = name, log
        self.channel = Channel.from_fds(from_child_r, to_child_w)
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._copy_output, args=(out_r,), daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                header, _ = self.channel.receive(max_payload=0)
            except ChannelError as e:
                if "closed" not in str(e):
                    self.log.note(f"{self.name}: {e}")
                self.messages.put(CLOSED)
                return
            self.messages.put(header)

    def _copy_output(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as out:
            while chunk := out.read(1 << 16):
                self.log.write(chunk)

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message, CLOSED once the process is gone, or None if nothing came within `timeout` seconds."""
        try:
            return self.messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> bool:
        """Whether the message went out (False: the process is gone)."""
        try:
            self.channel.send(header, payload)
            return True
        except ChannelError:
            return False

    def kill(self) -> int | None:
        """End the process and all it started; its exit status before that (None: it was still running)."""
        code = self.proc.poll()
        kill(self.proc)
        self.channel.close()
        return code
