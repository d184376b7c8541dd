"""Sampler time per trial as the history grows (TPE, CMA-ES, GP), and a whole 24-hour protocol end to end.

    python benchmarks/sampler_time.py [--trials 1000] [--gp-trials 100] [--skip-protocol]

1. Each sampler, built as `hybrid run` builds it (hybrid.classical.samplers.make_sampler, seed 0, the gpu space
   of search_space.yaml), proposes configs one after another in an in-memory study (no database cost), told the
   surrogate objective's results (failures as val_bpb 100). Timed: `study.ask` with the space's distributions,
   i.e. the sampler's work for one trial, in wall and CPU seconds. Reported at the trials just below 100 and
   1,000 (the mean over the 10 trials before). GP is capped (--gp-trials): each of its trials takes seconds.
2. `hybrid run --method tpe --objective surrogate --budget-hours 24` pinned to one core (taskset -c 0), as it is
   (the memory model on) and with --no-memory-model: CPU and wall seconds, trials. The goal: well under a minute
   of CPU. (tests/test_loop.py checks what such a run records, not how long it takes.)

Writes benchmarks/results/sampler_time.{json,md} and sampler_time.log (every timed trial, and the run's output).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import optuna

from hybrid.classical.samplers import make_sampler
from hybrid.paths import PROJECT_ROOT
from hybrid.space import load_space
from hybrid.surrogate import SurrogateTrials

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
AT = (100, 1000)  # report the sampler time per trial at these history sizes
WINDOW = 10


def time_sampler(name: str, trials: int, objective: SurrogateTrials, log: list[str]) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of `ask` for each trial of a run of `trials` trials."""
    space = load_space(PROJECT_ROOT / "search_space.yaml", "gpu")
    study = optuna.create_study(sampler=make_sampler(name, 0, x0=space.defaults()))
    study.enqueue_trial(space.defaults())
    distributions, times = space.distributions(), []
    for number in range(trials):
        wall, cpu = time.perf_counter(), time.process_time()
        trial = study.ask(distributions)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        result = objective.evaluate(trial.params, seed=0, trial_number=number)
        study.tell(trial, result.objective)
        log.append(f"{name} trial {number} ask_wall_s {times[-1][0]:.5f} ask_cpu_s {times[-1][1]:.5f} "
                   f"status {result.status} value {result.objective:.4f}")
        if number % 100 == 99 or name == "gp":
            print(log[-1], file=sys.stderr, flush=True)
    return times


def at(times: list[tuple[float, float]], n: int) -> dict[str, float] | None:
    """Mean (wall, cpu) over the WINDOW trials before trial n, if the run got that far."""
    if len(times) < n:
        return None
    window = times[n - WINDOW:n]
    return {"trials": n, "wall_s": sum(w for w, _ in window) / WINDOW, "cpu_s": sum(c for _, c in window) / WINDOW}


def protocol(log: list[str], *flags: str) -> dict[str, Any]:
    """The 24-hour TPE protocol on the surrogate, one core, through the command line."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    command = ["run", "--method", "tpe", "--objective", "surrogate", "--budget-hours", "24", "--study", "p24", *flags]
    with tempfile.TemporaryDirectory() as tmp:
        before, started = os.times(), time.perf_counter()
        done = subprocess.run([*pin, sys.executable, "-m", "hybrid.cli", *command], cwd=tmp, capture_output=True,
                              text=True, check=True)
        wall, after = time.perf_counter() - started, os.times()
        study = optuna.load_study(study_name="p24", storage=f"sqlite:///{tmp}/runs/hybrid.db")
        trials = study.get_trials()
    log += [f"--- hybrid {' '.join(command)} (stderr)", done.stderr]
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return {"command": f"hybrid {' '.join(command)}", "pinned": " ".join(pin), "cpu_s": round(cpu, 1),
            "wall_s": round(wall, 1), "trials": len(trials),
            "failed": sum(t.user_attrs["status"] != "ok" for t in trials),
            "trial_hours": round(sum(t.user_attrs["total_seconds"] for t in trials) / 3600, 2),
            "best_val_bpb": round(min(t.value for t in trials), 4)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Sampler time per trial", "",
             f"Command: `{' '.join(['python benchmarks/sampler_time.py', *result['args']])}`. "
             f"Raw timings: {result['name']}.log.",
             f"Machine: {result['machine']}.", "",
             "Time of `study.ask` (the sampler's work for one trial, 14-knob gpu space, in-memory storage), mean of "
             f"the {WINDOW} trials before the given history size:", "",
             "| sampler | trials | wall s/trial | CPU s/trial |", "|---|---|---|---|"]
    for name, points in result["samplers"].items():
        for n in AT:
            point = next((p for p in points["at"] if p["trials"] == n), None)
            if point is None:
                lines.append(f"| {name} | {n} | not measured (capped at {points['trials']} trials) | |")
            else:
                lines.append(f"| {name} | {n} | {point['wall_s']:.4f} | {point['cpu_s']:.4f} |")
        if points["trials"] not in AT:
            last = at(points["times"], points["trials"])
            lines.append(f"| {name} | {points['trials']} (cap) | {last['wall_s']:.4f} | {last['cpu_s']:.4f} |")
    lines += ["", "GP is capped (--gp-trials): its time per trial grows with the history (fitting the GP and "
              "optimizing the acquisition function), so 1,000 trials would take hours here; TPE and CMA-ES run to "
              "--trials.",
              "", "Whole runs: " + ", ".join(f"{k} {v['trials']} trials in {v['total_wall_s']:.0f} s wall"
                                              for k, v in result["samplers"].items()), ""]
    if result.get("protocol"):
        lines += ["## The 24-hour protocol on the surrogate, one core", "",
                  "Wall time depends on the load of the machine (shared); CPU time is the cost of the run.", "",
                  "| command | CPU s | wall s | trials | failed | GPU-hours of trials | best val_bpb |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| `{p['command']}` ({p['pinned'] or 'not pinned'}) | **{p['cpu_s']}** | {p['wall_s']} | "
                  f"{p['trials']} | {p['failed']} | {p['trial_hours']} | {p['best_val_bpb']} |"
                  for p in result["protocol"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--gp-trials", type=int, default=100, help="GP takes seconds per trial: its cap")
    parser.add_argument("--skip-protocol", action="store_true")
    parser.add_argument("--samplers", default="tpe,cmaes,gp", help="comma-separated subset")
    parser.add_argument("--name", default="sampler_time", help="results file names: NAME.{md,json,log}")
    args = parser.parse_args()
    import torch

    objective, log = SurrogateTrials(), []
    result: dict[str, Any] = {"args": sys.argv[1:], "name": args.name, "samplers": {},
                              "machine": f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                                         f"load average at start {os.getloadavg()[0]:.1f}"}
    caps = {"tpe": args.trials, "cmaes": args.trials, "gp": min(args.gp_trials, args.trials)}
    for name, trials in ((n, caps[n]) for n in args.samplers.split(",")):
        started = time.perf_counter()
        times = time_sampler(name, trials, objective, log)
        result["samplers"][name] = {"trials": trials, "total_wall_s": time.perf_counter() - started, "times": times,
                                    "at": [p for n in AT if (p := at(times, n))]}
    if not args.skip_protocol:
        result["protocol"] = [protocol(log), protocol(log, "--no-memory-model")]
    result["machine"] += f", at the end {os.getloadavg()[0]:.1f}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.log").write_text("\n".join(log) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    summary = {**result, "samplers": {k: {kk: vv for kk, vv in v.items() if kk != "times"}
                                      for k, v in result["samplers"].items()}}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
