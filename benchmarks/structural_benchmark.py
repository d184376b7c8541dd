"""How often the hybrid's structural verdicts are right, and what it ends with, on the benchmark objective (the paper
surrogate plus catalog mutations with hidden true effects: hybrid.benchmark_objective).

For every seed: hybrid studies at several (--mutate-every, --stagnation, --repeats) settings, and tpe, cmaes and the
hybrid at its defaults at equal budget. Each verdict is scored against the move's hidden true effect: a false promotion
is a move with true effect >= 0 (no better) promoted; power is the share of moves better by at least 2x the noise that
were promoted. Writes benchmarks/results/structural_benchmark.md and the raw log (one JSON line per study) beside it;
--resume keeps the studies already in the log and runs the rest (the page reports the studies of these arguments).

    python benchmarks/structural_benchmark.py [--seeds 10] [--workers 2] [--grid-trials 40] [--budget-hours 6]
                                              [--resume]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
# Hybrid settings of the grid: (mutate every, stagnation, repeats); the first is the centre the others vary from.
GRID = ((10, 5, 2), (10, 5, 1), (10, 5, 3), (5, 3, 2), (20, 10, 2))
H2H_METHODS = ("tpe", "cmaes", "hybrid")
JOB_KEYS = ("part", "method", "seed", "trials", "mutate_every", "stagnation", "repeats", "budget_hours")
POWER_FACTOR = 2.0  # power counts moves better by at least this many noise sd
Z95 = 1.96
MARGIN_ZS = (2.0, 1.645, 1.28, 1.0, 0.5, 0.0)  # margins the grid's verdicts are judged again at (standard errors)
NO_EARLY_STOP = 10**9  # failures in a row that stop a study: the protocol spends its budget whatever fails


def run_study(job: dict[str, Any]) -> dict[str, Any]:
    """One study on the benchmark objective in a temporary database; its verdicts and final truth."""
    import optuna

    from hybrid import loop

    from hybrid.study import generations, store
    from hybrid.benchmark_objective import DEFAULT_NOISE, hidden_world, read_truth
    from hybrid.config import RunConfig
    from hybrid.evolution import DEFAULT_SCHEDULES
    from hybrid.promotion import NOISE_Z, REPEATS, incumbent
    from hybrid.study.records import ok_value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started, wall = time.process_time(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(method=job["method"], study="s", storage=f"sqlite:///{tmp}/b.db", seed=job["seed"],
                           objective="benchmark", memory_model=False, sandbox="off", artifacts=f"{tmp}/art",
                           budget_hours=job.get("budget_hours"), trials=job.get("trials"),
                           mutate_every=job.get("mutate_every"), stagnation=job.get("stagnation"),
                           repeats=job.get("repeats"), max_failures_in_a_row=NO_EARLY_STOP)
        with contextlib.redirect_stderr(io.StringIO()):
            loop.run(config)
        study = optuna.load_study(study_name="s", storage=store.open_storage(config.storage))
        truth = read_truth(config.artifacts)
        gens = generations.load_all(study)
        world = hidden_world(job["seed"], gens[0].code)
        trials = study.get_trials(deepcopy=False)
        decisions = [{"generation": g.number, "mutation": g.mutation, "kind": str(world[g.mutation].kind),
                      "true_effect": world[g.mutation].size, "promoted": g.status == "promoted",
                      "delta": g.verdict.delta if g.verdict else None, "margin": g.verdict.margin if g.verdict else None,
                      "incumbent_source": _incumbent_source(incumbent(
                          [t for t in trials if t.user_attrs.get("generation") == g.number]))}
                     for g in gens.values() if g.parent is not None and g.status in ("promoted", "rejected")
                     and g.mutation in world]
        ok = [t for t in trials if ok_value(t) is not None]
        best = min(ok, key=ok_value)
    schedule = DEFAULT_SCHEDULES[config.profile]
    return {**job, "noise": DEFAULT_NOISE, "noise_z": NOISE_Z, "trials_run": len(trials), "decisions": decisions,
            "schedule_ran": [config.mutate_every or schedule.mutate_every, config.stagnation or schedule.stagnation,
                             config.repeats or REPEATS] if job["method"] == "hybrid" else None,
            "best_measured": ok_value(best), "best_true": truth[best.number]["true"],
            "cpu_seconds": round(time.process_time() - started, 1), "wall_seconds": round(time.time() - wall, 1)}


def _incumbent_source(trial: Any) -> str | None:
    """Where a generation's incumbent came from (probe, tpe, catalog: its first trial, warmstart, ...)."""
    return trial.user_attrs.get("source") if trial is not None else None


def jobs(seeds: int, grid_trials: int, budget_hours: float) -> list[dict[str, Any]]:
    """The grid (a trial budget) and the head-to-head (a time budget), every seed."""
    out = []
    for seed in range(seeds):
        for m, w, r in GRID:
            out.append({"part": "grid", "method": "hybrid", "seed": seed, "trials": grid_trials, "mutate_every": m,
                        "stagnation": w, "repeats": r})
        for method in H2H_METHODS:
            out.append({"part": "h2h", "method": method, "seed": seed, "budget_hours": budget_hours})
    return out


def rate(hits: int, n: int) -> str:
    """A proportion with its Wilson 95 % interval."""
    if n == 0:
        return "- (0 moves)"
    p = hits / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return f"{100 * p:.0f} % [{100 * max(0, centre - half):.0f}, {100 * min(1, centre + half):.0f}] ({hits}/{n})"


def mean_ci(values: list[float]) -> str:
    """Mean +- the normal 95 % half-width."""
    if len(values) < 2:
        return f"{values[0]:.5f}" if values else "-"
    return f"{statistics.mean(values):.5f} ± {Z95 * statistics.stdev(values) / math.sqrt(len(values)):.5f}"


def verdict_rates(runs: list[dict[str, Any]]) -> str:
    """Table cells: the studies' verdicts, the false-promotion rate and the power."""
    moves = [d for x in runs for d in x["decisions"]]
    noise = runs[0]["noise"] if runs else 0.0
    false = [d for d in moves if d["true_effect"] >= 0]
    good = [d for d in moves if d["true_effect"] <= -POWER_FACTOR * noise]
    return (f"{len(moves)} | {rate(sum(d['promoted'] for d in false), len(false))} | "
            f"{rate(sum(d['promoted'] for d in good), len(good))}")


RATES_HEADER = f"verdicts | false promotions (true effect >= 0) | power (better by >= {POWER_FACTOR:g} x noise)"


def grid_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"| mutate every | stagnation | repeats | {RATES_HEADER} | final true val_bpb | CPU s/study |",
             "|---|---|---|---|---|---|---|---|"]
    for m, w, r in GRID:
        runs = [x for x in rows if (x["mutate_every"], x["stagnation"], x["repeats"]) == (m, w, r)]
        lines.append(f"| {m} | {w} | {r} | {verdict_rates(runs)} | {mean_ci([x['best_true'] for x in runs])} | "
                     f"{statistics.mean(x['cpu_seconds'] for x in runs):.0f} |")
    return lines


def h2h_table(rows: list[dict[str, Any]]) -> list[str]:
    by = {m: {x["seed"]: x for x in rows if x["method"] == m} for m in H2H_METHODS}
    lines = ["| method | seeds | final true val_bpb (best measured trial's truth) | hybrid - method, paired |",
             "|---|---|---|---|"]
    for method, runs in by.items():
        paired = [by["hybrid"][s]["best_true"] - r["best_true"] for s, r in runs.items() if s in by["hybrid"]]
        diff = "-" if method == "hybrid" else mean_ci(paired)
        lines.append(f"| {method} | {len(runs)} | {mean_ci([r['best_true'] for r in runs.values()])} | {diff} |")
    return lines


def kind_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every verdict by the move's hidden kind: how often promoted, and how often a probe gave the incumbent."""
    moves = [d for x in rows for d in x["decisions"]]
    lines = ["| hidden kind | verdicts | promoted | mean true effect | candidate's incumbent from a probe |",
             "|---|---|---|---|---|"]
    for kind in sorted({d["kind"] for d in moves}):
        of = [d for d in moves if d["kind"] == kind]
        probe = sum(d["incumbent_source"] == "probe" for d in of)
        lines.append(f"| {kind} | {len(of)} | {rate(sum(d['promoted'] for d in of), len(of))} | "
                     f"{statistics.mean(d['true_effect'] for d in of):+.5f} | {probe}/{len(of)} |")
    return lines


def margin_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every verdict judged again at other margins (its delta against z standard errors instead of the z its
    study ran with): the trade-off between false promotions and power. First order: a verdict that went the other
    way would have changed the study's later moves, which this does not replay."""
    moves = [(d, x.get("noise_z", 2.0)) for x in rows for d in x["decisions"]
             if d["delta"] is not None and d["margin"] is not None]
    noise = rows[0]["noise"] if rows else 0.0
    ran = {x.get("noise_z", 2.0) for x in rows}
    lines = ["| margin (standard errors) | false promotions (true effect >= 0) | "
             f"power (better by >= {POWER_FACTOR:g} x noise) |", "|---|---|---|"]
    for z in sorted(set(MARGIN_ZS) | ran, reverse=True):
        promoted = [d["delta"] > d["margin"] * z / ran_z for d, ran_z in moves]
        false = [p for p, (d, _) in zip(promoted, moves) if d["true_effect"] >= 0]
        good = [p for p, (d, _) in zip(promoted, moves) if d["true_effect"] <= -POWER_FACTOR * noise]
        lines.append(f"| {z:g}{' (ran)' if z in ran else ''} | {rate(sum(false), len(false))} | "
                     f"{rate(sum(good), len(good))} |")
    return lines


def _key(job: dict[str, Any]) -> tuple:
    return tuple(job.get(k) for k in JOB_KEYS)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], log_name: str) -> str:
    """The results page: the command, the grid by schedule and by kind, the head-to-head."""
    grid = [r for r in rows if r["part"] == "grid"]
    h2h = [r for r in rows if r["part"] == "h2h"]
    hybrid = [r for r in h2h if r["method"] == "hybrid"]
    hours = sum(r["wall_seconds"] for r in rows) / 3600
    ran = sorted({tuple(r["schedule_ran"]) for r in h2h if r["method"] == "hybrid"})
    return "\n".join([
        f"# Structural decisions against ground truth ({args.seeds} seeds)", "",
        f"`python benchmarks/structural_benchmark.py --seeds {args.seeds} --workers {args.workers} "
        f"--grid-trials {args.grid_trials} --budget-hours {args.budget_hours:g}`: {len(rows)} studies, "
        f"{hours:.1f} h of study wall time over {args.workers} processes on a shared 2-core machine; raw log "
        f"`{log_name}` (one JSON line per study).", "",
        f"Benchmark objective (hybrid.benchmark_objective), noise sd {rows[0]['noise']:g} (the paper's seed-to-seed "
        "noise). Intervals: Wilson 95 % for rates, normal 95 % for means.", "",
        f"## Verdicts by schedule ({args.grid_trials} trials per study, hybrid with the catalog)", "",
        *grid_table(grid), "", "### Every grid verdict by the move's hidden kind", "", *kind_table(grid), "",
        "### The same verdicts at other margins (first order: later moves not replayed)", "",
        *margin_table(grid), "",
        f"## Head-to-head at equal budget ({args.budget_hours:g} h of modelled H200 time per study)", "",
        f"hybrid ran (mutate every, stagnation, repeats) = {', '.join(map(str, ran))}.", "",
        *h2h_table(h2h), "",
        f"### The hybrid's own verdicts in the head-to-head (its default schedule, {args.budget_hours:g} h per study)",
        "", f"| studies | {RATES_HEADER} |", "|---|---|---|---|", f"| {len(hybrid)} | {verdict_rates(hybrid)} |", "",
        *kind_table(hybrid), "", *margin_table(hybrid), ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grid-trials", type=int, default=40, help="trials per grid study")
    parser.add_argument("--budget-hours", type=float, default=6.0, help="modelled trial hours per head-to-head study")
    parser.add_argument("--resume", action="store_true", help="keep the studies in the log, run the rest")
    parser.add_argument("--out", type=Path, default=RESULTS / "structural_benchmark.md")
    args = parser.parse_args()
    log_path = args.out.with_suffix(".log")
    wanted = {_key(j): j for j in jobs(args.seeds, args.grid_trials, args.budget_hours)}
    logged = [json.loads(line) for line in log_path.read_text().splitlines()] if args.resume else []
    rows = [r for r in logged if _key(r) in wanted]  # the log may hold more seeds or other budgets: not reported
    done = {_key(r) for r in rows}
    todo = [j for k, j in wanted.items() if k not in done]
    with open(log_path, "a" if args.resume else "w") as log, \
            multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for count, row in enumerate(pool.imap_unordered(run_study, todo), 1):
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{count}/{len(todo)} {row['part']} {row['method']} seed {row['seed']} "
                  f"true {row['best_true']:.5f} ({row['wall_seconds']} s)", file=sys.stderr)
    text = report(args, rows, log_path.name)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
