"""Noise-aware bookkeeping of generations: when one is due for a structural move, how noisy a measurement is,
and whether a candidate beats its parent. Pure functions of a generation's trials."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hybrid.records import best_trial, ok_value

REPEATS = 2      # re-runs of a generation's incumbent before it is judged or mutated
NOISE_Z = 2.0    # margins are this many standard errors of the difference
# Sources of trials that run a config chosen before the generation's sampler had a say: the baseline, a
# generation's first trial and its warm starts (configs of the parent), and the repeats of an incumbent.
PINNED_SOURCES = ("baseline", "catalog", "llm-code", "warmstart", "repeat")


def is_tuning(trial: FrozenTrial) -> bool:
    """A trial that counts towards its generation's best (not a re-measurement of its incumbent)."""
    return trial.user_attrs.get("source") != "repeat"


def is_sampled(trial: FrozenTrial) -> bool:
    """A trial the generation's sampler chose: what the schedule counts."""
    return trial.user_attrs.get("source") not in PINNED_SOURCES


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def runs_of(trials: list[FrozenTrial], params: dict[str, Any]) -> list[FrozenTrial]:
    """The trials that ran exactly this config."""
    key = _key(params)
    return [t for t in trials if _key(t.params) == key]


def pooled_noise(trials_by_generation: dict[int, list[FrozenTrial]]) -> float | None:
    """The pooled standard deviation of val_bpb over every config run more than once in one generation
    (the repeats, and any other duplicates); None before any config was."""
    squares, dof = 0.0, 0
    for trials in trials_by_generation.values():
        groups: dict[str, list[float]] = {}
        for t in trials:
            if (value := ok_value(t)) is not None:
                groups.setdefault(_key(t.params), []).append(value)
        for values in groups.values():
            if len(values) > 1:
                mean = sum(values) / len(values)
                squares += sum((v - mean) ** 2 for v in values)
                dof += len(values) - 1
    return math.sqrt(squares / dof) if dof else None


def margin(noise: float | None, n_a: int, n_b: int) -> float:
    """NOISE_Z standard errors of the difference between a mean of n_a runs and a mean of n_b runs."""
    return NOISE_Z * (noise or 0.0) * math.sqrt(1 / n_a + 1 / n_b)


@dataclass(frozen=True)
class Score:
    """A generation's measured quality: the mean val_bpb of its incumbent's runs."""
    value: float
    runs: int
    best: float


def score(trials: list[FrozenTrial]) -> Score | None:
    best = best_trial(trials)
    if best is None:
        return None
    values = [v for t in runs_of(trials, best.params) if (v := ok_value(t)) is not None]
    return Score(sum(values) / len(values), len(values), ok_value(best))


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    margin: float
    noise: float | None
    score: float | None
    parent_score: float | None
    delta: float | None  # parent_score - score: how much the candidate improved


def judge(parent: Score | None, candidate: Score | None, noise: float | None) -> Verdict:
    """Promote the candidate only if its score beats the parent's by more than the noise margin."""
    parent_value = parent.value if parent else None
    if candidate is None:
        return Verdict(False, "no successful trial", 0.0, noise, None, parent_value, None)
    if parent is None:
        return Verdict(True, "the parent has no successful trial", 0.0, noise, candidate.value, None, None)
    m = margin(noise, parent.runs, candidate.runs)
    delta = parent.value - candidate.value
    if delta > m:
        return Verdict(True, f"beats the parent by {delta:.4f} > margin {m:.4f}", m, noise, candidate.value,
                       parent.value, delta)
    return Verdict(False, f"improves on the parent by {delta:.4f}, not more than the margin {m:.4f}", m, noise,
                   candidate.value, parent.value, delta)


@dataclass(frozen=True)
class Schedule:
    """A generation is due for a structural move after `mutate_every` sampled trials of its epoch (those since
    its last child was created), or when `stagnation` sampled trials of the epoch brought no improvement beyond
    the noise on its best so far (warm starts included). Pinned trials (see PINNED_SOURCES) are not counted, so
    that a new generation's own knobs are always explored before it is judged."""
    mutate_every: int
    stagnation: int

    def due(self, trials: list[FrozenTrial], epoch_after: int, noise: float | None) -> str | None:
        """Why the generation (its finished trials) is due, or None."""
        tuning = sorted((t for t in trials if is_tuning(t)), key=lambda t: t.number)
        epoch = [t for t in tuning if t.number > epoch_after and is_sampled(t)]
        if len(epoch) >= self.mutate_every:
            return f"{len(epoch)} sampled trials"
        threshold = margin(noise, 1, 1)
        best, since = math.inf, 0
        for t in tuning:
            value = ok_value(t)
            if value is not None and value < best - threshold:
                best, since = value, 0
            elif is_sampled(t):
                since += 1
        if len(epoch) >= self.stagnation and since >= self.stagnation:
            return f"stagnation: {since} sampled trials without an improvement beyond {threshold:.4f}"
        return None
