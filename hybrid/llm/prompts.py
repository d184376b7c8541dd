"""The texts the agents are given: a fixed prefix (brief, search space, train.py; cached by the provider) and a task."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hybrid.study import records
from hybrid.study.records import ok_value
from hybrid.space import SearchSpace

HISTORY_BEST = 5     # best trials always shown to the HP agent
HISTORY_LAST = 40    # and the most recent ones
CHANGES_SHOWN = 20   # code agent: most recent changes shown
DIFF_LINES = 80      # lines of one change's diff shown
RECENT = 20          # centaur: last trials shown
TOP = 5              # centaur: best configs shown


def value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={value_text(v)}" for k, v in config.items())


def config_json(config: dict[str, Any]) -> str:
    return json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in config.items()})


def space_table(space: SearchSpace) -> str:
    rows = ["| knob | type | range or choices | scale | default |", "|---|---|---|---|---|"]
    for k in space.knobs.values():
        span = ", ".join(map(str, k.choices)) if k.type == "categorical" else f"{value_text(k.low)} .. {value_text(k.high)}"
        rows.append(f"| {k.name} | {k.type} | {span} | {'log' if k.log else 'linear'} | {value_text(k.default)} |")
    return "\n".join(rows)


def prefix(program: str, train_py: str, space: SearchSpace) -> str:
    """The fixed part of every prompt: the brief, the space, and the current train.py."""
    return (f"You are a research engineer optimizing a language-model pre-training script.\n\n"
            f"# The research brief (program.md)\n\n{program.strip()}\n\n"
            f"# The search space (the knobs: top-level ALL_CAPS assignments of train.py)\n\n{space_table(space)}\n\n"
            f"# train.py (the current version)\n\n```python\n{train_py.rstrip()}\n```\n")


def outcome(trial: FrozenTrial) -> str:
    """`val_bpb 1.2345` or the failure class, with the trial's cost in seconds."""
    attrs = trial.user_attrs
    value = ok_value(trial)
    result = f"val_bpb {value:.4f}" if value is not None else attrs.get(records.STATUS, "?")
    return f"{result}, {float(attrs.get(records.TOTAL_SECONDS) or 0.0):.0f} s"


def note(trial: FrozenTrial) -> str:
    """Why it failed or what was changed in the agent's answer (clamped values, rejections)."""
    attrs = trial.user_attrs
    parts = [attrs.get(records.ERROR), attrs.get("llm_note"), attrs.get("llm_rejected")]
    return "; ".join(p for p in parts if p)


def trial_line(trial: FrozenTrial) -> str:
    source = trial.user_attrs.get(records.SOURCE, "?")
    text = f"- trial {trial.number} [{source}] {outcome(trial)}: {config_text(trial.params)}"
    extra = note(trial)
    return f"{text} ({extra})" if extra else text


def _best(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    return sorted((t for t in trials if ok_value(t) is not None), key=lambda t: (ok_value(t), t.number))[:n]


ANSWER_CONFIG = ("Answer with a few sentences of reasoning, then exactly one ```json block holding one object that "
                 "gives a value for every knob, for example:\n\n```json\n{example}\n```\n\n"
                 "Values outside a knob's range are clamped into it; a knob you leave out takes its default. "
                 "Lower val_bpb is better; failed trials (oom, crash, timeout, nan) cost time and teach little.")


def hp_task(trials: list[FrozenTrial], space: SearchSpace) -> str:
    """The HP agent's task: the trial history, then the answer format."""
    shown = {t.number: t for t in _best(trials, HISTORY_BEST) + trials[-HISTORY_LAST:]}
    history = "\n".join(trial_line(shown[n]) for n in sorted(shown)) or "(no trials yet)"
    omitted = len(trials) - len(shown)
    return (f"# Your task: choose the next configuration\n\n"
            f"train.py stays as it is; you choose the knob values of the next trial.\n\n"
            f"## Trials so far ({len(trials)}{f', {omitted} older ones not shown' if omitted else ''})\n\n{history}\n\n"
            + ANSWER_CONFIG.format(example=config_json(space.defaults())))


@dataclass(frozen=True)
class Change:
    """One entry of the code agent's history: a change that ran (kept or reverted) or a refused proposal."""
    title: str         # "generation 3, kept" or "refused before running"
    description: str
    outcome: str       # "val_bpb 0.9876 (best before 0.9901)", "crash: ...", or the refusal's reason
    diff: str = ""


def _clip(diff: str) -> str:
    lines = diff.splitlines()
    if len(lines) <= DIFF_LINES:
        return diff.rstrip()
    return "\n".join(lines[:DIFF_LINES] + [f"... ({len(lines) - DIFF_LINES} more lines)"])


ANSWER_EDIT = ("Propose one change to train.py. Answer in this form:\n\n"
               "Change: <one line saying what you change>\n\n"
               "A few sentences of reasoning, then EITHER the whole new train.py in one ```python block, OR a unified "
               "diff against the train.py above in one ```diff block (--- a/train.py, +++ b/train.py, @@ hunks with "
               "exact context lines). Only train.py may change; the change is kept if val_bpb improves, reverted "
               "otherwise.")


def code_task(changes: list[Change], best: float | None) -> str:
    """The code agent's task: its past changes with their outcomes, then the answer format."""
    shown = changes[-CHANGES_SHOWN:]
    score = f" (val_bpb {best:.4f})" if best is not None else ""
    parts = [f"# Your task: improve train.py\n\nThe train.py above is the best version so far{score}; "
             "its knob values are the ones that ran.\n"]
    if shown:
        count = f"{len(changes)}, the last {len(shown)} shown" if len(shown) < len(changes) else f"{len(changes)}"
        parts.append(f"## Your earlier changes ({count})\n")
        for c in shown:
            parts.append(f"### {c.title}: {c.description}\nOutcome: {c.outcome}")
            if c.diff:
                parts.append(f"```diff\n{_clip(c.diff)}\n```")
        parts.append("")
    parts.append(ANSWER_EDIT)
    return "\n".join(parts)


@dataclass(frozen=True)
class CMAView:
    """What the Centaur advisor is shown of CMA-ES: its mean as a config, its step size and covariance."""
    mean: dict[str, Any]
    sigma: float
    names: list[str]
    covariance: list[list[float]]  # sigma^2 C, in the unit-cube coordinates of the knobs
    generation: int


def matrix_text(names: list[str], matrix: list[list[float]]) -> str:
    width = max(8, *(len(n) for n in names)) + 1
    head = " " * width + "".join(f"{n[:9]:>10}" for n in names)
    rows = [f"{name:<{width}}" + "".join(f"{v:>10.2e}" for v in row) for name, row in zip(names, matrix)]
    return "\n".join([head, *rows])


def centaur_task(view: CMAView, proposal: dict[str, Any], trials: list[FrozenTrial], space: SearchSpace) -> str:
    """The Centaur advisor's task: CMA-ES's state and proposal, the best and the latest trials, the answer format."""
    top = "\n".join(trial_line(t) for t in _best(trials, TOP)) or "(none yet)"
    recent = "\n".join(trial_line(t) for t in trials[-RECENT:]) or "(none yet)"
    return (f"# Your task: advise CMA-ES on the next configuration\n\n"
            f"CMA-ES searches the knobs in a unit cube: each numeric knob mapped to [0, 1] (log-scaled where the "
            f"space says log), each categorical knob by the index of its choice. You see its state after "
            f"{view.generation} generations; your configuration is evaluated instead of CMA-ES's proposal and "
            f"CMA-ES learns from its result.\n\n"
            f"## CMA-ES\n\nmean (as knob values): {config_text(view.mean)}\n"
            f"step size sigma: {view.sigma:.4g}\n\ncovariance sigma^2 * C (unit-cube coordinates):\n"
            f"```\n{matrix_text(view.names, view.covariance)}\n```\n\n"
            f"CMA-ES's own proposal for this trial: {config_json(proposal)}\n\n"
            f"## The {TOP} best trials\n\n{top}\n\n## The last {RECENT} trials\n\n{recent}\n\n"
            + ANSWER_CONFIG.format(example=config_json(proposal)))
