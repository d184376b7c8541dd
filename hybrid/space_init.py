"""`hybrid space --init-yaml`: a search_space.yaml proposed for a foreign train.py (an autoresearch checkout's).

The 14 knobs of arXiv 2603.24647 get the paper's ranges (the project's own search_space.yaml, gpu profile); other
numeric knobs get a range around their value and a REVIEW mark; constants that are no hyperparameters (hardware
figures, dtypes, paths, seeds, logging, the protocol's own constants, non-literals) are left out, each with its
reason, as comments of the file.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from harness.knobs import FoundKnob, find_constants, find_knobs
from hybrid.errors import UserError
from hybrid.paths import PROJECT_ROOT
from hybrid.space import Knob, SpaceError, load_space

# Names of constants that are not hyperparameters, and why (the first pattern that matches a name wins).
NOT_HYPERPARAMETERS = (
    (re.compile(r"FLOP|PEAK|BANDWIDTH|^(H|A|B)\d{2,3}_|GPU|DEVICE$|NUM_GPUS"), "a hardware constant"),
    (re.compile(r"DTYPE|PRECISION"), "a dtype"),
    (re.compile(r"(DIR|PATH|FILE|URL|NAME)$"), "a path or a name"),
    (re.compile(r"SEED"), "a random seed (hybrid varies seeds itself)"),
    (re.compile(r"(^|_)LOG(_|$)|PRINT|VERBOSE|EVERY|INTERVAL|PROFIL|WANDB|SAVE|CHECKPOINT"),
     "logging or checkpointing"),
    (re.compile(r"TIME_BUDGET|SEQ_LEN|VOCAB|EVAL"), "part of the evaluation protocol (fixed for comparability)"),
)
REVIEW = "REVIEW: not a knob of the paper; range proposed around its value"
SHOWN_CHARS = 40  # of a left-out constant's source text
SPREAD = 4.0  # a proposed range spans the value divided and multiplied by this (1 - value for values near 1)


@dataclass(frozen=True)
class Proposal:
    """What --init-yaml proposes: knobs to tune (with a comment each) and constants left out (with the reason)."""
    knobs: dict[str, tuple[Knob, str]]
    left_out: dict[str, str]

    @property
    def marked(self) -> list[str]:
        return [name for name, (_, note) in self.knobs.items() if note.startswith("REVIEW")]


def paper_space() -> dict[str, Knob]:
    """The 14 knobs of arXiv 2603.24647 with the paper's ranges: the project's reference space."""
    return load_space(PROJECT_ROOT / "search_space.yaml", "gpu").knobs


def propose(code: str) -> Proposal:
    """The proposal for a train.py's code."""
    paper = paper_space()
    knobs: dict[str, tuple[Knob, str]] = {}
    left_out: dict[str, str] = {}
    for name, found in find_knobs(code).items():
        if name in paper:
            try:
                knobs[name] = _paper_knob(paper[name], found)
            except SpaceError as e:
                left_out[name] = f"{found.value!r}: a knob of the paper, but not of its type here ({e})"
        elif (reason := _not_hyperparameter(found)) is not None:
            left_out[name] = f"{found.value!r}: {reason}"
        else:
            knobs[name] = (_around(found), REVIEW)
    for name, text in find_constants(code).items():
        text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
        left_out[name] = f"{text}: not a literal (a tuple or an expression); hybrid writes literal values only, " \
                         "split it into literal knobs to tune it"
    return Proposal(knobs, left_out)


def _paper_knob(knob: Knob, found: FoundKnob) -> tuple[Knob, str]:
    """The paper's range with train.py's value as default (the range widened to hold it where it lies outside)."""
    held = widened(knob, found.value)
    return held, "" if held.to_dict() | {"default": knob.default} == knob.to_dict() else \
        f"the paper's range widened to hold train.py's {found.value!r}"


def widened(knob: Knob, value: Any) -> Knob:
    """The knob with `value` as its default, its range or choices widened to hold it (SpaceError: wrong type)."""
    if knob.type == "categorical":
        held = replace(knob, default=value, choices=knob.choices if value in knob.choices else (*knob.choices, value))
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{knob.name} is {knob.type}, got {type(value).__name__} {value!r}")
    else:
        low, high = min(knob.low, value), max(knob.high, value)
        held = replace(knob, default=value, low=low, high=high, log=knob.log and low > 0)
    return replace(held, default=held.check(value))


def _not_hyperparameter(found: FoundKnob) -> str | None:
    """Why a constant is no hyperparameter, or None."""
    for pattern, reason in NOT_HYPERPARAMETERS:
        if pattern.search(found.name):
            return reason
    if found.type == "bool":
        return "a switch (the search space has no boolean type; declare it categorical by hand to tune it)"
    if found.type == "str":
        return "a string that is not a knob of the paper (declare it categorical with its choices to tune it)"
    return None


def _around(found: FoundKnob) -> Knob:
    """A range around a numeric value: /SPREAD..xSPREAD (log), on 1 - value near 1, [0, 1] at 0 for fractions."""
    value = found.value
    if found.type == "int":
        low, high = (0, 4) if value == 0 else sorted((max(1, round(value / SPREAD)), round(value * SPREAD)))
        return Knob(found.name, "int", value, low=low, high=max(high, low + 1), log=value >= SPREAD)
    if value == 0:
        return Knob(found.name, "float", 0.0, low=0.0, high=1.0)
    if 0.5 < value < 1:  # a decay or a momentum: spread its distance to 1
        return Knob(found.name, "float", value, low=_round(1 - (1 - value) * SPREAD if value > 0.75 else value / 2),
                    high=_round(1 - (1 - value) / SPREAD))
    low, high = sorted((_round(value / SPREAD), _round(value * SPREAD)))
    return Knob(found.name, "float", value, low=low, high=high, log=value > 0)


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def to_yaml(proposal: Proposal, train_py: Path) -> str:
    """The proposal as search_space.yaml text, each knob on one line with its note, the left-out ones as comments."""
    lines = [f"# Proposed by `hybrid space --init-yaml` for {train_py}.",
             "# Knobs of arXiv 2603.24647 carry the paper's ranges; lines marked REVIEW are other numeric constants",
             "# with a range guessed around their value: check them, narrow them, or delete the line.",
             "knobs:"]
    width = max(map(len, proposal.knobs), default=0)
    for name, (knob, note) in proposal.knobs.items():
        flow = yaml.safe_dump(_spec(knob), default_flow_style=True, sort_keys=False, width=10_000).strip()
        lines.append(f"  {name + ':':<{width + 1}} {flow}" + (f"  # {note}" if note else ""))
    if proposal.left_out:
        lines.append("# Left out (not hyperparameters):")
        lines += [f"#   {name} = {why}" for name, why in proposal.left_out.items()]
    return "\n".join(lines) + "\n"


def _spec(knob: Knob) -> dict[str, Any]:
    spec = knob.to_dict()
    order = ("type", "low", "high", "choices", "default", "log")
    return {k: spec[k] for k in order if k in spec and spec[k] is not False}


def write_proposal(train_py: Path, out: Path) -> Proposal:
    """Write the proposal for train_py to `out` (never over an existing file); UserError for bad input."""
    if out.exists():
        raise UserError(f"{out} exists: --init-yaml never overwrites a file; remove it or choose another path")
    try:
        code = train_py.read_text()
    except OSError as e:
        raise UserError(f"cannot read {train_py}: {e.strerror}") from None
    proposal = propose(code)
    if not proposal.knobs:
        raise UserError(f"{train_py} has no numeric or paper knob (top-level ALL_CAPS literal) to tune")
    try:
        out.write_text(to_yaml(proposal, train_py))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    return proposal
