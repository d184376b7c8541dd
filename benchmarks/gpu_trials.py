"""The gpu profile on a real GPU: throughput and overhead at the default config, how fast a real out-of-memory
error ends a trial, and the memory model's error on real peaks.

    python benchmarks/gpu_trials.py [--trials 3] [--memory-configs 12] [--memory-seconds 10]
                                    [--source climbmix|builtin|PATH] [--eval-tokens N] [--profile gpu]

1. `--trials` trials at the defaults of search_space.yaml: tokens/s, MFU, and where the wall time outside the
   300 s budget goes (phases). Goals on an H100: at least the reference's 499.6 M tokens in 300 s (MFU 39.8 %),
   at most 10 s of overhead (the reference: 25.8 s).
2. One config far over the GPU's memory, run without the memory model: its status and the wall time until the
   trial was over (goal: `oom` in under 10 s).
3. `--memory-configs` random configs of the space, each trained for `--memory-seconds` (the peak is reached in the
   first steps and the evaluation): recorded peak against the memory model's uncalibrated estimate (goal: within
   10 %).

`--source builtin --eval-tokens 49152` runs it without network on the bundled corpus: its validation split
(about 60 k tokens) is far smaller than the profile's 21 M, and training loops over its 1.6 M tokens.
Writes OUT/gpu_trials.{json,md,log} (--out, default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch

from harness.data import prepare
from harness.profiles import Profile, get_profile
from harness.result import TrialResult
from harness.runner import run_trial
from hybrid.memory import MemoryModel
from hybrid.space import load_space

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "gpu_trials"
OOM_CONFIG = {"DEPTH": 24, "ASPECT_RATIO": 128, "HEAD_DIM": 128, "DEVICE_BATCH_SIZE": 256, "TOTAL_BATCH_SIZE": 2097152}


def random_configs(space_path: Path, profile: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configs drawn uniformly from the space (as the random method would)."""
    distributions = load_space(space_path, profile).distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(distributions).params for _ in range(n)]


def row(result: TrialResult) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("status", "val_bpb", "error", "total_seconds", "training_seconds",
                                            "startup_seconds", "eval_seconds", "tokens_per_second", "mfu",
                                            "peak_memory_mb", "num_params", "num_steps", "phases", "config")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu")
    parser.add_argument("--source", default=None, help="data source (default: the profile's)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="validation tokens (a small corpus needs fewer)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--memory-configs", type=int, default=12)
    parser.add_argument("--memory-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    profile = get_profile(args.profile)
    if args.eval_tokens:
        profile = replace(profile, eval_tokens=args.eval_tokens)
    prepare(profile, args.source)
    source = (ROOT / "train.py").read_text()
    space_path = ROOT / "search_space.yaml"
    defaults = load_space(space_path, profile.name).defaults()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"profile": profile.name, "source": args.source or profile.source,
                              "eval_tokens": profile.eval_tokens, "device": _device(),
                              "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as work, open(args.out / f"{NAME}.log", "w") as log:
        def trial(label: str, config: dict[str, Any], prof: Profile) -> dict[str, Any]:
            result = run_trial(source, config, prof, Path(work) / label, seed=0)
            out = row(result)
            line = (f"{label}: {result.status} val_bpb={result.val_bpb} total={result.total_seconds:.1f}s "
                    f"training={result.training_seconds:.1f}s tok/s={result.tokens_per_second} mfu={result.mfu} "
                    f"peak={result.peak_memory_mb} MiB phases={json.dumps(result.phases)} error={result.error}")
            print(line, flush=True)
            log.write(f"===== {line}\n{Path(result.log_path).read_text()}\n")
            log.flush()
            return out

        baseline = [trial(f"default-{i}", defaults, profile) for i in range(args.trials)]
        report["default_trials"] = baseline
        ok = [t for t in baseline if t["status"] == "ok"]
        if ok:
            report["default_summary"] = {
                key: statistics.median(t[key] for t in ok if t[key] is not None)
                for key in ("tokens_per_second", "mfu", "total_seconds", "training_seconds")
                if any(t[key] is not None for t in ok)} | {
                "overhead_seconds": statistics.median(t["total_seconds"] - t["training_seconds"] for t in ok)}
        report["oom_trial"] = trial("oom", {**defaults, **OOM_CONFIG}, profile) if torch.cuda.is_available() else None

        model, short = MemoryModel(profile), replace(profile, time_budget=args.memory_seconds)
        memory = []
        for i, config in enumerate(random_configs(space_path, profile.name, args.memory_configs)):
            t = trial(f"memory-{i}", config, short)
            t["estimate_mb"] = model.estimate_mb(source, t["config"] or config)
            memory.append(t)
        report["memory_trials"] = memory
        errors = [t["estimate_mb"] / t["peak_memory_mb"] - 1 for t in memory
                  if t["status"] == "ok" and t["peak_memory_mb"] and t["estimate_mb"]]
        report["memory_error"] = {"n": len(errors), "median_abs": statistics.median(map(abs, errors)),
                                  "max_abs": max(map(abs, errors)), "mean": statistics.mean(errors)} if errors else None
    report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / f"{NAME}.md").write_text(markdown(report))
    print(markdown(report))


def _device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA: peaks are process RSS)"


def markdown(r: dict[str, Any]) -> str:
    lines = ["# The gpu profile on a GPU", "",
             f"Device: {r['device']}; profile {r['profile']}, data {r['source']}, {r['eval_tokens']:,} validation "
             f"tokens; torch {r['machine']['torch']}; measured {r['measured_at']}. Produced by "
             f"`python benchmarks/gpu_trials.py` (log: {NAME}.log, data: {NAME}.json).", ""]
    s = r.get("default_summary")
    if s:
        mfu = f"{100 * s['mfu']:.1f} %" if s.get("mfu") is not None else "n/a"
        lines += [f"- Default config, median of {len(r['default_trials'])} trials: "
                  f"{s.get('tokens_per_second', 0):,.0f} tokens/s ({s.get('tokens_per_second', 0) * 300 / 1e6:.1f} M "
                  f"tokens in 300 s; reference 499.6 M), MFU {mfu} (reference 39.8 %), overhead "
                  f"{s['overhead_seconds']:.1f} s per trial (goal <= 10 s; reference 25.8 s)."]
        phases = r["default_trials"][0]["phases"] or {}
        lines += ["  Phases of the first trial (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())]
    oom = r.get("oom_trial")
    if oom:
        lines += [f"- A config far over memory ({OOM_CONFIG}): status `{oom['status']}` after "
                  f"{oom['total_seconds']:.1f} s of wall time (goal: `oom` in under 10 s). {oom['error']}"]
    e = r.get("memory_error")
    if e:
        lines += [f"- Memory model, uncalibrated, on {e['n']} random configs: median |error| "
                  f"{100 * e['median_abs']:.1f} %, max {100 * e['max_abs']:.1f} %, mean (signed) "
                  f"{100 * e['mean']:+.1f} % (goal: within 10 %)."]
    lines += ["", "| trial | status | peak MiB | estimate MiB | error |", "|---|---|---|---|---|"]
    for i, t in enumerate(r["memory_trials"]):
        err = (f"{100 * (t['estimate_mb'] / t['peak_memory_mb'] - 1):+.1f} %"
               if t["status"] == "ok" and t["peak_memory_mb"] and t["estimate_mb"] else "-")
        peak = f"{t['peak_memory_mb']:.0f}" if t["peak_memory_mb"] else "-"
        estimate = f"{t['estimate_mb']:.0f}" if t["estimate_mb"] else "-"
        lines.append(f"| memory-{i} | {t['status']} | {peak} | {estimate} | {err} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
