"""Methods: who proposes the next move. Each one turns the study's history into a Move; the loop runs it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import optuna
from optuna.trial import FrozenTrial

from hybrid.classical.samplers import CLASSICAL, PinnedSampler, make_sampler
from hybrid.space import SearchSpace

if TYPE_CHECKING:
    from hybrid.loop import RunConfig

NEEDS_LLM = ("llm-hp", "llm-code", "centaur")
EDITS_CODE = ("llm-code", "hybrid")


@dataclass
class Move:
    """One proposal: which code generation runs, over which space, with which config (None: the sampler picks)."""
    source: str                       # who proposed it: tpe, cmaes, llm-hp, catalog, repeat, ...
    generation: int
    code: str                         # the generation's train.py
    space: SearchSpace                # the generation's knob space
    config: dict[str, Any] | None = None
    rejected: str | None = None       # refused before running (patch guard, unreadable answer): the reason
    attrs: dict[str, Any] = field(default_factory=dict)  # extra trial attributes (LLM usage, mutation, ...)


class Method(Protocol):
    sampler: PinnedSampler

    def next_move(self, study: optuna.Study) -> Move: ...

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None: ...


class ClassicalMethod:
    """random, tpe, cmaes, gp: the Optuna sampler proposes every config of the fixed space."""

    def __init__(self, name: str, seed: int, space: SearchSpace, code: str) -> None:
        self.name, self.space, self.code = name, space, code
        self.sampler = PinnedSampler(make_sampler(name, seed, x0=space.defaults()))

    def next_move(self, study: optuna.Study) -> Move:
        return Move(self.name, 0, self.code, self.space)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        pass


def build_method(config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> Method:
    """The method named in the run config, ready to propose moves on this study."""
    if config.method in CLASSICAL:
        return ClassicalMethod(config.method, seed, space, code)
    if config.method == "llm-hp":
        from hybrid.llm.hp_agent import LLMHPMethod

        return LLMHPMethod(config, study, space, code, seed)
    if config.method == "llm-code":
        from hybrid.llm.code_agent import LLMCodeMethod

        return LLMCodeMethod(config, study, space, code, seed)
    if config.method == "centaur":
        from hybrid.llm.centaur import CentaurMethod

        return CentaurMethod(config, study, space, code, seed)
    if config.method == "hybrid":
        from hybrid.evolution import HybridMethod

        return HybridMethod(config, study, space, code, seed)
    raise ValueError(f"unknown method {config.method!r}")
