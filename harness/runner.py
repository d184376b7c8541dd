"""Run one trial: materialize its directory, run harness.worker in a clean subprocess, return its TrialResult."""
from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.data import prepared
from harness.knobs import find_knobs, inject_knobs
from harness.profiles import Profile, data_dir
from harness.result import TrialResult, is_oom

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")  # env names never passed to a trial
STOP_POLL_SECONDS = 0.1  # how soon a stop request (Ctrl-C) ends a running trial


def snap_batch_size(source: str, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """The config with TOTAL_BATCH_SIZE moved to the nearest multiple (ties up, at least one) of
    DEVICE_BATCH_SIZE * seq_len, so that gradient accumulation is a whole number of micro-batches.
    Knobs missing from config take train.py's values; a train.py without both knobs is left alone."""
    knobs = find_knobs(source)
    if "TOTAL_BATCH_SIZE" not in knobs or "DEVICE_BATCH_SIZE" not in knobs:
        return dict(config)
    total = config.get("TOTAL_BATCH_SIZE", knobs["TOTAL_BATCH_SIZE"].value)
    micro = config.get("DEVICE_BATCH_SIZE", knobs["DEVICE_BATCH_SIZE"].value) * seq_len
    snapped = max(1, math.floor(total / micro + 0.5)) * micro
    return dict(config) if snapped == total else {**config, "TOTAL_BATCH_SIZE": snapped}


def compile_caches() -> dict[str, str]:
    """Where torch.compile keeps its caches (inductor's FX graphs and kernels, Triton's binaries): under the data
    directory, so that every trial of the same code, and later runs, start from the kernels compiled before.
    They override the environment's (torch itself writes its default into os.environ when it first looks)."""
    root = data_dir() / "compile-cache"
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def clean_env() -> dict[str, str]:
    """os.environ without anything that looks like a secret, with the project importable, output unbuffered,
    and the compilation caches shared between trials."""
    env = {k: v for k, v in os.environ.items() if not any(m in k.upper() for m in SECRET_MARKERS)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env | compile_caches()


def _missing_result(returncode: int, log_path: Path) -> TrialResult:
    """Classify a worker that died without writing its result."""
    tail = log_path.read_text(errors="replace")[-4000:]
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")[:300]
    if returncode == -signal.SIGKILL:
        return TrialResult(status="oom", error="killed by SIGKILL (most likely the kernel's out-of-memory killer)")
    if is_oom(tail):
        return TrialResult(status="oom", error=last)
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
    return TrialResult(status="crash", error=f"trial process {how}" + (f": {last}" if last else ""))


def _wait(proc: subprocess.Popen, limit: float, stop: threading.Event | None) -> None:
    """Wait for a trial's worker: TimeoutExpired past `limit` seconds, KeyboardInterrupt soon after `stop` is set."""
    deadline = time.monotonic() + limit
    while True:
        try:
            proc.wait(timeout=min(STOP_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt


def run_trial(source: str, config: dict[str, Any], profile: Profile, trial_dir: Path, *, seed: int = 0,
              device: str | None = None, vram_cap_gb: float | None = None, timeout: float | None = None,
              stop: threading.Event | None = None) -> TrialResult:
    """Run train.py `source` with `config` injected in trial_dir; every failure of train.py is a result, never raised.

    TOTAL_BATCH_SIZE is snapped first (see snap_batch_size); result.config is the snapped config that ran.
    Setting `stop` (Ctrl-C) kills the trial and raises KeyboardInterrupt here, at a point where that is safe.
    Raises UserError when the profile's data is not prepared, KnobError for knobs train.py does not define.
    """
    data = prepared(profile)
    trial_dir = Path(trial_dir).resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    log_path = trial_dir / "log.txt"
    try:
        ast.parse(source)
    except SyntaxError as e:
        log_path.write_text(f"train.py does not parse: line {e.lineno}: {e.msg}\n")
        return TrialResult(status="crash", error=f"SyntaxError: {e.msg} (train.py:{e.lineno})", config=dict(config),
                           log_path=str(log_path))
    config = snap_batch_size(source, config, profile.seq_len)
    (trial_dir / "train.py").write_text(inject_knobs(source, config))
    spec = {"profile": asdict(profile), "data": data.to_dict(), "seed": seed, "device": device,
            "vram_cap_gb": vram_cap_gb, "launched_at": time.time(), "runner_pid": os.getpid()}
    (trial_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    for stale in list(trial_dir.glob("result*.json")):
        stale.unlink()
    nonce = secrets.token_hex(16)
    limit = timeout or profile.timeout_seconds
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(trial_dir)], cwd=trial_dir,
                                env=clean_env(), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        timed_out = False
        try:
            _wait(proc, limit, stop)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the worker and anything train.py started, also when we are interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    total = time.perf_counter() - t0
    out = trial_dir / f"result-{nonce}.json"
    if out.exists():
        result = TrialResult.read(out)
        out.unlink()
        if result.phases:  # writing the result, process exit, and the runner's own work around the launch
            result.phases["teardown"] = max(0.0, total - sum(result.phases.values()))
    elif timed_out:
        result = TrialResult(status="timeout", error=f"killed at the {limit:.0f}s wall-clock limit of a trial")
    else:
        result = _missing_result(proc.returncode, log_path)
    result.total_seconds, result.config, result.log_path = total, config, str(log_path)
    result.write(trial_dir / "result.json")
    return result
