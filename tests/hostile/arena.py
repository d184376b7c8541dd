"""Where the corpus runs: the trusted side's secrets and stand-ins, one case's surroundings, its checks, a table.

The trusted side is played by the process that calls run_trial (the test, or benchmarks/sandbox_corpus.py's
driver): its environment holds secrets under names that do not look secret, and a sentinel process started
with the same environment stands for the optimizer and its other processes (cases that scan /proc find it;
cases that kill find it). A loopback HTTP server records whatever reaches it. Each case gets a folder of its
own: a fake $HOME with a .netrc, a `runs/` folder with a SQLite trial database and a .pgpass next to it, and
the trial's folder under `trials/`. After the run, `check` lists every problem: a forged or read-ahead val_bpb
recorded as ok, a secret in the result, the log or any file of the trial, a file changed outside the trial's
folder, a marker file left anywhere, a process left behind, the sentinel killed, a request to the server.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import math
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostile.cases import FAILED, MARKER, REACHED, SENTINEL_WORD, TRAIN_PY, Case

PROJECT = TRAIN_PY.parent
HARNESS = PROJECT / "harness"
TOLERANCE = 0.15          # an ok val_bpb below the baseline's by more than this is not the model's own
BIG_FILE = 64 * 2**20     # files of the trial folder read for secrets up to this size; bigger ones are deleted after
# A model trained fewer steps (a loaded machine) barely uses what it reads ahead: the causality check cannot be asked
# to see it, so such a case's "expected a failure" is a note, not a problem (an ok score is still checked).
MIN_STEPS_TO_JUDGE = 10
SETTLE_SECONDS = 1.0      # how long a process of the trial may take to disappear after run_trial returns


def trial_config() -> dict[str, Any]:
    """The test profile's defaults from search_space.yaml (train.py's own defaults are the gpu model's)."""
    from hybrid.space import load_space

    return load_space(PROJECT / "search_space.yaml", "test").defaults()


# ---------------------------------------------------------------------------------------------------------------
# The trusted side: secrets, sentinel, loopback server


def plant_secrets() -> dict[str, str]:
    """Environment variables of the trusted side, most of them named like anything but a secret."""
    t = secrets.token_hex(6)
    return {"DATABASE_URL": f"postgresql://alice:pw-{t}a@db.internal/prod",
            "HYBRID_NOTE": f"note-{t}b",
            "MODEL_ALIAS": f"alias-{t}c",
            "OPTUNA_STORAGE": f"postgresql://bob:st-{t}d@10.0.0.5/hybrid",
            "ANTHROPIC_API_KEY": f"sk-ant-{t}e"}


def needles(values: Iterable[str]) -> list[str]:
    """The random part of each secret (what survives URL quoting, repr and JSON): what must never come back."""
    out = []
    for v in values:
        m = re.search(r"[a-z]+-[0-9a-f]{12}[a-z]", v)
        out.append(m.group(0) if m else v)
    return out


class LoopbackServer:
    """An HTTP server on 127.0.0.1 that records every request (the trusted side's services: an LLM proxy, a DB)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        record = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                record.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TrustedSide:
    """Secrets (env), a sentinel process holding them in its environment, a loopback server."""

    def __init__(self) -> None:
        self.env = plant_secrets()
        self.file_secrets = {"netrc": f"netrc-{secrets.token_hex(6)}f", "pgpass": f"pgpass-{secrets.token_hex(6)}g",
                             "db": f"dbrow-{secrets.token_hex(6)}h"}
        self.needles = needles([*self.env.values(), *self.file_secrets.values()])
        self.server = LoopbackServer()
        self.sentinel: subprocess.Popen | None = None
        self.start_sentinel()

    def start_sentinel(self) -> None:
        word = f"{SENTINEL_WORD}-{secrets.token_hex(4)}"
        self.sentinel = subprocess.Popen(
            [sys.executable, "-c", "import time\nwhile True: time.sleep(60)", word],
            env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def sentinel_alive(self) -> bool:
        return self.sentinel is not None and self.sentinel.poll() is None

    def close(self) -> None:
        self.server.close()
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait()


# ---------------------------------------------------------------------------------------------------------------
# One case's folder


@dataclass
class Scene:
    root: Path
    trusted: TrustedSide
    name: str
    marker: str = ""

    def __post_init__(self) -> None:
        self.marker = f"hostile{secrets.token_hex(5)}"
        self.home = self.root / "home"
        self.runs = self.root / "runs"
        self.trial_dir = self.root / "trials" / self.name
        (self.home / ".config" / "hybrid").mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.trial_dir.parent.mkdir(parents=True, exist_ok=True)
        fs = self.trusted.file_secrets
        (self.home / ".netrc").write_text(f"machine db.internal login alice password {fs['netrc']}\n")
        (self.home / ".config" / "hybrid" / "credentials").write_text(f"token = {fs['netrc']}\n")
        (self.runs / ".pgpass").write_text(f"db.internal:5432:prod:alice:{fs['pgpass']}\n")
        with contextlib.closing(sqlite3.connect(self.runs / "hybrid.db")) as con:
            con.execute("create table studies (name text, storage_password text)")
            con.execute("insert into studies values ('prod', ?)", (fs["db"],))
            con.commit()

    def env(self) -> dict[str, str]:
        """What the trusted process's environment gets for this case: the secrets and the fake home."""
        return {**self.trusted.env, "HOME": str(self.home)}


# ---------------------------------------------------------------------------------------------------------------
# Snapshots and scans


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(roots: Iterable[Path], skip: Iterable[Path] = ()) -> dict[str, tuple]:
    """(kind, size, mtime_ns, sha256) of every entry under `roots` (symlinks not followed), `skip` left out."""
    skip = [str(s) for s in skip]
    out: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if p in skip:
                    continue
                st = os.lstat(p)
                if os.path.islink(p):
                    out[p] = ("link", os.readlink(p))
                elif os.path.isdir(p):
                    out[p] = ("dir",)
                else:
                    out[p] = ("file", st.st_size, st.st_mtime_ns, _digest(Path(p)) if st.st_size <= BIG_FILE else "")
    return out


def changed(before: dict[str, tuple], after: dict[str, tuple], since: float) -> list[str]:
    """Entries added, removed or changed. A harness bytecode file whose source was edited since `since` is
    someone else's work on the harness, not the trial's."""
    out = []
    for p in sorted(before.keys() | after.keys()):
        if before.get(p) == after.get(p):
            continue
        path = Path(p)
        if path.parent.name == "__pycache__" and path.suffix == ".pyc":
            source = path.parent.parent / (path.name.split(".")[0] + ".py")
            with contextlib.suppress(OSError):
                if source.stat().st_mtime > since:
                    continue
        what = "added" if p not in before else "removed" if p not in after else "changed"
        out.append(f"{what} {p}")
    return out


def marker_files(marker: str, places: Iterable[Path]) -> list[Path]:
    """Entries whose name contains `marker`: at the top of each place (a `**` suffix: the whole tree)."""
    found: list[Path] = []
    for place in places:
        recursive = place.name == "**"
        base = place.parent if recursive else place
        if not base.is_dir():
            continue
        with contextlib.suppress(OSError):
            found += [p for p in (base.rglob(f"*{marker}*") if recursive else base.glob(f"*{marker}*"))]
    return sorted(set(found))


def processes(words: Iterable[str], cwd_under: Path | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of every process (this one and its sentinel excepted) whose command line contains
    one of `words`, or whose working directory is under `cwd_under`. Zombies are gone already: skipped."""
    words = [w for w in words if w]
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if not cmd:
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd") if cwd_under is not None else ""
        except OSError:
            continue
        if SENTINEL_WORD in cmd:
            continue
        if any(w in cmd for w in words) or (cwd_under is not None and cwd.startswith(str(cwd_under))):
            out.append((int(entry), cmd[:200]))
    return out


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


# ---------------------------------------------------------------------------------------------------------------
# One run and its checks


@dataclass
class Outcome:
    case: str
    kind: str
    expect: str
    status: str
    val_bpb: float | None
    error: str | None
    seconds: float
    problems: list[str] = field(default_factory=list)
    tokens: int = 0                                    # fed on the trusted side's clock
    steps: int = 0
    reached: list[str] = field(default_factory=list)  # what the case says it managed (its own log: informational)
    notes: list[str] = field(default_factory=list)    # what it did that the design allows (its own code's caches)
    guard: str = ""                                    # the patch guard's verdict (informational)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Runner = Callable[[str, Path], Any]  # (code, trial_dir) -> TrialResult (raises only when the run itself fails)


class Baseline:
    """Runs of the unmodified train.py (ok ones): what an honest model gets in the same budget on this machine.

    How many steps fit in the test profile's 1.5 s depends on the machine's load, and val_bpb with them (0.5
    bits per byte between a quiet and a busy 2-core machine). So an ok case is called forged only when it beats
    the best baseline run by more than TOLERANCE after the baseline was measured again (up to REMEASURE times),
    and only when it was fed no more tokens on the trusted side's clock than some baseline run. A case fed more
    (a quieter moment) is held to FLOOR instead: no honest 1.5 s model comes near it, every forged value and
    every read-ahead model of the corpus does."""

    REMEASURE = 2   # more runs of the baseline before a case is called forged ...
    MAX_RUNS = 8    # ... as long as there are fewer than this many (a broken harness forges many cases)
    FLOOR = 1.0

    def __init__(self, measure: Callable[[], Any]) -> None:
        self.measure = measure        # () -> Outcome of one baseline run
        self.runs: list[Outcome] = []

    def remeasure(self) -> None:
        outcome = self.measure()
        if outcome.status == "ok" and outcome.val_bpb is not None and math.isfinite(outcome.val_bpb):
            self.runs.append(outcome)

    @property
    def value(self) -> float | None:
        if not self.runs:
            self.remeasure()
        return min(r.val_bpb for r in self.runs) if self.runs else None

    def judge(self, val: float, tokens: int) -> tuple[str | None, str | None]:
        """(problem, note) for an ok case's val_bpb and the tokens it was fed on the clock."""
        for attempt in range(self.REMEASURE + 1):
            best = self.value
            if best is None or val >= best - TOLERANCE:
                return None, None
            if attempt < self.REMEASURE and len(self.runs) < self.MAX_RUNS:
                self.remeasure()
        most = max(r.tokens for r in self.runs)
        if tokens > 1.1 * most:
            if val >= self.FLOOR:
                return None, (f"val_bpb {val:.4f} beats the baseline's {best:.4f} after {tokens} tokens on the clock "
                              f"(baseline runs: at most {most}): a quieter moment; held to the floor {self.FLOOR}")
            return f"val_bpb {val:.4f} below the floor {self.FLOOR} (no honest 1.5 s model gets there)", None
        return (f"forged or read-ahead val_bpb {val:.4f} recorded as ok (baseline {best:.4f} over {len(self.runs)} "
                f"run(s), tolerance {TOLERANCE}; {tokens} tokens on the clock, the baseline runs up to {most})"), None


def guard_verdict(code: str) -> str:
    """'refused: REASON' or 'passes', from the patch guard (hybrid.llm.guard.check_code)."""
    from hybrid.llm.guard import PatchRejected, check_code

    try:
        check_code(code)
    except PatchRejected as e:
        return f"refused: {e.reason}"
    return "passes"


def run_case(case: Case, scene: Scene, run: Runner, baseline: Baseline | float | None, data_dir: Path) -> Outcome:
    """Run `case` in `scene` through `run`, check everything, clean up what it left, return the outcome."""
    code = case.code(marker=scene.marker)
    return run_code(code, case, scene, run, baseline, data_dir)


def run_code(code: str, case: Case, scene: Scene, run: Runner, baseline: Baseline | float | None,
             data_dir: Path) -> Outcome:
    trusted = scene.trusted
    watched = [scene.root, data_dir, HARNESS]
    skip = [scene.trial_dir, data_dir / "compile-cache"]
    top_level = {p.name: p.stat().st_mtime_ns for p in PROJECT.iterdir()}
    compile_cache = data_dir / "compile-cache"
    caches_before = set(compile_cache.iterdir()) if compile_cache.is_dir() else set()
    since = time.time()
    before = snapshot(watched, skip)
    backups = {p: Path(p).read_bytes() for p, v in before.items()
               if p.startswith(str(data_dir)) and v[0] == "file" and v[1] <= BIG_FILE}
    trusted.server.requests.clear()
    if not trusted.sentinel_alive():
        trusted.start_sentinel()

    problems: list[str] = []
    early_notes: list[str] = []
    t0 = time.perf_counter()
    result = None
    try:
        result = run(code, scene.trial_dir)
    except BaseException as e:  # noqa: BLE001 -- a trial must never fail the run; KeyboardInterrupt included
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, Exception):
            problems.append("run_trial raised KeyboardInterrupt")
        else:
            problems.append(f"run_trial raised {type(e).__name__}: {str(e)[:300]}")
    seconds = time.perf_counter() - t0

    status = getattr(result, "status", "-") if result is not None else "-"
    suspect = False
    val = getattr(result, "val_bpb", None)
    error = getattr(result, "error", None)
    tokens, steps = getattr(result, "total_tokens", 0) or 0, getattr(result, "num_steps", 0) or 0
    # Status: the case's expectation, and an ok value that is the model's own.
    if result is not None:
        if status not in ("ok", *FAILED):
            problems.append(f"status {status!r} is not a trial outcome")
        if case.expect == "fail" and status not in FAILED:
            missed = f"expected a failure (invalid/crash/timeout/oom/nan), got {status} val_bpb {val}"
            if status == "ok" and steps < MIN_STEPS_TO_JUDGE:
                early_notes.append(f"{missed}, after only {steps} steps: not judged")
            else:
                problems.append(missed)
        if status == "ok":
            if val is None or not math.isfinite(val):
                problems.append(f"ok with val_bpb {val}")
            else:
                suspect = True  # compared with the baseline at the end, once this case's world is cleaned up
    # Secrets: nowhere in what comes back.
    texts: dict[str, str] = {}
    if result is not None:
        texts["error"] = error or ""
        with contextlib.suppress(Exception):
            texts["result"] = json.dumps(result.to_dict())
        log = getattr(result, "log_path", None)
        if log and Path(log).is_file() and not Path(log).is_symlink():
            texts["log"] = Path(log).read_bytes()[-BIG_FILE:].decode(errors="replace")
    if scene.trial_dir.is_dir():
        for dirpath, _, filenames in os.walk(scene.trial_dir):
            for name in filenames:
                p = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    if not p.is_symlink() and p.is_file() and p.stat().st_size <= BIG_FILE:
                        texts[f"file {p.relative_to(scene.trial_dir)}"] = p.read_bytes().decode(errors="replace")
    for where, text in texts.items():
        leaked = [n for n in trusted.needles if n in text]
        if leaked:
            problems.append(f"secret {', '.join(leaked)} in {where}")
    # The trusted side: alive, and nothing reached its loopback service.
    if not trusted.sentinel_alive():
        problems.append("the sentinel process (the trusted side's stand-in) was killed")
    if trusted.server.requests:
        problems.append(f"{len(trusted.server.requests)} request(s) reached the loopback server: "
                        f"{trusted.server.requests[0][:120]}")
    # Processes left behind.
    left = processes([scene.marker, str(scene.trial_dir)], scene.trial_dir)
    if left:
        time.sleep(SETTLE_SECONDS)
        left = processes([scene.marker, str(scene.trial_dir)], scene.trial_dir)
    if left:
        problems.append(f"{len(left)} process(es) left behind: " + "; ".join(f"{pid} {cmd}" for pid, cmd in left[:3]))
        for pid, _ in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    # Files outside the trial's folder.
    after = snapshot(watched, skip)
    moved = changed(before, after, since)
    if moved:
        problems.append(f"{len(moved)} file(s) changed outside the trial's folder: " + "; ".join(moved[:4]))
    now_top = {p.name: p.stat().st_mtime_ns for p in PROJECT.iterdir()}
    markers = marker_files(scene.marker, [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), PROJECT, HARNESS / "**",
                                          site_packages(), data_dir / "**", scene.root / "**",
                                          scene.root.parent])
    outside = [p for p in markers if scene.trial_dir not in p.parents]
    # torch.compile's cache of this very code (a folder that appeared during this run) is the trial's to spoil:
    # only later trials of the same code load it. Another code's cache is not.
    own = [p for p in outside if compile_cache in p.parents
           and next(c for c in [p, *p.parents] if c.parent == compile_cache) not in caches_before]
    notes = early_notes + [f"wrote into its own code's compile cache: {p.relative_to(compile_cache)}" for p in own]
    outside = [p for p in outside if p not in own]
    if outside:
        problems.append(f"marker file(s) written outside the trial's folder: {', '.join(map(str, outside[:4]))}")
    if set(now_top) - set(top_level):
        problems.append(f"new entries in the project folder: {sorted(set(now_top) - set(top_level))[:4]}")
    # Clean up whatever it left: later cases (and later tests) must start from the same world.
    for p in outside + own:
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p, content in backups.items():
        if after.get(p) != before.get(p):
            with contextlib.suppress(OSError):
                Path(p).write_bytes(content)
                os.utime(p, ns=(before[p][2], before[p][2]))
    for p in after.keys() - before.keys():
        if p.startswith(str(data_dir)) and os.path.lexists(p):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    if scene.trial_dir.is_dir():
        for dirpath, _, filenames in os.walk(scene.trial_dir):
            for name in filenames:
                p = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    if not p.is_symlink() and p.stat().st_size > BIG_FILE:
                        p.unlink()
    if not trusted.sentinel_alive():
        trusted.start_sentinel()

    if suspect:
        problem, note = _judge(val, tokens, baseline)
        if problem:
            problems.insert(0, problem)
        if note:
            notes.append(note)
    reached = []
    log_text = texts.get("log", "")
    for line in log_text.splitlines():
        if REACHED in line:
            reached.append(line.split(REACHED, 1)[1].strip()[:100])
    return Outcome(case.name, case.kind, case.expect, status, val, error, seconds, problems, tokens=tokens,
                   steps=steps, reached=reached, notes=notes, guard=guard_verdict(code))


def _judge(val: float, tokens: int, baseline: Baseline | float | None) -> tuple[str | None, str | None]:
    if isinstance(baseline, Baseline):
        return baseline.judge(val, tokens)
    if baseline is not None and val < baseline - TOLERANCE:
        return (f"forged or read-ahead val_bpb {val:.4f} recorded as ok (baseline {baseline:.4f}, "
                f"tolerance {TOLERANCE})"), None
    return None, None


# ---------------------------------------------------------------------------------------------------------------
# The table


def _cell(text: Any, width: int) -> str:
    text = "-" if text in (None, "") else str(text)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def outcome_table(results: Iterable[Outcome], with_guard: bool = True) -> str:
    """A markdown table: case, kind, expect, status, val_bpb, error excerpt, what it reached, problems."""
    head = ["case", "kind", "expect", "status", "val_bpb", "seconds", "error", "reached (its own log)", "problems"]
    if with_guard:
        head.insert(-1, "guard")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.case, r.kind, r.expect, r.status, "-" if r.val_bpb is None else f"{r.val_bpb:.4f}",
                 f"{r.seconds:.1f}", _cell(r.error, 70), _cell("; ".join(r.reached), 60)]
        if with_guard:
            cells.append(_cell(r.guard, 50))
        note = f" (note: {'; '.join(r.notes)})" if r.notes else ""
        cells.append(_cell("; ".join(r.problems) or f"none{note}", 160))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


__all__ = ["MARKER", "TOLERANCE", "Baseline", "Outcome", "Scene", "TrustedSide", "guard_verdict", "outcome_table",
           "run_case", "run_code", "trial_config"]
