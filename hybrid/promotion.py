"""Noise-aware bookkeeping of generations: when one is due for a structural move, how noisy a measurement is,
and whether a candidate beats its parent. Pure functions of a generation's trials."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hybrid.study import records
from hybrid.study.records import best_trial, ok_value

# Fresh re-runs (each on a seed of its own) of a generation's incumbent before it is judged or mutated, and of a
# candidate's control: what verdicts compare, since the incumbent's own run was selected for being low. 1, 2 and 3
# tied in the structural benchmark (benchmarks/results/structural_benchmark.md): a tie keeps the value it had.
REPEATS = 2
# Margins are this many standard errors of the difference: a one-sided test at 5 %. The verdict compares with the
# better of two references (the parent, the control), which makes it stricter still: at 2.0, no move of true effect
# >= 0 was promoted in the structural benchmark, at the cost of power (benchmarks/results/structural_benchmark.md).
NOISE_Z = 1.645
# Sources of trials that run a config chosen before the generation's sampler had a say: the baseline, a
# generation's first trial, its probes (hybrid.probes) and warm starts (configs of the parent), and the re-runs of an
# incumbent or a control.
PINNED_SOURCES = ("baseline", "catalog", "llm-code", "probe", "warmstart", "repeat")


def is_tuning(trial: FrozenTrial) -> bool:
    """A trial that counts towards its generation's best (not a fresh re-run of a config)."""
    return trial.user_attrs.get(records.SOURCE) != "repeat"


def is_sampled(trial: FrozenTrial) -> bool:
    """A trial the generation's sampler chose: what the schedule counts."""
    return trial.user_attrs.get(records.SOURCE) not in PINNED_SOURCES


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
    """A config's quality measured fresh: the mean val_bpb of its re-runs (`repeat` trials, each on a seed of its own,
    never used to select it; None before one succeeded), and for an incumbent the tuning run that selected it (the
    minimum over its generation's trials, so biased low: the winner's curse)."""
    value: float | None
    runs: int
    selection: float | None = None


def incumbent(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The generation's best tuning trial: selected among the trials that are not re-measurements."""
    return best_trial([t for t in trials if is_tuning(t)])


def fresh_score(trials: list[FrozenTrial], params: dict[str, Any], selection: float | None = None) -> Score:
    """The mean of the successful re-runs of this config."""
    values = [v for t in runs_of(trials, params) if not is_tuning(t) and (v := ok_value(t)) is not None]
    return Score(sum(values) / len(values) if values else None, len(values), selection)


def score(trials: list[FrozenTrial]) -> Score | None:
    """The generation's incumbent, scored by its fresh re-runs; None without a successful tuning trial."""
    best = incumbent(trials)
    return None if best is None else fresh_score(trials, best.params, ok_value(best))


def control_config(incumbent_config: dict[str, Any], new_knobs: dict[str, Any]) -> dict[str, Any]:
    """The incumbent with the knobs its generation opened at their declared defaults: its move switched off (the
    defaults reproduce the parent's code), so that tuning progress during probation is not credited to the move."""
    return {**incumbent_config, **{name: spec["default"] for name, spec in new_knobs.items()
                                   if name in incumbent_config}}


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    margin: float
    noise: float | None
    score: float | None           # the candidate's incumbent, fresh mean
    parent_score: float | None    # the parent's incumbent, fresh mean
    delta: float | None           # reference - score: how much the candidate improved on what it was compared with
    selection: float | None = None         # the candidate's incumbent as selected (its tuning run)
    parent_selection: float | None = None  # the parent's incumbent as selected
    control_score: float | None = None     # the candidate's incumbent with its move switched off, fresh mean
    reference: str | None = None           # what the candidate was compared with: parent or control


def _reference(parent: Score | None, control: Score | None) -> tuple[str, float, int] | None:
    """The best fresh measurement of the parent's code: its incumbent, or the control (the candidate's incumbent
    with its move switched off); the parent's selection run (biased in its favour) when it has no fresh one."""
    options = []
    if parent is not None:
        options.append(("parent", parent.value, parent.runs) if parent.value is not None
                       else ("parent", parent.selection, 1))
    if control is not None and control.value is not None:
        options.append(("control", control.value, control.runs))
    return min(options, key=lambda o: o[1]) if options else None


def judge(parent: Score | None, candidate: Score | None, noise: float | None, control: Score | None = None) -> Verdict:
    """Promote the candidate only if the fresh mean of its incumbent beats the best fresh measurement of the parent's
    code (its incumbent, or the control) by more than the noise margin."""
    details = {"selection": candidate.selection if candidate else None,
               "parent_selection": parent.selection if parent else None,
               "control_score": control.value if control else None}
    parent_value = parent.value if parent else None
    if candidate is None:
        return Verdict(False, "no successful trial", 0.0, noise, None, parent_value, None, **details)
    if candidate.value is None:
        return Verdict(False, "no successful re-run of its incumbent", 0.0, noise, None, parent_value, None, **details)
    reference = _reference(parent, control)
    if reference is None:
        return Verdict(True, "the parent has no successful trial", 0.0, noise, candidate.value, None, None, **details)
    name, value, runs = reference
    m = margin(noise, runs, candidate.runs)
    delta = value - candidate.value
    against = "the parent" if name == "parent" else "its incumbent with the move switched off"
    if delta > m:
        reason = f"beats {against} by {delta:.4f} > margin {m:.4f} (fresh re-runs)"
    else:
        reason = f"improves on {against} by {delta:.4f}, not more than the margin {m:.4f} (fresh re-runs)"
    return Verdict(delta > m, reason, m, noise, candidate.value, parent_value, delta, reference=name, **details)


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
