"""How well an early val_bpb predicts the final one: real trials on the cpu profile, intermediate evaluations at
many fractions of the budget.

    python benchmarks/pruning_correlation.py [--configs 48] [--seed 0] [--out benchmarks/results]

Draws configurations at random from search_space.yaml (the cpu profile's ranges; the defaults first), runs
each once (seed 0) with intermediate evaluations at FRACTIONS of the budget that stop nothing, and appends one
JSON line per trial to OUT/pruning_correlation.jsonl as it ends (a rerun skips the configurations already there,
so an interrupted run continues). benchmarks/pruning_analysis.py turns the lines into the tables of pruning.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optuna

from harness.profiles import get_profile
from harness.runner import run_trial
from hybrid.objectives import ensure_prepared
from hybrid.space import load_space

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LOG_NAME = "pruning_correlation.jsonl"
FIELDS = ("status", "val_bpb", "error", "intermediate", "total_seconds", "training_seconds", "eval_seconds",
          "num_steps", "tokens_per_second", "phases")


def configs(n: int, seed: int) -> list[dict]:
    """The defaults, then n - 1 configurations drawn uniformly from the cpu profile's search space."""
    space = load_space(ROOT / "search_space.yaml", "cpu")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = [study.ask(space.distributions()).params for _ in range(n - 1)]
    return [space.defaults(), *drawn]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="of the random draw of configurations")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    profile = get_profile("cpu")
    ensure_prepared(profile)
    log = args.out / LOG_NAME
    done = {json.dumps(json.loads(line)["config"], sort_keys=True) for line in log.read_text().splitlines()
            if line.strip()} if log.exists() else set()
    code = (ROOT / "train.py").read_text()
    for index, config in enumerate(configs(args.configs, args.seed)):
        if json.dumps(config, sort_keys=True) in done:
            continue
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as folder:
            result = run_trial(code, config, profile, Path(folder), seed=0, report=lambda f, v: False,
                               fractions=FRACTIONS)
        line = {"index": index, "config": config, "load_average_before": load, "finished_at": time.time(),
                **{k: getattr(result, k) for k in FIELDS}}
        with log.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{index:3d} {result.status:8s} val_bpb {result.val_bpb or float('nan'):.4f} "
              f"intermediate {[round(v, 3) for _, v in result.intermediate]} {result.total_seconds:.1f}s "
              f"load {load:.1f}", flush=True)


if __name__ == "__main__":
    main()
