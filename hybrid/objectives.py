"""Objectives: what evaluating a config costs and returns. `train` runs train.py; `surrogate` predicts it; `benchmark`
adds code generations with hidden true effects to the surrogate (hybrid.benchmark_objective)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from optuna.trial import FrozenTrial

from harness.profiles import Profile
from harness.result import TrialResult
from hybrid.study.records import SOURCE, ok_value


class Objective(Protocol):
    name: str

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config a trial of `config` actually runs, after what the objective does to it first."""

    def evaluate(self, code: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        """The trial's result; KeyboardInterrupt if it was stopped (Ctrl-C) before it had one."""


STARTUP_FACTOR, STARTUP_SLACK = 4.0, 30.0  # a trial may start this many times slower than the baseline, plus this


def startup_limit(profile: Profile, history: Iterable[FrozenTrial]) -> float:
    """Seconds a trial may take before its clock runs: relative to what the baseline needed in this study (a loaded
    machine starts every config slowly, and that is no failure of the config), the profile's bound at least."""
    measured = [t.user_attrs.get("startup_seconds") or 0.0 for t in history
                if t.user_attrs.get(SOURCE) == "baseline" and ok_value(t) is not None]
    if not measured:
        return profile.max_startup_seconds
    return max(profile.max_startup_seconds, STARTUP_FACTOR * max(measured) + STARTUP_SLACK)


def rescore_below(history: Iterable[FrozenTrial]) -> float | None:
    """A val_bpb this far below the study's best so far is scored a second time, on another order, before it counts."""
    from harness.runner import IMPLAUSIBLE_GAIN

    values = [v for t in history if (v := ok_value(t)) is not None]
    return min(values) - IMPLAUSIBLE_GAIN if values else None


@dataclass
class TrainObjective:
    """A real trial: the generation's train.py with the config injected, run by the harness in its sandbox."""
    profile: Profile
    vram_cap_gb: float | None = None
    device: str | None = None
    stop: threading.Event | None = None  # set on Ctrl-C: the trial in flight is killed
    sandbox: str = "auto"
    history: Callable[[], Iterable[FrozenTrial]] = tuple  # the study's trials: startup bound, rescoring
    name: str = "train"
    curves: bool = True  # evaluate() takes `report`: intermediate val_bpb for a pruner (hybrid.pruners)

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config run_trial injects: TOTAL_BATCH_SIZE snapped to whole micro-batches (see snap_batch_size)."""
        from harness.knobs import KnobError
        from harness.runner import snap_batch_size

        try:
            return snap_batch_size(code, config, self.profile.seq_len)
        except KnobError:  # train.py does not parse: run_trial records the crash
            return dict(config)

    def evaluate(self, code: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path, report: Callable[[float, float], bool] | None = None) -> TrialResult:
        """`report`: told the intermediate val_bpb at each checkpoint, True stops the trial (harness.runner)."""
        from harness.runner import run_trial

        history = list(self.history())
        return run_trial(code, config, self.profile, trial_dir, seed=seed, device=self.device,
                         vram_cap_gb=self.vram_cap_gb, stop=self.stop, sandbox=self.sandbox,
                         startup_limit=startup_limit(self.profile, history), rescore_below=rescore_below(history),
                         report=report)


class SurrogateObjective:
    """The paper's H200 trials as a model: val_bpb, failure and wall time of a config, in microseconds."""
    name = "surrogate"

    def __init__(self) -> None:
        from hybrid.surrogate import SurrogateTrials

        self._trials = SurrogateTrials()

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config snapped as the paper's runner did (hybrid.surrogate.runs_as)."""
        from hybrid.surrogate import runs_as

        return runs_as(config)

    def evaluate(self, code: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        return self._trials.evaluate(config, seed=seed, trial_number=trial_number)


def ensure_prepared(profile: Profile) -> None:
    """Prepare the bundled corpus on first use (offline, seconds); other corpora need `hybrid prepare`."""
    from harness.data import prepare, prepared
    from hybrid.errors import UserError

    try:
        prepared(profile)
    except UserError:
        if profile.corpus != "builtin":
            raise
        prepare(profile, None)


@dataclass
class MemoryGuarded:
    """An objective behind the memory model: a config whose run (objective.runs_as) is predicted over the VRAM cap
    is not run but recorded `oom-predicted`, at no GPU time (the sampler is told the failure penalty)."""
    objective: Objective
    cap_gb: float
    history: Callable[[], Iterable[FrozenTrial]]  # the study's trials, to calibrate on
    model: Any  # hybrid.memory.MemoryModel (imported lazily: it builds models with torch)

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def curves(self) -> bool:
        return getattr(self.objective, "curves", False)

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        return self.objective.runs_as(code, config)

    def evaluate(self, code: str, config: dict[str, Any], **kwargs: Any) -> TrialResult:
        refused = self.model.check(code, self.runs_as(code, config), self.cap_gb, self.history())
        return refused if refused is not None else self.objective.evaluate(code, config, **kwargs)


def make_objective(name: str, profile: Profile, *, vram_cap_gb: float | None = None, memory_model: bool = False,
                   history: Callable[[], Iterable[FrozenTrial]] = tuple,
                   stop: threading.Event | None = None, sandbox: str = "auto",
                   trusted_code: tuple[str, ...] = (), repo: str | None = None, seed: int = 0,
                   benchmark_noise: float | None = None) -> Objective:
    """The objective `name`, behind the memory model when it is on and a VRAM cap applies. Setting `stop` ends
    a train.py trial in flight (a surrogate trial takes milliseconds: it finishes). `sandbox`: harness.sandbox's mode;
    `trusted_code`: the user's own train.py, which the memory model builds in process (agent code: sandboxed).
    `repo`: an autoresearch checkout, whose own train.py and metric run instead (hybrid.foreign; no memory model).
    `seed` and `benchmark_noise`: the benchmark's hidden world and its noise (no memory model: its failures are the
    surrogate's)."""
    if repo:
        from hybrid.foreign import ForeignObjective, Repo

        return ForeignObjective(Repo.open(repo), stop=stop, sandbox=sandbox)
    if name == "benchmark":
        from hybrid.benchmark_objective import BenchmarkObjective

        return BenchmarkObjective(seed, benchmark_noise, trusted_code[0] if trusted_code else None)
    objective = (SurrogateObjective() if name == "surrogate"
                 else TrainObjective(profile, vram_cap_gb=vram_cap_gb, stop=stop, sandbox=sandbox, history=history))
    if not memory_model:
        return objective
    from hybrid.memory import MemoryModel, default_cap_gb

    cap = default_cap_gb(vram_cap_gb, name, profile)
    return objective if cap is None else MemoryGuarded(objective, cap, history,
                                                       MemoryModel(profile, sandbox, trusted=trusted_code))
