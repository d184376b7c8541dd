"""A Move (one proposal: which code runs, over which space, with which config) and the Method that makes moves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial

from hybrid.classical.move_sampler import MoveSampler
from hybrid.space import SearchSpace


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
    # Generations besides its own whose trials the pruner compares it with (hybrid.pruners): a new generation's
    # first trials screened against its parent's curves, the survivors run the full budget.
    prune_with: tuple[int, ...] = ()


class Method(Protocol):
    """Who proposes the next move: turns the study's history into a Move; the loop runs it and reports back."""
    sampler: MoveSampler

    def next_move(self, study: optuna.Study) -> Move: ...

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None: ...
