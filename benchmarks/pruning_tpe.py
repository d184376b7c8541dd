"""TPE with and without a pruner at the same budget of trial time, real training on the cpu profile.

    python benchmarks/pruning_tpe.py [--pruner median] [--seeds 3] [--budget-hours 0.25] [--out DIR]

Runs `hybrid run --method tpe --profile cpu` for --pruner none and the given pruner, each seed its own study in
OUT/pruning_tpe.db (a rerun resumes the studies not finished), then writes OUT/pruning_tpe.md: per study the
configurations evaluated (finished trials), the best val_bpb, and the share of wall time spent on trials that
were pruned; OUT/pruning_tpe.log holds every run's output.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import optuna

from hybrid.study import records, store

ROOT = Path(__file__).resolve().parents[1]


def study_name(pruner: str, seed: int) -> str:
    return f"tpe-{pruner}-s{seed}"


def summary(study: optuna.Study) -> dict:
    """Configurations evaluated, best val_bpb, and the wall-time share of pruned trials of one study."""
    finished = store.finished_trials(study)
    seconds = store.seconds_used(finished)
    pruned = [t for t in finished if t.user_attrs.get(records.STATUS) == records.PRUNED]
    best = records.best_trial(finished)
    return {"trials": len(finished), "pruned": len(pruned), "best": records.ok_value(best) if best else None,
            "pruned_share": store.seconds_used(pruned) / seconds if seconds else 0.0, "hours": seconds / 3600}


def markdown(rows: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = ["# TPE with and without pruning, cpu profile (generated)", "",
             f"`python benchmarks/pruning_tpe.py --pruner {args.pruner} --seeds {args.seeds} --budget-hours "
             f"{args.budget_hours}`; raw output in pruning_tpe.log, studies in pruning_tpe.db.", "",
             "| pruner | seed | configurations | pruned | best val_bpb | wall time on pruned trials | hours |",
             "|---|---|---|---|---|---|---|"]
    for pruner, studies in rows.items():
        for seed, s in enumerate(studies):
            best = f"{s['best']:.4f}" if s["best"] is not None else "-"
            lines.append(f"| {pruner} | {seed} | {s['trials']} | {s['pruned']} | {best} | "
                         f"{100 * s['pruned_share']:.0f} % | {s['hours']:.2f} |")
    means = {p: statistics.mean(s["trials"] for s in studies) for p, studies in rows.items()}
    if len(means) == 2 and all(means.values()):
        none, pruned = means["none"], means[args.pruner]
        lines += ["", f"Configurations per study: {none:.1f} without, {pruned:.1f} with {args.pruner} "
                      f"({pruned / none:.2f}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruner", default="median")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-hours", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    storage = f"sqlite:///{(args.out / 'pruning_tpe.db').resolve()}"
    rows: dict[str, list[dict]] = {}
    with (args.out / "pruning_tpe.log").open("a") as log:
        for seed in range(args.seeds):
            for pruner in ("none", args.pruner):
                name = study_name(pruner, seed)
                exists = store.study_exists(store.open_storage(storage), name)
                command = (["resume", "--study", name, "--storage", storage] if exists else
                           ["run", "--method", "tpe", "--study", name, "--storage", storage, "--profile", "cpu",
                            "--seed", str(seed), "--budget-hours", str(args.budget_hours), "--pruner", pruner])
                log.write(f"$ hybrid {' '.join(command)}\n")
                log.flush()
                subprocess.run([sys.executable, "-m", "hybrid.cli", *command], stdout=log, stderr=log, cwd=ROOT)
    for pruner in ("none", args.pruner):
        rows[pruner] = [summary(optuna.load_study(study_name=study_name(pruner, seed), storage=storage))
                        for seed in range(args.seeds)]
    text = markdown(rows, args)
    (args.out / "pruning_tpe.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
