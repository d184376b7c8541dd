"""Method `centaur`: CMA-ES proposes every trial; on a fraction of them an LLM, shown CMA-ES's state, proposes instead.

CMA-ES (the `cmaes` library, ask/tell) works in a unit cube: numeric knobs mapped to [0, 1] (log-scaled where the
space says log), categorical knobs by the index of their choice. It is told every finished trial of the study,
in trial order, the LLM's included, so its state is a function of the study alone: a resumed run rebuilds it by
telling it the same trials again.
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from cmaes import CMA
from optuna.trial import FrozenTrial, TrialState

from harness.knobs import inject_knobs
from harness.result import PENALTY
from hybrid.study import optuna_compat, records, store
from hybrid.classical.move_sampler import MoveSampler
from hybrid.llm import prompts
from hybrid.llm.agent import failure_attrs, read_program, reply_attrs
from hybrid.llm.client import Advisor, ProviderError, make_provider
from hybrid.llm.spending import LLMBudgetSpent, announce
from hybrid.llm.hp_agent import ConfigRejected, read_config
from hybrid.move import Move
from hybrid.space import Knob, SearchSpace

if TYPE_CHECKING:
    from hybrid.config import RunConfig

WARMUP_TRIALS = 10  # finished trials before the LLM is consulted
SIGMA0 = 0.2        # initial step size, in unit-cube coordinates


class UnitCube:
    """A search space as coordinates in [0, 1]^d and back."""

    def __init__(self, space: SearchSpace) -> None:
        self.knobs: list[Knob] = list(space.knobs.values())

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    def encode(self, config: dict[str, Any]) -> np.ndarray:
        return np.array([self._encode(k, config.get(k.name, k.default)) for k in self.knobs], dtype=float)

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        return {k.name: self._decode(k, float(u)) for k, u in zip(self.knobs, np.clip(x, 0.0, 1.0))}

    @staticmethod
    def _encode(knob: Knob, value: Any) -> float:
        if knob.type == "categorical":
            return (knob.choices.index(value) + 0.5) / len(knob.choices)
        value = min(max(float(value), knob.low), knob.high)
        if knob.log:
            return (math.log(value) - math.log(knob.low)) / (math.log(knob.high) - math.log(knob.low))
        return (value - knob.low) / (knob.high - knob.low)

    @staticmethod
    def _decode(knob: Knob, u: float) -> Any:
        if knob.type == "categorical":
            return knob.choices[min(int(u * len(knob.choices)), len(knob.choices) - 1)]
        if knob.log:
            value = math.exp(math.log(knob.low) + u * (math.log(knob.high) - math.log(knob.low)))
        else:
            value = knob.low + u * (knob.high - knob.low)
        return int(min(max(round(value), knob.low), knob.high)) if knob.type == "int" else float(value)


class CMAState:
    """CMA-ES on the unit cube, told results one at a time (a generation is told once it is complete)."""

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.cube, self.seed = UnitCube(space), seed
        self.cma = self._fresh(self.cube.encode(space.defaults()))
        self.pending: list[tuple[np.ndarray, float]] = []

    def _fresh(self, mean: np.ndarray) -> CMA:
        bounds = np.tile([0.0, 1.0], (len(mean), 1))
        return CMA(mean=np.clip(mean, 0.0, 1.0), sigma=SIGMA0, bounds=bounds, seed=self.seed)

    def ask(self) -> dict[str, Any]:
        return self.cube.decode(self.cma.ask())

    def tell(self, config: dict[str, Any], value: float) -> None:
        self.pending.append((self.cube.encode(config), value))
        if len(self.pending) == self.cma.population_size:
            self.cma.tell(self.pending)
            self.pending = []
            if self.cma.should_stop():  # converged or degenerate: start again around the current mean
                self.cma = self._fresh(self.cma.mean)

    def view(self) -> prompts.CMAView:
        sigma = optuna_compat.cma_sigma(self.cma)  # private in the library: read, never written
        covariance = (sigma ** 2 * optuna_compat.cma_covariance(self.cma)).tolist()
        return prompts.CMAView(self.cube.decode(self.cma.mean), sigma, self.cube.names, covariance, self.cma.generation)


def told_value(trial: FrozenTrial) -> float:
    """What CMA-ES is told of a finished trial: its val_bpb; a pruned one's last intermediate val_bpb (measured early,
    so worse than a final one: it ranks among the losers the pruner judged it to be); a failure's penalty."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.last_step is not None:
        return trial.intermediate_values[trial.last_step]
    return PENALTY


class CentaurMethod:
    """CMA-ES on every trial, the LLM instead of it on a seeded fraction of trials after the warm-up."""

    def __init__(self, config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> None:
        self.space, self.code = space, code
        self.fraction, self.run_seed = config.llm_fraction, config.seed
        self.sampler = MoveSampler.random(seed)
        self.cma = CMAState(space, seed)
        self.told: set[int] = set()
        self._catch_up(study)
        self.advisor = Advisor(make_provider(config))
        self.prefix = prompts.prefix(read_program(config.repo), inject_knobs(code, space.defaults()), space)

    def _catch_up(self, study: optuna.Study) -> None:
        """Tell CMA-ES the finished trials it has not seen, in trial order (all of them when resuming)."""
        for trial in store.finished_trials(study):
            if trial.number in self.told:
                continue
            self.told.add(trial.number)
            if trial.user_attrs.get(records.STATUS) != records.REJECTED and set(trial.params) == set(self.space.names):
                self.cma.tell(trial.params, told_value(trial))

    def llm_turn(self, finished: int) -> bool:
        """Whether the trial after `finished` finished ones is the LLM's: a coin seeded by the run's seed and the count."""
        return finished >= WARMUP_TRIALS and random.Random(f"{self.run_seed}:{finished}").random() < self.fraction

    def next_move(self, study: optuna.Study) -> Move:
        self._catch_up(study)
        proposal = self.cma.ask()
        trials = store.finished_trials(study)
        if not self.llm_turn(len(trials)):
            return Move("cmaes", 0, self.code, self.space, config=proposal)
        task = prompts.centaur_task(self.cma.view(), proposal, trials, self.space)
        try:
            reply = self.advisor.ask(self.prefix, task)
        except ProviderError as e:  # CMA-ES's proposal runs; the failure is recorded with it
            return Move("cmaes", 0, self.code, self.space, config=proposal, attrs=failure_attrs(e))
        except LLMBudgetSpent as e:
            announce(e, study.study_name, "centaur goes on with CMA-ES alone")
            return Move("cmaes", 0, self.code, self.space, config=proposal)
        attrs = reply_attrs(reply)
        try:
            config, note = read_config(reply.text, self.space)
        except ConfigRejected as e:
            return Move("cmaes", 0, self.code, self.space, config=proposal, attrs={**attrs, "llm_rejected": e.reason})
        attrs.update({"cmaes_proposal": proposal, **({"llm_note": note} if note else {})})
        return Move("centaur-llm", 0, self.code, self.space, config=config, attrs=attrs)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        self._catch_up(study)
