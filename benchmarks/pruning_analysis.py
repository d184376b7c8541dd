"""Tables of pruning.md from the raw lines of pruning_correlation.py: rank correlation of each intermediate val_bpb
with the final one, and Optuna's pruners replayed on the recorded curves.

    python benchmarks/pruning_analysis.py [--log benchmarks/results/pruning_correlation.jsonl]

Writes LOG's folder/pruning_correlation.md. A trial's value at a checkpoint c is the one measured at the first
recorded fraction >= c (what a run with checkpoint c measures: the first tick past it). The replay feeds the trials,
in the order they ran, into an in-memory study with each pruner (hybrid.pruners' settings), reports the values at
the checkpoints and stops a trial where the pruner says so; its saving is the rest of its training plus its final
evaluation. A replay, not a run: TPE with and without pruning is benchmarks/pruning_tpe.py.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optuna
from scipy.stats import spearmanr

from hybrid import pruners

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
REPLAYED = (0.25, 0.5, 0.75)  # the checkpoints of harness.profiles (intermediate_fractions)
PENALTY = 100.0


def value_at(trial: dict, checkpoint: float) -> float | None:
    """The intermediate val_bpb measured at the first recorded fraction >= checkpoint, if any."""
    later = [(f, v) for f, v in trial["intermediate"] if f >= checkpoint - 1e-9]
    return min(later)[1] if later else None


def correlation_rows(ok: list[dict]) -> list[str]:
    rows = []
    for c in CHECKPOINTS:
        pairs = [(v, t["val_bpb"]) for t in ok if (v := value_at(t, c)) is not None]
        if len(pairs) < 3:
            rows.append(f"| {c:.0%} | {len(pairs)} | - | - |")
            continue
        rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        rows.append(f"| {c:.0%} | {len(pairs)} | {rho:.3f} | {p:.2g} |")
    return rows


def saved_seconds(trial: dict, fraction: float) -> float:
    """Wall time a trial stopped at `fraction` would not have spent: the rest of its training, its final eval."""
    return (1 - fraction) * trial["training_seconds"] + trial["eval_seconds"]


def variants() -> dict[str, optuna.pruners.BasePruner]:
    """hybrid.pruners' settings of each --pruner, and the alternatives weighed against them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    named = {name: pruners.make_pruner(name) for name in pruners.PRUNERS[1:]}
    return {**named,
            "median, from 50 %": optuna.pruners.MedianPruner(n_startup_trials=pruners.STARTUP_TRIALS,
                                                             n_warmup_steps=50),
            "median, 10 startup trials": optuna.pruners.MedianPruner(n_startup_trials=10),
            "percentile 75 (worst quarter)": optuna.pruners.PercentilePruner(75.0,
                                                                             n_startup_trials=pruners.STARTUP_TRIALS),
            "sha, reduction 2": optuna.pruners.SuccessiveHalvingPruner(min_resource=pruners.MIN_RESOURCE,
                                                                       reduction_factor=2)}


def replay(trials: list[dict], pruner: optuna.pruners.BasePruner) -> dict:
    """The trials told in order to a study with `pruner`; which are stopped where, and what that saves."""
    study = optuna.create_study(pruner=pruner)
    pruned, saved, total = [], 0.0, 0.0
    for t in trials:
        total += t["total_seconds"]
        trial = study.ask()
        trial.set_user_attr("generation", 0)
        stopped = None
        for c in REPLAYED:
            value = value_at(t, c)
            if value is None or t["status"] != "ok":
                continue
            trial.report(value, step=round(pruners.STEP_SCALE * c))
            if t["index"] > 0 and trial.should_prune():  # the baseline (index 0) is never pruned
                stopped = c
                break
        if stopped is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned.append((t, stopped))
            saved += saved_seconds(t, stopped)
        else:
            study.tell(trial, t["val_bpb"] if t["status"] == "ok" else PENALTY)
    ok = [t for t in trials if t["status"] == "ok"]
    best = min(ok, key=lambda t: t["val_bpb"])
    kept = [t for t in ok if all(t is not p for p, _ in pruned)]
    return {"pruned": len(pruned), "saved": saved, "total": total, "best_pruned": any(t is best for t, _ in pruned),
            "best_kept": min(t["val_bpb"] for t in kept), "best": best["val_bpb"],
            "top5_pruned": sum(1 for t, _ in pruned if t in sorted(ok, key=lambda t: t["val_bpb"])[:5])}


def markdown(trials: list[dict], log: Path) -> str:
    ok = [t for t in trials if t["status"] == "ok" and t["val_bpb"] is not None and math.isfinite(t["val_bpb"])]
    failed = {s: sum(1 for t in trials if t["status"] == s) for s in {t["status"] for t in trials} - {"ok"}}
    loads = [t["load_average_before"] for t in trials]
    each = [(t["phases"]["intermediate"] / len(t["intermediate"]), t["total_seconds"]) for t in ok if t["intermediate"]]
    share = [len(REPLAYED) * seconds / total for seconds, total in each]
    lines = [
        "# Intermediate val_bpb vs final val_bpb on the cpu profile (generated)",
        "",
        f"`python benchmarks/pruning_analysis.py --log {log.relative_to(ROOT) if log.is_relative_to(ROOT) else log}`"
        f" from {len(trials)} trials of `python benchmarks/pruning_correlation.py` ({len(ok)} ok; failed: "
        f"{failed or 'none'}); load average before a trial {min(loads):.1f} to {max(loads):.1f} on "
        "a 2-core machine shared with other work.",
        "",
        f"One intermediate evaluation of the cpu slice (8192 tokens): {sum(e for e, _ in each) / len(each):.2f} s "
        f"on average (wall time, at this load); {len(REPLAYED)} of them: {100 * sum(share) / len(share):.1f} % of a "
        f"trial's wall time on average (at most {100 * max(share):.1f} %), over the {len(each)} trials that had one.",
        "",
        "## Spearman rank correlation with the final val_bpb (successful trials)",
        "",
        "| checkpoint | trials with a value | rho | p |", "|---|---|---|---|", *correlation_rows(ok),
        "",
        "## Optuna's pruners replayed on these curves (checkpoints 25, 50, 75 %)",
        "",
        "| pruner | pruned | wall time saved | best trial pruned | top-5 pruned | best kept val_bpb (best) |",
        "|---|---|---|---|---|---|",
    ]
    for name, pruner in variants().items():
        r = replay(trials, pruner)
        lines.append(f"| {name} | {r['pruned']} of {len(trials)} | {100 * r['saved'] / r['total']:.0f} % "
                     f"({r['total'] / max(1e-9, r['total'] - r['saved']):.2f}x trials per hour) | "
                     f"{'yes' if r['best_pruned'] else 'no'} | {r['top5_pruned']} | {r['best_kept']:.4f} "
                     f"({r['best']:.4f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=ROOT / "benchmarks" / "results" / "pruning_correlation.jsonl")
    args = parser.parse_args()
    trials = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    text = markdown(trials, args.log.resolve())
    (args.log.parent / "pruning_correlation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
