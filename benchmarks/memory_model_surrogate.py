"""The memory model on the surrogate objective: the 24 h protocol of random, tpe and cmaes, with and without it.

    python benchmarks/memory_model_surrogate.py [--methods random,tpe,cmaes] [--seeds 3] [--workers 2]
                                                [--budget-hours 24] [--out DIR]

Each (method, seed) runs twice through hybrid.loop.run on the surrogate objective (gpu profile, 24 GPU-hours):
without the memory model every config is evaluated, and the surrogate's failure model stands in for the GPU
(out of memory with its p_fail, after the seconds its failure cost says); with it, a config predicted over the
paper's cap (76 GiB) is recorded as `oom-predicted` at zero cost and never evaluated. Reported per run and per
method: the share of the budget spent on failed trials, the rates of real and predicted OOMs, and the best
val_bpb (observed, and the surrogate's noise-free value of that config). Goal: under 2 % of the budget wasted
with the memory model, and no method worse off.

The memory model stands in front of the objective as the loop wires it (hybrid.objectives.MemoryGuarded): it
checks the config the surrogate runs (snapped as the paper's runner did: HEAD_DIM, DEVICE_BATCH_SIZE and
TOTAL_BATCH_SIZE to powers of two).
Writes OUT/memory_model_surrogate.{json,md,log} (OUT: benchmarks/results).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch

import hybrid.config
import hybrid.loop
from harness.profiles import get_profile
from hybrid import surrogate
from hybrid.study import store
from hybrid.memory import MemoryModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "memory_model_surrogate"
GOAL_WASTED = 0.02
SOURCE = (ROOT / "train.py").read_text()


def one_run(task: tuple[str, int, bool, float, str]) -> dict[str, Any]:
    method, seed, memory_on, hours, work_dir = task
    name = f"{method}-seed{seed}-{'memory' if memory_on else 'plain'}"
    storage = f"sqlite:///{work_dir}/{name}.db"
    config = hybrid.config.RunConfig(method=method, study=name, storage=storage, seed=seed, objective="surrogate",
                                   profile="gpu", memory_model=memory_on, budget_hours=hours,
                                   artifacts=f"{work_dir}/{name}")
    t0 = time.perf_counter()
    progress = io.StringIO()
    with contextlib.redirect_stderr(progress):
        hybrid.loop.run(config)
    study = optuna.load_study(study_name=name, storage=store.open_storage(storage))
    calibration = MemoryModel(get_profile("gpu")).calibration(SOURCE, study.get_trials(deepcopy=False))
    return summarize(study, method, seed, memory_on) | {"calibration_at_end": calibration,
                                                        "seconds": time.perf_counter() - t0,
                                                        "progress": progress.getvalue()}


def summarize(study: optuna.Study, method: str, seed: int, memory_on: bool) -> dict[str, Any]:
    trials = store.finished_trials(study)
    status = [t.user_attrs["status"] for t in trials]
    seconds = np.array([float(t.user_attrs.get("total_seconds") or 0.0) for t in trials])
    failed = np.array([s != "ok" for s in status])
    ok = [t for t, s in zip(trials, status) if s == "ok"]
    best = min(ok, key=lambda t: t.user_attrs["val_bpb"])
    expected = float(surrogate.load_surrogate().predict(pd.DataFrame([best.params]))["val_bpb_pred"].iloc[0])
    evaluated = len(trials) - status.count("oom-predicted")
    return {
        "method": method, "seed": seed, "memory_model": memory_on, "trials": len(trials),
        "ok": len(ok), "oom": status.count("oom"), "oom_predicted": status.count("oom-predicted"),
        "other_failures": int(failed.sum()) - status.count("oom") - status.count("oom-predicted"),
        "hours": float(seconds.sum() / 3600), "failed_hours": float(seconds[failed].sum() / 3600),
        "wasted_share": float(seconds[failed].sum() / seconds.sum()),
        "oom_rate_evaluated": status.count("oom") / max(1, evaluated),
        "failed_rate_all": float(failed.mean()),
        "best_val_bpb": float(best.user_attrs["val_bpb"]), "best_expected_val_bpb": expected,
        "best_trial": best.number, "best_config": surrogate.runs_as(best.params),
    }


def aggregate(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        for memory_on in (False, True):
            group = [r for r in runs if r["method"] == method and r["memory_model"] == memory_on]
            row = {"method": method, "memory_model": memory_on, "seeds": len(group)}
            for key in ("wasted_share", "oom_rate_evaluated", "failed_rate_all", "best_val_bpb",
                        "best_expected_val_bpb", "trials", "oom", "oom_predicted"):
                values = [r[key] for r in group]
                row[key] = statistics.mean(values)
                row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def verdict(summary: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Wasted share under the goal with the memory model; no method's mean best val_bpb worse by more than the
    spread of its seeds (the larger standard deviation of the two arms)."""
    out = {}
    for method in methods:
        plain, memory = (next(r for r in summary if r["method"] == method and r["memory_model"] == on)
                         for on in (False, True))
        delta = memory["best_val_bpb"] - plain["best_val_bpb"]
        spread = max(plain["best_val_bpb_sd"], memory["best_val_bpb_sd"])
        out[method] = {"wasted_under_goal": memory["wasted_share"] < GOAL_WASTED, "best_delta": delta,
                       "seed_spread": spread, "not_worse": delta <= spread}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="random,tpe,cmaes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-hours", type=float, default=24.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as work_dir, open(args.out / f"{NAME}.log", "w") as log:
        tasks = [(m, s, on, args.budget_hours, work_dir)
                 for m in methods for s in range(args.seeds) for on in (False, True)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(one_run, tasks):
                line = (f"{r['method']} seed {r['seed']} memory_model={r['memory_model']}: {r['trials']} trials, "
                        f"ok {r['ok']}, oom {r['oom']}, oom-predicted {r['oom_predicted']}, "
                        f"other failures {r['other_failures']}, {r['hours']:.2f} h, failed {r['failed_hours']:.3f} h "
                        f"({100 * r['wasted_share']:.2f} %), best val_bpb {r['best_val_bpb']:.5f} "
                        f"(expected {r['best_expected_val_bpb']:.5f}), calibration at the end "
                        f"{r['calibration_at_end']}, {r['seconds']:.0f} s")
                print(line, flush=True)
                log.write(f"===== {line}\n{r.pop('progress')}\n")
                log.flush()
                runs.append(r)
    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"], r["memory_model"]))
    summary = aggregate(runs, methods)
    report = {
        "protocol": f"surrogate objective, gpu profile, {args.budget_hours:g} GPU-hours per run, cap 76 GiB (the paper's)",
        "goal": {"wasted_share_below": GOAL_WASTED, "no_method_worse_off": True},
        "summary": summary, "verdict": verdict(summary, methods), "runs": runs,
        "seconds": time.perf_counter() - t0,
        "code": {path: store.code_sha((ROOT / path).read_text())
                 for path in ("train.py", "hybrid/memory.py", "hybrid/surrogate.py", "hybrid/loop.py")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "optuna": optuna.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{NAME}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Memory model on the surrogate objective: protocols with and without it",
        "",
        f"Protocol: {r['protocol']}; seeds {sorted({run['seed'] for run in r['runs']})}. The surrogate's failure "
        "model stands in for the GPU. Produced by `python benchmarks/memory_model_surrogate.py` "
        "(log: memory_model_surrogate.log).",
        "",
        "Mean ± sd over seeds. Wasted: share of the budget's wall time spent on failed trials. OOM rate: real "
        "(surrogate) out-of-memory failures per evaluated trial. Refused: trials recorded `oom-predicted` (no cost).",
        "",
        "| method | memory model | wasted | OOM rate | refused / run | trials / run | best val_bpb | best, noise-free |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["summary"]:
        lines.append(
            f"| {s['method']} | {'on' if s['memory_model'] else 'off'} | "
            f"{100 * s['wasted_share']:.2f} ± {100 * s['wasted_share_sd']:.2f} % | "
            f"{100 * s['oom_rate_evaluated']:.1f} ± {100 * s['oom_rate_evaluated_sd']:.1f} % | "
            f"{s['oom_predicted']:.0f} | {s['trials']:.0f} | "
            f"{s['best_val_bpb']:.4f} ± {s['best_val_bpb_sd']:.4f} | "
            f"{s['best_expected_val_bpb']:.4f} ± {s['best_expected_val_bpb_sd']:.4f} |")
    lines += ["", "Verdict (goal: wasted < 2 % with the memory model; best val_bpb not worse than without it by more "
              "than the spread of the seeds):", ""]
    for method, v in r["verdict"].items():
        lines.append(f"- {method}: wasted under goal: {v['wasted_under_goal']}; best val_bpb change "
                     f"{v['best_delta']:+.4f} (seed spread {v['seed_spread']:.4f}): "
                     f"{'not worse' if v['not_worse'] else 'WORSE'}")
    lines += ["", "## Runs", "", "| method | seed | memory model | trials | ok | oom | refused | wasted | best val_bpb |",
              "|---|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        lines.append(f"| {run['method']} | {run['seed']} | {'on' if run['memory_model'] else 'off'} | {run['trials']} | "
                     f"{run['ok']} | {run['oom']} | {run['oom_predicted']} | {100 * run['wasted_share']:.2f} % | "
                     f"{run['best_val_bpb']:.5f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
