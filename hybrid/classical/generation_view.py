"""A sampler per code generation, each shown only the trials of its own generation."""
from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from hybrid import optuna_compat

GENERATION_ATTR = "generation"  # trial user attribute: the code generation the trial ran


class GenerationStudy:
    """A study as one generation sees it: its trial lists hold that generation's trials only."""

    def __init__(self, study: optuna.Study, generation: int) -> None:
        self._study = study
        self.generation = generation

    # Optuna's samplers list trials through this private method (see hybrid/optuna_compat.py): overridden here.
    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = optuna_compat.study_trials(self._study, deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.user_attrs.get(GENERATION_ATTR) == self.generation]

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:  # storage, ids, directions: the real study's
        return getattr(self._study, name)


class GenerationSampler(BaseSampler):
    """Delegates to the sampler of the selected generation (made on first use by `factory`), through a
    GenerationStudy. It also tags each new trial with its generation and source at creation, so that a
    running trial already counts for its generation (constant liar, repeats in flight)."""

    def __init__(self, factory: Callable[[int], BaseSampler]) -> None:
        self._factory = factory
        self._samplers: dict[int, BaseSampler] = {}
        self.generation = 0
        self.source = ""

    def select(self, generation: int, source: str) -> None:
        """The generation (and move source) of the next trial."""
        self.generation, self.source = generation, source

    @property
    def current(self) -> BaseSampler:
        if self.generation not in self._samplers:
            self._samplers[self.generation] = self._factory(self.generation)
        return self._samplers[self.generation]

    def _view(self, study: optuna.Study) -> GenerationStudy:
        return GenerationStudy(study, self.generation)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.current.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.current.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.current.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        storage, trial_id = optuna_compat.storage(study), optuna_compat.trial_id(trial)
        storage.set_trial_user_attr(trial_id, GENERATION_ATTR, self.generation)
        if "source" not in trial.user_attrs:  # an enqueued trial (the baseline) keeps its own
            storage.set_trial_user_attr(trial_id, "source", self.source)
        self.current.before_trial(self._view(study), trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self.current.after_trial(self._view(study), trial, state, values)

    def reseed_rng(self) -> None:
        for sampler in self._samplers.values():
            sampler.reseed_rng()
