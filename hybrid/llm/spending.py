"""`--llm-max-usd`: no LLM call once the study's recorded LLM cost (the trials' `llm_cost_usd`) reaches the cap.

The cap travels with the provider (hybrid.llm.client.make_provider), so every agent's calls go through it. Methods
with a classical half (centaur, hybrid) catch LLMBudgetSpent and go on without the LLM (`announce` says so once);
for llm-hp and llm-code it ends the run (hybrid.loop)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import optuna

from hybrid.study import records, store


class LLMBudgetSpent(Exception):
    """The study's LLM cost reached --llm-max-usd. `first`: the first time this cap said so in this process."""

    def __init__(self, message: str, *, first: bool) -> None:
        super().__init__(message)
        self.first = first


@dataclass
class SpendingCap:
    """The cap of one study; the study is opened at the first check (the provider exists before the study does)."""
    max_usd: float
    storage: str
    study_name: str
    _study: optuna.Study | None = field(default=None, init=False, repr=False)
    _said: bool = field(default=False, init=False, repr=False)

    def spent(self) -> float:
        if self._study is None:
            self._study = optuna.load_study(study_name=self.study_name, storage=store.open_storage(self.storage))
        return records.LLMUsage.of(self._study.get_trials(deepcopy=False)).usd

    def check(self) -> None:
        """LLMBudgetSpent once the study's recorded cost is at the cap."""
        spent = self.spent()
        if spent >= self.max_usd:
            first, self._said = not self._said, True
            raise LLMBudgetSpent(f"the study's LLM cost reached ${spent:.2f} of its --llm-max-usd {self.max_usd:g}",
                                 first=first)


def announce(error: LLMBudgetSpent, study_name: str, going_on: str) -> None:
    """Say once per process that a method goes on without the LLM, and how."""
    if error.first:
        print(f"hybrid: [{study_name}] {error}: no more LLM calls; {going_on}", file=sys.stderr)
