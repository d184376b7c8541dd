"""One trial's process: `python -m harness.worker TRIAL_DIR` (nonce on stdin) runs TRIAL_DIR/train.py, scores it.

Reads TRIAL_DIR/spec.json, sets seeds, device and VRAM cap, runs train.py, evaluates the model it handed over,
and writes TRIAL_DIR/result-<nonce>.json (a TrialResult) for the runner. A watchdog ends the trial as a
timeout if the clock has not started within profile.max_startup_seconds, or runs far past the budget, and
kills the trial's process group (the worker and anything train.py started) if the runner dies.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from harness import api
from harness.data import Prepared
from harness.evaluate import InvalidOutput, evaluate_bpb
from harness.profiles import Profile
from harness.result import TrialResult, is_oom

IMPORTED_AT = time.time()  # the interpreter and the imports above are done
FINISH_GRACE = 10.0  # seconds train.py may keep running after finish()
OVERRUN = 30.0       # seconds past the time budget (plus a quarter of it) before the watchdog gives up
ORPHANED = 3         # exit status of a worker whose runner died, where it could not kill its process group
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "RTX 4090": 165.2e12, "RTX 3090": 71e12}


def classify(e: BaseException) -> str:
    """The failure class of an exception raised by train.py or by scoring its model."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or is_oom(str(e)):
        return "oom"
    if isinstance(e, api.Diverged):
        return "nan"
    if isinstance(e, InvalidOutput):
        return "invalid"
    return "crash"


def one_line(e: BaseException) -> str:
    """`Type: message (train.py:LINE)`, the message cut to its first line."""
    where = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).name == "train.py"]
    message = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {message}" + (f" (train.py:{where[-1].lineno})" if where else "")


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def measure(result: TrialResult, session: api.Session, launched_at: float, data_ready_at: float) -> None:
    """Training, startup and its phases, throughput, memory, size and MFU, from the session and the process."""
    result.training_seconds = session.training_seconds
    clock_wall = session.clock_wall or time.time()
    result.startup_seconds = clock_wall - launched_at
    result.phases = {"imports": IMPORTED_AT - launched_at, "data": data_ready_at - IMPORTED_AT,
                     "setup": clock_wall - data_ready_at, "training": result.training_seconds,
                     "eval": result.eval_seconds}
    result.num_steps, result.total_tokens = session.steps, session.tokens
    if session.training_seconds > 0:
        result.tokens_per_second = session.tokens / session.training_seconds
    if session.device.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(session.device) / 2**20
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.peak_memory_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    model = session.model
    if isinstance(model, torch.nn.Module):
        result.num_params = sum(p.numel() for p in model.parameters())
        if session.device.type == "cuda" and result.tokens_per_second and peak_flops(session.device):
            per_token = model.estimate_flops() if hasattr(model, "estimate_flops") else 6 * result.num_params
            result.mfu = per_token * result.tokens_per_second / peak_flops(session.device)


def end_orphaned() -> NoReturn:
    """Kill the process group this worker leads (itself and whatever train.py started): its runner is gone."""
    with contextlib.suppress(ProcessLookupError):  # not a group leader when not started by the runner
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(ORPHANED)


def main(trial_dir: Path) -> None:
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # train.py cannot read the nonce
    out = trial_dir / f"result-{nonce}.json"
    spec = json.loads((trial_dir / "spec.json").read_text())
    profile, data, seed = Profile(**spec["profile"]), Prepared.from_dict(spec["data"]), spec["seed"]
    device = torch.device(spec["device"] or ("cuda" if torch.cuda.is_available() else
                                             "mps" if torch.backends.mps.is_available() else "cpu"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu" and os.environ.get("HYBRID_TRIAL_THREADS"):
        torch.set_num_threads(int(os.environ["HYBRID_TRIAL_THREADS"]))  # workers sharing the cores
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        if spec.get("vram_cap_gb"):
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["vram_cap_gb"] * 2**30 / total), device)
    session = api.Session(profile, data, device, seed)
    api._session = session
    data_ready_at = time.time()
    result = TrialResult()
    lock = threading.Lock()  # whoever writes the result first ends the trial

    def end(status: str, error: str) -> None:
        with lock:
            result.status, result.error = status, error
            measure(result, session, spec["launched_at"], data_ready_at)
            result.write(out)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def watchdog() -> None:
        while True:
            time.sleep(0.1)
            if os.getppid() != spec["runner_pid"]:  # the runner was killed: end the trial with it
                end_orphaned()
            if session.model is not None:
                continue
            if session.clock_start is None and time.time() - spec["launched_at"] > profile.max_startup_seconds:
                print(f"harness: the clock did not start within {profile.max_startup_seconds:.0f}s", file=sys.stderr)
                end("timeout", f"the training clock did not start within {profile.max_startup_seconds:.0f}s "
                               f"(startup: imports, data, model, compilation and {profile.warmup_steps} warm-up step(s))")
            limit = profile.time_budget * 1.25 + OVERRUN
            if session.clock_start is not None and time.perf_counter() - session.clock_start > limit:
                print(f"harness: training ran past {limit:.0f}s without finish()", file=sys.stderr)
                end("timeout", f"training ran past {limit:.0f}s on the clock without finish() "
                               f"(budget {profile.time_budget:.0f}s: stop when session.done)")

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        try:
            runpy.run_path(str(trial_dir / "train.py"), run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise RuntimeError(f"train.py exited with status {e.code}") from None
        if session.model is None:
            raise InvalidOutput("train.py never called session.finish(model)")
        if session.clock_start is None:
            raise InvalidOutput("the training clock never ran: call session.tick(loss) once per optimizer step")
        lag = time.perf_counter() - session.finished_at
        if lag > FINISH_GRACE:
            raise InvalidOutput(f"train.py kept running {lag:.0f}s after finish(model)")
        t0 = time.perf_counter()
        result.val_bpb = evaluate_bpb(session.model, profile, data, device)
        result.eval_seconds = time.perf_counter() - t0
        if not np.isfinite(result.val_bpb):
            result.status, result.error = "nan", f"val_bpb is {result.val_bpb}"
    except BaseException as e:  # every failure of train.py becomes a result
        traceback.print_exc()
        result.status, result.error = classify(e), one_line(e)
    end(result.status, result.error)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
