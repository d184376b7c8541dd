"""Small helpers shared by the test modules: the CLI run in-process, and a port nobody listens on."""
from __future__ import annotations

import socket

import pytest

from hybrid.cli import main


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """`hybrid ARGV` in this process: exit status and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def closed_port() -> int:
    """A local TCP port with no server behind it (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
