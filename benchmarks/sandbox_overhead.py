"""The cost of the trust split and of the OS sandbox, per trial, against the unsplit harness it replaced.

    python benchmarks/sandbox_overhead.py [--rounds 3] [--profile cpu] [--unsplit-commit 27648cf]

Runs the same trial (train.py at the profile's defaults of search_space.yaml, seed 0) in rounds, each round once
per variant, interleaved so that a change of the machine's load touches all alike:

    unsplit   the harness before the split (git commit --unsplit-commit, unpacked to a temporary folder): train.py
              and evaluate_bpb in one process, no sandbox
    split     this harness with --sandbox off: training and two evaluation processes, trusted scorer, no bubblewrap
    sandboxed this harness with --sandbox required: the same in bubblewrap

Writes benchmarks/results/sandbox_overhead.json, .md (the table) and .log (every trial's log). Overhead is a
trial's wall time outside its training budget; tokens/s is what the training clock saw.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

from harness.data import prepare
from harness.profiles import get_profile
from harness.runner import run_trial
from hybrid.space import load_space

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("unsplit", "split", "sandboxed")
UNSPLIT_TRIAL = """
import json, sys
from pathlib import Path
from harness.profiles import get_profile
from harness.runner import run_trial
r = run_trial(Path(sys.argv[1]).read_text(), json.loads(sys.argv[2]), get_profile(sys.argv[3]), Path(sys.argv[4]), seed=0)
print(json.dumps(r.to_dict()))
"""


def unpack(commit: str, dest: Path) -> Path:
    """The project at `commit`, as files (git archive), for the unsplit harness."""
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def unsplit_trial(old: Path, train_py: Path, config: dict, profile: str, trial_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(old)}
    done = subprocess.run([sys.executable, "-c", UNSPLIT_TRIAL, str(train_py), json.dumps(config), profile,
                           str(trial_dir)], cwd=old, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def markdown(report: dict) -> str:
    s = report["summary"]
    base = s["unsplit"]
    lines = [
        "# The cost of the trust split and of the sandbox, per trial",
        "",
        f"Command: `python benchmarks/sandbox_overhead.py --rounds {report['rounds']} --profile {report['profile']}`; "
        f"{report['machine']['cpus']} cores, torch {report['machine']['torch']}, measured {report['measured_at']}; "
        f"the unsplit harness is commit {report['unsplit_commit']}. Raw output: sandbox_overhead.log, data: "
        "sandbox_overhead.json. Means over the rounds (min to max).",
        "",
        "| variant | ok | total s | overhead s | eval s | startup s | tokens/s | val_bpb |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        m = s[v]

        def cell(key: str, fmt: str = ".2f") -> str:
            return f"{m[key]['mean']:{fmt}} ({m[key]['min']:{fmt}} to {m[key]['max']:{fmt}})" if key in m else "-"

        lines.append(f"| {v} | {m['ok']}/{report['rounds']} | {cell('total_seconds')} | {cell('overhead_seconds')} | "
                     f"{cell('eval_seconds')} | {cell('startup_seconds')} | {cell('tokens_per_second', ',.0f')} | "
                     f"{cell('val_bpb', '.4f')} |")
    if all("overhead_seconds" in s[v] for v in VARIANTS):
        lines += ["", "Against the unsplit harness: " + "; ".join(
            f"{v} {s[v]['overhead_seconds']['mean'] - base['overhead_seconds']['mean']:+.2f} s overhead per trial, "
            f"tokens/s {100 * (s[v]['tokens_per_second']['mean'] / base['tokens_per_second']['mean'] - 1):+.1f} %, "
            f"eval {s[v]['eval_seconds']['mean'] - base['eval_seconds']['mean']:+.2f} s"
            for v in VARIANTS[1:]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--unsplit-commit", default="27648cf")
    args = parser.parse_args()
    profile = get_profile(args.profile)
    prepare(profile, log=lambda line: None)
    train_py = ROOT / "train.py"
    config = load_space(ROOT / "search_space.yaml", profile.name).defaults()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as work, open(RESULTS / "sandbox_overhead.log", "w") as log:
        old = unpack(args.unsplit_commit, Path(work) / "unsplit")
        for i in range(args.rounds):
            for v in VARIANTS:
                trial_dir = Path(work) / f"{v}-{i}"
                if v == "unsplit":
                    r = unsplit_trial(old, train_py, config, profile.name, trial_dir)
                else:
                    r = run_trial(train_py.read_text(), config, profile, trial_dir, seed=0,
                                  sandbox="required" if v == "sandboxed" else "off").to_dict()
                r["overhead_seconds"] = r["total_seconds"] - r["training_seconds"]
                r["load_average_before"] = os.getloadavg()[0]
                rows[v].append(r)
                line = (f"round {i} {v}: status={r['status']} val_bpb={r['val_bpb']} total={r['total_seconds']:.2f} "
                        f"overhead={r['overhead_seconds']:.2f} eval={r['eval_seconds']:.2f} "
                        f"tokens/s={r['tokens_per_second'] or 0:,.0f} phases={json.dumps(r['phases'])}")
                print(line, flush=True)
                log.write(f"===== {line}\n{Path(r['log_path']).read_text()}\n")
    summary = {}
    for v, trials in rows.items():
        ok = [t for t in trials if t["status"] == "ok"]
        summary[v] = {"ok": len(ok)} | {k: summarize([t[k] for t in ok]) for k in (
            "total_seconds", "overhead_seconds", "eval_seconds", "startup_seconds", "tokens_per_second", "val_bpb")
            if ok}
    report = {"profile": profile.name, "rounds": args.rounds, "unsplit_commit": args.unsplit_commit, "config": config,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trials": rows, "summary": summary}
    (RESULTS / "sandbox_overhead.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "sandbox_overhead.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
