"""The classical samplers, by name (Optuna's)."""
from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

CLASSICAL = ("random", "tpe", "cmaes", "gp")
# Random trials of a study before TPE or GP takes over, for the tpe and gp methods (Optuna's own default). The
# hybrid method starts each generation's sampler with far fewer: hybrid.evolution.GENERATION_N_STARTUP.
STUDY_N_STARTUP = 10

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(name: str, seed: int, *, x0: dict[str, Any] | None = None,
                 source_trials: list[FrozenTrial] | None = None, n_startup: int = STUDY_N_STARTUP) -> BaseSampler:
    """The classical sampler `name`, seeded. CMA-ES may start at x0 or be warm-started from source trials;
    TPE and GP sample at random for their first n_startup trials."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=n_startup)
    if name == "cmaes":
        # with_margin keeps integer knobs from collapsing onto one value; categorical knobs are sampled
        # independently (CMA-ES has no categorical encoding).
        numeric_x0 = {k: v for k, v in (x0 or {}).items() if not isinstance(v, str)} or None
        with warnings.catch_warnings():  # x0 is deprecated since optuna 4.9, to go in 6.0: no warning per run
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, with_margin=source_trials is None,
                                                x0=numeric_x0 if source_trials is None else None,
                                                source_trials=source_trials, warn_independent_sampling=False,
                                                independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False,
                                         independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(CLASSICAL)}")
