"""The memory model: analytic peak estimate on the meta device, calibration on recorded peaks, the cap check."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import hybrid.memory
from harness.errors import UserError
from harness.profiles import get_profile
from harness.sandbox import Jail
from harness.scorer import MAX_LOGIT_TOKENS
from hybrid.memory import (GIB, MIB, PAPER_CAP_GB, MemoryModel, analytic_peak_bytes, default_cap_gb, model_shapes,
                          peak_bytes)
from hybrid.paths import project_file
from hybrid.study.store import code_sha

GPU = get_profile("gpu")
REFERENCE_BASELINE_MIB = 45060.2  # autoresearch's baseline, peak_vram_mb on one H100 (its README)


@pytest.fixture(scope="module")
def code() -> str:
    return project_file("train.py").read_text()


@pytest.fixture
def in_process(monkeypatch):
    """Builds of the reference train.py in this process (it is trusted; a probe process costs seconds): for the tests
    of the estimate's arithmetic. The probe's own tests below go through its sandboxed processes."""
    probe = hybrid.memory.ShapeProbe("off")
    monkeypatch.setattr(probe, "build", lambda code, architectures, profile: [
        hybrid.memory.build_shapes(code, knobs, profile) for knobs in architectures])
    monkeypatch.setattr(hybrid.memory, "shape_probe", lambda sandbox="auto": probe)
    return probe


def test_estimate_grows_with_batch_and_depth(code, in_process):
    def peak(**knobs) -> float:
        return analytic_peak_bytes(code, knobs, GPU)

    assert peak(DEVICE_BATCH_SIZE=128) < peak(DEVICE_BATCH_SIZE=256)
    assert peak(DEPTH=8) < peak(DEPTH=12) < peak(DEPTH=16)
    assert peak(DEPTH=16, DEVICE_BATCH_SIZE=32) < peak(DEPTH=16, DEVICE_BATCH_SIZE=64)
    # the harness's evaluation holds the fp32 logits of at most MAX_LOGIT_TOKENS: a floor under small models
    assert model_shapes(code, {}, GPU).eval_rows * GPU.seq_len <= MAX_LOGIT_TOKENS
    assert peak(DEPTH=1, DEVICE_BATCH_SIZE=1) == peak(DEPTH=1, DEVICE_BATCH_SIZE=2)


def test_baseline_near_the_reference_measurement(code, in_process):
    estimate_mib = analytic_peak_bytes(code, {}, GPU) / MIB
    assert 0.9 < estimate_mib / REFERENCE_BASELINE_MIB < 1.1


def test_shapes_match_the_real_model(code, in_process):
    import types

    from harness.knobs import inject_knobs

    knobs = {"DEPTH": 3, "ASPECT_RATIO": 32, "HEAD_DIM": 32}
    profile = get_profile("test")
    shapes = model_shapes(code, knobs, profile)
    module = types.ModuleType("train_for_test")
    exec(compile(inject_knobs(code, knobs), "train.py", "exec", dont_inherit=True), module.__dict__)
    model = module.build_model(profile.vocab_size, profile.seq_len, device="cpu")
    assert shapes.params == sum(p.numel() for p in model.parameters())
    assert shapes.adam_params + shapes.muon_params == shapes.params
    assert shapes.muon_params == sum(p.numel() for p in model.blocks.parameters())
    assert len(shapes.blocks) == 3 and shapes.model_dim == model.config.model_dim
    assert [b.value_embedding for b in shapes.blocks] == [str(i) in model.value_embeds for i in range(3)]


def test_the_model_is_built_once_per_architecture(code):
    probe = hybrid.memory.shape_probe("auto")
    probe.clear()
    started = probe.processes
    first = analytic_peak_bytes(code, {"DEPTH": 6, "MATRIX_LR": 0.01}, GPU)
    # the code's defaults and its shapeless knobs changed (shapeless_knobs), and DEPTH=6: three processes at once
    assert probe.processes - started == 3
    assert analytic_peak_bytes(code, {"DEPTH": 6, "MATRIX_LR": 0.05, "WINDOW_PATTERN": "LLLL"}, GPU) == first
    assert MemoryModel(GPU).estimate_mb(code, {"DEPTH": 6, "MATRIX_LR": 0.02}) == first / MIB  # shares the cache
    assert probe.processes - started == 3
    # the batch knobs are applied to that build: the estimate of a build with the whole config injected
    config = {"DEPTH": 6, "EMBEDDING_LR": 0.3, "DEVICE_BATCH_SIZE": 64, "TOTAL_BATCH_SIZE": 300_000}
    whole = hybrid.memory.build_shapes(code, tuple(config.items()), GPU)
    assert whole.grad_accum == 2 and analytic_peak_bytes(code, config, GPU) == peak_bytes(whole)
    assert probe.processes - started == 3
    # any other knob may set shapes (VE_GATE_CHANNELS does): another build, in a process of its own
    assert analytic_peak_bytes(code, {"DEPTH": 6, "VE_GATE_CHANNELS": 16}, GPU) < first
    assert probe.processes - started == 4


def test_an_edit_that_makes_a_shapeless_knob_set_a_shape_loses_the_sharing(code, in_process):
    line = "model_dim = math.ceil(DEPTH * ASPECT_RATIO / head_dim) * head_dim"
    assert line in code
    edited = code.replace(line, "model_dim = math.ceil(DEPTH * ASPECT_RATIO * (1 + (MATRIX_LR > 0.05)) / head_dim) "
                                "* head_dim")
    assert hybrid.memory.shapeless_knobs(code, GPU) == hybrid.memory.SHAPELESS_KNOBS
    assert hybrid.memory.shapeless_knobs(edited, GPU) == set(hybrid.memory.BATCH_KNOBS)
    assert analytic_peak_bytes(edited, {"MATRIX_LR": 0.01}, GPU) < analytic_peak_bytes(edited, {"MATRIX_LR": 0.1}, GPU)


def _hostile(code: str, snippet: str) -> str:
    """`code` with `snippet` run at import, before build_model is defined."""
    return code.replace("\ndef build_model(", f"\n{snippet}\ndef build_model(", 1)


def _processes_running(marker: bytes) -> list[int]:
    """Processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _children() -> set[int]:
    """This process's children."""
    children = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            children |= {int(pid) for pid in (task / "children").read_text().split()}
    return children


def _contained() -> bool:
    return Jail("auto", Path("/nonexistent")).contained


@pytest.mark.parametrize("hostile", [
    "raise SystemExit(3)\n",                     # would end the run if it ran in the run's process
    "import os\nos._exit(1)\n",                 # kills its probe
    "while True:\n    pass\n",                  # hangs it: killed after PROBE_BUILD_SECONDS
    "_hog = b'x' * (6 << 30)\n",                  # 6 GiB, touched: a MemoryError at the probe's memory limit
    # it cannot lift that limit (soft and hard): still a MemoryError
    "import resource\ntry:\n    resource.setrlimit(resource.RLIMIT_DATA, (-1, -1))\nexcept ValueError:\n    pass\n"
    "_hog = b'x' * (6 << 30)\n",
])
def test_a_hostile_train_py_costs_its_prediction_not_the_run(code, hostile, monkeypatch):
    monkeypatch.setattr(hybrid.memory, "PROBE_BUILD_SECONDS", 3.0)
    hostile_code = _hostile(code, hostile)
    started = hybrid.memory.shape_probe("auto").processes
    assert MemoryModel(GPU).check(hostile_code, {"DEPTH": 6}, cap_gb=0.001) is None  # no prediction: the trial runs
    assert hybrid.memory.shape_probe("auto").processes - started == 3  # the check and DEPTH=6, side by side
    assert not [pid for pid in _processes_running(b"hybrid.memory") if pid in _children()]  # each died with its build
    # and the next build works: an architecture of the reference train.py that no other test builds
    assert model_shapes(code, {"DEPTH": 3, "ASPECT_RATIO": 40 + len(hostile)}, GPU).params > 0


def test_a_probe_that_does_not_start_in_time_gives_no_prediction(code, monkeypatch, capsys):
    monkeypatch.setattr(hybrid.memory, "PROBE_START_SECONDS", 0.05)
    probe = hybrid.memory.ShapeProbe("auto")
    assert probe.model_shapes(code, {"DEPTH": 9}, GPU) is None
    assert probe.model_shapes(code, {"DEPTH": 10}, GPU) is None
    assert probe.processes == 4 and not [pid for pid in _processes_running(b"hybrid.memory") if pid in _children()]
    assert capsys.readouterr().err.count("probe process did not start (not ready in 0 s)") == 1  # said once


def test_what_train_py_prints_goes_nowhere(code):
    """Printed lines, on stdout (`{}`, `[1, 2]`: would-be answers) or stderr (a MiB of it), change no prediction."""
    prints = "import os, sys\nos.write(1, b'{}\\n')\nprint('[1, 2]')\nsys.stderr.write('x' * 2**20)\n"
    config = {"DEPTH": 2, "ASPECT_RATIO": 32}
    assert model_shapes(_hostile(code, prints), config, GPU) == model_shapes(code, config, GPU) is not None


def test_a_train_py_that_patches_torch_at_import_changes_no_other_prediction(code):
    """Module-level code once patched the long-lived probe: the unchanged baseline's later predictions grew from 30 to
    979 GiB. Each build now has a process of its own: the patch lives and dies with its own build."""
    patch = "import torch\ntorch.Tensor.numel = lambda self: 1 << 40  # every parameter 2**40 elements\n"
    hostile = _hostile(code, patch)
    probe = hybrid.memory.shape_probe("auto")
    probe.clear()
    before = MemoryModel(GPU).estimate_mb(code, {})
    assert MemoryModel(GPU).estimate_mb(hostile, {}) > 1000 * before  # the patch works, in its own build
    probe.clear()  # no cached build: the baseline is built again, after the hostile code ran
    started = probe.processes
    assert MemoryModel(GPU).estimate_mb(code, {}) == before
    assert probe.processes > started
    # in one long-lived process (the old probe), the same patch changes every later build of the unchanged baseline
    script = ("import sys, json\nimport hybrid.memory as m\nfrom harness.profiles import get_profile\n"
              "hostile, code = json.load(sys.stdin)\ngpu = get_profile('gpu')\n"
              "m.build_shapes(hostile, (), gpu)\nprint(m.peak_bytes(m.build_shapes(code, (), gpu)) / 2**20)\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([hostile, code]), capture_output=True,
                          text=True, check=True)
    assert float(done.stdout.split()[-1]) > 1000 * before


@pytest.mark.parametrize("mode, reach", [("auto", 0), ("off", 1 + 4)])
def test_a_build_sees_what_its_sandbox_hands_it(code, mode, reach, tmp_path, monkeypatch):
    """The build's model has 1 + (what it could reach) blocks: a file of the trusted side (1), the trusted side's
    environment (2), a file written outside its scratch folder (4). In bubblewrap: none; without (`off`): the
    files, never the environment (an allow-list)."""
    if mode == "auto" and not _contained():
        pytest.skip("bubblewrap cannot run here")
    visible, escaped = tmp_path / "visible", tmp_path / "escaped"
    visible.write_text("x")
    monkeypatch.setenv("HYBRID_TEST_PLANTED", "postgresql://u:pw@h/db")
    probe = hybrid.memory.ShapeProbe(mode)
    hostile_code = code + (f"\nimport os as _os\n_reach = int(_os.path.exists({str(visible)!r}))\n"
                           "_reach += 2 * ('HYBRID_TEST_PLANTED' in _os.environ)\n"
                           f"try:\n    open({str(escaped)!r}, 'w').close()\n    _reach += 4\nexcept OSError:\n    pass\n"
                           "DEPTH = 1 + _reach\n")
    assert len(probe.model_shapes(hostile_code, {}, GPU).blocks) == 1 + reach
    assert escaped.exists() == bool(reach & 4)
    assert probe.processes == 2  # the shapeless check's two builds, side by side; the config's is the first


def test_a_build_leaves_no_process_behind(code):
    """A process that a build starts and detaches (its own session) ends with the build: bubblewrap's PID namespace."""
    if not _contained():
        pytest.skip("bubblewrap cannot run here (without it, a detached process can outlive its build)")
    marker = f"{time.time_ns() % 10**9}.5"
    hostile_code = _hostile(code, f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n")
    assert hybrid.memory.ShapeProbe("auto").model_shapes(hostile_code, {}, GPU) is not None
    deadline = time.monotonic() + 10.0
    while _processes_running(f"sleep\0{marker}".encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_running(f"sleep\0{marker}".encode())


def test_sandbox_modes(code):
    with pytest.raises(UserError, match="unknown sandbox mode"):
        MemoryModel(GPU, sandbox="sometimes")
    off = MemoryModel(GPU, sandbox="off")
    assert off.probe is hybrid.memory.shape_probe("off") and off.probe is not MemoryModel(GPU).probe
    assert off.estimate_mb(code, {"DEPTH": 4}) == MemoryModel(GPU, sandbox="auto").estimate_mb(code, {"DEPTH": 4})


@pytest.mark.parametrize("answer", ["[1, 2]", '{"blocks": "x"}', "not json", '{"blocks": []}'])
def test_an_answer_that_is_not_shapes_is_no_prediction(code, answer):
    shapes = hybrid.memory.build_shapes(code, (("DEPTH", 4),), GPU)
    assert hybrid.memory._shapes_from_json(json.dumps(dataclasses.asdict(shapes))) == shapes
    assert hybrid.memory._shapes_from_json(answer) is None
    fields = dataclasses.asdict(shapes)
    fields["params"] = "1e30"
    assert hybrid.memory._shapes_from_json(json.dumps(fields)) is None


def test_without_build_optimizers_every_parameter_has_adam_states(code, in_process):
    shapes = model_shapes(code.replace("def build_optimizers(", "def other_name("), {"DEPTH": 4}, GPU)
    assert shapes.adam_params == shapes.params and shapes.muon_params == 0


def test_huge_config_over_a_small_cap_is_refused(code, in_process):
    memory = MemoryModel(GPU)
    result = memory.check(code, {"DEPTH": 24, "ASPECT_RATIO": 128, "DEVICE_BATCH_SIZE": 256}, cap_gb=8.0)
    assert result is not None and result.status == "oom-predicted" and not result.ok
    assert result.total_seconds == 0.0 and result.objective == 100.0
    assert "> cap 8 GB" in result.error
    assert memory.check(code, {}, cap_gb=PAPER_CAP_GB) is None  # the baseline fits the paper's cap


@pytest.mark.parametrize("broken", [
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\n",                                   # no build_model
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\nraise RuntimeError('at import')\n",  # fails on import
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\ndef build_model(vocab_size, seq_len, device='cpu'):\n    return None\n",
])
def test_unbuildable_train_py_gives_no_prediction(broken):
    assert analytic_peak_bytes(broken, {"DEPTH": 6}, GPU) is None
    assert MemoryModel(GPU).check(broken, {"DEPTH": 6}, cap_gb=0.001) is None  # no prediction: the trial runs


def _trial(code: str, config: dict, peak_mb: float | None, status: str = "ok") -> optuna.trial.FrozenTrial:
    attrs = {"status": status, "code_sha": code_sha(code), "config_ran": config}
    if peak_mb is not None:
        attrs["peak_memory_mb"] = peak_mb
    return optuna.trial.create_trial(value=1.0, user_attrs=attrs)


def test_calibration_moves_predictions_toward_recorded_peaks(code, in_process):
    memory = MemoryModel(GPU)
    configs = [{"DEPTH": 4}, {"DEPTH": 6}, {"DEVICE_BATCH_SIZE": 64}]
    history = [_trial(code, c, 0.5 * memory.estimate_mb(code, c)) for c in configs]
    target = {"DEPTH": 10}
    estimate = memory.estimate_mb(code, target)
    assert memory.predict_mb(code, target, history[:2]) == estimate  # too few points: the estimate alone
    assert memory.predict_mb(code, target, history) == pytest.approx(0.5 * estimate)
    noise = [_trial(code, configs[0], 10 * estimate, status="oom"), _trial(code, configs[0], None),
             _trial("another train.py", configs[0], 10 * estimate)]
    assert memory.predict_mb(code, target, history + noise) == pytest.approx(0.5 * estimate)
    # a config the raw estimate refuses runs once the code is known to use half of it
    cap_gb = 0.75 * estimate * MIB / GIB
    assert memory.check(code, target, cap_gb) is not None
    assert memory.check(code, target, cap_gb, history) is None


def test_calibration_uses_reserved_peaks_where_recorded(code, in_process):
    """The cap concerns reserved memory: a trial's reserved peak calibrates, its allocated peak only without one."""
    memory = MemoryModel(GPU)
    configs = [{"DEPTH": 4}, {"DEPTH": 6}, {"DEVICE_BATCH_SIZE": 64}]
    history = [_trial(code, c, 0.5 * memory.estimate_mb(code, c)) for c in configs]
    for trial, config in zip(history[1:], configs[1:]):
        trial.user_attrs["peak_reserved_mb"] = 0.8 * memory.estimate_mb(code, config)
    target = {"DEPTH": 10}
    assert memory.predict_mb(code, target, history) == pytest.approx(0.8 * memory.estimate_mb(code, target))


def test_calibration_uses_the_trials_nearest_the_cap(code, in_process):
    memory = MemoryModel(GPU)
    small = [{"DEPTH": 4, "DEVICE_BATCH_SIZE": 32, "ASPECT_RATIO": a} for a in (32, 40, 48)]
    large = [{"DEPTH": d, "DEVICE_BATCH_SIZE": 128} for d in range(8, 18)]  # CALIBRATION_POINTS of them
    history = ([_trial(code, c, 0.3 * memory.estimate_mb(code, c)) for c in small]
               + [_trial(code, c, 0.9 * memory.estimate_mb(code, c)) for c in large])
    target = {"DEPTH": 20}
    assert memory.predict_mb(code, target, history) == pytest.approx(0.9 * memory.estimate_mb(code, target))


def test_default_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_cap_gb(40.0, "train", get_profile("cpu")) == 40.0
    assert default_cap_gb(None, "train", GPU) == PAPER_CAP_GB
    assert default_cap_gb(None, "train", get_profile("cpu")) is None
    assert default_cap_gb(None, "train", get_profile("test")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # trials on the CPU: nothing to cap
    assert default_cap_gb(40.0, "train", GPU) is None
    assert default_cap_gb(None, "surrogate", GPU) == PAPER_CAP_GB
    assert default_cap_gb(50.0, "surrogate", GPU) == 50.0


def test_estimate_leaves_no_trace(code):
    import sys

    before = set(sys.modules)
    hybrid.memory.build_shapes(code, (("DEPTH", 5),), GPU)  # in process (a probe's process builds once)
    assert set(sys.modules) - before <= {m for m in sys.modules if m.startswith("torch")}
    assert torch.get_default_device().type == "cpu"
