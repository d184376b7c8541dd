"""Pruning: Optuna's pruners over the intermediate val_bpb a train trial reports at checkpoints of its budget.

The harness measures val_bpb on a fixed validation slice at harness.profiles' intermediate_fractions of the
training budget (off the clock); the loop reports each value to the Optuna trial at step = percent of the budget
and stops the trial when the study's pruner condemns it (recorded `pruned`, Optuna's PRUNED, its wall time
counted). The settings below come from benchmarks/results/pruning.md (rank correlation of each intermediate
value with the final val_bpb over real cpu-profile trials, and the pruners replayed on their curves).

A trial is compared with the trials of its own code generation, plus those of the generations its move names
(Move.prune_with, stored as records.PRUNE_WITH): a method screens a new generation's first trials against its
parent's curves that way (low fidelity first; the survivors run the full budget): hybrid.evolution does so for
every trial of a candidate but its repeats.
Hyperband's brackets (read from the storage) and Wilcoxon's best trial are the whole study's, all generations.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Container

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from hybrid.study import optuna_compat
from hybrid.study.records import GENERATION, PRUNE_WITH

PRUNERS = ("none", "median", "sha", "hyperband", "wilcoxon")
DEFAULT_PRUNER = "median"  # for `hybrid run` on real training; `reproduce` follows the paper (none)
STEP_SCALE = 100           # a checkpoint's Optuna step: its percent of the training budget
STARTUP_TRIALS = 5         # median: finished trials of the generation before any pruning
REDUCTION_FACTOR = 3       # sha, hyperband: the share of a rung that goes on (1 / REDUCTION_FACTOR)
MIN_RESOURCE = 25          # sha, hyperband: the first rung (percent of the budget)
WILCOXON_P = 0.2           # wilcoxon: the p-value under which a trial worse than the best is stopped
# Moves that always run the full budget (their values still reported): the baseline (every run's reference),
# the hybrid's repeats (the promotion's noise margin needs final values).
UNPRUNED = ("baseline", "repeat")


def make_pruner(name: str | None) -> BasePruner:
    """Optuna's pruner for `--pruner NAME`, seen per code generation (None: a study stored before pruners: none)."""
    pruners: dict[str, Callable[[], BasePruner]] = {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS),
        "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_RESOURCE,
                                                              reduction_factor=REDUCTION_FACTOR),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=MIN_RESOURCE, max_resource=STEP_SCALE,
                                                            reduction_factor=REDUCTION_FACTOR),
        "wilcoxon": lambda: optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P),
    }
    with warnings.catch_warnings():  # WilcoxonPruner is experimental since Optuna 3.6: no warning per run
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return GenerationPruner(pruners[name or "none"]())


class GenerationView:
    """The study as a pruner sees one trial: only the trials of the generations it is compared with."""

    def __init__(self, study: optuna.Study, generations: Container[int]) -> None:
        self._study, self._generations = study, generations

    # Optuna's pruners list trials through these (see hybrid/study/optuna_compat.py): filtered here.
    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = optuna_compat.study_trials(self._study, deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.user_attrs.get(GENERATION, 0) in self._generations]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> object:  # storage, ids, direction, best_trial: the real study's
        return getattr(self._study, name)


class GenerationPruner(BasePruner):
    """An Optuna pruner shown only the trials of the pruned trial's generation and of those its move names."""

    def __init__(self, pruner: BasePruner) -> None:
        self.pruner = pruner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        generations = {trial.user_attrs.get(GENERATION, 0), *trial.user_attrs.get(PRUNE_WITH, ())}
        return self.pruner.prune(GenerationView(study, generations), trial)  # type: ignore[arg-type]


def reporter(trial: optuna.Trial, prunable: bool) -> Callable[[float, float], bool]:
    """What a train trial calls at each checkpoint (harness.runner's `report`): the value goes to the Optuna trial;
    True when the study's pruner condemns it (never for a trial that is not `prunable`, such as the baseline)."""
    def report(fraction: float, value: float) -> bool:
        trial.report(value, step=round(STEP_SCALE * fraction))
        return prunable and trial.should_prune()
    return report
