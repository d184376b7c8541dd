"""Per-trial overhead on the cpu profile, and the noise of identical trials.

    python benchmarks/overhead_cpu.py [--trials 5] [--concurrent 1] [--name overhead_cpu] [--train-py train.py]

Runs the same trial (train.py at the cpu defaults of search_space.yaml, seed 0) several times, `--concurrent` at
once (as the test suite's processes or `hybrid run --workers` on one machine run them; 1: one after another), and
writes benchmarks/results/NAME.json (per trial and summary), NAME.md (the table) and NAME.log (every trial's log).
Overhead is a trial's wall time outside its training budget; the phases say where it went (imports, data,
setup, eval, teardown). Run it on a quiet machine: the load average before each trial is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from harness.data import prepare
from harness.profiles import get_profile
from harness.runner import run_trial
from hybrid.space import load_space

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ("status", "val_bpb", "total_seconds", "training_seconds", "startup_seconds", "eval_seconds",
          "tokens_per_second", "num_steps", "peak_memory_mb")
PHASES = ("imports", "data", "setup", "training", "eval", "teardown")


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def markdown(report: dict, stem: str) -> str:
    s = report["summary"]
    rows = [f"| {name} | {s[name]['mean']:.2f} | {s[name]['min']:.2f} | {s[name]['max']:.2f} |"
            for name in ("total_seconds", "training_seconds", "overhead_seconds", *(f"phase_{p}" for p in PHASES))]
    loads = [t["load_average_before"] for t in report["trials"]]
    return "\n".join([
        "# Per-trial overhead on the cpu profile",
        "",
        f"Command: `python benchmarks/overhead_cpu.py --trials {len(report['trials'])} --concurrent "
        f"{report['concurrent']} --name {stem}`; {report['machine']['cpus']} cores, torch {report['machine']['torch']}, "
        f"measured {report['measured_at']}; load average before the trials {min(loads):.2f} to {max(loads):.2f}. "
        f"Raw output: {stem}.log, data: {stem}.json.",
        "",
        f"The same trial (cpu defaults, seed 0, {report['time_budget']:.0f} s training budget) run "
        f"{len(report['trials'])} times, {report['concurrent']} at once; {report['trials_ok']} succeeded.",
        "",
        "| seconds | mean | min | max |", "|---|---|---|---|", *rows,
        "",
        f"Overhead (wall time outside the training budget): {s['overhead_seconds']['mean']:.2f} s per trial, "
        f"{100 * s['overhead_seconds']['mean'] / s['total_seconds']['mean']:.1f} % of a trial.",
        "",
        f"Noise of identical trials: val_bpb {s['val_bpb']['mean']:.4f} ± {s['val_bpb']['std']:.4f} (std), range "
        f"{s['val_bpb']['min']:.4f} to {s['val_bpb']['max']:.4f}; steps {s['num_steps']['min']:.0f} to "
        f"{s['num_steps']['max']:.0f}. The seed is the same: the training budget is wall time, so the number of "
        "steps, and with it val_bpb, varies with the machine's speed from one trial to the next.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=1, help="trials run at once")
    parser.add_argument("--name", default="overhead_cpu", help="stem of the files written to benchmarks/results")
    parser.add_argument("--train-py", type=Path, default=ROOT / "train.py")
    args = parser.parse_args()
    profile = get_profile("cpu")
    prepare(profile)
    code = args.train_py.read_text()
    config = load_space(ROOT / "search_space.yaml", "cpu").defaults()
    RESULTS.mkdir(parents=True, exist_ok=True)
    trials = []

    def one(i: int) -> tuple[dict, str]:
        load = os.getloadavg()[0]
        r = run_trial(code, config, profile, Path(work) / f"trial-{i}", seed=0)
        row = {k: getattr(r, k) for k in FIELDS} | {"overhead_seconds": r.total_seconds - r.training_seconds,
                                                   "phases": r.phases, "load_average_before": load, "error": r.error}
        return row, Path(r.log_path).read_text()

    with (tempfile.TemporaryDirectory() as work, open(RESULTS / f"{args.name}.log", "w") as log,
          ThreadPoolExecutor(args.concurrent) as pool):
        for i, (row, trial_log) in enumerate(pool.map(one, range(args.trials))):
            trials.append(row)
            line = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if k != "phases")
            phases = " ".join(f"{k}={v:.2f}" for k, v in row["phases"].items())
            print(f"trial {i}: {line}\n  phases: {phases}", flush=True)
            log.write(f"===== trial {i}: {line}\n  phases: {phases}\n{trial_log}\n")
    ok = [t for t in trials if t["status"] == "ok"]
    summary = {k: summarize([t[k] for t in ok]) for k in ("val_bpb", "num_steps", "overhead_seconds",
                                                          "total_seconds", "training_seconds")}
    summary |= {f"phase_{p}": summarize([t["phases"].get(p, 0.0) for t in ok]) for p in PHASES}
    report = {
        "profile": profile.name, "time_budget": profile.time_budget, "config": config, "concurrent": args.concurrent,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trials_ok": len(ok), "trials": trials,
        "summary": summary,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(report, args.name))
    print(markdown(report, args.name))


if __name__ == "__main__":
    main()
