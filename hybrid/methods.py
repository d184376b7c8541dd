"""The classical method and build_method, which makes the method a run config names (hybrid.config.METHODS)."""
from __future__ import annotations

import importlib

import optuna
from optuna.trial import FrozenTrial

from hybrid.classical.move_sampler import MoveSampler
from hybrid.classical.samplers import make_sampler
from hybrid.config import METHODS, RunConfig
from hybrid.move import Method, Move
from hybrid.space import SearchSpace


class ClassicalMethod:
    """random, tpe, cmaes, gp: the Optuna sampler proposes every config of the fixed space."""

    def __init__(self, config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> None:
        self.name, self.space, self.code = config.method, space, code
        self.sampler = MoveSampler(lambda generation: make_sampler(config.method, seed, x0=space.defaults()))

    def next_move(self, study: optuna.Study) -> Move:
        return Move(self.name, 0, self.code, self.space)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        pass


def build_method(config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> Method:
    """The method named in the run config, ready to propose moves on this study."""
    module, _, name = METHODS[config.method].factory.partition(":")
    return getattr(importlib.import_module(module), name)(config, study, space, code, seed)
