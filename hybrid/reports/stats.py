"""Pairwise tests between methods on their best val_bpb per seed, with bootstrap intervals of the difference."""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class PairTest:
    """Method a against method b. `diff` is mean(a) - mean(b): negative when a found the lower val_bpb."""
    a: str
    b: str
    test: str                 # "wilcoxon" (seeds pair up), "mann-whitney", or "none" (fewer than 2 seeds a side)
    n_a: int
    n_b: int
    diff: float
    ci_low: float | None      # bootstrap percentile interval of diff at CONFIDENCE
    ci_high: float | None
    p_value: float | None     # two-sided

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(a: dict[int, float], b: dict[int, float]) -> bool:
    """Two methods pair up when they ran the same seeds (at least two)."""
    return len(a) >= 2 and set(a) == set(b)


def compare_pair(a_name: str, a: dict[int, float], b_name: str, b: dict[int, float], *,
                 rng_seed: int = 0) -> PairTest:
    """Wilcoxon signed-rank on seed-paired bests, else Mann-Whitney U; and a bootstrap interval of the difference."""
    a = {s: v for s, v in a.items() if math.isfinite(v)}
    b = {s: v for s, v in b.items() if math.isfinite(v)}
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    diff = float(xa.mean() - xb.mean()) if len(xa) and len(xb) else math.nan
    if len(xa) < 2 or len(xb) < 2:
        return PairTest(a_name, b_name, "none", len(xa), len(xb), diff, None, None, None)
    rng = np.random.default_rng(rng_seed)
    if paired(a, b):
        d = np.array([a[s] - b[s] for s in sorted(a)])
        p = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
        boot = d[rng.integers(0, len(d), (RESAMPLES, len(d)))].mean(axis=1)
        test = "wilcoxon"
    else:
        p = float(stats.mannwhitneyu(xa, xb, alternative="two-sided").pvalue)
        boot = (xa[rng.integers(0, len(xa), (RESAMPLES, len(xa)))].mean(axis=1)
                - xb[rng.integers(0, len(xb), (RESAMPLES, len(xb)))].mean(axis=1))
        test = "mann-whitney"
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return PairTest(a_name, b_name, test, len(xa), len(xb), diff, float(low), float(high), p)


def pairwise(per_seed_best: dict[str, dict[int, float]]) -> list[PairTest]:
    """Every pair of methods, in the order given."""
    return [compare_pair(a, per_seed_best[a], b, per_seed_best[b], rng_seed=i)
            for i, (a, b) in enumerate(itertools.combinations(per_seed_best, 2))]
