"""What a structural agent chooses its next move from: every earlier move of the run with its verdict and margin, the
knob importances of the generation to mutate, and the noise figure. Built from the study by the hybrid method; the
catalog's bandit reads it, the LLM is shown it as text. Only measured values: nothing an objective keeps hidden."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from optuna.trial import FrozenTrial
from scipy.stats import rankdata

from hybrid.study.generations import Generation
from hybrid.promotion import is_tuning
from hybrid.study.records import ok_value
from hybrid.space import SearchSpace

IMPORTANCE_MIN_TRIALS = 5  # successful tuning trials before importances mean anything
REWARD_CLIP = 5.0          # a move's reward, in noise units, is clipped to +- this
IMPORTANCES_SHOWN = 6      # knobs in the text form


@dataclass(frozen=True)
class Attempt:
    """One earlier structural move: which mutation, from which parent, and what its verdict measured."""
    mutation: str
    generation: int
    parent: int
    status: str
    delta: float | None   # the verdict's improvement on its reference (fresh means), None before a verdict
    margin: float | None

    def reward(self, noise: float | None) -> float | None:
        """The realized improvement beyond the margin, in noise units (clipped); +-1 for a verdict without a noise
        figure or a move refused before it ran; None while the move is on probation."""
        if self.status == "candidate":
            return None
        if self.delta is None or not noise:
            return 1.0 if self.status == "promoted" else -1.0
        return max(-REWARD_CLIP, min(REWARD_CLIP, (self.delta - (self.margin or 0.0)) / noise))


@dataclass(frozen=True)
class Evidence:
    """The run's memory for a structural agent."""
    attempts: tuple[Attempt, ...] = ()
    importances: dict[str, float] = field(default_factory=dict)  # knob -> |Spearman rho| with val_bpb
    noise: float | None = None
    trials: int = 0  # the successful tuning trials the importances come from

    def blocked(self, parent: int) -> set[str]:
        """Mutations already tried from this parent: not retried unless the parent changed."""
        return {a.mutation for a in self.attempts if a.parent == parent}

    def text(self) -> str:
        """Compact, for a prompt: the noise figure, the knob importances, the moves so far and their rewards."""
        noise = f"{self.noise:.5f}" if self.noise is not None else "not measured yet"
        lines = [f"Noise (sd of val_bpb between re-runs of one config): {noise}."]
        if self.importances:
            top = sorted(self.importances.items(), key=lambda kv: -kv[1])[:IMPORTANCES_SHOWN]
            lines.append(f"Knob importances of the current generation (|Spearman rho| with val_bpb, {self.trials} "
                         f"trials): " + ", ".join(f"{name} {value:.2f}" for name, value in top) + ".")
        for a in self.attempts:
            measured = "" if a.delta is None else f", delta {a.delta:+.5f} vs margin {a.margin or 0.0:.5f}"
            reward = a.reward(self.noise)
            gain = "" if reward is None else f", reward {reward:+.1f}"
            lines.append(f"- {a.mutation} (gen {a.generation} from {a.parent}): {a.status}{measured}{gain}")
        return "\n".join(lines)


def attempts(lineage: dict[int, Generation]) -> tuple[Attempt, ...]:
    """Every structural move of the run, oldest first."""
    return tuple(Attempt(g.mutation, g.number, g.parent, g.status, g.verdict.delta if g.verdict else None,
                         g.verdict.margin if g.verdict else None)
                 for g in lineage.values() if g.parent is not None and g.mutation)


def importances(trials: list[FrozenTrial], space: SearchSpace) -> tuple[dict[str, float], int]:
    """|Spearman rho| between each knob and val_bpb over the successful tuning trials (categorical knobs by the
    index of their choice); {} below IMPORTANCE_MIN_TRIALS. Also how many trials that was."""
    ok = [(t, v) for t in trials if is_tuning(t) and (v := ok_value(t)) is not None]
    if len(ok) < IMPORTANCE_MIN_TRIALS:
        return {}, len(ok)
    values = rankdata([v for _, v in ok])
    out = {}
    for name, knob in space.knobs.items():
        column = [_numeric(knob.choices, t.params.get(name, knob.default)) for t, _ in ok]
        out[name] = _abs_correlation(rankdata(column), values)
    return out, len(ok)


def _numeric(choices: tuple | None, value: object) -> float:
    if choices:
        return float(choices.index(value)) if value in choices else -1.0
    return float(value)


def _abs_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """|Pearson r| of two rank vectors; 0 when either is constant."""
    sa, sb = float(np.std(a)), float(np.std(b))
    if sa == 0.0 or sb == 0.0:
        return 0.0
    r = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
    return 0.0 if math.isnan(r) else abs(r)


def gather(lineage: dict[int, Generation], trials: list[FrozenTrial], space: SearchSpace,
           noise: float | None) -> Evidence:
    """The evidence for mutating the generation whose finished trials and space are given."""
    found, n = importances(trials, space)
    return Evidence(attempts(lineage), found, noise, n)
