"""The OS sandbox of every process that runs agent code: bubblewrap (Debian's `bubblewrap` package).

Inside, a process has its own user, PID, network, IPC and mount namespaces: it sees the Python environment and
the project's code read-only (the bundled corpus hidden), a writable scratch folder of its own and the files it
is handed, nothing else (not $HOME, not the trial database, not other trials, not the prepared data); no
network (its own empty loopback), no signal reaches outside, and when it ends every process it started ends with
it. Its environment is built from an allow-list. Resource limits (address space on CPU, open files, file size,
processes) are set before it starts; where the kernel offers a writable cgroup, a process and memory cap too.

Modes: `auto` uses bubblewrap where the kernel allows it and says once per run, loudly, where it cannot;
`required` refuses to run without it; `off` runs agent code as a plain child process (allow-listed environment
and limits only: the process split still keeps the metric out of its reach, but not the files).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

MODES = ("auto", "required", "off")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRATCH = "/scratch"               # the sandbox's writable folder, and its working directory and $HOME
HANDED = "/trial"                  # where files handed to the process appear, read-only or writable as asked
ENV_ALLOWED = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")  # the only variables taken from the trusted side
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime")
NVIDIA_SHARED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
                 "/dev/nvidia-caps")
OPEN_FILES = 4096                  # file descriptors per process
FILE_BYTES = 16 * 2**30            # largest file it may write (a model, a log)
PROCESSES = 1024                   # processes and threads (pids cgroup; RLIMIT_NPROC where not root)
PROBE_SECONDS = 20.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None  # address space (CPU) and the memory cgroup's cap; None: no cap
    open_files: int = OPEN_FILES
    file_bytes: int = FILE_BYTES
    processes: int = PROCESSES


TRIAL_THREADS = "HYBRID_TRIAL_THREADS"  # torch threads of a CPU trial's training (its two evaluations share them)


def share_cores(processes: int) -> int:
    """Torch threads of each of `processes` trials run side by side here: $HYBRID_TRIAL_THREADS, else the cores
    shared among them, written there for this process's trials and the processes it starts. Threads that
    outnumber the cores spin against each other (benchmarks/results/overhead_cpu_two_*.md)."""
    os.environ.setdefault(TRIAL_THREADS, str(max(1, (os.cpu_count() or 1) // processes)))
    return int(os.environ[TRIAL_THREADS])


def default_memory_bytes(workers: int = 1) -> int:
    """Host memory a trial process may take: $HYBRID_TRIAL_MEMORY_GB, else 80 % of the machine's shared by workers."""
    if os.environ.get("HYBRID_TRIAL_MEMORY_GB"):
        return int(float(os.environ["HYBRID_TRIAL_MEMORY_GB"]) * 2**30)
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, workers))


@functools.cache
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot run a sandbox here (None: it can), found by starting one that runs `true`."""
    binary = shutil.which("bwrap")
    if binary is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap)"
    argv = [binary, "--unshare-all", "--die-with-parent", *_system_binds(), "--proc", "/proc", "--dev", "/dev",
            "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap did not start ({e})"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"bubblewrap cannot create namespaces here ({why}); unprivileged user namespaces may be off"
    return None


_warned: set[str] = set()


def resolve(mode: str) -> bool:
    """Whether processes that run agent code go into bubblewrap under `mode`: UserError where `required` cannot
    be met; in `auto` without it, one loud warning per process (a run)."""
    if mode not in MODES:
        raise UserError(f"unknown sandbox mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return False
    problem = bwrap_problem()
    if problem is None:
        return True
    if mode == "required":
        raise UserError(f"--sandbox required, but {problem}; install it or run with --sandbox auto")
    if problem not in _warned:
        _warned.add(problem)
        print(f"hybrid: WARNING: agent code runs WITHOUT the OS sandbox: {problem}. Files, the network and other "
              "processes are within its reach (the metric is not). Use --sandbox required to refuse this.",
              file=sys.stderr, flush=True)
    return False


def _system_binds() -> list[str]:
    """The operating system's programs and libraries, read-only, with the host's symlinks (merged /usr)."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def _python_binds() -> list[str]:
    """The interpreter, its standard library and the environment's packages, read-only, at their own paths."""
    roots = {Path(p).resolve() for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    roots |= {Path(p).resolve() for p in sys.path if p and Path(p).is_dir() and "site-packages" in p}
    roots = sorted(r for r in roots if not any(str(r).startswith(d + "/") for d in ("/usr",)))
    args: list[str] = []
    for root in roots:
        if not any(other != root and root.is_relative_to(other) for other in roots):
            args += ["--ro-bind", str(root), str(root)]
    if Path(sys.prefix).resolve() != Path(sys.prefix):  # a venv reached through a symlink
        args += ["--ro-bind", sys.prefix, sys.prefix]
    return args


def physical_gpu(index: int) -> str:
    """The device this process calls cuda:`index`, as the machine names it: the index-th entry of this process's
    CUDA_VISIBLE_DEVICES (a worker pinned to "3", a scheduler's "2,3", a UUID), else the index itself."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[index] if index < len(listed) else str(index)


def _gpu_binds(device: str) -> list[str]:
    """The GPU's own device node (every GPU's where `device` is a UUID: CUDA_VISIBLE_DEVICES then picks it) and
    the driver's shared ones; /sys read-only for the driver's lookups."""
    nodes = [f"/dev/nvidia{device}"] if device.isdigit() else sorted(glob.glob("/dev/nvidia[0-9]*"))
    args = ["--ro-bind", "/sys", "/sys"]
    for path in (*NVIDIA_SHARED, *nodes):
        args += ["--dev-bind-try", path, path]
    return args


@dataclass
class Jail:
    """One sandboxed process's world: `scratch` writable, `handed` files (name -> host path) read-only or, named in
    `writable`, read-write; the project folders in `code` read-only; the GPU `gpu` (an index) or none."""
    mode: str
    scratch: Path
    handed: dict[str, Path] = field(default_factory=dict)
    writable: tuple[str, ...] = ()
    code: tuple[str, ...] = ("harness",)
    gpu: int | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.contained = resolve(self.mode)

    def path(self, name: str) -> str:
        """Where the process sees the handed file `name`."""
        return f"{HANDED}/{name}" if self.contained else str(self.handed[name])

    @property
    def home(self) -> str:
        return SCRATCH if self.contained else str(self.scratch)

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The allow-listed environment: nothing of the trusted side's but the locale."""
        env = {k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}
        env |= {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.home, "TMPDIR": self.home, "USER": "trial",
                "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONNOUSERSITE": "1"}
        if self.gpu is not None and not (self.contained and physical_gpu(self.gpu).isdigit()):
            env["CUDA_VISIBLE_DEVICES"] = physical_gpu(self.gpu)  # in bubblewrap, its device node alone otherwise
        elif self.gpu is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env | (extra or {})

    def argv(self, command: list[str]) -> list[str]:
        """`command` wrapped in bubblewrap (as it is when not contained)."""
        if not self.contained:
            return command
        args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", "65534", "--gid", "65534", "--hostname", "trial", *_system_binds(), *_python_binds()]
        for folder in self.code:
            args += ["--ro-bind", str(PROJECT_ROOT / folder), str(PROJECT_ROOT / folder)]
        args += ["--tmpfs", str(PROJECT_ROOT / "harness" / "corpus")]  # the raw corpus, validation plays included
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(self.scratch), SCRATCH]
        for name, host in self.handed.items():
            args += ["--bind" if name in self.writable else "--ro-bind", str(host), f"{HANDED}/{name}"]
        if self.gpu is not None:
            args += _gpu_binds(physical_gpu(self.gpu))
        return [*args, "--chdir", SCRATCH, "--", *command]

    def popen(self, command: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start `command` in the jail, in a session of its own (so that Ctrl-C is the run's, and kill() ends all)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        cgroups = _cgroups(self.limits)
        kwargs.setdefault("close_fds", True)
        proc = subprocess.Popen(self.argv(command), cwd=self.scratch, env=self.environment(env),
                                start_new_session=True, preexec_fn=functools.partial(_limit, self.limits, cgroups,
                                                                                     self.gpu is None), **kwargs)
        proc.cgroups = cgroups  # removed by kill()
        return proc


def kill(proc: subprocess.Popen) -> None:
    """End a jailed process and everything it started (its session; in bubblewrap, its PID namespace)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)
    proc.wait()
    for group in getattr(proc, "cgroups", ()):
        _remove_cgroup(group)


def _limit(limits: Limits, cgroups: list[Path], cpu_only: bool) -> None:
    """In the child before exec: rlimits, and the child into its cgroups (so that all it starts is counted)."""
    def cap(which: int, value: int) -> None:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (value, value))

    _die_with_parent()
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_FSIZE, limits.file_bytes)
    if os.getuid() != 0:  # root is exempt from RLIMIT_NPROC: the pids cgroup caps it there
        cap(resource.RLIMIT_NPROC, limits.processes)
    if limits.memory_bytes and cpu_only:  # CUDA reserves vast address space: GPU trials rely on the memory cgroup
        cap(resource.RLIMIT_AS, limits.memory_bytes)
    for group in cgroups:
        with contextlib.suppress(OSError):
            (group / "cgroup.procs").write_text(str(os.getpid()))


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends (bubblewrap does the same inside)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _cgroups(limits: Limits) -> list[Path]:
    """Fresh cgroups capping processes and memory, below this process's own, where it may create them (v2 or v1)."""
    base = Path("/sys/fs/cgroup")
    memory = {"memory.max" if (base / "cgroup.controllers").exists() else "memory.limit_in_bytes":
              str(limits.memory_bytes)} if limits.memory_bytes else {}
    caps = {"pids": {"pids.max": str(limits.processes)}, "memory": memory}
    mine = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.count(":") >= 2)
    if (base / "cgroup.controllers").exists():  # v2: one group with the controllers delegated to ours
        parent = base / mine.get("", "/").lstrip("/")
        delegated = (parent / "cgroup.subtree_control").read_text().split() if parent.exists() else []
        roots = [(parent, {k: v for c, knobs in caps.items() if c in delegated for k, v in knobs.items()})]
    else:
        roots = [(base / c / mine.get(c, "/").lstrip("/"), knobs) for c, knobs in caps.items()]
    groups = []
    name = f"hybrid-trial-{secrets.token_hex(6)}"
    for parent, knobs in roots:
        if not knobs or not os.access(parent, os.W_OK):
            continue
        group = parent / name
        try:
            group.mkdir()
            for knob, value in knobs.items():
                (group / knob).write_text(value)
        except OSError:
            _remove_cgroup(group)
            continue
        groups.append(group)
    return groups


def _remove_cgroup(group: Path) -> None:
    with contextlib.suppress(OSError):
        group.rmdir()
