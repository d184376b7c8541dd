"""Whole trials through harness.runner.run_trial: a sandboxed training process, fresh evaluation processes, the
trusted scorer. Each failure class, the trial's folder, what the trial sees of the environment, the rescore, and
that no process of a trial outlives it (Ctrl-C, or its runner killed)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness import api
from harness.errors import UserError
from harness.profiles import get_profile
from harness.result import TrialResult
from harness.runner import PEAK_BF16_FLOPS, _died, peak_flops, run_trial, snap_batch_size, trial_device
from harness.sandbox import ENV_ALLOWED, PROJECT_ROOT, bwrap_problem
from harness.scorer import forward_rows
from harness.trainer import classify, one_line

TEST = get_profile("test")
SHORT = replace(TEST, time_budget=0.5)  # for trials whose outcome does not depend on how long they train
PLANTED_URL = "postgresql://optimizer:planted-pw-4242@db.internal/trials"

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")


def environment_names(log: str) -> set[str]:
    """The names TINY_TRAIN_PY printed as its environment."""
    line = next(line for line in log.splitlines() if line.startswith("environment:"))
    return set(line.split()[1:])


def test_the_working_files_are_kept_when_asked(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_KEEP_TRIAL_FILES", "1")
    r = run_trial(tiny_train_py.read_text(), {}, TEST, tmp_path / "t")
    assert r.ok, r.error
    assert (tmp_path / "t" / "scratch" / "model.pt").exists() and (tmp_path / "t" / "eval-main" / "logits.bin").exists()


def test_a_trial(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    """An honest trial: scored (twice: below rescore_below, on another order, and it agrees), its folder laid out,
    its clock and counts from the trusted side, and an environment built from the allow-list."""
    monkeypatch.setenv("DATABASE_URL", PLANTED_URL)
    folder = tmp_path / "t"
    r = run_trial(tiny_train_py.read_text(), {"TOTAL_BATCH_SIZE": 700}, TEST, folder, rescore_below=100.0)
    assert r.ok, r.error
    assert 1 < r.val_bpb < 5  # a uniform model scores 3.9 here
    assert r.config == {"TOTAL_BATCH_SIZE": 512}
    assert "TOTAL_BATCH_SIZE = 512" in (folder / "train.py").read_text()

    log = (folder / "log.txt").read_text()
    assert "scored again" in log  # the honest model passes the rescore
    names = environment_names(log)
    assert "DATABASE_URL" not in names
    fixed = {"PATH", "HOME", "TMPDIR", "USER", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
             "PYTHONNOUSERSITE", "CUDA_VISIBLE_DEVICES", "PWD", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
             "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"}
    assert names <= set(ENV_ALLOWED) | fixed, names - set(ENV_ALLOWED) - fixed
    assert "planted-pw-4242" not in log

    # what stays: the code, spec, log and result; the model and the logits handed to the scorer are removed
    assert {p.name for p in folder.iterdir()} == {"train.py", "spec.json", "log.txt", "result.json"}
    assert TrialResult.read(folder / "result.json").to_dict() == r.to_dict() and r.log_path == str(folder / "log.txt")
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["eval_rows"] == forward_rows(TEST) and spec["seq_len"] == TEST.seq_len and spec["device"] == "cpu"
    assert "planted-pw-4242" not in (folder / "spec.json").read_text()

    assert r.training_seconds >= TEST.time_budget
    assert r.total_seconds > r.training_seconds + r.startup_seconds > 0 and r.eval_seconds > 0
    assert list(r.phases) == ["imports", "data", "setup", "training", "intermediate", "eval", "teardown"]
    assert r.phases["intermediate"] == 0 and r.intermediate == []  # no pruning: no intermediate evaluation
    assert min(r.phases.values()) >= 0 and r.phases["imports"] > 0.1  # at least the interpreter and torch
    assert sum(r.phases.values()) == pytest.approx(r.total_seconds, abs=1e-6)
    assert r.phases["imports"] + r.phases["data"] + r.phases["setup"] == pytest.approx(r.startup_seconds, abs=1e-6)
    # one micro-batch of 8 x 64 per step; the batches of the warm-up steps are random tokens and not counted
    assert r.num_steps > 1 and r.total_tokens == (r.num_steps - TEST.warmup_steps) * 512 and r.tokens_per_second > 0
    assert r.num_params == 2048 * 32 + (32 * 128 + 128) + (128 * 32 + 32) + (32 * 2048 + 2048)
    assert r.peak_memory_mb > 0 and r.mfu is None


def test_the_two_evaluations_share_the_trial_threads(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    """Training has the trial's threads; the two evaluation processes, which run at once, half of them each."""
    monkeypatch.setenv("HYBRID_TRIAL_THREADS", "4")
    code = tiny_train_py.read_text().replace("    def forward(self, idx):\n", "    def forward(self, idx):\n"
                                             "        print('THREADS', self.training, torch.get_num_threads())\n")
    r = run_trial(code, {}, SHORT, tmp_path / "t", sandbox="off")
    assert r.ok, r.error
    log = (tmp_path / "t" / "log.txt").read_text()
    assert "THREADS True 4" in log and "THREADS False 2" in log and "THREADS False 4" not in log


FAILURES = [
    ("raise", "crash", "ValueError: boom from the tiny script (train.py:"),
    ("nan", "nan", "training loss is nan"),
    ("no-finish", "invalid", "never called session.finish"),
    ("bad-shape", "invalid", "must return logits of shape (64, 64, 2048) (B, T, vocab), got (64, 64, 2047)"),
    ("oom", "oom", "out of memory"),
    ("exit", "crash", "train.py exited with status 3"),
]


@pytest.mark.parametrize("mode, status, error", FAILURES, ids=[mode for mode, _, _ in FAILURES])
def test_trial_failures(prepared_test, tiny_train_py, tmp_path, mode, status, error):
    r = run_trial(tiny_train_py.read_text(), {"MODE": mode}, SHORT, tmp_path / mode)
    assert (r.status, r.val_bpb) == (status, None), r.error
    assert error in r.error and "\n" not in r.error
    assert TrialResult.read(tmp_path / mode / "result.json").status == status
    if mode == "raise":
        assert "Traceback" in (tmp_path / mode / "log.txt").read_text()


def test_an_error_and_the_log_are_scrubbed(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    """A value of the trusted side's environment never comes back in an error or the log, even when the trial
    says it (here it cannot know it: the same words happen to be its error message)."""
    monkeypatch.setenv("INNOCENT_LOOKING_SETTING", "boom from the tiny script")
    r = run_trial(tiny_train_py.read_text(), {"MODE": "raise"}, SHORT, tmp_path / "t")
    assert r.status == "crash" and r.error.startswith("ValueError: [redacted] (train.py:")
    assert "boom from" not in (tmp_path / "t" / "log.txt").read_text()
    assert "boom from" not in (tmp_path / "t" / "result.json").read_text()


def test_trial_timeouts(prepared_test, tiny_train_py, tmp_path):
    """Both limits end a train.py that would sleep 600 s: the wall-clock one, and the start-up limit."""
    r = run_trial(tiny_train_py.read_text(), {"MODE": "sleep"}, TEST, tmp_path / "hard", timeout=3)
    assert (r.status, r.val_bpb) == ("timeout", None) and "wall-clock limit" in r.error
    r = run_trial(tiny_train_py.read_text(), {"MODE": "sleep"}, TEST, tmp_path / "startup", startup_limit=2)
    assert r.status == "timeout" and "clock did not start within 2s" in r.error


def test_trial_syntax_error(prepared_test, tmp_path):
    r = run_trial("x = (\n", {}, TEST, tmp_path / "s")
    assert r.status == "crash" and "SyntaxError" in r.error and "(train.py:1)" in r.error
    assert "does not parse" in (tmp_path / "s" / "log.txt").read_text()
    assert TrialResult.read(tmp_path / "s" / "result.json").status == "crash"


@pytest.mark.parametrize("name", ["result.json", "log.txt"])
def test_a_spoiled_folder_fails_the_trial_alone(prepared_test, tmp_path, name):
    """A directory where the trusted side writes a file: that trial fails, nothing is raised."""
    (tmp_path / "s" / name).mkdir(parents=True)
    r = run_trial("x = (\n", {}, TEST, tmp_path / "s")
    assert r.status == "crash" and "cannot write the trial's log or result" in r.error


def test_without_the_sandbox_a_trial_runs_too(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", PLANTED_URL)
    r = run_trial(tiny_train_py.read_text(), {}, SHORT, tmp_path / "off", sandbox="off")
    assert r.ok and 1 < r.val_bpb < 5, r.error
    assert "DATABASE_URL" not in environment_names((tmp_path / "off" / "log.txt").read_text())


def test_bad_sandbox_mode_and_missing_data(prepared_test, tiny_train_py, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown sandbox mode"):
        run_trial(tiny_train_py.read_text(), {}, TEST, tmp_path / "mode", sandbox="maybe")
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no prepared data"):
        run_trial(tiny_train_py.read_text(), {}, TEST, tmp_path / "data")


def test_snap_batch_size():
    src = "DEVICE_BATCH_SIZE = 8\nTOTAL_BATCH_SIZE = 2**10\n"
    assert snap_batch_size(src, {}, 64) == {}  # 1024 is 2 micro-batches of 8 * 64 already
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 700}, 64) == {"TOTAL_BATCH_SIZE": 512}
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 768}, 64) == {"TOTAL_BATCH_SIZE": 1024}  # ties go up
    assert snap_batch_size(src, {"TOTAL_BATCH_SIZE": 100}, 64) == {"TOTAL_BATCH_SIZE": 512}  # at least one
    assert snap_batch_size(src, {"DEVICE_BATCH_SIZE": 12}, 64) == {"DEVICE_BATCH_SIZE": 12, "TOTAL_BATCH_SIZE": 768}
    assert snap_batch_size("LR = 0.1\n", {"LR": 0.2}, 64) == {"LR": 0.2}


def test_trial_device():
    assert trial_device("cpu") == (torch.device("cpu"), None)
    assert trial_device("cuda:1") == (torch.device("cuda", 1), 1)  # the jail sees it as cuda:0
    assert trial_device("cuda") == (torch.device("cuda", 0), 0)


def test_a_process_that_died_silently():
    r = _died(-signal.SIGKILL, "step 3\n", "the training process ended without handing over a model")
    assert r.status == "oom" and "SIGKILL" in r.error
    r = _died(-signal.SIGSEGV, "step 3\n\n", "the training process ended")
    assert r.status == "crash" and r.error == "the training process ended (exit status -11): step 3"
    r = _died(-signal.SIGABRT, "terminate called after throwing an instance of 'std::bad_alloc'\n", "ended")
    assert r.status == "oom"


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


def test_one_line():
    try:
        exec(compile("\n\nraise KeyError('first line\\nsecond line')", "/trial/train.py", "exec"))
    except KeyError as e:
        assert one_line(e) == "KeyError: 'first line\\nsecond line' (train.py:3)"
    try:
        raise ValueError("first\nsecond")
    except ValueError as e:
        assert one_line(e) == "ValueError: first"


# Starts a child that leaves its session and process group, then waits: what must still end with the trial.
ORPHAN_TRAIN_PY = """
import subprocess, sys, time
from harness import api

MARKER = "{marker}"


def main():
    session = api.start()
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", MARKER], start_new_session=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
"""
RUNNER_PY = """
import sys
from pathlib import Path
from harness.profiles import get_profile
from harness.runner import run_trial

run_trial(Path(sys.argv[1]).read_text(), {}, get_profile("test"), Path(sys.argv[2]), sandbox="required")
"""


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (zombies aside)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":
                    found[int(entry.name)] = (int(ppid), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def of_trial(folder: Path, marker: str) -> set[int]:
    """The trial's processes: those whose command line holds its folder or the marker, and all they started."""
    table = processes()
    found = {pid for pid, (_, cmdline) in table.items() if str(folder) in cmdline or marker in cmdline}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def wait_for(condition, seconds: float = 60.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(condition())


def still_alive(pids: set[int]) -> set[int]:
    return pids & set(processes())


@pytest.fixture
def orphan(tmp_path):
    """(train.py code, trial folder, marker), and any process of it SIGKILLed afterwards, whatever happened."""
    marker = f"orphan-{uuid.uuid4().hex}"
    folder = tmp_path / "t"
    yield ORPHAN_TRAIN_PY.replace("{marker}", marker), folder, marker
    for pid in of_trial(folder, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@needs_bwrap
def test_a_stopped_trial_is_killed_and_raises(prepared_test, orphan):
    """Setting `stop` (Ctrl-C) ends the trial's processes, the escaped child included, and raises KeyboardInterrupt."""
    code, folder, marker = orphan
    stop, seen = threading.Event(), {}

    def stop_once_running() -> None:
        wait_for(lambda: any(marker in cmdline for _, cmdline in processes().values()), 120)
        seen.update({pid: processes().get(pid, (0, ""))[1] for pid in of_trial(folder, marker)})
        stop.set()

    watcher = threading.Thread(target=stop_once_running)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_trial(code, {}, TEST, folder, stop=stop, sandbox="required")
    finally:
        stop.set()
        watcher.join()
    assert any(marker in cmdline for cmdline in seen.values()), "the trial's child never started"
    assert wait_for(lambda: not still_alive(set(seen)) and not of_trial(folder, marker)), \
        {pid: processes().get(pid) for pid in still_alive(set(seen)) | of_trial(folder, marker)}


@needs_bwrap
def test_a_trial_ends_when_its_runner_is_killed(prepared_test, orphan):
    """SIGKILL of the process running a trial ends every process of the trial (bubblewrap dies with its parent
    and takes its PID namespace along), not at the timeout."""
    code, folder, marker = orphan
    (folder.parent / "orphan.py").write_text(code)
    runner = subprocess.Popen([sys.executable, "-c", RUNNER_PY, str(folder.parent / "orphan.py"), str(folder)],
                              cwd=PROJECT_ROOT)
    try:
        assert wait_for(lambda: runner.poll() is not None or any(
            marker in cmdline for _, cmdline in processes().values()), 120), "the trial's child never started"
        assert runner.poll() is None
        trial = of_trial(folder, marker)
        assert len(trial) >= 3  # bubblewrap, the training process and its child at least
        runner.kill()
        runner.wait()
        assert wait_for(lambda: not still_alive(trial) and not of_trial(folder, marker)), \
            {pid: processes().get(pid) for pid in still_alive(trial) | of_trial(folder, marker)}
    finally:
        runner.kill()
        runner.wait()


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA GeForce RTX 2080 Ti", None), ("NVIDIA L4O", None), ("Tesla T4", None),
])
def test_peak_flops_matches_whole_model_names(name, model):
    assert peak_flops(name) == (PEAK_BF16_FLOPS[model] if model else None)


def test_peak_flops_keeps_variants_apart():
    assert peak_flops("NVIDIA H100 PCIe") < peak_flops("NVIDIA H100 NVL") < peak_flops("NVIDIA H100 80GB HBM3")
    assert peak_flops("NVIDIA L4") < peak_flops("NVIDIA L40") < peak_flops("NVIDIA L40S")
