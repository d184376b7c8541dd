"""Storage write latency: the time to record one trial, and one attribute, in SQLite and PostgreSQL, with 1 and 4
workers writing to the same study at once.

    python benchmarks/storage_latency.py [--trials 100]

Each worker (a process) records --trials trials the way the run loop does (hybrid.loop): `study.ask()`, the first
heartbeat, the 14 knobs of the gpu space suggested (one row each), the outcome's user attributes written one by
one (`store.record_result` writes the same set), and the tell. The sampler is random, the objective absent: what
is timed is the storage. SQLite is configured as `hybrid` opens it (WAL, synchronous=NORMAL); PostgreSQL is a
local server with its default settings (fsync on every commit), started by tests/pg.py.

Writes benchmarks/results/storage_latency.{json,md} and storage_latency.log (one line per recorded trial).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import optuna

from harness.result import TrialResult
from hybrid.study import store
from hybrid.loop import _suggest
from hybrid.paths import PROJECT_ROOT
from hybrid.space import load_space

sys.path.insert(0, str(PROJECT_ROOT / "tests"))
import pg  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
# A typical surrogate trial's attributes, as record_result writes them
RESULT = TrialResult(val_bpb=0.9876, training_seconds=300.0, total_seconds=325.0, peak_memory_mb=41234.5,
                     num_params=50_331_648, config={"DEPTH": 8})
ATTRS = {**{k: getattr(RESULT, k) for k in store.MEASUREMENTS if getattr(RESULT, k) is not None},
         "source": "random", "generation": 0, "code_sha": "0123456789abcdef", "seed": 0, "method": "random",
         "config_ran": RESULT.config, "status": RESULT.status}


def worker(url: str, trials: int, index: int, start_at: float, out: Any) -> None:  # noqa: ANN401
    study = optuna.load_study(study_name="latency", storage=store.open_storage(url),
                              sampler=optuna.samplers.RandomSampler(seed=index))
    distributions = load_space(PROJECT_ROOT / "search_space.yaml", "gpu").distributions()
    time.sleep(max(0.0, start_at - time.time()))  # all workers start writing together
    rows = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        with store.Heartbeat(study, trial):
            _suggest(trial, distributions)
            t1 = time.perf_counter()
            for key, value in ATTRS.items():
                trial.set_user_attr(key, value)
            t2 = time.perf_counter()
            study.tell(trial, RESULT.objective)
        t3 = time.perf_counter()
        rows.append({"worker": index, "trial": trial.number, "ask_s": t1 - t0, "attrs_s": t2 - t1, "tell_s": t3 - t2,
                     "trial_s": t3 - t0, "end": time.time() - start_at})
    out.put(rows)


def measure(kind: str, url: str, workers: int, trials: int) -> dict[str, Any]:
    optuna.create_study(study_name="latency", storage=store.open_storage(url))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 8.0  # time for the workers to start and import
    procs = [ctx.Process(target=worker, args=(url, trials, i, start_at, out)) for i in range(workers)]
    for p in procs:
        p.start()
    rows = [row for _ in procs for row in out.get()]
    for p in procs:
        p.join()
    per_trial = [r["trial_s"] for r in rows]
    return {"storage": kind, "workers": workers, "trials": len(rows), "rows": rows,
            "trial_ms_median": 1e3 * statistics.median(per_trial),
            "trial_ms_p90": 1e3 * statistics.quantiles(per_trial, n=10)[-1],
            "attr_write_ms_median": 1e3 * statistics.median(r["attrs_s"] / len(ATTRS) for r in rows),
            "param_write_ms_median": 1e3 * statistics.median(r["ask_s"] / 14 for r in rows),
            "tell_ms_median": 1e3 * statistics.median(r["tell_s"] for r in rows),
            "trials_per_s_all_workers": len(rows) / max(r["end"] for r in rows)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Storage write latency", "",
             f"Command: `{' '.join(['python benchmarks/storage_latency.py', *result['args']])}`. One line per recorded "
             "trial: storage_latency.log.", f"Machine: {result['machine']}.", "",
             f"A recorded trial = ask + first heartbeat + 14 knob rows + {len(ATTRS)} user attributes + tell, "
             "as in the run loop (no sampler work, no objective).", "",
             "| storage | workers | trials | ms/trial (median) | p90 | ms/attribute write | ms/knob row (ask incl.) "
             "| ms/tell | trials/s, all workers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['storage']} | {r['workers']} | {r['trials']} | {r['trial_ms_median']:.1f} | "
                     f"{r['trial_ms_p90']:.1f} | {r['attr_write_ms_median']:.2f} | {r['param_write_ms_median']:.2f} | "
                     f"{r['tell_ms_median']:.1f} | {r['trials_per_s_all_workers']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="trials recorded by each worker")
    args = parser.parse_args()
    result: dict[str, Any] = {"args": sys.argv[1:], "runs": [],
                              "machine": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"}
    with tempfile.TemporaryDirectory() as tmp, pg.postgres_server() as pg_url:
        for workers in (1, 4):
            result["runs"].append(measure("sqlite", f"sqlite:///{tmp}/w{workers}.db", workers, args.trials))
            result["runs"].append(measure("postgresql", pg_url, workers, args.trials))
            optuna.delete_study(study_name="latency", storage=store.open_storage(pg_url))
            print(markdown(result), file=sys.stderr, flush=True)
    result["machine"] += f", at the end {os.getloadavg()[0]:.1f}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "storage_latency.log").write_text("".join(
        f"{r['storage']} workers {r['workers']} " + " ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in row.items()) + "\n"
        for r in result["runs"] for row in r["rows"]))
    (RESULTS / "storage_latency.md").write_text(markdown(result))
    summary = {**result, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in result["runs"]]}
    (RESULTS / "storage_latency.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
