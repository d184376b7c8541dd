"""Objectives: the config each one runs (runs_as), and the memory guard checking that config, not the one sampled."""
from __future__ import annotations

import pytest

from harness.profiles import get_profile
from harness.runner import snap_batch_size
from hybrid.memory import GIB, MIB, MemoryModel
from hybrid.objectives import MemoryGuarded, SurrogateObjective, TrainObjective
from hybrid.paths import project_file
from hybrid.surrogate import PAPER_SPACE

GPU = get_profile("gpu")


@pytest.fixture(scope="module")
def code() -> str:
    return project_file("train.py").read_text()


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory) -> SurrogateObjective:
    """The surrogate objective; a fit it caches goes to a temporary data directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRID_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        return SurrogateObjective()


@pytest.mark.parametrize("sampled_batch, ran_batch", [(200, 256), (180, 128)])  # snapped up, snapped down
def test_the_guard_checks_the_config_the_surrogate_runs(code, surrogate, tmp_path, sampled_batch, ran_batch):
    sampled = {**PAPER_SPACE.defaults(), "DEPTH": 16, "DEVICE_BATCH_SIZE": sampled_batch}
    ran = surrogate.runs_as(code, sampled)
    assert ran == {**sampled, "DEVICE_BATCH_SIZE": ran_batch}
    memory = MemoryModel(GPU)
    as_sampled, as_ran = memory.estimate_mb(code, sampled), memory.estimate_mb(code, ran)
    guarded = MemoryGuarded(surrogate, (as_sampled + as_ran) / 2 * MIB / GIB, tuple, memory)  # a cap between them
    result = guarded.evaluate(code, sampled, seed=0, trial_number=0, trial_dir=tmp_path)
    assert (result.status == "oom-predicted") == (as_ran > as_sampled)  # the sampled config alone decides otherwise
    assert result.config == ran


def test_train_runs_the_config_the_runner_snaps(code):
    objective = TrainObjective(GPU)
    config = {"DEVICE_BATCH_SIZE": 64, "TOTAL_BATCH_SIZE": 200_000}  # 1.5 micro-batches of 64 x 2048 tokens
    assert objective.runs_as(code, config) == snap_batch_size(code, config, GPU.seq_len)
    assert objective.runs_as(code, config)["TOTAL_BATCH_SIZE"] == 2 * 64 * 2048
    assert objective.runs_as("def broken(:\n", config) == config  # run_trial records the crash


def test_a_refused_train_trial_records_the_config_it_would_have_run(code, tmp_path):
    guarded = MemoryGuarded(TrainObjective(GPU), cap_gb=1.0, history=tuple, model=MemoryModel(GPU))
    ran = {"TOTAL_BATCH_SIZE": 128 * 2048}  # one micro-batch of train.py's DEVICE_BATCH_SIZE
    assert guarded.runs_as(code, {"TOTAL_BATCH_SIZE": 200_000}) == ran
    result = guarded.evaluate(code, {"TOTAL_BATCH_SIZE": 200_000}, seed=0, trial_number=0, trial_dir=tmp_path)
    assert result.status == "oom-predicted" and result.config == ran
