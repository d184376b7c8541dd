"""Run one trial: materialize its folder, train in one sandboxed process, score in two fresh ones, return the result.

    trial_dir/train.py       the generation's code with the trial's knob values written in (read-only to the trial)
    trial_dir/spec.json      what the trial processes are told: constants, seed, device
    trial_dir/scratch/       the training process's only writable folder (its saved model ends here)
    trial_dir/eval-*/        each evaluation process's own writable folder and its shared logits file
    trial_dir/log.txt        everything the processes printed (bounded, scrubbed of secrets)
    trial_dir/result.json    the TrialResult, written by this trusted side only

This process never runs agent code: it feeds batches, keeps the clock (harness.training) and turns logits into
val_bpb (harness.scorer). The processes that do run agent code live in harness.sandbox's jail.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.agent_process import AgentProcess, TrialLog
from harness.data import prepared
from harness.errors import UserError
from harness.knobs import find_knobs, inject_knobs, parse_python
from harness.profiles import Profile, data_dir
from harness.result import TrialResult, is_oom
from harness.sandbox import TRIAL_THREADS, Jail, Limits, default_memory_bytes
from harness.scorer import (RESCORE_TOLERANCE, Evaluation, forward_rows, intermediate_rows, score,
                            score_intermediate)
from harness.scrub import scrub
from harness.tokenizer import Tokenizer
from harness.training import Checkpoints, Feed, supervise

IMPLAUSIBLE_GAIN = 0.03  # bits per byte below the best so far that earn a rescore on another order before they count
ERROR_CHARS = 500        # of a failure's message, stored and shown to agents
# Dense bf16 tensor-core peaks (no sparsity), by model as CUDA names it ("NVIDIA H100 PCIe", "NVIDIA H200 NVL");
# matched on whole words, the longest model first: "L4" is not "L40", "H100 NVL" is not the SXM "H100".
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H200 NVL": 835.5e12, "GH200": 989.5e12, "H100": 989.5e12,
                   "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
                   "L4": 121e12, "A10G": 70e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12}
# Trials on CUDA: segments that grow instead of fragmenting (the reference sets it; reserved stays near allocated).
CUDA_ALLOCATOR = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
EVALUATIONS = ("main", "check")  # each a process of its own, scored at once (harness.scorer.score)
INTERMEDIATE_CALL_TOKENS = 8192  # tokens of one intermediate request: its logits stay far below a training step's


def snap_batch_size(code: str, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """The config with TOTAL_BATCH_SIZE moved to the nearest multiple (ties up, at least one) of
    DEVICE_BATCH_SIZE * seq_len, so that gradient accumulation is a whole number of micro-batches.
    Knobs missing from config take train.py's values; a train.py without both knobs is left alone."""
    knobs = find_knobs(code)
    if "TOTAL_BATCH_SIZE" not in knobs or "DEVICE_BATCH_SIZE" not in knobs:
        return dict(config)
    total = config.get("TOTAL_BATCH_SIZE", knobs["TOTAL_BATCH_SIZE"].value)
    micro = config.get("DEVICE_BATCH_SIZE", knobs["DEVICE_BATCH_SIZE"].value) * seq_len
    snapped = max(1, math.floor(total / micro + 0.5)) * micro
    return dict(config) if snapped == total else {**config, "TOTAL_BATCH_SIZE": snapped}


def compile_cache(code: str) -> Path:
    """torch.compile's caches for one code (inductor, Triton): shared by its trials and kept between runs, never
    by other code (a trial can spoil only its own generation's kernels)."""
    path = data_dir() / "compile-cache" / hashlib.sha256(code.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def trial_device(device: str | None) -> tuple[torch.device, int | None]:
    """The device the trusted side scores on, and the GPU index the trial's jail is given (it sees it as cuda:0)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    d = torch.device(device)
    if d.type != "cuda":
        return d, None
    index = d.index if d.index is not None else 0
    return torch.device("cuda", index), index


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its CUDA name (PEAK_BF16_FLOPS); None for a model not in the table."""
    words = re.split(r"[\s\-_]+", device_name.upper())
    for key in sorted(PEAK_BF16_FLOPS, key=lambda k: -len(k.split())):
        wanted = key.upper().split()
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words))):
            return PEAK_BF16_FLOPS[key]
    return None


# What a trial leaves besides train.py, spec.json, log.txt and result.json: the model, the logits handed to the scorer
# (hundreds of MB on cpu, GBs on gpu, per trial) and whatever train.py wrote. Removed once it is scored, unless
# $HYBRID_KEEP_TRIAL_FILES=1 (to look into one).
WORKING_FILES = ("scratch", "eval-*", "intermediate")
KEEP_FILES_ENV = "HYBRID_KEEP_TRIAL_FILES"


def _fresh(folder: Path) -> Path:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def run_trial(code: str, config: dict[str, Any], profile: Profile, trial_dir: Path, *, seed: int = 0,
              device: str | None = None, vram_cap_gb: float | None = None, timeout: float | None = None,
              stop: threading.Event | None = None, sandbox: str = "auto", startup_limit: float | None = None,
              rescore_below: float | None = None, report: Callable[[float, float], bool] | None = None,
              fractions: tuple[float, ...] | None = None) -> TrialResult:
    """Run train.py `code` with `config` injected in trial_dir; every failure of the trial is a result, never raised.

    TOTAL_BATCH_SIZE is snapped first (see snap_batch_size); result.config is the snapped config that ran.
    `startup_limit` bounds the seconds before the clock runs (default profile.max_startup_seconds); a val_bpb
    below `rescore_below` is scored again on another row order and must agree. With `report`, the slice's val_bpb
    at each of `fractions` of the budget (default profile.intermediate_fractions) is told to report(fraction,
    val_bpb), and True ends the trial `pruned` (harness.training). Setting `stop` (Ctrl-C) kills
    the trial and raises KeyboardInterrupt. Raises UserError when the profile's data is not prepared or the
    sandbox is required and missing, KnobError for knobs train.py does not define.
    """
    t0 = time.perf_counter()
    data = prepared(profile)
    trial_dir = Path(trial_dir).resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    log = TrialLog(trial_dir / "log.txt")
    try:
        parse_python(code)
    except SyntaxError as e:
        log.note(f"train.py does not parse: line {e.lineno}: {e.msg}")
        return _finish(TrialResult(status="crash", error=f"SyntaxError: {e.msg} (train.py:{e.lineno})"),
                       config, log, trial_dir, t0)
    config = snap_batch_size(code, config, profile.seq_len)
    trial_code = inject_knobs(code, config)
    scoring_device, gpu = trial_device(device)
    tokenizer = Tokenizer.load(data.tokenizer)
    threads = int(os.environ[TRIAL_THREADS]) if os.environ.get(TRIAL_THREADS) else None
    try:
        (trial_dir / "train.py").write_text(trial_code)
        scratch = _fresh(trial_dir / "scratch")
    except OSError as e:
        return _finish(TrialResult(status="crash", error=f"cannot write the trial's folder: {e}"), config, log,
                       trial_dir, t0)
    # the evaluations run side by side: on a CPU, each with its share of the trial's threads, not all of them
    eval_threads = max(1, (threads or torch.get_num_threads()) // len(EVALUATIONS))
    spec = {"seed": seed, "threads": threads, "eval_threads": eval_threads,
            "device": "cuda:0" if gpu is not None else scoring_device.type,
            "vram_cap_gb": vram_cap_gb,
            "seq_len": profile.seq_len, "time_budget": profile.time_budget, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eval_rows": forward_rows(profile)}
    limits = Limits(memory_bytes=default_memory_bytes())
    cache = compile_cache(code)
    allocator = CUDA_ALLOCATOR if gpu is not None else {}
    probe = _fresh(trial_dir / "intermediate") / "logits.bin" if report is not None else None
    handed_train = {"compile-cache": cache} | ({"logits.bin": probe} if probe else {})

    def jail(folder: Path, handed: dict[str, Path], writable: tuple[str, ...] = ()) -> Jail:
        return Jail(sandbox, folder, handed={"train.py": trial_dir / "train.py", "spec.json": trial_dir / "spec.json",
                                             **handed}, writable=writable, gpu=gpu, limits=limits)

    train_jail = jail(scratch, handed_train, ("compile-cache", "logits.bin"))
    spec["model_path"] = f"{train_jail.home}/model.pt"
    if probe:
        spec["intermediate_rows"] = max(1, min(forward_rows(profile), INTERMEDIATE_CALL_TOKENS // profile.seq_len))
        spec["intermediate_logits"] = train_jail.path("logits.bin")
    (trial_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    caches = {"TORCHINDUCTOR_CACHE_DIR": f"{train_jail.path('compile-cache')}/inductor",
              "TRITON_CACHE_DIR": f"{train_jail.path('compile-cache')}/triton",
              "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", **allocator}

    def start_evaluation(logits: Path) -> AgentProcess:
        folder = logits.parent
        # the training scratch folder, not its model.pt: a symlink there resolves inside the jail, never on the host
        j = jail(_fresh(folder / "scratch"), {"trained": scratch, "logits.bin": logits}, ("logits.bin",))
        args = [j.path("spec.json"), j.path("train.py"), f"{j.path('trained')}/model.pt", j.path("logits.bin")]
        return AgentProcess(j, "harness.evaluator", args, log, folder.name, env=allocator)

    def new_evaluations() -> list[Evaluation]:
        return [Evaluation(start_evaluation, _fresh(trial_dir / f"eval-{name}") / "logits.bin", spec["eval_rows"],
                           profile.seq_len, tokenizer.vocab_size) for name in EVALUATIONS]

    limit = timeout or profile.timeout_seconds
    deadline = t0 + limit

    def start_trainer(logits: Path | None = None) -> AgentProcess:
        args = [train_jail.path("spec.json"), train_jail.path("train.py")]
        return AgentProcess(train_jail, "harness.trainer", args, log, "train", env=caches)

    launched = time.perf_counter()
    checkpoints = None
    if probe:
        try:
            rows = intermediate_rows(profile, data)
        except RuntimeError as e:
            raise UserError(f"{e}: too little validation data for the intermediate evaluations of pruning (the rows "
                            "after the final evaluation's); run without --pruner") from None
        answering = Evaluation(start_trainer, probe, spec["intermediate_rows"], profile.seq_len, tokenizer.vocab_size)
        token_bytes = torch.from_numpy(tokenizer.token_bytes())
        checkpoints = Checkpoints(fractions or profile.intermediate_fractions, rows.shape[0] * profile.seq_len,
                                  lambda: score_intermediate(answering, rows, token_bytes, scoring_device, deadline),
                                  report)
        trainer = answering.process
    else:
        trainer = start_trainer()
    feed = Feed(data, profile, seed, tokenizer.bos_id)
    evaluations = new_evaluations() if gpu is not None else None  # on a GPU, they start while it trains
    try:
        training = supervise(trainer, feed, profile, startup_limit=startup_limit or profile.max_startup_seconds,
                             deadline=deadline, model_bytes=lambda: _size(scratch / "model.pt"), stop=stop,
                             checkpoints=checkpoints)
    except BaseException:
        for evaluation in evaluations or ():
            evaluation.process.kill()
        raise
    finally:
        exit_code = trainer.kill()
        feed.close()
    result = TrialResult(status=training.status, error=training.error)
    if training.status == "crash" and training.error.startswith("the training process ended"):
        result = _died(exit_code, log.text(), training.error)
    if result.ok:
        scored = score(evaluations or new_evaluations(), profile, data, scoring_device, deadline, stop=stop)
        if scored.status == "ok" and rescore_below is not None and scored.val_bpb < rescore_below:
            log.note(f"val_bpb {scored.val_bpb:.4f} beats the best so far by over {IMPLAUSIBLE_GAIN}: scored again")
            again = score(new_evaluations(), profile, data, scoring_device, deadline, reorder=True, stop=stop)
            if again.status != "ok" or abs(again.val_bpb - scored.val_bpb) > RESCORE_TOLERANCE:
                got = f"{again.val_bpb:.6f}" if again.val_bpb is not None else again.error
                scored.status, scored.error = "invalid", (f"not reproducible: val_bpb {scored.val_bpb:.6f} in one "
                                                          f"order of the rows, {got} in another")
            scored.eval_seconds += again.eval_seconds
        result = TrialResult(status=scored.status, error=scored.error, val_bpb=scored.val_bpb if
                             scored.status == "ok" else None, eval_seconds=scored.eval_seconds)
    elif evaluations:
        for evaluation in evaluations:
            evaluation.process.kill()
    result.intermediate = [list(point) for point in training.intermediate]
    _measure(result, training, launched - t0, scoring_device)
    return _finish(result, config, log, trial_dir, t0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _died(exit_code: int | None, log_text: str, error: str) -> TrialResult:
    """Classify a training process that ended without a word: the OOM killer's SIGKILL, an allocation failure."""
    if exit_code in (-9, 137):
        return TrialResult(status="oom", error="killed by SIGKILL (most likely the kernel's out-of-memory killer)")
    tail = log_text[-4000:]
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")[:300]
    status = "oom" if is_oom(tail) else "crash"
    how = f" (exit status {exit_code})" if exit_code not in (None, 0) else ""
    return TrialResult(status=status, error=f"{error}{how}" + (f": {last}" if last else ""))


def _measure(result: TrialResult, training, before_launch: float, device: torch.device) -> None:  # noqa: ANN001
    """Seconds, steps and tokens from the trusted clock; size and memory as the trial reported them."""
    result.training_seconds = training.training_seconds
    result.num_steps, result.total_tokens = training.steps, training.tokens
    ready = training.ready or training.launched
    clock = training.clock_start or training.finished or time.perf_counter()
    result.startup_seconds = before_launch + clock - training.launched
    result.phases = {"imports": ready - training.launched, "data": before_launch, "setup": max(0.0, clock - ready),
                     "training": result.training_seconds, "intermediate": training.evaluating,
                     "eval": result.eval_seconds}
    if result.training_seconds > 0:
        result.tokens_per_second = training.tokens / result.training_seconds
    reported = training.reported
    result.peak_memory_mb, result.peak_reserved_mb = reported.get("peak_memory_mb"), reported.get("peak_reserved_mb")
    params = reported.get("num_params")
    result.num_params = int(params) if params is not None else None
    flops = reported.get("flops_per_token") or (6 * params if params else None)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if result.tokens_per_second and flops and peak:
        result.mfu = flops * result.tokens_per_second / peak


def _finish(result: TrialResult, config: dict[str, Any], log: TrialLog, trial_dir: Path, t0: float) -> TrialResult:
    """Remove the working files, scrub and bound the error, write the log and result.json (a trial that spoiled its
    folder fails, alone)."""
    if os.environ.get(KEEP_FILES_ENV) != "1":
        for name in WORKING_FILES:
            for folder in trial_dir.glob(name):
                shutil.rmtree(folder, ignore_errors=True)  # links inside are removed, never followed
    result.total_seconds = time.perf_counter() - t0
    if result.phases:
        result.phases["teardown"] = max(0.0, result.total_seconds - sum(result.phases.values()))
    result.config, result.log_path = config, str(trial_dir / "log.txt")
    if result.error:
        result.error = scrub(result.error, ERROR_CHARS)
    try:
        log.close()
        result.write(trial_dir / "result.json")
    except OSError as e:
        result.status, result.val_bpb = "crash", None
        result.error = scrub(f"cannot write the trial's log or result: {e}", ERROR_CHARS)
    return result
