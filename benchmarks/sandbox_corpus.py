"""The adversarial corpus (tests/hostile) run for real on the test profile: what each hostile edit got.

    python benchmarks/sandbox_corpus.py [--sandbox required|auto|off|none] [--cases NAME,NAME] [--out DIR]

Every case runs through harness.runner.run_trial (the test profile, train.py at the test defaults of
search_space.yaml, seed 0), as tests/test_hostile.py runs it, except that each run_trial call lives in a driver
process of its own: a case that kills its runner then kills one driver, which is recorded as a problem, and the
corpus goes on. The driver's environment holds the planted secrets and a fake $HOME; a sentinel process and a
loopback HTTP server stand for the rest of the trusted side (see tests/hostile/arena.py). `--sandbox none`
calls run_trial without the keyword (a runner from before the sandbox).

Writes DIR/sandbox_corpus.md (the outcome table and a summary) and DIR/sandbox_corpus.log (per case: the outcome
as JSON, then the tail of the trial's log). DIR defaults to benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.data import prepare  # noqa: E402
from harness.profiles import get_profile  # noqa: E402
from harness.result import TrialResult  # noqa: E402
from hostile.arena import TOLERANCE, Baseline, Outcome, Scene, TrustedSide, outcome_table, run_code  # noqa: E402
from hostile.cases import CASES, TRAIN_PY, Case  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DRIVER_TIMEOUT = 600
DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from harness.profiles import get_profile
from harness.runner import run_trial
from hostile.arena import trial_config
train_py, trial_dir, sandbox, out = sys.argv[1:5]
kwargs = {{}} if sandbox == "none" else {{"sandbox": sandbox}}
result = run_trial(Path(train_py).read_text(), trial_config(), get_profile("test"), Path(trial_dir), seed=0, **kwargs)
Path(out).write_text(json.dumps(result.to_dict()))
"""


def driver(scene: Scene, work: Path, sandbox: str, data_dir: Path):  # noqa: ANN201
    """A runner for run_code: run_trial in a driver process whose environment is the trusted side's."""

    def run(code: str, trial_dir: Path) -> TrialResult:
        work.mkdir(parents=True, exist_ok=True)
        (work / "train.py").write_text(code)
        out = work / "result.json"
        env = {**os.environ, **scene.env(), "HYBRID_DATA_DIR": str(data_dir)}
        proc = subprocess.run([sys.executable, "-c", DRIVER.format(tests=str(ROOT / "tests")), str(work / "train.py"),
                               str(trial_dir), sandbox, str(out)], cwd=ROOT, env=env, capture_output=True,
                              timeout=DRIVER_TIMEOUT)
        (work / "driver.log").write_bytes(proc.stdout + proc.stderr)
        if not out.exists():
            tail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"the runner process died (exit status {proc.returncode}): {tail[0][:200]}")
        return TrialResult.from_dict(json.loads(out.read_text()))

    return run


def log_tail(trial_dir: Path, lines: int = 40) -> str:
    log = trial_dir / "log.txt"
    text = log.read_text(errors="replace") if log.is_file() and not log.is_symlink() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandbox", default="required", choices=["required", "auto", "off", "none"])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="sandbox-corpus-"))
    data_dir = tmp / "data"
    os.environ["HYBRID_DATA_DIR"] = str(data_dir)
    prepare(get_profile("test"), log=lambda line: None)
    trusted = TrustedSide()
    outcomes: list[Outcome] = []
    log_lines: list[str] = []
    t_start = time.time()
    try:
        baselines: list[Outcome] = []

        def measure() -> Outcome:
            name = f"baseline-{len(baselines)}"
            scene = Scene(tmp / "cases" / name, trusted, "baseline")
            base = run_code(TRAIN_PY.read_text(), Case("baseline", "forge", "honest", []), scene,
                            driver(scene, tmp / "driver" / name, args.sandbox, data_dir), None, data_dir)
            baselines.append(base)
            log_lines.extend([json.dumps(base.to_dict()), log_tail(scene.trial_dir), ""])
            print(f"baseline: {base.status} val_bpb {base.val_bpb} ({base.seconds:.1f}s) {base.problems}", flush=True)
            return base

        baseline = Baseline(measure)
        if baseline.value is None:
            print("the unmodified train.py failed: every ok case is reported without a forgery check", flush=True)
        outcomes.append(baselines[0])
        for c in cases:
            scene = Scene(tmp / "cases" / c.name, trusted, c.name)
            outcome = run_code(c.code(marker=scene.marker), c, scene,
                               driver(scene, tmp / "driver" / c.name, args.sandbox, data_dir), baseline, data_dir)
            outcomes.append(outcome)
            log_lines += [json.dumps(outcome.to_dict()), log_tail(scene.trial_dir), ""]
            val = "-" if outcome.val_bpb is None else f"{outcome.val_bpb:.4f}"
            print(f"{c.name:32s} {outcome.status:8s} {val:>8s} {outcome.seconds:5.1f}s  "
                  f"{'; '.join(outcome.problems)[:200] or 'ok'}", flush=True)
    finally:
        trusted.close()

    (args.out / "sandbox_corpus.log").write_text("\n".join(log_lines) + "\n")
    hostile = outcomes[1:]
    bad = [o for o in hostile if o.problems]
    by_kind = Counter(o.kind for o in hostile)
    bad_by_kind = Counter(o.kind for o in bad)
    statuses = Counter(o.status for o in hostile)
    summary = [
        "# The adversarial corpus on the test profile",
        "",
        f"Command: `python benchmarks/sandbox_corpus.py --sandbox {args.sandbox}`"
        + (f" --cases {args.cases}" if args.cases else "") + f"; {os.cpu_count()} cores, {platform.platform()}, "
        f"measured {time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}, {time.time() - t_start:.0f} s in all. "
        "Raw output: sandbox_corpus.log.",
        "",
        f"Baseline (train.py unchanged): {outcomes[0].status}; val_bpb measured {len(baselines)} time(s): "
        + ", ".join("-" if b.val_bpb is None else f"{b.val_bpb:.4f}" for b in baselines)
        + f". A hostile case's ok val_bpb more than {TOLERANCE} below the lowest of them counts as forged or "
        "read-ahead (tests/hostile/arena.py, Baseline: the baseline is measured again before a case is called "
        "forged, since the machine's load changes how many steps fit in the 1.5 s budget; a case fed more tokens on "
        "the clock than every baseline run is held to an absolute floor instead).",
        "",
        f"{len(hostile)} cases; {len(hostile) - len(bad)} without a problem, {len(bad)} with one or more. "
        "Statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + ".",
        "",
        "| kind | cases | with problems |", "|---|---|---|",
        *[f"| {k} | {by_kind[k]} | {bad_by_kind[k]} |" for k in sorted(by_kind)],
        "",
        "`reached` is what the case's own log says it managed (informational: the log is the agent's); `guard` is",
        "the patch guard's verdict on the edit (informational: the guard is a first filter, not the boundary).",
        "",
        "",
    ]
    (args.out / "sandbox_corpus.md").write_text("\n".join(summary) + outcome_table(outcomes))
    print(f"{len(bad)} of {len(hostile)} cases with problems; wrote {args.out / 'sandbox_corpus.md'}")
    return 1 if bad or outcomes[0].status != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
