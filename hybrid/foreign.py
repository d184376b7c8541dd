"""Trials of a foreign repository (`hybrid run --repo PATH`): an autoresearch checkout's own train.py, prepare.py,
data and evaluation, run in the same sandbox as any agent code.

Trust: the val_bpb of such a trial is the repository's own evaluation (its prepare.py's evaluate_bpb), printed by
its train.py in the `key: value` summary autoresearch ends with, and parsed here. The process that computes it runs
the code being tuned, so the metric is only as honest as that code: nothing stops a train.py from printing any
number. hybrid's trust split (a trusted scorer, pinned validation inputs, causality checks, the harness clock) does
not apply. The sandbox, the wall-clock limit and the seal of prepare.py still do: hybrid's own files, secrets and
the network stay out of reach, a trial cannot run forever, and a prepare.py changed during a run stops it.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from harness.agent_process import TrialLog
from harness.knobs import KnobError, find_knobs, inject_knobs
from harness.result import TrialResult, is_oom
from harness.sandbox import Jail, Limits, default_memory_bytes, kill
from harness.scrub import scrub
from harness.seal import HarnessChanged
from hybrid.study import store
from hybrid.errors import UserError

if TYPE_CHECKING:
    from hybrid.config import RunConfig

CACHE_ENV = "HYBRID_AUTORESEARCH_CACHE"  # where prepare.py put its data (default ~/.cache/autoresearch)
WALL_FACTOR, WALL_SLACK = 2.0, 300.0     # a trial is killed after WALL_FACTOR x TIME_BUDGET + WALL_SLACK seconds
POLL_SECONDS = 0.1
SUMMARY_LINE = re.compile(r"^(\w+):[ \t]+(\S+)[ \t]*$", re.MULTILINE)
# summary key -> (TrialResult field, factor): what autoresearch's train.py prints at the end
MEASURED = {"training_seconds": ("training_seconds", 1.0), "peak_vram_mb": ("peak_memory_mb", 1.0),
            "mfu_percent": ("mfu", 0.01), "total_tokens_M": ("total_tokens", 1e6), "num_steps": ("num_steps", 1.0),
            "num_params_M": ("num_params", 1e6)}
INTEGERS = ("total_tokens", "num_steps", "num_params")
TRUST_NOTE = ("val_bpb here is the repository's own evaluation (its prepare.py's evaluate_bpb, as printed by its "
              "train.py), not hybrid's harness: the code being tuned computes and prints its own metric, so a train.py "
              "edit could change the number without training a better model. The sandbox, the wall-clock limit and the "
              "seal of prepare.py still hold; the trusted scorer, the pinned validation inputs and the harness clock "
              "do not.")


@dataclass(frozen=True)
class Repo:
    """An autoresearch-shaped checkout: prepare.py (constants, data, evaluation) and train.py (the knobs)."""
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> Repo:
        """The checkout at path; UserError unless it has prepare.py, train.py and a numeric TIME_BUDGET."""
        repo = cls(Path(path).expanduser().resolve())
        if not repo.path.is_dir():
            raise UserError(f"--repo {path}: no such folder")
        for name in ("prepare.py", "train.py"):
            if not (repo.path / name).is_file():
                raise UserError(f"{repo.path} has no {name}: --repo expects an autoresearch checkout "
                                "(prepare.py and train.py at its top)")
        if not isinstance(repo.constant("TIME_BUDGET"), (int, float)):
            raise UserError(f"{repo.prepare} defines no TIME_BUDGET = <seconds>: hybrid bounds a trial's wall time "
                            "by it")
        return repo

    @property
    def prepare(self) -> Path:
        return self.path / "prepare.py"

    @property
    def train_py(self) -> Path:
        return self.path / "train.py"

    @property
    def cache(self) -> Path:
        return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autoresearch").expanduser()

    def constant(self, name: str) -> Any:
        """A top-level literal of prepare.py, read from its syntax tree (prepare.py is never run on this side)."""
        try:
            found = find_knobs(self.prepare.read_text()).get(name)
        except (OSError, KnobError) as e:
            raise UserError(f"cannot read {self.prepare}: {e}") from None
        return found.value if found is not None else None

    def home_caches(self) -> dict[str, tuple[Path, str]]:
        """Folders handed read-only to a trial (name -> host folder, its place under the trial's $HOME): the data of
        prepare.py, and Hugging Face's hub cache, where `kernels` keeps the FlashAttention-3 build autoresearch
        loads (the sandbox has no network; the hub folder holds no token, which lives beside it)."""
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub").expanduser()
        return {"data": (self.cache, ".cache/autoresearch"), "hf-hub": (hub, ".cache/huggingface/hub")}

    @property
    def wall_limit(self) -> float:
        return WALL_FACTOR * float(self.constant("TIME_BUDGET")) + WALL_SLACK


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class PrepareSeal:
    """prepare.py's digest when the run started; verify() stops the run (HarnessChanged) once it differs."""
    path: Path
    digest: str = ""

    def __post_init__(self) -> None:
        self.digest = _sha256(self.path)

    def verify(self) -> None:
        try:
            same = _sha256(self.path) == self.digest
        except OSError:
            same = False
        if not same:
            raise HarnessChanged(f"{self.path} changed since the run started (its results would not compare with "
                                 "the earlier ones): restore it (git checkout prepare.py), or start a new study")


def configure(config: RunConfig) -> None:
    """Fill a --repo run's defaults (train.py and search_space.yaml of the repository); UserError for bad input."""
    if config.objective != "train":
        raise UserError("--repo runs the repository's own train.py: --objective surrogate does not apply")
    repo = Repo.open(config.repo)
    config.repo = str(repo.path)
    config.train_py = config.train_py or str(repo.train_py)
    config.space = config.space or str(repo.path / "search_space.yaml")
    if not Path(config.space).is_file():
        raise UserError(f"no search space at {config.space}: write one with `hybrid space --train-py {repo.train_py} "
                        f"--init-yaml {config.space}` and review it, or pass --space")
    if not repo.cache.is_dir():
        raise UserError(f"no prepared data at {repo.cache}: run `python prepare.py` in {repo.path} first "
                        f"(or set {CACHE_ENV} to where it put its data)")


def parse_summary(text: str) -> dict[str, float]:
    """The numeric `key: value` lines of a trial's output (the last one of each key wins)."""
    summary = {}
    for key, value in SUMMARY_LINE.findall(text):
        try:
            summary[key] = float(value)
        except ValueError:
            continue
    return summary


def outcome(exit_code: int | None, text: str, timed_out: float | None) -> TrialResult:
    """The result of a finished process from its exit status and output: status, error and the summary's figures."""
    summary = parse_summary(text)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")[:300]
    if timed_out is not None:
        result = TrialResult(status="timeout", error=f"killed after the wall-clock limit of {timed_out:.0f} s "
                                                     f"({WALL_FACTOR:g} x TIME_BUDGET + {WALL_SLACK:g} s)")
    elif exit_code != 0:
        oom = exit_code in (-9, 137) or is_oom(text[-4000:])
        result = TrialResult(status="oom" if oom else "crash", error=f"train.py exited with status {exit_code}: {last}")
    elif "val_bpb" not in summary:
        result = TrialResult(status="crash", error="train.py printed no `val_bpb:` line (the summary block "
                                                   "autoresearch prints at the end): nothing to score")
    elif not math.isfinite(summary["val_bpb"]):
        result = TrialResult(status="nan", error=f"train.py printed val_bpb {summary['val_bpb']}")
    else:
        result = TrialResult(val_bpb=summary["val_bpb"])
    for key, (name, factor) in MEASURED.items():
        if key in summary and math.isfinite(summary[key]):
            value = summary[key] * factor
            setattr(result, name, int(round(value)) if name in INTEGERS else value)
    if result.training_seconds > 0 and result.total_tokens:
        result.tokens_per_second = result.total_tokens / result.training_seconds
    return result


@dataclass
class ForeignObjective:
    """The repository's train.py with the trial's knobs written in, run in the trial's folder, in the sandbox."""
    repo: Repo
    stop: threading.Event | None = None  # set on Ctrl-C: the trial in flight is killed
    sandbox: str = "auto"
    device: str | None = None
    name: str = "train"
    seal: PrepareSeal = field(init=False)

    def __post_init__(self) -> None:
        self.seal = PrepareSeal(self.repo.prepare)  # taken when the run (its worker) starts
        print(f"hybrid: --repo {self.repo.path}: {TRUST_NOTE}", file=sys.stderr, flush=True)

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        """TOTAL_BATCH_SIZE snapped to whole micro-batches of prepare.py's MAX_SEQ_LEN (autoresearch asserts it)."""
        from harness.runner import snap_batch_size

        seq_len = self.repo.constant("MAX_SEQ_LEN")
        if not isinstance(seq_len, int):
            return dict(config)
        try:
            return snap_batch_size(code, config, seq_len)
        except KnobError:  # train.py does not parse: the trial records the crash
            return dict(config)

    def evaluate(self, code: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        """The trial's result (every failure of train.py is one); KeyboardInterrupt when stopped."""
        from harness.runner import ERROR_CHARS

        self.seal.verify()
        t0 = time.perf_counter()
        config = self.runs_as(code, config)
        trial_dir = Path(trial_dir).resolve()
        trial_dir.mkdir(parents=True, exist_ok=True)
        log = TrialLog(trial_dir / "log.txt")
        try:
            (trial_dir / "train.py").write_text(inject_knobs(code, config))
            status, timed_out = self._train(trial_dir, log, code)
            result = outcome(status, log.text(), timed_out)
        except KnobError as e:  # train.py does not parse, or lost a knob
            result = TrialResult(status="crash", error=str(e))
        finally:
            log.close()
        result.total_seconds = time.perf_counter() - t0
        result.config, result.log_path = config, str(trial_dir / "log.txt")
        result.error = scrub(result.error, ERROR_CHARS) if result.error else None
        result.write(trial_dir / "result.json")
        return result

    def _jail(self, trial_dir: Path, code: str) -> Jail:
        from harness.runner import compile_cache, trial_device

        caches = {name: (host, home) for name, (host, home) in self.repo.home_caches().items() if host.is_dir()}
        handed = {"train.py": trial_dir / "train.py", "repo": self.repo.path,
                  "compile-cache": compile_cache(code),  # per generation, as the harness keeps it
                  **{name: host for name, (host, _) in caches.items()}}
        jail = Jail(self.sandbox, trial_dir / "scratch", handed=handed, writable=("compile-cache",), code=(),
                    gpu=trial_device(self.device)[1], limits=Limits(memory_bytes=default_memory_bytes()))
        for name, (_, home) in caches.items():  # found where the code looks: under $HOME, the scratch folder
            link = jail.scratch / home
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(jail.path(name))
        return jail

    def _train(self, trial_dir: Path, log: TrialLog, code: str) -> tuple[int | None, float | None]:
        """Run `python train.py` to its end or its wall-clock limit: (exit status, the limit if it was hit)."""
        jail = self._jail(trial_dir, code)
        cache = jail.path("compile-cache")
        env = {"PYTHONPATH": jail.path("repo"), "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
               "TRITON_CACHE_DIR": f"{cache}/triton", "HF_HUB_OFFLINE": "1"}
        proc = jail.popen([sys.executable, jail.path("train.py")], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        copier = threading.Thread(target=_copy, args=(proc.stdout, log), daemon=True)
        copier.start()
        deadline = time.monotonic() + self.repo.wall_limit
        try:
            while proc.poll() is None:
                if self.stop is not None and self.stop.is_set():
                    raise KeyboardInterrupt
                if time.monotonic() > deadline:
                    return None, self.repo.wall_limit
                time.sleep(POLL_SECONDS)
            return proc.returncode, None
        finally:
            kill(proc)
            copier.join(timeout=5)


def _copy(stream: Any, log: TrialLog) -> None:
    """A process's output into the trial's log (bounded and scrubbed there), until it closes."""
    while chunk := stream.read1(1 << 16):
        log.write(chunk)


def uses_repo(study: optuna.Study) -> bool:
    """Whether a study's metric is a repository's own (a --repo run, or an imported autoresearch night)."""
    return bool((study.user_attrs.get(store.RUN_KEY) or {}).get("repo"))


def trust_note(studies: list[optuna.Study]) -> str:
    """The report's paragraph on whose metric it shows, for studies of foreign repositories ('' when none)."""
    names = [s.study_name for s in studies if uses_repo(s)]
    if not names:
        return ""
    return f"## Whose metric\n\nStudies {', '.join(f'`{n}`' for n in names)}: {TRUST_NOTE} Imported trials " \
           "(source `import`) were measured by the autoresearch run itself; hybrid reran none of them."
