"""The study's sampler: a trial's fixed config as given, else the sampler of its code generation, shown only
the trials of that generation."""
from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from hybrid.study import optuna_compat
from hybrid.study.records import GENERATION


class GenerationStudy:
    """A study as one generation sees it: its trial lists hold that generation's trials only."""

    def __init__(self, study: optuna.Study, generation: int) -> None:
        self._study = study
        self.generation = generation

    # Optuna's samplers list trials through this private method (see hybrid/study/optuna_compat.py): overridden here.
    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = optuna_compat.study_trials(self._study, deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.user_attrs.get(GENERATION) == self.generation]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:  # storage, ids, directions: the real study's
        return getattr(self._study, name)


class MoveSampler(BaseSampler):
    """The study's sampler, told each trial's move before its values are suggested (prepare): a move with a fixed
    config gets exactly that; otherwise the sampler of the move's generation (made on first use by `factory`)
    samples it, shown only that generation's trials through a GenerationStudy. The loop writes each trial's
    generation when it is asked, so a running trial already counts for its generation (constant liar, repeats
    in flight)."""

    def __init__(self, factory: Callable[[int], BaseSampler]) -> None:
        self._factory = factory
        self._samplers: dict[int, BaseSampler] = {}
        self.generation = 0
        self.fixed: dict[str, Any] | None = None

    @classmethod
    def random(cls, seed: int) -> MoveSampler:
        """For methods that fix every config themselves (the LLM methods): anything unfixed is sampled at random."""
        return cls(lambda generation: optuna.samplers.RandomSampler(seed=seed + generation))

    def prepare(self, generation: int, fixed: dict[str, Any] | None) -> None:
        """The next trial's generation, and its fixed config (None: sampled)."""
        self.generation, self.fixed = generation, dict(fixed) if fixed is not None else None

    def of(self, generation: int) -> BaseSampler:
        """The sampler of one generation."""
        if generation not in self._samplers:
            self._samplers[generation] = self._factory(generation)
        return self._samplers[generation]

    def _view(self, study: optuna.Study) -> GenerationStudy:
        return GenerationStudy(study, self.generation)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self.fixed is not None:
            return {}
        return self.of(self.generation).infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self.fixed is not None:
            return {}
        return self.of(self.generation).sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self.fixed is not None and param_name in self.fixed:
            return self.fixed[param_name]
        return self.of(self.generation).sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Nothing: the trial's move is not known yet when Optuna creates it (see prepare)."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        generation = trial.user_attrs.get(GENERATION)
        if generation in self._samplers:
            self._samplers[generation].after_trial(GenerationStudy(study, generation), trial, state, values)

    def reseed_rng(self) -> None:
        for sampler in self._samplers.values():
            sampler.reseed_rng()
