"""Structural agents: who proposes a code mutation of train.py, with the knobs it opens (the catalog, an LLM)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from hybrid.evidence import Evidence
from hybrid.study.generations import Generation
from hybrid.space import Knob


@dataclass
class Proposal:
    """A mutation of the parent's train.py and the change of knob space that comes with it."""
    name: str                                  # short and stable: what the lineage and the catalog call it
    description: str
    code: str                                  # the whole new train.py
    added: dict[str, Knob] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)  # recorded on the generation and its first trial
    rejected: str | None = None                # the agent's own refusal (an unreadable answer): the reason


@dataclass(frozen=True)
class Context:
    """What an agent is told: the generation to mutate, its best run so far, every generation of the run, and the
    evidence gathered from them (verdicts, importances, noise)."""
    parent: Generation
    lineage: dict[int, Generation]
    best_config: dict[str, Any]
    best_value: float | None
    evidence: Evidence | None = None  # None: the agent reads the earlier moves from the lineage alone


class StructuralAgent(Protocol):
    source: str  # the trial source of its moves: catalog, llm-code

    def propose(self, context: Context) -> Proposal | None:
        """A mutation of context.parent; None when the agent has nothing left to try."""
        ...
