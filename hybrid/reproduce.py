"""`hybrid reproduce arxiv-2603.24647`: the paper's protocol on the surrogate (minutes on a CPU) or for real (GPUs),
then its published table beside ours, method by method.

The protocol: 24 h of trial time per run, failures cost their wall time and count as val_bpb = 100, 3 seeds;
random, tpe and cmaes, plus centaur and llm-hp (and llm-code, for real) when an LLM provider is given.
gp is left out: Optuna 5's GPSampler needs 5-10 s per trial from about 30 trials on on 2 cores, growing with
the history, so the ~300 trials of a 24-h run take hours. Run it apart with
`hybrid compare --methods gp --objective surrogate --budget-hours 24 --seeds 3 --out DIR`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness.profiles import PAPER_CAP_GB
from hybrid.reports import report
from hybrid.compare import check_existing, default_storage, run_studies, study_name
from hybrid.errors import UserError
from hybrid.config import RunConfig

PAPER = "arxiv-2603.24647"
PROTOCOL_HOURS = 24.0
PAPER_SEEDS = 3
FIXED_SPACE = ("random", "tpe", "cmaes")
LLM_METHODS = {"surrogate": ("centaur", "llm-hp"), "real": ("centaur", "llm-hp", "llm-code")}
OOM_CLOSE_POINTS = 5.0        # an OOM rate agrees within 5 percentage points or 30 % of the paper's
OOM_CLOSE_RELATIVE = 0.3


def published() -> dict[str, Any]:
    """The paper's table, as shipped in hybrid/data."""
    return json.loads((Path(__file__).parent / "data" / PAPER / "published.json").read_text())


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_mode(args: argparse.Namespace) -> str:
    """surrogate or real: as asked, else real where a GPU is found; --real without one is an error."""
    if args.real or not (args.surrogate or args.real):
        if has_gpu():
            return "real"
        if args.real:
            raise UserError("--real trains on GPUs and this machine has none: use --surrogate (the default here)")
    return "surrogate"


def plan(args: argparse.Namespace, mode: str) -> list[RunConfig]:
    storage = args.storage or default_storage(args.out)
    methods = list(FIXED_SPACE) + (list(LLM_METHODS[mode]) if args.llm not in (None, "none") else [])
    configs = [RunConfig(method=m, study=study_name(m, seed), storage=storage, seed=seed, budget_hours=PROTOCOL_HOURS,
                         objective="surrogate" if mode == "surrogate" else "train", profile="gpu",
                         llm=args.llm, llm_model=args.llm_model, llm_base_url=args.llm_base_url,
                         llm_max_usd=args.llm_max_usd,
                         vram_cap_gb=PAPER_CAP_GB if mode == "real" else None, sandbox=args.sandbox,
                         memory_model=False, pruner="none").finalize()  # the paper's protocol: failures run
               for m in methods for seed in range(args.seeds)]  # and cost their time; no trial is cut short
    check_existing(configs)
    return configs


def default_workers(mode: str) -> int:
    """Surrogate: one process per core. Real: one study per GPU."""
    if mode == "surrogate":
        return os.cpu_count() or 1
    import torch

    return max(1, torch.cuda.device_count())


# -- the paper beside ours --------------------------------------------------------------------------------

def agreement(methods: pd.DataFrame, paper: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of ours that the paper ran: both figures, and whether they agree.

    Best val_bpb agrees when the means differ by at most two standard errors of the difference
    (sqrt(std_paper^2 / 3 + std_ours^2 / n)); our failure rate agrees with the paper's OOM % (its share of failed
    trials) when within OOM_CLOSE_POINTS points or OOM_CLOSE_RELATIVE of it."""
    rows = []
    for ref in paper["rows"]:
        method = ref["ours"]
        if method is None or method not in methods.index:
            continue
        ours = methods.loc[method]
        ours_std = 0.0 if math.isnan(ours.best_std) else ours.best_std
        se = math.sqrt(ref["best_std"] ** 2 / PAPER_SEEDS + ours_std ** 2 / max(1, ours.n_seeds))
        diff = ours.best_mean - ref["best_mean"]
        failed_pct = 100 * ours.fail_rate
        rows.append({"method": method, "paper_method": ref["method"],
                     "paper_best_mean": ref["best_mean"], "paper_best_std": ref["best_std"], "paper_oom_pct": ref["oom_pct"],
                     "best_mean": ours.best_mean, "best_std": None if math.isnan(ours.best_std) else ours.best_std,
                     "failed_pct": failed_pct, "best_diff": diff, "best_diff_se": se,
                     "best_agrees": bool(abs(diff) <= 2 * se),
                     "failed_agrees": bool(abs(failed_pct - ref["oom_pct"]) <= max(OOM_CLOSE_POINTS, OOM_CLOSE_RELATIVE * ref["oom_pct"]))})
    return rows


def ordering(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Our methods from best to worst by mean best val_bpb, ours and the paper's."""
    ours = [r["method"] for r in sorted(rows, key=lambda r: r["best_mean"])]
    theirs = [r["method"] for r in sorted(rows, key=lambda r: r["paper_best_mean"])]
    return ours, theirs


def swaps(rows: list[dict[str, Any]], built: report.Report) -> str:
    """The pairs of methods that ours and the paper order differently, and whether our interval of their
    difference excludes zero (a real disagreement) or not (a swap within the noise of three seeds)."""
    ours, theirs = ordering(rows)
    notes = []
    for test in built.tests:
        if test.a not in ours or test.b not in ours:
            continue
        if (ours.index(test.a) < ours.index(test.b)) == (theirs.index(test.a) < theirs.index(test.b)):
            continue
        paper = {r["method"]: r["paper_best_mean"] for r in rows}
        within = test.ci_low is not None and test.ci_low <= 0 <= test.ci_high
        ci = "no interval (fewer than 2 seeds)" if test.ci_low is None else f"[{test.ci_low:+.4f}, {test.ci_high:+.4f}]"
        notes.append(f"{test.a} and {test.b} swap places: ours differ by {test.diff:+.4f}, 95 % interval {ci}"
                     f"{' (includes zero: within the noise)' if within else ''}; the paper's by "
                     f"{paper[test.a] - paper[test.b]:+.4f}")
    return ". ".join(notes) + "." if notes else ""


def random_verdict(built: report.Report) -> str:
    """Whether random is the worst method, and whether every interval of the difference excludes zero."""
    if "random" not in built.methods.index or len(built.methods) < 2:
        return ""
    worst = built.methods["best_mean"].idxmax()
    against = [t for t in built.tests if "random" in (t.a, t.b)]
    clear = [t for t in against if t.ci_low is not None and (t.ci_high < 0 if t.b == "random" else t.ci_low > 0)]
    text = f"Random is {'the worst' if worst == 'random' else 'not the worst'} of our methods (worst: {worst})"
    if against and any(t.ci_low is not None for t in against):
        text += (f"; the bootstrap interval of the difference excludes zero against {len(clear)} of {len(against)} "
                 f"other methods ({', '.join(t.a if t.b == 'random' else t.b for t in clear) or 'none'})")
    return text + "."


def comparison_markdown(rows: list[dict[str, Any]], built: report.Report, mode: str, elapsed: float,
                        workers: int) -> str:
    def mark(ok: bool) -> str:
        return "agrees" if ok else "differs"

    table = ["| method (paper's name) | paper: best val_bpb | ours | difference (± 2 SE) | agree? "
             "| paper: OOM | ours: failed | agree? |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = math.nan if r["best_std"] is None else r["best_std"]
        table.append(f"| {r['method']} ({r['paper_method']}) | {r['paper_best_mean']:.4f} ± {r['paper_best_std']:.4f} "
                     f"| {report.best_text(r['best_mean'], std)} | {r['best_diff']:+.4f} (± {2 * r['best_diff_se']:.4f}) "
                     f"| {mark(r['best_agrees'])} | {r['paper_oom_pct']:.0f} % | {r['failed_pct']:.1f} % | {mark(r['failed_agrees'])} |")
    ours, theirs = ordering(rows)
    same = ours == theirs
    lines = ["## The paper beside ours", "\n".join(table),
             f"Agreement rules: best val_bpb agrees when the means differ by at most two standard errors of the "
             f"difference (paper: 3 seeds; ours: {built.methods['n_seeds'].max()}); the failure rate when within "
             f"{OOM_CLOSE_POINTS:g} points or {100 * OOM_CLOSE_RELATIVE:g} % of the paper's. The paper's OOM % is its share "
             "of failed trials (almost all out of memory), so it is set beside our share of failed trials of any kind; "
             "the per-method table above splits out the OOMs.",
             f"Ordering, best first: ours {' < '.join(ours)}; the paper's {' < '.join(theirs)}: "
             f"{'the same' if same else 'different'}. {swaps(rows, built)} {random_verdict(built)}",
             f"This invocation ran in {elapsed / 60:.1f} minutes with {workers} process{'es' if workers > 1 else ''} "
             f"({mode} objective; a resumed run counts only what was left)."]
    if mode == "surrogate":
        lines.append("The surrogate is a model fitted on two of the paper's three seeds of real H200 trials "
                     "(hybrid.surrogate): agreement here checks the protocol and the samplers against the paper, "
                     "on a landscape learned from the paper's own trials; it is not an independent replication. "
                     "gp is not in the default set (Optuna's GPSampler takes seconds per trial at a few hundred "
                     "trials; see `hybrid.reproduce`), and LLM methods run only with --llm.")
    return "\n\n".join(lines)


def reproduce(args: argparse.Namespace) -> Path:
    """Run the protocol's studies (resumable), then the report with the paper's table beside ours."""
    mode = choose_mode(args)
    configs = plan(args, mode)
    workers = args.workers or default_workers(mode)
    print(f"hybrid: reproducing {PAPER} ({mode}): {len(configs)} studies of {PROTOCOL_HOURS:g} h, "
          f"{workers} at a time, storage {configs[0].storage}", file=sys.stderr)
    started = time.monotonic()
    run_studies(configs, workers)
    elapsed = time.monotonic() - started
    paper = published()
    references = {r["ours"]: r["best_mean"] for r in paper["rows"] if r["ours"]}
    names = [c.study for c in configs]
    rows: list[dict[str, Any]] = []

    def section(built: report.Report) -> str:
        rows.extend(agreement(built.methods, paper))
        return comparison_markdown(rows, built, mode, elapsed, workers)

    built = report.build(configs[0].storage, names, args.out, title=f"Reproduction of {PAPER} ({mode})",
                         extra=section, references=references)
    (Path(args.out) / "comparison.json").write_text(json.dumps({"mode": mode, "seconds": elapsed, "workers": workers,
                                                                "methods": rows}, indent=1) + "\n")
    print(f"hybrid: report written to {built.path}", file=sys.stderr)
    return built.path
