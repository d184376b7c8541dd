"""Fresh re-runs of every study's best trial, all under one load: a head-to-head read without the winner's curse
(a best is the lowest of many noisy measurements) or the load each study happened to run under.

    HYBRID_TRIAL_THREADS=1 python benchmarks/rerun_best.py --storage sqlite:///DIR/hybrid.db --out DIR \
        [--repeats 3] [--concurrent 2]

For each study of the storage (as `hybrid compare` names them: METHOD-sSEED), the train.py of its best successful
trial (its generation's code with the trial's knob values, as `hybrid best --export` writes it), and once the
project's train.py at the space's defaults (the baseline), run `--repeats` times on seeds no study used
(RERUN_SEED + k), `--concurrent` at once, round by round through every study so that a drift of the machine's
speed falls on all methods alike; methods are compared pairwise by seed as `hybrid compare`'s report does. Writes DIR/rerun_best.json (every re-run), rerun_best.md (the tables) and
rerun_best.log (every re-run's trial log).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna

from harness.profiles import get_profile
from harness.runner import run_trial
from hybrid.reports import results
from hybrid.reports.report import pairwise_markdown
from hybrid.reports.stats import pairwise
from hybrid.space import load_space
from hybrid.study import records, store

ROOT = Path(__file__).resolve().parents[1]
RERUN_SEED = 10_000  # far above the seeds a study gives its trials
BASELINE = "baseline"


def best_codes(url: str) -> tuple[dict[str, dict], str]:
    """Per study: method, seed, best trial, its recorded val_bpb and train.py; and the studies' profile."""
    studies, profiles = {}, set()
    summaries = optuna.get_all_study_summaries(results.open_storage(url), include_best_trial=False)
    for summary in sorted(summaries, key=lambda s: s.study_name):
        study = results.open_study(url, summary.study_name)
        info = study.user_attrs.get(store.RUN_KEY) or {}
        best = results.best_trials(study, 1)[0]
        studies[study.study_name] = {"method": info["method"], "seed": info["seed"], "trial": best.number,
                                     "recorded": records.ok_value(best), "code": results.trial_code(study, best)}
        profiles.add(info["profile"])
    if len(profiles) != 1:
        raise SystemExit(f"rerun_best: the studies ran on different profiles ({', '.join(sorted(profiles))})")
    return studies, profiles.pop()


def markdown(report: dict) -> str:
    studies, reruns = report["studies"], report["reruns"]
    fresh = {name: [r["val_bpb"] for r in reruns if r["study"] == name and r["status"] == "ok"]
             for name in [*studies, BASELINE]}
    mean = {name: statistics.mean(v) if v else float("nan") for name, v in fresh.items()}
    lines = ["# Fresh re-runs of each study's best trial", "",
             f"Command: `HYBRID_TRIAL_THREADS={report['threads']} python benchmarks/rerun_best.py --storage "
             f"{report['storage']} --repeats {report['repeats']} --concurrent {report['concurrent']}`; "
             f"{report['profile']} profile, measured {report['measured_at']} ({report['seconds'] / 60:.1f} min); "
             f"load average before the re-runs {min(r['load'] for r in reruns):.2f} to "
             f"{max(r['load'] for r in reruns):.2f}. "
             "Raw output: rerun_best.log (every re-run's trial log), data: rerun_best.json.", "",
             f"Each study's best trial, and the baseline, trained {report['repeats']} more times on seeds no study "
             f"used, {report['concurrent']} at once, round by round through all of them: every value below was "
             "measured under the same load.", "",
             "| study | method | seed | best trial | recorded val_bpb | fresh re-runs (mean ± std) | fresh − recorded "
             "|",
             "|---|---|---|---|---|---|---|"]
    for name, s in studies.items():
        v = fresh[name]
        spread = f"{mean[name]:.4f} ± {statistics.stdev(v):.4f} ({len(v)})" if len(v) > 1 else f"{mean[name]:.4f}"
        lines.append(f"| {name} | {s['method']} | {s['seed']} | {s['trial']} | {s['recorded']:.4f} | {spread} | "
                     f"{mean[name] - s['recorded']:+.4f} |")
    v = fresh[BASELINE]
    lines += ["", f"Baseline (train.py at the space's defaults): {mean[BASELINE]:.4f} ± "
                  f"{statistics.stdev(v) if len(v) > 1 else float('nan'):.4f} ({len(v)} re-runs).", "",
              "| method | seeds | fresh val_bpb of its best (mean over seeds ± std) | below the baseline |",
              "|---|---|---|---|"]
    methods = sorted({s["method"] for s in studies.values()})
    per_seed = {m: {s["seed"]: mean[n] for n, s in studies.items() if s["method"] == m} for m in methods}
    for m in methods:
        values = list(per_seed[m].values())
        sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        lines.append(f"| {m} | {len(values)} | {statistics.mean(values):.4f}{sd} | "
                     f"{mean[BASELINE] - statistics.mean(values):.4f} |")
    lines += ["", "Pairs of methods on the fresh re-runs of their bests (`hybrid.reports.stats`, as in the compare's "
                  "report):", "", pairwise_markdown(pairwise(per_seed)), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the compare's database URL")
    parser.add_argument("--out", type=Path, required=True, help="folder of rerun_best.{json,md,log}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2, help="re-runs at once")
    args = parser.parse_args()
    studies, profile_name = best_codes(args.storage)
    profile = get_profile(profile_name)
    baseline = (ROOT / "train.py").read_text()
    defaults = load_space(ROOT / "search_space.yaml", profile.name).defaults()
    jobs = [(name, k) for k in range(args.repeats) for name in [*studies, BASELINE]]
    print(f"rerun_best: {len(studies)} studies and the baseline, {args.repeats} re-runs each on the {profile.name} "
          f"profile, {args.concurrent} at once", flush=True)
    t0 = time.time()

    def rerun(job: tuple[str, int]) -> tuple[dict, str]:
        name, k = job
        load = os.getloadavg()[0]
        code, config = (baseline, defaults) if name == BASELINE else (studies[name]["code"], {})
        r = run_trial(code, config, profile, Path(work) / f"{name}-{k}", seed=RERUN_SEED + k)
        row = {"study": name, "repeat": k, "seed": RERUN_SEED + k, "status": r.status, "val_bpb": r.val_bpb,
               "num_steps": r.num_steps, "total_seconds": r.total_seconds, "load": load, "error": r.error}
        return row, Path(r.log_path).read_text()

    reruns = []
    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory() as work, open(args.out / "rerun_best.log", "w") as log,
          ThreadPoolExecutor(args.concurrent) as pool):
        for i, (row, trial_log) in enumerate(pool.map(rerun, jobs), 1):
            reruns.append(row)
            value = f"{row['val_bpb']:.4f}" if row["val_bpb"] is not None else row["error"]
            line = (f"[{i}/{len(jobs)}] {row['study']} re-run {row['repeat']}: {row['status']} {value}, "
                    f"{row['num_steps']} steps, load {row['load']:.2f}")
            print(line, flush=True)
            log.write(f"===== {line}\n{trial_log}\n")
    report = {"storage": args.storage, "profile": profile.name, "repeats": args.repeats,
              "concurrent": args.concurrent, "threads": os.environ.get("HYBRID_TRIAL_THREADS", "default"),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.time() - t0,
              "studies": {n: {k: v for k, v in s.items() if k != "code"} for n, s in studies.items()},
              "reruns": reruns}
    (args.out / "rerun_best.json").write_text(json.dumps(report, indent=1))
    (args.out / "rerun_best.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
