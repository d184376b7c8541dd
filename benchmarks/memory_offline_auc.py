"""Offline check of the memory model: does its analytic estimate alone separate the paper's failed trials from
its successful ones?

    python benchmarks/memory_offline_auc.py [--workers 2]

On the trials shipped in hybrid/data/arxiv-2603.24647/ (every method but "Karpathy Agent (Code)", whose knobs do
not describe the code that ran), the analytic peak estimate of every trial (this project's train.py on the gpu
profile: vocabulary 8192, sequence 2048; no calibration), then:
- the ROC AUC of the estimate as a score of failure (goal >= 0.95), over all failures and over the failures that
  ended within 100 s (out of memory; the few 600 s hangs are something else);
- the decisions of the paper's cap (76 GiB): successful trials it would have refused (false positives), failed
  ones it would have let run (false negatives), and the GPU time of failures it would have saved, per method;
- the same for caps scaled by 0.9 to 1.1 (how sensitive the decisions are to the estimate's error).
The model is built on the meta device once per architecture (DEPTH, ASPECT_RATIO, HEAD_DIM: the knobs that set
shapes); the micro-batch and gradient accumulation are set per trial.
Writes benchmarks/results/memory_offline_auc.{json,md,log}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from harness.profiles import get_profile
from hybrid.memory import GIB, MIB, PAPER_CAP_GB, analytic_peak_bytes, grad_accum, model_shapes, peak_bytes
from hybrid.study.store import code_sha
from hybrid.surrogate import EDITED_CODE, TRIALS_FILE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "memory_offline_auc"
SHAPE_KNOBS = ("DEPTH", "ASPECT_RATIO", "HEAD_DIM")
OOM_SECONDS = 100.0               # failures that ended sooner were out of memory; the rest hung (about 600 s)
REFERENCE_BASELINE_MIB = 45060.2  # autoresearch's baseline config on one H100: peak_vram_mb in its README
CAP_SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)
GPU = get_profile("gpu")
SOURCE = (ROOT / "train.py").read_text()


class Log:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "w")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _shapes(key: tuple[int, int, int]):  # noqa: ANN202 (a worker process's task)
    return key, model_shapes(SOURCE, dict(zip(SHAPE_KNOBS, key)), GPU)


def estimates(trials: pd.DataFrame, workers: int, log: Log) -> np.ndarray:
    """The analytic peak (bytes) of every trial, the model built once per architecture."""
    keys = sorted({tuple(int(v) for v in row) for row in trials[list(SHAPE_KNOBS)].to_numpy()})
    log(f"{len(trials)} trials, {len(keys)} architectures: building each on the meta device ({workers} processes)")
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        shapes = {}
        for i, (key, s) in enumerate(pool.imap_unordered(_shapes, keys, chunksize=16)):
            shapes[key] = s
            if (i + 1) % 500 == 0:
                log(f"  {i + 1}/{len(keys)} architectures, {time.perf_counter() - t0:.0f} s")
    log(f"built in {time.perf_counter() - t0:.0f} s")
    out = []
    for row in trials.itertuples():
        s = shapes[(row.DEPTH, row.ASPECT_RATIO, row.HEAD_DIM)]
        batch = int(row.DEVICE_BATCH_SIZE)
        out.append(peak_bytes(dataclasses.replace(
            s, device_batch_size=batch, grad_accum=grad_accum(int(row.TOTAL_BATCH_SIZE), batch * GPU.seq_len))))
    return np.array(out)


def check_against_full_path(trials: pd.DataFrame, peaks: np.ndarray, log: Log, n: int = 12) -> None:
    """The cached per-architecture path gives what analytic_peak_bytes gives with the whole config injected."""
    for i in random.Random(0).sample(range(len(trials)), n):
        config = {k: int(trials.iloc[i][k]) for k in (*SHAPE_KNOBS, "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE")}
        full = analytic_peak_bytes(SOURCE, config, GPU)
        assert abs(full - peaks[i]) < 1.0, (config, full, peaks[i])
    log(f"cached path == analytic_peak_bytes on {n} random trials")


def decisions(failed: np.ndarray, refused: np.ndarray, wt: np.ndarray) -> dict:
    fp, fn = int((refused & ~failed).sum()), int((~refused & failed).sum())
    return {
        "refused": int(refused.sum()), "true_positives": int((refused & failed).sum()),
        "false_positives": fp, "false_negatives": fn,
        "accuracy": float((refused == failed).mean()),
        "precision": float((refused & failed).sum() / max(1, refused.sum())),
        "recall": float((refused & failed).sum() / max(1, failed.sum())),
        "failed_hours": float(wt[failed].sum() / 3600), "failed_hours_left": float(wt[failed & ~refused].sum() / 3600),
        "budget_share_failed": float(wt[failed].sum() / wt.sum()),
        "budget_share_failed_left": float(wt[failed & ~refused].sum() / wt.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = Log(RESULTS / f"{NAME}.log")
    t0 = time.perf_counter()
    all_trials = pd.read_csv(TRIALS_FILE)
    trials = all_trials[all_trials["method"] != EDITED_CODE].reset_index(drop=True)
    log(f"data: {TRIALS_FILE.relative_to(ROOT)}, {len(all_trials)} trials, {len(trials)} without {EDITED_CODE!r}")
    peaks = estimates(trials, args.workers, log)
    check_against_full_path(trials, peaks, log)
    baseline_mib = analytic_peak_bytes(SOURCE, {}, GPU) / MIB
    log(f"baseline config: estimate {baseline_mib:.0f} MiB, reference measurement {REFERENCE_BASELINE_MIB:.0f} MiB "
        f"(ratio {baseline_mib / REFERENCE_BASELINE_MIB:.3f})")

    failed = ~trials["success"].to_numpy(bool)
    wt = trials["wt"].to_numpy(float)
    oom_like = ~failed | (wt < OOM_SECONDS)
    auc = float(roc_auc_score(failed, peaks))
    auc_oom = float(roc_auc_score(failed[oom_like], peaks[oom_like]))
    log(f"ROC AUC of the estimate: {auc:.4f} over all {failed.sum()} failures, {auc_oom:.4f} over the "
        f"{(failed & oom_like).sum()} that ended within {OOM_SECONDS:.0f} s (goal >= 0.95)")

    cap = PAPER_CAP_GB * GIB
    at_cap = decisions(failed, peaks > cap, wt)
    log(f"cap {PAPER_CAP_GB:g} GiB: " + ", ".join(f"{k} {v:.4g}" for k, v in at_cap.items()))
    sweep = {f"{s:g}": decisions(failed, peaks > s * cap, wt) for s in CAP_SCALES}
    for s, d in sweep.items():
        log(f"  cap x {s}: false positives {d['false_positives']}, false negatives {d['false_negatives']}")
    ok = ~failed
    refused_ok = ok & (peaks > cap)
    val = trials["val_bpb"].to_numpy(float)
    best_refused = float(np.min(val[refused_ok])) if refused_ok.any() else None
    log(f"best val_bpb overall {np.min(val[ok]):.6f}; best among the successes the cap would refuse: {best_refused}")
    missed = failed & ~(peaks > cap)
    log("false negatives (estimate GiB, wall s): " + ", ".join(
        f"{peaks[i] / GIB:.1f}/{wt[i]:.0f}" for i in np.flatnonzero(missed)[np.argsort(-peaks[missed])]))

    per_method = {}
    for method, group in trials.groupby("method"):
        idx = group.index.to_numpy()
        d = decisions(failed[idx], peaks[idx] > cap, wt[idx])
        per_method[method] = {"trials": len(idx), "failed": int(failed[idx].sum()), **d}
    report = {
        "data": str(TRIALS_FILE.relative_to(ROOT)), "excluded": EDITED_CODE, "trials": len(trials),
        "failed": int(failed.sum()), "failed_within_100s": int((failed & oom_like).sum()),
        "architectures": len({tuple(r) for r in trials[list(SHAPE_KNOBS)].to_numpy()}),
        "profile": {"name": GPU.name, "vocab_size": GPU.vocab_size, "seq_len": GPU.seq_len},
        "cap_gib": PAPER_CAP_GB,
        "baseline": {"estimate_mib": baseline_mib, "reference_mib": REFERENCE_BASELINE_MIB},
        "roc_auc": auc, "roc_auc_oom_only": auc_oom, "goal_roc_auc": 0.95,
        "at_cap": at_cap, "cap_sweep": sweep, "per_method": per_method,
        "best_val_bpb": float(np.min(val[ok])), "best_val_bpb_refused": best_refused,
        "seconds": time.perf_counter() - t0,
        "code": {path: code_sha((ROOT / path).read_text()) for path in ("train.py", "hybrid/memory.py")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{NAME}.md").write_text(markdown(report))
    log(f"done in {report['seconds']:.0f} s: {NAME}.json, {NAME}.md")


def _pct(share: float) -> str:
    return f"{100 * share:.2f} %"


def markdown(r: dict) -> str:
    c, base = r["at_cap"], r["baseline"]
    lines = [
        "# Memory model, offline: the analytic estimate on the paper's trials",
        "",
        f"Data: `{r['data']}`, {r['trials']} trials ({r['failed']} failed) of every method but {r['excluded']}; "
        f"{r['architectures']} architectures. Estimate: this project's train.py on the gpu profile "
        f"(vocabulary {r['profile']['vocab_size']}, sequence {r['profile']['seq_len']}), built on the meta device, "
        "no calibration. Produced by `python benchmarks/memory_offline_auc.py` (log: memory_offline_auc.log).",
        "",
        f"- **ROC AUC** of the estimate as a score of failure: **{r['roc_auc']:.4f}** over all failures "
        f"(goal >= {r['goal_roc_auc']}); {r['roc_auc_oom_only']:.4f} over the {r['failed_within_100s']} failures "
        "that ended within 100 s (out of memory; the others hung for about 600 s).",
        f"- Baseline config: estimate {base['estimate_mib']:.0f} MiB; the reference autoresearch measured "
        f"{base['reference_mib']:.0f} MiB on an H100 (ratio {base['estimate_mib'] / base['reference_mib']:.3f}).",
        f"- At the paper's cap ({r['cap_gib']:g} GiB): {c['refused']} trials refused, {c['true_positives']} of them "
        f"failed; **{c['false_positives']} successful trials refused** (false positives), "
        f"**{c['false_negatives']} failures let run** (false negatives); accuracy {c['accuracy']:.4f}, "
        f"precision {c['precision']:.4f}, recall {c['recall']:.4f}.",
        f"- GPU time of failures: {c['failed_hours']:.1f} h ({_pct(c['budget_share_failed'])} of all trial time); "
        f"left after refusals: {c['failed_hours_left']:.2f} h ({_pct(c['budget_share_failed_left'])}).",
        f"- Best val_bpb of all trials {r['best_val_bpb']:.6f}; best among the successful trials the cap refuses: "
        f"{r['best_val_bpb_refused']}.",
        "",
        "## Per method, at the cap",
        "",
        "| method | trials | failed | refused | false positives | false negatives | failed share of time | left |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, d in r["per_method"].items():
        lines.append(f"| {m} | {d['trials']} | {d['failed']} | {d['refused']} | {d['false_positives']} | "
                     f"{d['false_negatives']} | {_pct(d['budget_share_failed'])} | "
                     f"{_pct(d['budget_share_failed_left'])} |")
    lines += ["", "## Sensitivity: the cap scaled", "",
              "| cap x | false positives | false negatives | accuracy |", "|---|---|---|---|"]
    for scale, d in r["cap_sweep"].items():
        lines.append(f"| {scale} | {d['false_positives']} | {d['false_negatives']} | {d['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
