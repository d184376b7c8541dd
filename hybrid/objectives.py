"""Objectives: what evaluating a config costs and returns. `train` runs train.py; `surrogate` predicts it."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from optuna.trial import FrozenTrial

from harness.profiles import Profile
from harness.result import TrialResult


class Objective(Protocol):
    name: str

    def runs_as(self, source: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config a trial of `config` actually runs, after what the objective does to it first."""

    def evaluate(self, source: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        """The trial's result; KeyboardInterrupt if it was stopped (Ctrl-C) before it had one."""


@dataclass
class TrainObjective:
    """A real trial: the generation's train.py with the config injected, run by the harness."""
    profile: Profile
    vram_cap_gb: float | None = None
    device: str | None = None
    stop: threading.Event | None = None  # set on Ctrl-C: the trial in flight is killed
    name: str = "train"

    def runs_as(self, source: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config run_trial injects: TOTAL_BATCH_SIZE snapped to whole micro-batches (see snap_batch_size)."""
        from harness.knobs import KnobError
        from harness.runner import snap_batch_size

        try:
            return snap_batch_size(source, config, self.profile.seq_len)
        except KnobError:  # train.py does not parse: run_trial records the crash
            return dict(config)

    def evaluate(self, source: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        from harness.runner import run_trial

        return run_trial(source, config, self.profile, trial_dir, seed=seed, device=self.device,
                         vram_cap_gb=self.vram_cap_gb, stop=self.stop)


class SurrogateObjective:
    """The paper's H200 trials as a model: val_bpb, failure and wall time of a config, in microseconds."""
    name = "surrogate"

    def __init__(self) -> None:
        from hybrid.surrogate import SurrogateObjective as Model

        self._model = Model()

    def runs_as(self, source: str, config: dict[str, Any]) -> dict[str, Any]:
        """The config snapped as the paper's runner did (hybrid.surrogate.runs_as)."""
        from hybrid.surrogate import runs_as

        return runs_as(config)

    def evaluate(self, source: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        return self._model.evaluate(config, seed=seed, trial_number=trial_number)


def ensure_prepared(profile: Profile) -> None:
    """Prepare the bundled corpus on first use (offline, seconds); other sources need `hybrid prepare`."""
    from harness.data import prepare, prepared
    from hybrid.errors import UserError

    try:
        prepared(profile)
    except UserError:
        if profile.source != "builtin":
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

    def runs_as(self, source: str, config: dict[str, Any]) -> dict[str, Any]:
        return self.objective.runs_as(source, config)

    def evaluate(self, source: str, config: dict[str, Any], **kwargs: Any) -> TrialResult:
        refused = self.model.check(source, self.runs_as(source, config), self.cap_gb, self.history())
        return refused if refused is not None else self.objective.evaluate(source, config, **kwargs)


def make_objective(name: str, profile: Profile, *, vram_cap_gb: float | None = None, memory_model: bool = False,
                   history: Callable[[], Iterable[FrozenTrial]] = tuple,
                   stop: threading.Event | None = None) -> Objective:
    """The objective `name`, behind the memory model when it is on and a VRAM cap applies. Setting `stop` ends
    a train.py trial in flight (a surrogate trial takes milliseconds: it finishes)."""
    objective = (SurrogateObjective() if name == "surrogate"
                 else TrainObjective(profile, vram_cap_gb=vram_cap_gb, stop=stop))
    if not memory_model:
        return objective
    from hybrid.memory import MemoryModel, default_cap_gb

    cap = default_cap_gb(vram_cap_gb, name, profile)
    return objective if cap is None else MemoryGuarded(objective, cap, history, MemoryModel(profile))
