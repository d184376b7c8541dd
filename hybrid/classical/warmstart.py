"""Warm starts of a new generation's sampler from its parent's trials, projected into the new knob space."""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hybrid.study.records import ok_value
from hybrid.space import SearchSpace

CMA_MIN_SOURCES = 10  # cmaes.get_warm_start_mgd keeps the best 10 %: it needs at least ten solutions


def best_configs(trials: list[FrozenTrial], space: SearchSpace, k: int) -> list[dict[str, Any]]:
    """The k best distinct configs of successful trials, moved into `space` (new knobs at their defaults)."""
    ranked = sorted((t for t in trials if ok_value(t) is not None), key=lambda t: (ok_value(t), t.number))
    configs: list[dict[str, Any]] = []
    for trial in ranked:
        config = space.project(trial.params)
        if config not in configs:
            configs.append(config)
        if len(configs) == k:
            break
    return configs


def cma_source_trials(trials: list[FrozenTrial], space: SearchSpace) -> list[FrozenTrial]:
    """The completed trials as CMA-ES source trials over the numeric knobs of `space`.

    Failures count with their penalty value. With fewer than CMA_MIN_SOURCES trials the list is repeated,
    so the warm start centres on the best ones with the prior's spread on every axis."""
    numeric = {name: knob.distribution() for name, knob in space.knobs.items() if knob.type != "categorical"}
    sources = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        params = {k: v for k, v in space.project(trial.params).items() if k in numeric}
        sources.append(optuna.trial.create_trial(params=params, distributions=numeric, value=trial.value))
    if not sources:
        return []
    return sources * math.ceil(CMA_MIN_SOURCES / len(sources))
