import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness import api
from harness.evaluate import InvalidOutput, evaluate_bpb
from harness.loader import batches
from harness.profiles import data_dir, get_profile
from harness.runner import PROJECT_ROOT, _missing_result, clean_env, run_trial, snap_batch_size
from harness.tokenizer import Tokenizer
from harness.worker import classify

TEST = get_profile("test")


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int, shape_error: bool = False):
        super().__init__()
        self.vocab, self.shape_error = vocab, shape_error

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab - self.shape_error)


def test_uniform_model_bpb(prepared_test):
    bpb = evaluate_bpb(Uniform(2048), TEST, prepared_test, "cpu")
    lengths = torch.from_numpy(Tokenizer.load(prepared_test.tokenizer).token_bytes())
    x, y = next(batches(prepared_test, "val", TEST.eval_tokens // TEST.seq_len, TEST.seq_len, "cpu"))
    counted = lengths[y]
    assert y.numel() == TEST.eval_tokens
    assert bpb == pytest.approx(math.log2(2048) * (counted > 0).sum().item() / counted.sum().item(), rel=1e-6)


def test_wrong_logits_shape(prepared_test):
    with pytest.raises(InvalidOutput, match=r"\(64, 64, 2048\).*got \(64, 64, 2047\)"):
        evaluate_bpb(Uniform(2048, shape_error=True), TEST, prepared_test, "cpu")


class ReadsAhead(torch.nn.Module):
    """Predicts each next token by looking at it: a perfect score the metric must refuse."""

    def forward(self, idx):
        ahead = torch.roll(idx, -1, dims=1)
        return 15.0 * torch.nn.functional.one_hot(ahead, 2048).float()


def test_a_model_that_reads_ahead_is_invalid(prepared_test):
    with pytest.raises(InvalidOutput, match="not causal"):
        evaluate_bpb(ReadsAhead(), TEST, prepared_test, "cpu")


def test_session_clock(prepared_test):
    profile = replace(TEST, warmup_steps=2, time_budget=0.3)
    s = api.Session(profile, prepared_test, "cpu")
    assert (s.vocab_size, s.bos_id, s.seq_len) == (2048, 2047, 64)
    batches_ = s.train_batches(4)
    next(batches_)
    s.tick(5.0)
    time.sleep(0.2)
    before_clock = time.perf_counter()
    s.tick(5.0)  # the second warm-up step: still off the clock, which starts now
    assert s.training_seconds == 0 and s.tokens == 0 and not s.done
    next(batches_)
    time.sleep(0.2)
    fraction = s.tick(4.0)
    assert 0.2 / 0.3 <= fraction <= (time.perf_counter() - before_clock) / 0.3
    assert s.tokens == 4 * 64
    time.sleep(0.15)
    assert s.tick(4.0) == 1.0 and s.done
    for bad in (float("nan"), float("inf"), 101.0):
        with pytest.raises(api.Diverged):
            s.tick(bad)


def test_snap_batch_size():
    src = "DEVICE_BATCH_SIZE = 8\nTOTAL_BATCH_SIZE = 2**10\n"
    assert snap_batch_size(src, {}, 64) == {}  # 1024 is 2 micro-batches of 8 * 64 already
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 700}, 64) == {"TOTAL_BATCH_SIZE": 512}
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 768}, 64) == {"TOTAL_BATCH_SIZE": 1024}  # ties go up
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 100}, 64) == {"TOTAL_BATCH_SIZE": 512}  # at least one
    assert snap_batch_size(src, {"DEVICE_BATCH_SIZE": 12}, 64) == {"DEVICE_BATCH_SIZE": 12, "TOTAL_BATCH_SIZE": 768}
    assert snap_batch_size("LR = 0.1\n", {"LR": 0.2}, 64) == {"LR": 0.2}


def test_clean_env(monkeypatch):
    for name in ("MY_API_KEY", "hf_token", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("HYBRID_PROFILE", "test")
    env = clean_env()
    assert not {"MY_API_KEY", "hf_token", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"} & set(env)
    assert env["HYBRID_PROFILE"] == "test" and env["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")  # what torch writes on first use
    env = clean_env()
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(data_dir() / "compile-cache" / "inductor")
    assert env["TRITON_CACHE_DIR"].startswith(str(data_dir())) and env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"


def test_missing_result(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("step 3\n")
    assert _missing_result(-signal.SIGKILL, log).status == "oom"
    r = _missing_result(-signal.SIGSEGV, log)
    assert r.status == "crash" and "SIGSEGV" in r.error and "step 3" in r.error
    log.write_text("terminate called after throwing an instance of 'std::bad_alloc'\n")
    assert _missing_result(-signal.SIGABRT, log).status == "oom"


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
    RuntimeError("Triton Error [CUDA]: CUDA_ERROR_OUT_OF_MEMORY"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
    OSError(12, "Cannot allocate memory"),
    RuntimeError("std::bad_alloc"),
    MemoryError(),
])
def test_allocation_failures_are_oom(error):
    assert classify(error) == "oom"


def test_other_failures_are_not_oom():
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == "crash"
    assert classify(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")) == "crash"
    assert classify(api.Diverged("training loss is nan")) == "nan"
    assert classify(InvalidOutput("bad shape")) == "invalid"


def test_trial_ok(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "sk-secret-value")
    r = run_trial(tiny_train_py.read_text(), {"TOTAL_BATCH_SIZE": 700}, TEST, tmp_path / "t")
    assert r.ok, r.error
    assert 1 < r.val_bpb < 5  # a uniform model scores 3.9 here
    assert r.config == {"TOTAL_BATCH_SIZE": 512}
    assert "TOTAL_BATCH_SIZE = 512" in (tmp_path / "t" / "train.py").read_text()
    assert TEST.time_budget <= r.training_seconds < TEST.time_budget + 2
    assert r.total_seconds > r.training_seconds + r.startup_seconds > 0 and r.eval_seconds > 0
    assert list(r.phases) == ["imports", "data", "setup", "training", "eval", "teardown"]
    assert min(r.phases.values()) >= 0 and r.phases["imports"] > 0.1  # at least the interpreter and torch
    assert sum(r.phases.values()) == pytest.approx(r.total_seconds, abs=1e-6)
    assert r.phases["imports"] + r.phases["data"] + r.phases["setup"] == pytest.approx(r.startup_seconds, abs=1e-6)
    assert r.num_steps > 1 and r.total_tokens > 0 and r.tokens_per_second > 0
    assert r.num_params > 0 and r.peak_memory_mb > 0 and r.mfu is None
    log = (tmp_path / "t" / "log.txt").read_text()
    assert "environment:" in log and "MY_API_KEY" not in log and "sk-secret-value" not in log
    assert (tmp_path / "t" / "result.json").exists() and r.log_path == str(tmp_path / "t" / "log.txt")


@pytest.mark.parametrize("mode, status, error", [
    ("raise", "crash", "ValueError: boom from the tiny script (train.py:"),
    ("nan", "nan", "training loss is nan"),
    ("no-finish", "invalid", "never called session.finish"),
    ("bad-shape", "invalid", "must return logits of shape"),
    ("oom", "oom", "out of memory"),
])
def test_trial_failures(prepared_test, tiny_train_py, tmp_path, mode, status, error):
    r = run_trial(tiny_train_py.read_text(), {"MODE": mode}, TEST, tmp_path / mode)
    assert (r.status, r.val_bpb) == (status, None)
    assert error in r.error and "\n" not in r.error
    if mode == "raise":
        assert "Traceback" in (tmp_path / mode / "log.txt").read_text()


def test_trial_timeouts(prepared_test, tiny_train_py, tmp_path):
    """Both limits end a train.py that would sleep 600 s: the wall-clock one, and the start-up watchdog."""
    t0 = time.time()
    r = run_trial(tiny_train_py.read_text(), {"MODE": "sleep"}, TEST, tmp_path / "hard", timeout=3)
    assert r.status == "timeout" and "3s wall-clock limit" in r.error and r.total_seconds < 30
    r = run_trial(tiny_train_py.read_text(), {"MODE": "sleep"}, replace(TEST, max_startup_seconds=2), tmp_path / "watchdog")
    assert r.status == "timeout" and "did not start within 2s" in r.error
    assert time.time() - t0 < 120


def test_trial_syntax_error(prepared_test, tmp_path):
    r = run_trial("x = (\n", {}, TEST, tmp_path / "s")
    assert r.status == "crash" and "SyntaxError" in r.error


ORPHAN_TRAIN_PY = """
import os, subprocess, sys, time
from harness import api

session = api.start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pids", os.getpid(), child.pid, flush=True)
time.sleep(600)
"""
RUNNER_PY = """
import sys
from pathlib import Path
from harness.profiles import get_profile
from harness.runner import run_trial

run_trial(Path(sys.argv[1]).read_text(), {}, get_profile("test"), Path(sys.argv[2]))
"""


def alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def reported_pids(log: Path) -> list[int]:
    """The pids ORPHAN_TRAIN_PY printed (its own and its child's), once it has."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("pids ")] if log.exists() else []
    return [int(pid) for pid in lines[0].split()[1:]] if lines else []


def gone_within(pids: list[int], seconds: float) -> bool:
    """Whether every process in pids has ended within `seconds` (a SIGKILL takes effect asynchronously)."""
    deadline = time.time() + seconds
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    return not any(map(alive, pids))


def test_trial_ends_when_its_runner_is_killed(prepared_test, tmp_path):
    """SIGKILL of the process running a trial ends the trial's worker and what train.py started, not at the timeout."""
    (tmp_path / "orphan.py").write_text(ORPHAN_TRAIN_PY)
    log = tmp_path / "t" / "log.txt"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER_PY, str(tmp_path / "orphan.py"), str(tmp_path / "t")],
                              cwd=PROJECT_ROOT)
    pids: list[int] = []
    try:
        deadline = time.time() + 60
        while not pids and time.time() < deadline and runner.poll() is None:
            time.sleep(0.1)
            pids = reported_pids(log)
        assert len(pids) == 2, log.read_text() if log.exists() else "no log"
        runner.kill()
        runner.wait()
        assert gone_within(pids, 5.0), f"still running 5s after their runner was killed: {pids}"
    finally:
        runner.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_stopped_trial_is_killed_and_raises(prepared_test, tmp_path):
    """Setting `stop` (Ctrl-C) ends the trial's worker and what train.py started, and raises KeyboardInterrupt."""
    log, stop, pids = tmp_path / "t" / "log.txt", threading.Event(), []

    def stop_once_running() -> None:
        deadline = time.time() + 60
        while not pids and time.time() < deadline:
            time.sleep(0.05)
            pids.extend(reported_pids(log))
        stop.set()

    watcher = threading.Thread(target=stop_once_running)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_trial(ORPHAN_TRAIN_PY, {}, TEST, tmp_path / "t", stop=stop)
        watcher.join()
        assert len(pids) == 2 and gone_within(pids, 5.0), log.read_text()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
