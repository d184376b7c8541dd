"""The jail of processes that run agent code (harness.sandbox), tried from the inside by a real process in bubblewrap:
no files but its scratch folder and the code, no network, no signal out, an allow-listed environment, and nothing
of it left once it is killed. Also how the modes resolve where bubblewrap is missing."""
from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import harness.sandbox
from harness.errors import UserError
from harness.profiles import data_dir
from harness.sandbox import (ENV_ALLOWED, OPEN_FILES, PROJECT_ROOT, TRIAL_THREADS, Jail, bwrap_problem, kill, resolve,
                             share_cores)

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")

# Runs in the jail: tries each thing a hostile train.py would, reports what happened as one JSON line, then
# (if asked) waits, with a child that left its session and process group behind it.
PROBE = r'''
import json, os, resource, signal, socket, subprocess, sys, time

args = json.loads(sys.argv[1])
out = {}


def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except Exception as e:
        out[name] = ["error", f"{type(e).__name__}: {e}"]


def write(path):
    with open(path, "w") as f:
        f.write("written from the jail")
    return path


def processes():
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                found[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def connect():
    socket.create_connection(("127.0.0.1", args["port"]), timeout=5).close()
    return "connected"


for name, path in args["read"].items():
    attempt("read " + name, lambda: sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read()[:100])
for name, path in args["write"].items():
    attempt("write " + name, lambda: write(path))
attempt("write scratch", lambda: write(os.path.join(os.environ["HOME"], "note.txt")))
attempt("connect", connect)
attempt("environment", lambda: sorted(os.environ))
attempt("processes", processes)
attempt("signal", lambda: os.kill(args["victim"], signal.SIGKILL))
attempt("open files", lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0])
if args.get("child"):
    attempt("child", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", args["child"]],
                                              start_new_session=True).pid)
print(json.dumps(out), flush=True)
if args.get("child"):
    time.sleep(1000)
'''


def read_line(proc: subprocess.Popen, seconds: float = 120.0) -> str:
    """The first line the process prints, waiting at most `seconds` (a generous bound, not a timing check)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline, buffer = time.monotonic() + seconds, b""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        assert left > 0, "the probe printed nothing"
        if sel.select(left):
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            assert chunk, f"the probe ended without a report: {proc.stderr.read().decode()[-2000:]}"
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


def holding(marker: str) -> list[int]:
    """Host pids of the processes whose command line holds `marker` (zombies aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def wait_for(condition, seconds: float = 30.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A trial-like layout, planted secrets around it, a TCP server on loopback and a process to signal."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://optimizer:planted-pw@127.0.0.1/trials")
    monkeypatch.setenv("BORING_NAME", "planted-value-1234")
    trial = tmp_path / "trial"
    (trial / "scratch").mkdir(parents=True)
    (trial / "train.py").write_text("print('the code')\n")
    (trial / "spec.json").write_text("{}")
    (tmp_path / "other-trial.txt").write_text("another trial's result")
    (trial / "planted.txt").write_text("next to the scratch folder")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    victim = subprocess.Popen(["sleep", "1000"])
    yield {"trial": trial, "tmp": tmp_path, "server": server, "victim": victim}
    for name, path in outside({"trial": trial}).items():  # should the jail ever fail, leave nothing behind
        if name != "train.py":
            Path(path).unlink(missing_ok=True)
    server.close()
    victim.kill()
    victim.wait()


def outside(world) -> dict[str, str]:  # noqa: ANN001
    """Files outside the scratch folder a jailed process tries to write (host paths; train.py is handed read-only)."""
    return {"harness": str(PROJECT_ROOT / "harness" / "planted_by_trial.py"),
            "venv": str(Path(sys.prefix) / "planted_by_trial"), "train.py": str(world["trial"] / "train.py"),
            "next to scratch": str(world["trial"] / "written_by_trial.txt"),
            "home": str(Path.home() / "planted_by_trial")}


def probe(world, mode: str, *, child: str | None = None) -> tuple[dict, subprocess.Popen]:  # noqa: ANN001
    trial, tmp = world["trial"], world["tmp"]
    jail = Jail(mode, trial / "scratch", handed={"train.py": trial / "train.py", "spec.json": trial / "spec.json"})
    args = {"port": world["server"].getsockname()[1], "victim": world["victim"].pid, "child": child,
            "read": {"home": str(Path.home()), "planted": str(trial / "planted.txt"),
                     "other trial": str(tmp / "other-trial.txt"), "project": str(PROJECT_ROOT / "pyproject.toml"),
                     "tests": str(PROJECT_ROOT / "tests"), "git": str(PROJECT_ROOT / ".git"),
                     "corpus": str(PROJECT_ROOT / "harness" / "corpus"), "train.py": jail.path("train.py"),
                     "proc 1 environ": "/proc/1/environ", "data": str(data_dir())},
            "write": outside(world) if jail.contained else {}}
    proc = jail.popen([sys.executable, "-c", PROBE, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    report = json.loads(read_line(proc))
    return report, proc


@needs_bwrap
def test_a_jailed_process_reaches_nothing_outside_its_scratch(world):
    marker = f"jailed-child-{uuid.uuid4().hex}"
    report, proc = probe(world, "required", child=marker)
    try:
        outcome = {name: value[0] for name, value in report.items()}
        assert outcome["read train.py"] == "ok" and report["read train.py"][1] == "print('the code')\n"
        assert report["read corpus"] == ["ok", []]  # the raw corpus (validation text included) is hidden
        assert os.listdir(PROJECT_ROOT / "harness" / "corpus")  # though the host has it
        # $HOME holds nothing but the way to the Python installation where that lies below it (pyenv)
        python = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
        on_the_way = {p.relative_to(Path.home()).parts[0] for p in python if p.is_relative_to(Path.home())}
        assert outcome["read home"] == "error" or set(report["read home"][1]) <= on_the_way, report["read home"]
        for name in ("planted", "other trial", "project", "tests", "git", "data"):
            assert outcome[f"read {name}"] == "error", (name, report[f"read {name}"])
        assert "planted" not in str(report["read proc 1 environ"])  # its PID 1 is the jail's, not the host's
        for name in ("harness", "venv", "train.py", "next to scratch"):  # read-only, or not there at all
            assert outcome[f"write {name}"] == "error", (name, report[f"write {name}"])
        for name, path in outside(world).items():  # (the jail's own root is a throwaway tmpfs: $HOME may be made)
            assert name == "train.py" or not Path(path).exists(), (name, report[f"write {name}"])
        assert (world["trial"] / "train.py").read_text() == "print('the code')\n"
        assert outcome["write scratch"] == "ok"
        assert (world["trial"] / "scratch" / "note.txt").read_text() == "written from the jail"

        assert outcome["connect"] == "error"
        with pytest.raises(TimeoutError):
            world["server"].accept()  # nothing came through

        names = set(report["environment"][1])
        assert "DATABASE_URL" not in names and "BORING_NAME" not in names
        fixed = {"PATH", "HOME", "TMPDIR", "USER", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
                 "PYTHONNOUSERSITE", "CUDA_VISIBLE_DEVICES", "PWD"}  # PWD: bubblewrap's --chdir sets it
        assert names <= set(ENV_ALLOWED) | fixed, names - set(ENV_ALLOWED) - fixed
        seen = report["processes"][1]
        mine = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert not {mine.strip(), "sleep 1000"} & {cmdline.strip() for cmdline in seen.values()}, seen
        assert len(seen) <= 4, seen  # bubblewrap's init, the probe and its child: its own PID namespace
        assert outcome["signal"] == "error" or str(world["victim"].pid) in seen
        assert world["victim"].poll() is None  # the test's process was not reached
        assert report["open files"] == ["ok", OPEN_FILES]

        assert outcome["child"] == "ok" and wait_for(lambda: holding(marker)), "the child did not start"
    finally:
        kill(proc)
    assert wait_for(lambda: not holding(marker)), f"the jail's child outlived kill(): {holding(marker)}"


def test_without_the_sandbox_the_probe_does_reach_out(world):
    """The control: the same probe outside bubblewrap connects and reads (so its refusals above mean something),
    and still gets only the allow-listed environment."""
    report, proc = probe(world, "off")
    kill(proc)
    assert report["connect"] == ["ok", "connected"]
    assert report["read planted"] == ["ok", "next to the scratch folder"]
    names = set(report["environment"][1])
    assert "DATABASE_URL" not in names and "BORING_NAME" not in names and "PYTHONPATH" in names
    assert all("planted-pw" not in v and "planted-value-1234" not in v for v in report["environment"][1])


@needs_bwrap
def test_limits_reach_the_process(tmp_path):
    jail = Jail("required", tmp_path, limits=harness.sandbox.Limits(memory_bytes=3 * 2**30, open_files=77))
    code = "import resource as r; print(r.getrlimit(r.RLIMIT_NOFILE)[0], r.getrlimit(r.RLIMIT_AS)[0])"
    proc = jail.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    assert out.split() == ["77", str(3 * 2**30)], err
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 77  # this process is untouched


@pytest.fixture
def no_bwrap(monkeypatch):
    """bubblewrap missing from PATH, for as long as the test runs (the probe's cache cleared on both sides)."""
    monkeypatch.setattr(harness.sandbox.shutil, "which", lambda name, *args, **kwargs: None)
    monkeypatch.setattr(harness.sandbox, "_warned", set())
    bwrap_problem.cache_clear()
    yield
    bwrap_problem.cache_clear()


def test_required_refuses_to_run_without_bubblewrap(no_bwrap, tmp_path):
    assert "not installed" in bwrap_problem()
    with pytest.raises(UserError, match="--sandbox required, but bubblewrap is not installed"):
        resolve("required")
    with pytest.raises(UserError):
        Jail("required", tmp_path)


def test_auto_warns_once_and_runs_without(no_bwrap, tmp_path, capsys):
    assert resolve("auto") is False
    assert Jail("auto", tmp_path).contained is False
    err = capsys.readouterr().err
    assert err.count("WARNING: agent code runs WITHOUT the OS sandbox") == 1 and "not installed" in err
    assert resolve("off") is False and capsys.readouterr().err == ""


def test_modes(tmp_path):
    with pytest.raises(UserError, match="unknown sandbox mode 'maybe'"):
        resolve("maybe")
    assert resolve("off") is False
    jail = Jail("off", tmp_path / "scratch", handed={"train.py": tmp_path / "train.py"})
    assert jail.argv(["python"]) == ["python"] and jail.path("train.py") == str(tmp_path / "train.py")
    assert jail.home == str(tmp_path / "scratch")
    if bwrap_problem() is None:
        assert resolve("auto") is True and resolve("required") is True
        jail = Jail("required", tmp_path / "scratch", handed={"train.py": tmp_path / "train.py"})
        argv = jail.argv(["python"])
        assert argv[0].endswith("bwrap") and argv[-2:] == ["--", "python"]
        assert jail.path("train.py") == "/trial/train.py"
        assert "--unshare-all" in argv and "--die-with-parent" in argv


def test_trials_side_by_side_share_the_cores_unless_told(monkeypatch):
    monkeypatch.delenv(TRIAL_THREADS, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert share_cores(3) == 2 and os.environ[TRIAL_THREADS] == "2"  # written for the processes it starts
    assert share_cores(16) == 2  # the first share stands
    monkeypatch.setenv(TRIAL_THREADS, "5")
    assert share_cores(2) == 5
    monkeypatch.delenv(TRIAL_THREADS)
    assert share_cores(16) == 1
