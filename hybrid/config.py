"""A run's configuration: the method registry, RunConfig (what a study was started with) and its Budget."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import optuna

from harness.profiles import get_profile
from hybrid.study import store
from hybrid.errors import UserError


@dataclass(frozen=True)
class MethodSpec:
    """A method of the registry: what it needs, and where its class lives (`module:Class`, built by
    hybrid.methods.build_method, so that this table imports no method)."""
    name: str
    factory: str
    needs_llm: bool = False
    edits_code: bool = False


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("random", "hybrid.methods:ClassicalMethod"),
    MethodSpec("tpe", "hybrid.methods:ClassicalMethod"),
    MethodSpec("cmaes", "hybrid.methods:ClassicalMethod"),
    MethodSpec("gp", "hybrid.methods:ClassicalMethod"),
    MethodSpec("llm-hp", "hybrid.llm.hp_agent:LLMHPMethod", needs_llm=True),
    MethodSpec("llm-code", "hybrid.llm.code_agent:LLMCodeMethod", needs_llm=True, edits_code=True),
    MethodSpec("centaur", "hybrid.llm.centaur:CentaurMethod", needs_llm=True),
    MethodSpec("hybrid", "hybrid.evolution:HybridMethod", edits_code=True),
)}

DEFAULT_STORAGE = "sqlite:///runs/hybrid.db"
# Objectives that model the paper's H200 trials instead of training (gpu profile, the paper's 24 hours).
MODELLED = ("surrogate", "benchmark")
# The budget of a run given neither --budget-hours nor --trials: the paper's 24 h on a GPU (and on its surrogate),
# 15 minutes on the cpu profile (about 30 trials of ~28 s), seconds on the test profile. `hybrid compare` gives
# each of its studies a quarter of the cpu one (hybrid.compare.CPU_BUDGET_HOURS).
DEFAULT_BUDGET_HOURS = {"gpu": 24.0, "cpu": 0.25, "test": 0.01, "surrogate": 24.0}
# Trials in a row that fail for the same reason (failure class and message) after which a run stops (hybrid.stops).
DEFAULT_MAX_FAILURES_IN_A_ROW = 5


@dataclass
class RunConfig:
    """Everything a study was started with; stored in the study so `resume` needs nothing else."""
    method: str
    study: str
    storage: str = DEFAULT_STORAGE
    seed: int = 0
    budget_hours: float | None = None
    trials: int | None = None
    objective: str = "train"
    profile: str | None = None
    workers: int = 1
    llm: str | None = None
    llm_model: str | None = None
    llm_base_url: str | None = None
    sampler: str | None = None
    memory_model: bool = True
    vram_cap_gb: float | None = None
    train_py: str | None = None
    space: str | None = None
    mutate_every: int | None = None
    stagnation: int | None = None
    repeats: int | None = None    # hybrid: fresh re-runs of an incumbent (and a control) per verdict (hybrid.promotion)
    llm_fraction: float = 0.3
    artifacts: str | None = None
    sandbox: str = "auto"         # the OS sandbox of agent code: auto | required | off (harness.sandbox)
    repo: str | None = None       # an autoresearch checkout whose own train.py, prepare.py and metric run (hybrid.foreign)
    max_failures_in_a_row: int = DEFAULT_MAX_FAILURES_IN_A_ROW  # trials failing the same way that stop the run
    llm_max_usd: float | None = None  # no LLM call once the study's recorded LLM cost reaches this (hybrid.llm.spending)
    benchmark_noise: float | None = None  # the benchmark objective's measurement noise (hybrid.benchmark_objective)
    pruner: str | None = None     # none | median | sha | hyperband | wilcoxon (hybrid.pruners); None stored: none

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["memory_model"] = not args.no_memory_model
        for key in ("train_py", "space", "repo"):
            values[key] = str(values[key]) if values.get(key) else None
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def prunes(self) -> bool:
        """Whether trials report intermediate val_bpb to a pruner (None: a study stored before pruners existed)."""
        return self.pruner not in (None, "none")

    def finalize(self) -> RunConfig:
        """Fill the defaults that depend on the machine, and refuse impossible combinations (UserError)."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.profile is None:
            self.profile = "gpu" if self.objective in MODELLED else get_profile(None).name
        if self.llm is None:
            self.llm = "none"
        if self.spec.needs_llm and self.llm == "none":
            raise UserError(f"method {self.method} needs an LLM: add --llm anthropic or --llm openai --llm-base-url URL")
        if self.objective == "surrogate" and self.spec.edits_code:
            raise UserError(f"method {self.method} edits train.py, which the surrogate objective cannot evaluate: use --objective train")
        if self.objective == "benchmark" and self.spec.edits_code and (self.method != "hybrid" or self.llm != "none"):
            raise UserError("the benchmark objective knows the effects of the offline catalog's mutations only: "
                            "use --method hybrid --llm none")
        if self.benchmark_noise is not None and self.benchmark_noise < 0:
            raise UserError(f"--benchmark-noise must be >= 0, got {self.benchmark_noise}")
        if self.repeats is not None and self.repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {self.repeats}")
        if not 0.0 <= self.llm_fraction <= 1.0:
            raise UserError(f"--llm-fraction must be within [0, 1], got {self.llm_fraction}")
        self._finalize_pruner()
        if self.budget_hours is None and self.trials is None:
            self.budget_hours = DEFAULT_BUDGET_HOURS["surrogate" if self.objective in MODELLED else self.profile]
        for name, value in (("budget", self.budget_hours), ("trials", self.trials), ("workers", self.workers),
                            ("max-failures-in-a-row", self.max_failures_in_a_row), ("llm-max-usd", self.llm_max_usd)):
            if value is not None and value <= 0:
                raise UserError(f"--{name} must be > 0, got {value}")
        if self.method == "centaur" and self.sampler not in (None, "cmaes"):
            raise UserError(f"centaur is CMA-ES with an LLM advisor: --sampler {self.sampler} does not apply")
        if self.sampler is None:
            self.sampler = "cmaes" if self.method == "centaur" else "tpe"
        if self.artifacts is None:
            self.artifacts = str(artifacts_root(self.storage) / self.study)
        return self

    def _finalize_pruner(self) -> None:
        """The run's pruner: refused where no learning curve exists, else the default of real training."""
        from hybrid.pruners import DEFAULT_PRUNER, PRUNERS

        if self.pruner is not None and self.pruner not in PRUNERS:
            raise UserError(f"unknown pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        curves = self.objective == "train" and not self.repo
        if self.pruner not in (None, "none") and not curves:
            what = "a --repo trial reports" if self.repo else f"the {self.objective} objective has"
            raise UserError(f"--pruner {self.pruner}: {what} no intermediate val_bpb to prune on; drop --pruner")
        if self.pruner is None:
            self.pruner = DEFAULT_PRUNER if curves else "none"


def artifacts_root(storage: str) -> Path:
    """Trial folders live beside a SQLite database, else under ./runs."""
    if storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///"):]).resolve().parent
    return Path("runs").resolve()


@dataclass
class Budget:
    """A run's budget: seconds of trial wall time, or a number of trials."""
    seconds: float | None
    trials: int | None

    @classmethod
    def of(cls, config: RunConfig) -> Budget:
        return cls(config.budget_hours * 3600 if config.budget_hours else None, config.trials)

    def spent(self, finished: list[optuna.trial.FrozenTrial]) -> bool:
        if self.trials is not None:
            return len(finished) >= self.trials
        return store.seconds_used(finished) >= self.seconds
