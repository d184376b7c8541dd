"""Probes of a new generation's knobs: its parent's incumbent with one new knob moved at a time across the knob's
range. A candidate's sampler moves every knob at once, so a gain of the new knobs alone shows only where a sampled
config is also good in the old ones; the probes measure the move where the parent is best, before the sampler takes
over; the best probe of every knob that improved on the incumbent are then measured together (the joint probe), since
a move's gain often needs several of its knobs moved at once. Pure functions of knobs and configs."""
from __future__ import annotations

import math
from typing import Any

from hybrid.space import Knob

PROBE_UNITS = (0.15, 0.5, 0.85)  # where a numeric knob is probed: places in its range (log where the knob is)
MIN_PROBE_GAP = 0.1  # a probe this close to the knob's default (in range units) measures nothing new: skipped


def unit(knob: Knob, value: Any) -> float:
    """A knob value as a coordinate in [0, 1]: its place in the range (log where the knob is), or its choice's."""
    if knob.type == "categorical":
        return knob.choices.index(value) / max(1, len(knob.choices) - 1) if value in knob.choices else 0.0
    low, high, v = float(knob.low), float(knob.high), float(value)
    if knob.log:
        low, high, v = math.log(low), math.log(high), math.log(max(v, low))
    return min(1.0, max(0.0, (v - low) / (high - low))) if high > low else 0.0


def at_unit(knob: Knob, u: float) -> Any:
    """The knob value at coordinate u, the inverse of unit (int knobs rounded, categorical ones the nearest choice)."""
    if knob.type == "categorical":
        return knob.choices[round(u * (len(knob.choices) - 1))]
    low, high = (math.log(knob.low), math.log(knob.high)) if knob.log else (float(knob.low), float(knob.high))
    x = low + u * (high - low)
    return knob.clamp(math.exp(x) if knob.log else x)


def probe_values(knob: Knob) -> list[Any]:
    """The values a knob is probed at: every other choice, or PROBE_UNITS away from its default (distinct)."""
    if knob.type == "categorical":
        return [c for c in knob.choices if c != knob.default]
    home = unit(knob, knob.default)
    values: list[Any] = []
    for u in PROBE_UNITS:
        value = at_unit(knob, u)
        if abs(unit(knob, value) - home) >= MIN_PROBE_GAP and value != knob.default and value not in values:
            values.append(value)
    return values


def probe_configs(incumbent: dict[str, Any], knobs: list[Knob]) -> list[dict[str, Any]]:
    """The incumbent with each of `knobs` moved to each of its probe values, one knob at a time (knob by knob)."""
    return [{**incumbent, knob.name: value} for knob in knobs for value in probe_values(knob)]


def joint_probe(first: dict[str, Any], knobs: list[Knob], measured: list[tuple[dict[str, Any], float]]
                ) -> dict[str, Any] | None:
    """`first` (the parent's incumbent in the candidate's space) with each knob at its best probe, for the knobs whose
    best probe beat `first`'s own value; None unless two or more did (one alone is already measured). `measured`:
    (config, val_bpb) of the successful trials so far."""
    base = min((v for c, v in measured if c == first), default=None)
    if base is None:
        return None
    joint = dict(first)
    for knob in knobs:
        alone = [(v, c[knob.name]) for c, v in measured
                 if c.get(knob.name) != first.get(knob.name) and c == {**first, knob.name: c.get(knob.name)}]
        best = min(alone, key=lambda vc: vc[0], default=None)
        if best is not None and best[0] < base:
            joint[knob.name] = best[1]
    return joint if sum(joint[k.name] != first.get(k.name) for k in knobs) >= 2 else None
