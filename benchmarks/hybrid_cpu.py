"""The hybrid method on the cpu profile, killed in the middle of a generation and resumed.

    python benchmarks/hybrid_cpu.py [--budget-hours 0.25] [--out runs/hybrid-cpu] [--sampler tpe]

Runs `hybrid run --method hybrid --llm none --profile cpu` to its budget (15 minutes of trial time by default).
Once a candidate generation has a finished trial and another one in flight, the run is killed with SIGKILL and
continued with `hybrid resume`. Writes benchmarks/results/hybrid_cpu.log (both processes' output) and
hybrid_cpu.md (the lineage, what the kill interrupted, and what the resumed run did with it).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hybrid.study import generations, records, store
from hybrid.evolution import Snapshot, format_lineage, lineage_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STUDY = "hybrid-cpu"


def _study(storage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=STUDY, storage=store.open_storage(storage))
    except KeyError:
        return None


def _mid_generation(study: optuna.Study) -> dict | None:
    """A candidate with a finished trial and a trial in flight: the moment to kill the run."""
    if store.RUN_KEY not in study.user_attrs:
        return None
    snap = Snapshot.load(study)
    gen = snap.current
    running = [t for t in snap.attempted[gen.number] if t.state == TrialState.RUNNING]
    if gen.status == "candidate" and snap.finished[gen.number] and running:
        return {"generation": gen.number, "mutation": gen.mutation, "running_trial": running[0].number,
                "finished_in_generation": len(snap.finished[gen.number]),
                "finished_in_study": len(store.finished_trials(study))}
    return None


def _run(args: list[str], log, kill_when=None, storage: str = "") -> tuple[int, dict | None]:  # noqa: ANN001
    """Run `hybrid ARGS`, its output into log; SIGKILL it once kill_when(study) says so."""
    log.write(f"$ hybrid {' '.join(args)}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "hybrid.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    while proc.poll() is None:
        time.sleep(2.0)
        study = _study(storage) if kill_when else None
        moment = kill_when(study) if study is not None else None
        if moment is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n*** SIGKILL at {moment}\n\n")
            log.flush()
            return proc.returncode, moment
    return proc.returncode, None


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _summary(study: optuna.Study, moment: dict | None, budget_hours: float, wall: float, sampler: str) -> str:
    rows = lineage_table(study)
    gens = generations.load_all(study)
    trials = store.finished_trials(study)
    base_knobs = set(gens[0].space)
    later = {r["generation"]: sorted(set(gens[r["generation"]].space) - base_knobs) for r in rows if r["generation"]}
    tuned_new = sorted({k for t in trials for k in t.params if k not in base_knobs})
    sources: dict[str, int] = {}
    for t in trials:
        sources[t.user_attrs.get("source", "?")] = sources.get(t.user_attrs.get("source", "?"), 0) + 1
    failed_unfinished = [t.number for t in study.get_trials(deepcopy=False)
                         if t.state == TrialState.FAIL and not records.is_finished(t)]
    ok = [t.user_attrs["val_bpb"] for t in trials if t.user_attrs.get("status") == "ok"]
    failures: dict[str, list[str]] = {}
    for t in trials:
        if t.user_attrs.get("status") not in ("ok", None):
            failures.setdefault(t.user_attrs["status"], []).append(str(t.user_attrs.get("error", ""))[:90])
    mutations = [str(g.mutation) for g in gens.values() if g.parent is not None]
    baseline = next((t.user_attrs.get("val_bpb") for t in trials if t.user_attrs.get("source") == "baseline"), None)
    lines = [
        "# hybrid on the cpu profile (catalog, no LLM)", "",
        f"Command: `python benchmarks/hybrid_cpu.py --budget-hours {budget_hours} --sampler {sampler}` "
        f"(`hybrid run --method hybrid --llm none --profile cpu --sampler {sampler}`, killed with SIGKILL "
        "mid-generation, then `hybrid resume`). Full output: hybrid_cpu.log.", "",
        f"- wall time {wall / 60:.1f} min; trial time used {store.seconds_used(trials) / 60:.1f} min "
        f"of {budget_hours * 60:.0f}; {len(trials)} finished trials "
        f"({', '.join(f'{k} {v}' for k, v in sorted(sources.items()))})",
        f"- generations: {len(gens)} ({', '.join(f'{g.number} {g.status}' for g in gens.values())})",
        f"- baseline val_bpb {_bpb(baseline)}; best {_bpb(min(ok, default=None))}",
        *(f"- {len(errors)} {status}: e.g. {errors[0]}" for status, errors in sorted(failures.items())),
        f"- load average of the machine (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} cores",
        f"- knobs tuned that generation 0 did not have: {', '.join(tuned_new) or 'none'}",
        *(f"  - generation {n}: + {', '.join(k) or 'none'}" for n, k in later.items()),
        "", "## Lineage", "", "```", format_lineage(rows), "```", "", "## The kill and the resume", "",
    ]
    if moment is None:
        lines.append("The run finished before a candidate generation had a finished trial and one in flight: no kill.")
    else:
        gen = gens[moment["generation"]]
        after = [t for t in trials if t.user_attrs.get("generation") == gen.number and t.number > moment["running_trial"]]
        lines += [
            f"Killed while generation {gen.number} ({moment['mutation']}) was on probation: "
            f"{moment['finished_in_generation']} of its trials finished, trial {moment['running_trial']} in flight, "
            f"{moment['finished_in_study']} finished in the study.",
            f"- the interrupted trial(s) {failed_unfinished} were failed by `resume` and never counted",
            f"- the resumed run went on with generation {gen.number}: {len(after)} more of its trials; "
            f"its verdict: {gen.status}" + (f" ({gen.why})" if gen.why else ""),
            f"- mutations tried, each once: {', '.join(mutations)}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-hours", type=float, default=0.25)
    parser.add_argument("--sampler", choices=("tpe", "cmaes", "gp"), default="tpe")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "hybrid-cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(args.out / 'hybrid.db').resolve()}"
    if _study(storage) is not None:
        sys.exit(f"{storage} already holds study {STUDY}: choose another --out")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(RESULTS / "hybrid_cpu.log", "w") as log:
        subprocess.run([sys.executable, "-m", "hybrid.cli", "prepare", "--profile", "cpu"], stdout=log,
                       stderr=subprocess.STDOUT, cwd=ROOT, check=True)
        run_args = ["run", "--method", "hybrid", "--llm", "none", "--profile", "cpu", "--sampler", args.sampler,
                    "--study", STUDY, "--storage", storage, "--budget-hours", str(args.budget_hours)]
        _, moment = _run(run_args, log, kill_when=_mid_generation, storage=storage)
        if moment is not None:
            code, _ = _run(["resume", "--study", STUDY, "--storage", storage], log)
            if code != 0:
                sys.exit(f"hybrid resume exited with {code}: see {RESULTS / 'hybrid_cpu.log'}")
    study = _study(storage)
    (RESULTS / "hybrid_cpu.md").write_text(_summary(study, moment, args.budget_hours, time.monotonic() - started,
                                                    args.sampler))
    print((RESULTS / "hybrid_cpu.md").read_text())


if __name__ == "__main__":
    main()
