"""The `benchmark` objective: ground truth for structural decisions. The paper surrogate's landscape (hybrid.surrogate)
over the 14 base knobs, plus, for every mutation of the offline catalog (hybrid.llm.catalog) that a generation's
train.py carries, a hidden effect of the knobs it opens: some moves are better, some neutral, some worse, some better
only once their knobs are re-tuned far from the defaults, some better only together with a base knob moved to a hidden
setting. Measurements add Gaussian noise of a configurable level (default: the paper's seed-to-seed noise).

The hidden world is drawn from the run's seed (deterministic per seed) and lives only in this object: nothing an
agent sees (code, prompts, trial attributes) carries it. The true value of every trial is written next to its
measured value in `<artifacts>/benchmark_truth.jsonl`, outside the study's database.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.result import TrialResult
from hybrid.llm.catalog import MUTATIONS, MutationError, carried
from hybrid.paths import project_file
from hybrid.probes import unit
from hybrid.space import Knob
from hybrid.surrogate import KNOBS, PAPER_SPACE, SUCCESS_SECONDS, TRAINING_SECONDS, SurrogateTrials, runs_as

DEFAULT_NOISE = 1e-4  # the paper's seed-to-seed noise: its baseline config run five times, sd 1e-4 (the data's README)
EFFECT_UNIT = 1e-4    # hidden effects are drawn in multiples of this, whatever the noise level
# One kind per catalog mutation, shuffled per seed.
KINDS = ("better", "better", "better", "neutral", "neutral", "worse", "worse", "retune", "retune", "interact",
         "interact")
GAIN_RANGE = (0.5, 30.0)  # |true effect| of better, retune and interact moves: log-uniform, in EFFECT_UNIT
COST_RANGE = (0.5, 10.0)  # true effect of worse moves (a slower step: at every setting), in EFFECT_UNIT
MIN_OFFSET = 0.25         # a gain's best setting lies at least this far from the defaults (unit coordinates)
RETUNE_OFFSET = 0.5       # a retune move's, at least this far
RETUNE_WIDTH = 0.1        # and its gain is felt only this close to it
CURVATURE = 2.0           # neutral and worse moves: EFFECT_UNIT per unit distance squared away from the defaults
PARTNER_SHIFT = (0.15, 0.35)  # an interacting move's hidden setting of its base knob: this far from its default
PARTNER_RANGE = 0.3       # its gain turns to a loss (at most as large) this far from that setting
TRUTH_FILE = "benchmark_truth.jsonl"
WORLD_SALT, NOISE_SALT = 0xB3, 0x5E  # draws of the hidden world and of the noise never share a stream


@dataclass(frozen=True)
class Effect:
    """The hidden effect of one catalog mutation: `size` is its true effect, the change of val_bpb at the best setting
    of its knobs (negative: better). At the knobs' defaults, which reproduce the parent's code, only a worse move
    changes anything."""
    mutation: str
    kind: str
    size: float
    knobs: tuple[Knob, ...]
    optimum: tuple[float, ...]
    partner: Knob | None = None
    partner_optimum: float | None = None

    def value(self, config: dict[str, Any]) -> float:
        """The change of val_bpb this move makes at `config` (its knobs missing: at their defaults)."""
        u = np.array([unit(k, config.get(k.name, k.default)) for k in self.knobs])
        home = np.array([unit(k, k.default) for k in self.knobs])
        off_default = float(np.sum((u - home) ** 2))
        if self.kind in ("neutral", "worse"):
            return max(self.size, 0.0) + CURVATURE * EFFECT_UNIT * off_default
        best = np.array(self.optimum)
        width = RETUNE_WIDTH if self.kind == "retune" else math.sqrt(float(np.sum((home - best) ** 2)))
        floor = math.exp(-float(np.sum((home - best) ** 2)) / (2 * width**2))
        basin = (math.exp(-float(np.sum((u - best) ** 2)) / (2 * width**2)) - floor) / (1 - floor)
        if self.kind != "interact":
            return self.size * basin
        v = unit(self.partner, config.get(self.partner.name, self.partner.default))
        return self.size * basin * max(-1.0, 1 - ((v - self.partner_optimum) / PARTNER_RANGE) ** 2)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _optimum(rng: np.random.Generator, knobs: tuple[Knob, ...], offset: float) -> tuple[float, ...]:
    """A best setting at least `offset` from the defaults (categorical knobs on one of their choices), or at 90 % of
    the farthest a setting can be where that is nearer (a default in the middle of a knob's range)."""
    home = np.array([unit(k, k.default) for k in knobs])
    offset = min(offset, 0.9 * float(np.sqrt(np.sum(np.maximum(home, 1.0 - home) ** 2))))
    while True:
        point = rng.uniform(0.0, 1.0, len(knobs))
        for i, k in enumerate(knobs):
            if k.type == "categorical":
                steps = max(1, len(k.choices) - 1)
                point[i] = round(point[i] * steps) / steps
        if float(np.sum((point - home) ** 2)) >= offset**2:
            return tuple(float(p) for p in point)


def hidden_world(seed: int, train_py: str) -> dict[str, Effect]:
    """The hidden effect of every catalog mutation that applies to `train_py`, drawn from `seed`."""
    rng = np.random.default_rng([seed % 2**32, WORLD_SALT])
    kinds = list(rng.permutation(KINDS))
    world = {}
    for mutation, kind in zip(MUTATIONS, kinds):
        try:
            knobs = tuple(mutation.apply(train_py).knobs.values())
        except MutationError:
            continue
        if kind in ("neutral", "worse"):
            size = _log_uniform(rng, COST_RANGE) * EFFECT_UNIT if kind == "worse" else 0.0
            world[mutation.name] = Effect(mutation.name, kind, size, knobs, ())
            continue
        size = -_log_uniform(rng, GAIN_RANGE) * EFFECT_UNIT
        optimum = _optimum(rng, knobs, RETUNE_OFFSET if kind == "retune" else MIN_OFFSET)
        if kind != "interact":
            world[mutation.name] = Effect(mutation.name, kind, size, knobs, optimum)
            continue
        numeric = [n for n in mutation.related if PAPER_SPACE.knobs[n].type != "categorical"] or ["MATRIX_LR"]
        partner = PAPER_SPACE.knobs[numeric[int(rng.integers(len(numeric)))]]
        shift = rng.uniform(*PARTNER_SHIFT) * rng.choice((-1.0, 1.0))
        home = unit(partner, partner.default)
        target = home + shift if 0.0 <= home + shift <= 1.0 else home - shift
        world[mutation.name] = Effect(mutation.name, kind, size, knobs, optimum, partner, float(target))
    return world


class BenchmarkObjective:
    """Trials whose truth is known: the surrogate's expected val_bpb at the base knobs, plus the hidden effects of the
    catalog mutations the code carries; measured with Gaussian noise; failures (out of memory) as the surrogate's."""
    name = "benchmark"

    def __init__(self, seed: int = 0, noise: float | None = None, train_py: str | None = None) -> None:
        self.noise = DEFAULT_NOISE if noise is None else noise
        self.world = hidden_world(seed, train_py if train_py is not None else project_file("train.py").read_text())
        self._trials = SurrogateTrials()

    def runs_as(self, code: str, config: dict[str, Any]) -> dict[str, Any]:
        """The base knobs snapped as the paper's runner did; the mutations' knobs as given."""
        return {**config, **runs_as(self._base(config))}

    def truth(self, code: str, config: dict[str, Any]) -> tuple[float, float]:
        """The true (noise-free) val_bpb of `config` in this code, and its probability of failing."""
        outcome = self._trials.surrogate.outcomes(pd.DataFrame([runs_as(self._base(config))])).iloc[0]
        effects = sum(self.world[name].value(config) for name in carried(code) if name in self.world)
        return float(outcome["val_bpb_pred"]) + effects, float(outcome["p_fail"])

    def evaluate(self, code: str, config: dict[str, Any], *, seed: int, trial_number: int,
                 trial_dir: Path) -> TrialResult:
        """The surrogate's trial (its failure draw, time and memory), with the true value plus noise as val_bpb."""
        base = self._trials.evaluate(self._base(config), seed=seed, trial_number=trial_number)
        true, _ = self.truth(code, config)
        rng = np.random.default_rng([seed % 2**64, trial_number % 2**64, NOISE_SALT])
        measured = true + self.noise * float(rng.standard_normal()) if base.ok else None
        result = TrialResult(status=base.status, val_bpb=measured, error=base.error,
                             training_seconds=TRAINING_SECONDS if base.ok else 0.0,
                             total_seconds=SUCCESS_SECONDS if base.ok else base.total_seconds,
                             peak_memory_mb=base.peak_memory_mb, num_params=base.num_params,
                             config=self.runs_as(code, config))
        record = {"trial": trial_number, "status": base.status, "measured": measured, "true": true,
                  "mutations": sorted(carried(code))}
        trial_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(trial_dir.parent / TRUTH_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    @staticmethod
    def _base(config: dict[str, Any]) -> dict[str, Any]:
        """The 14 knobs the surrogate models (a missing one at the paper's default)."""
        return {name: config.get(name, PAPER_SPACE.knobs[name].default) for name in KNOBS}


def read_truth(artifacts: str | Path) -> dict[int, dict[str, Any]]:
    """The truth log of a run: trial number -> its record (status, measured, true, mutations)."""
    path = Path(artifacts) / TRUTH_FILE
    if not path.exists():
        return {}
    return {r["trial"]: r for r in map(json.loads, path.read_text().splitlines())}
