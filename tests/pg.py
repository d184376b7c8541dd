"""A throwaway PostgreSQL server on loopback, for the tests and the storage benchmark.

The server binaries come from Debian's `postgresql` package (installed with apt-get where they are missing
and we are root). `initdb` into a temporary folder, a random port on 127.0.0.1, trust authentication, run
as the `postgres` user when we are root (PostgreSQL refuses to run as root); stopped and deleted at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


class Unavailable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why."""


def server_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = [d.parent for d in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if (d.parent / "initdb").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0, default=None)


def install() -> Path:
    """The server binaries, installing Debian's `postgresql` package if they are missing."""
    if (found := server_bin()) is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and apt-get cannot "
                          "install it here (needs root on Debian/Ubuntu): apt-get install -y postgresql")
    done = _apt("install", "-y", "--no-install-recommends", "postgresql")
    if done.returncode != 0:  # a fresh machine: the package lists first
        _apt("update")
        done = _apt("install", "-y", "--no-install-recommends", "postgresql")
    if (found := server_bin()) is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"apt-get install -y postgresql failed: {tail[0]}")
    return found


def _apt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *args], env=APT_ENV, capture_output=True, text=True, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(database: str = "hybrid") -> Iterator[str]:
    """Start a server and yield the SQLAlchemy URL of an empty database on it; stop and delete it at the end."""
    bin_dir = install()
    root = Path(tempfile.mkdtemp(prefix="hybrid-pg-"))
    as_user = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    if as_user:
        shutil.chown(root, **as_user)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, **as_user)
        if done.returncode != 0:
            raise Unavailable(f"{Path(cmd[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    started = False
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
            "-o", f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c max_connections=200")
        started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60, cwd=root, **as_user)
        shutil.rmtree(root, ignore_errors=True)
