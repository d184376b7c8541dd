"""Harness overhead on the cpu profile: wall time of a trial outside its training budget (startup, eval, process).

    python benchmarks/overhead_cpu.py [--trials 5] [--train-py train.py]

Runs the trials of train.py at the cpu defaults of search_space.yaml one after another and writes
benchmarks/results/overhead_cpu.json (per trial and summary) and overhead_cpu.log (every trial's log).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--train-py", type=Path, default=ROOT / "train.py")
    args = parser.parse_args()
    profile = get_profile("cpu")
    prepare(profile)
    source = args.train_py.read_text()
    config = load_space(ROOT / "search_space.yaml", "cpu").defaults()
    RESULTS.mkdir(parents=True, exist_ok=True)
    trials = []
    with tempfile.TemporaryDirectory() as work, open(RESULTS / "overhead_cpu.log", "w") as log:
        for i in range(args.trials):
            load = os.getloadavg()[0]
            r = run_trial(source, config, profile, Path(work) / f"trial-{i}", seed=i)
            row = {k: getattr(r, k) for k in FIELDS} | {"overhead_seconds": r.total_seconds - r.training_seconds,
                                                       "load_average_before": load, "error": r.error}
            trials.append(row)
            line = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(f"trial {i}: {line}", flush=True)
            log.write(f"===== trial {i}: {line}\n{Path(r.log_path).read_text()}\n")
    ok = [t for t in trials if t["status"] == "ok"]

    def stats(key: str) -> dict:
        values = [t[key] for t in ok]
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)} if values else {}

    report = {
        "profile": profile.name, "time_budget": profile.time_budget, "config": config,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trials_ok": len(ok), "trials": trials,
        "summary": {k: stats(k) for k in ("overhead_seconds", "startup_seconds", "eval_seconds", "total_seconds",
                                          "training_seconds")},
    }
    (RESULTS / "overhead_cpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
