"""The memory model: analytic peak estimate on the meta device, calibration on recorded peaks, the cap check."""
from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch

import hybrid.memory
from harness.scorer import MAX_LOGIT_TOKENS
from harness.profiles import get_profile
from hybrid.memory import (GIB, MIB, PAPER_CAP_GB, MemoryModel, analytic_peak_bytes, default_cap_gb, model_shapes,
                          peak_bytes)
from hybrid.paths import project_file
from hybrid.store import code_sha

GPU = get_profile("gpu")
REFERENCE_BASELINE_MIB = 45060.2  # autoresearch's baseline, peak_vram_mb on one H100 (its README)


@pytest.fixture(scope="module")
def source() -> str:
    return project_file("train.py").read_text()


def test_estimate_grows_with_batch_and_depth(source):
    def peak(**knobs) -> float:
        return analytic_peak_bytes(source, knobs, GPU)

    assert peak(DEVICE_BATCH_SIZE=128) < peak(DEVICE_BATCH_SIZE=256)
    assert peak(DEPTH=8) < peak(DEPTH=12) < peak(DEPTH=16)
    assert peak(DEPTH=16, DEVICE_BATCH_SIZE=32) < peak(DEPTH=16, DEVICE_BATCH_SIZE=64)
    # the harness's evaluation holds the fp32 logits of at most MAX_LOGIT_TOKENS: a floor under small models
    assert model_shapes(source, {}, GPU).eval_rows * GPU.seq_len <= MAX_LOGIT_TOKENS
    assert peak(DEPTH=1, DEVICE_BATCH_SIZE=1) == peak(DEPTH=1, DEVICE_BATCH_SIZE=2)


def test_baseline_near_the_reference_measurement(source):
    estimate_mib = analytic_peak_bytes(source, {}, GPU) / MIB
    assert 0.9 < estimate_mib / REFERENCE_BASELINE_MIB < 1.1


def test_shapes_match_the_real_model(source):
    import types

    from harness.knobs import inject_knobs

    knobs = {"DEPTH": 3, "ASPECT_RATIO": 32, "HEAD_DIM": 32}
    profile = get_profile("test")
    shapes = model_shapes(source, knobs, profile)
    module = types.ModuleType("train_for_test")
    exec(compile(inject_knobs(source, knobs), "train.py", "exec", dont_inherit=True), module.__dict__)
    model = module.build_model(profile.vocab_size, profile.seq_len, device="cpu")
    assert shapes.params == sum(p.numel() for p in model.parameters())
    assert shapes.adam_params + shapes.muon_params == shapes.params
    assert shapes.muon_params == sum(p.numel() for p in model.blocks.parameters())
    assert len(shapes.blocks) == 3 and shapes.model_dim == model.config.model_dim
    assert [b.value_embedding for b in shapes.blocks] == [str(i) in model.value_embeds for i in range(3)]


def test_the_model_is_built_once_per_architecture(source, monkeypatch):
    builds = []
    build = hybrid.memory._PROBE.build
    monkeypatch.setattr(hybrid.memory._PROBE, "build", lambda *request: builds.append(request) or build(*request))
    hybrid.memory._built_shapes.cache_clear()
    hybrid.memory.shapeless_knobs.cache_clear()
    first = analytic_peak_bytes(source, {"DEPTH": 6, "MATRIX_LR": 0.01}, GPU)
    assert len(builds) == 3  # the code's defaults and its shapeless knobs changed (shapeless_knobs), DEPTH=6
    assert analytic_peak_bytes(source, {"DEPTH": 6, "MATRIX_LR": 0.05, "WINDOW_PATTERN": "LLLL"}, GPU) == first
    assert len(builds) == 3
    # the batch knobs are applied to that build: the estimate of a build with the whole config injected
    config = {"DEPTH": 6, "EMBEDDING_LR": 0.3, "DEVICE_BATCH_SIZE": 64, "TOTAL_BATCH_SIZE": 300_000}
    whole = hybrid.memory.build_shapes(source, tuple(config.items()), GPU)
    assert whole.grad_accum == 2 and analytic_peak_bytes(source, config, GPU) == peak_bytes(whole)
    assert len(builds) == 3
    # any other knob may set shapes (VE_GATE_CHANNELS does): another build
    assert analytic_peak_bytes(source, {"DEPTH": 6, "VE_GATE_CHANNELS": 16}, GPU) < first
    assert len(builds) == 4


def test_an_edit_that_makes_a_shapeless_knob_set_a_shape_loses_the_sharing(source):
    line = "model_dim = math.ceil(DEPTH * ASPECT_RATIO / head_dim) * head_dim"
    assert line in source
    edited = source.replace(line, "model_dim = math.ceil(DEPTH * ASPECT_RATIO * (1 + (MATRIX_LR > 0.05)) / head_dim) "
                                  "* head_dim")
    assert hybrid.memory.shapeless_knobs(source, GPU) == hybrid.memory.SHAPELESS_KNOBS
    assert hybrid.memory.shapeless_knobs(edited, GPU) == set(hybrid.memory.BATCH_KNOBS)
    assert analytic_peak_bytes(edited, {"MATRIX_LR": 0.01}, GPU) < analytic_peak_bytes(edited, {"MATRIX_LR": 0.1}, GPU)


@pytest.mark.parametrize("hostile, survives", [
    ("raise SystemExit(3)\n", True),            # would end the run if it ran in the run's process
    ("import os\nos._exit(1)\n", False),        # kills the probe
    ("while True:\n    pass\n", False),         # hangs it: killed after PROBE_BUILD_SECONDS
    ("_hog = b'x' * (6 << 30)\n", True),         # 6 GiB, touched: a MemoryError at the probe's memory limit
])
def test_a_hostile_train_py_costs_its_prediction_not_the_run(source, hostile, survives, monkeypatch):
    monkeypatch.setattr(hybrid.memory, "PROBE_BUILD_SECONDS", 3.0)
    hybrid.memory._built_shapes.cache_clear()
    assert model_shapes(source, {"DEPTH": 4}, GPU).params > 0
    probe = hybrid.memory._PROBE._process.pid
    code = source.replace("\ndef build_model(", f"\n{hostile}\ndef build_model(", 1)
    assert MemoryModel(GPU).check(code, {"DEPTH": 6}, cap_gb=0.001) is None  # no prediction: the trial runs
    assert (hybrid.memory._PROBE._process is not None and hybrid.memory._PROBE._process.pid == probe) == survives
    assert model_shapes(source, {"DEPTH": 5}, GPU).params > 0  # and the next build works (a fresh probe if need be)


@pytest.mark.parametrize("answer", ["[1, 2]", '{"blocks": "x"}', "not json", '{"blocks": []}'])
def test_an_answer_that_is_not_shapes_is_no_prediction(source, answer):
    shapes = hybrid.memory.build_shapes(source, (("DEPTH", 4),), GPU)
    assert hybrid.memory._shapes_from_json(json.dumps(dataclasses.asdict(shapes))) == shapes
    assert hybrid.memory._shapes_from_json(answer) is None
    fields = dataclasses.asdict(shapes)
    fields["params"] = "1e30"
    assert hybrid.memory._shapes_from_json(json.dumps(fields)) is None


def test_without_build_optimizers_every_parameter_has_adam_states(source):
    shapes = model_shapes(source.replace("def build_optimizers(", "def other_name("), {"DEPTH": 4}, GPU)
    assert shapes.adam_params == shapes.params and shapes.muon_params == 0


def test_huge_config_over_a_small_cap_is_refused(source):
    memory = MemoryModel(GPU)
    result = memory.check(source, {"DEPTH": 24, "ASPECT_RATIO": 128, "DEVICE_BATCH_SIZE": 256}, cap_gb=8.0)
    assert result is not None and result.status == "oom-predicted" and not result.ok
    assert result.total_seconds == 0.0 and result.objective == 100.0
    assert "> cap 8 GB" in result.error
    assert memory.check(source, {}, cap_gb=PAPER_CAP_GB) is None  # the baseline fits the paper's cap


@pytest.mark.parametrize("broken", [
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\n",                                   # no build_model
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\nraise RuntimeError('at import')\n",  # fails on import
    "DEPTH = 4\nDEVICE_BATCH_SIZE = 8\ndef build_model(vocab_size, seq_len, device='cpu'):\n    return None\n",
])
def test_unbuildable_train_py_gives_no_prediction(broken):
    assert analytic_peak_bytes(broken, {"DEPTH": 6}, GPU) is None
    assert MemoryModel(GPU).check(broken, {"DEPTH": 6}, cap_gb=0.001) is None  # no prediction: the trial runs


def _trial(source: str, config: dict, peak_mb: float | None, status: str = "ok") -> optuna.trial.FrozenTrial:
    attrs = {"status": status, "code_sha": code_sha(source), "config_ran": config}
    if peak_mb is not None:
        attrs["peak_memory_mb"] = peak_mb
    return optuna.trial.create_trial(value=1.0, user_attrs=attrs)


def test_calibration_moves_predictions_toward_recorded_peaks(source):
    memory = MemoryModel(GPU)
    configs = [{"DEPTH": 4}, {"DEPTH": 6}, {"DEVICE_BATCH_SIZE": 64}]
    history = [_trial(source, c, 0.5 * memory.estimate_mb(source, c)) for c in configs]
    target = {"DEPTH": 10}
    estimate = memory.estimate_mb(source, target)
    assert memory.predict_mb(source, target, history[:2]) == estimate  # too few points: the estimate alone
    assert memory.predict_mb(source, target, history) == pytest.approx(0.5 * estimate)
    noise = [_trial(source, configs[0], 10 * estimate, status="oom"), _trial(source, configs[0], None),
             _trial("another train.py", configs[0], 10 * estimate)]
    assert memory.predict_mb(source, target, history + noise) == pytest.approx(0.5 * estimate)
    # a config the raw estimate refuses runs once the code is known to use half of it
    cap_gb = 0.75 * estimate * MIB / GIB
    assert memory.check(source, target, cap_gb) is not None
    assert memory.check(source, target, cap_gb, history) is None


def test_calibration_uses_the_trials_nearest_the_cap(source):
    memory = MemoryModel(GPU)
    small = [{"DEPTH": 4, "DEVICE_BATCH_SIZE": 32, "ASPECT_RATIO": a} for a in (32, 40, 48)]
    large = [{"DEPTH": d, "DEVICE_BATCH_SIZE": 128} for d in range(8, 18)]  # CALIBRATION_POINTS of them
    history = ([_trial(source, c, 0.3 * memory.estimate_mb(source, c)) for c in small]
               + [_trial(source, c, 0.9 * memory.estimate_mb(source, c)) for c in large])
    target = {"DEPTH": 20}
    assert memory.predict_mb(source, target, history) == pytest.approx(0.9 * memory.estimate_mb(source, target))


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


def test_estimate_leaves_no_trace(source):
    import sys

    before = set(sys.modules)
    hybrid.memory.build_shapes(source, (("DEPTH", 5),), GPU)  # as the probe process does, build after build
    assert set(sys.modules) - before <= {m for m in sys.modules if m.startswith("torch")}
    assert torch.get_default_device().type == "cpu"
