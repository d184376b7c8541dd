"""Worker pinning (hybrid.gpus) and the trial's device as the machine names it (harness.sandbox), with a fake
device count: a preset CUDA_VISIBLE_DEVICES is the run's list, worker i gets its i-th entry, worker 0 too."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.sandbox import Jail, physical_gpu
from hybrid.errors import UserError
from hybrid.gpus import ALL_GPUS, SHARE, VISIBLE, check_workers, pin_gpu, run_gpus


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `count` CUDA devices, CUDA_VISIBLE_DEVICES as given (None: unset); restored afterwards."""
    def machine(count: int, visible: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        for variable in (VISIBLE, ALL_GPUS, SHARE):  # set first, so that the test's pins are undone too
            monkeypatch.setenv(variable, "")
            monkeypatch.delenv(variable)
        if visible is not None:
            monkeypatch.setenv(VISIBLE, visible)
    return machine


@pytest.mark.parametrize("count, visible, index, pinned", [
    (4, None, 0, "0"), (4, None, 3, "3"),                       # every device of the machine
    (8, "2,3", 0, "2"), (8, "2,3", 1, "3"),                     # SLURM's list: the i-th entry, worker 0 too
    (8, " 5 , 7 ", 1, "7"),                                     # spaces
    (2, "GPU-aaaa,GPU-bbbb", 1, "GPU-bbbb"),                    # UUIDs
    (1, None, 0, "0"),                                          # one GPU, pinned all the same
])
def test_worker_i_gets_the_ith_device(gpus, count, visible, index, pinned):
    gpus(count, visible)
    pin_gpu(index)
    assert os.environ[VISIBLE] == pinned


def test_workers_started_after_the_first_pin_from_the_same_list(gpus):
    gpus(8, "4,5,6")
    pin_gpu(0)  # worker 0, in the run's process, before the others start (they inherit its environment)
    assert os.environ[VISIBLE] == "4"
    pin_gpu(2)
    assert os.environ[VISIBLE] == "6" and run_gpus() == ["4", "5", "6"]


def test_no_cuda_pins_nothing(gpus):
    gpus(0)
    pin_gpu(1)
    check_workers(8)  # CPU workers split the cores, not GPUs
    assert VISIBLE not in os.environ


def test_more_workers_than_gpus_is_refused_unless_asked(gpus, monkeypatch, capsys):
    gpus(8, "0,1")
    check_workers(2)
    with pytest.raises(UserError, match=r"--workers 3 with 2 GPU\(s\).*HYBRID_SHARE_GPUS=1"):
        check_workers(3)
    monkeypatch.setenv(SHARE, "1")
    check_workers(3)
    pin_gpu(2)  # shares the first, and says so
    assert os.environ[VISIBLE] == "0" and "worker 2 shares GPU 0" in capsys.readouterr().err


@pytest.mark.parametrize("visible, index, device", [(None, 0, "0"), ("3", 0, "3"), ("2,3", 1, "3"),
                                                     ("GPU-aaaa", 0, "GPU-aaaa")])
def test_the_trial_gets_the_physical_device(monkeypatch, tmp_path: Path, visible, index, device):
    monkeypatch.setenv(VISIBLE, "")
    monkeypatch.delenv(VISIBLE)
    if visible is not None:
        monkeypatch.setenv(VISIBLE, visible)
    assert physical_gpu(index) == device
    plain = Jail("off", tmp_path, gpu=index)
    assert plain.environment()[VISIBLE] == device
    jailed = Jail("off", tmp_path, gpu=index)
    jailed.contained = True  # the bubblewrap command line, built without starting it
    argv = jailed.argv(["true"])
    if device.isdigit():  # its own device node, and no CUDA_VISIBLE_DEVICES inside
        assert f"/dev/nvidia{device}" in argv and VISIBLE not in jailed.environment()
    else:  # a UUID: the nodes bound, CUDA picks it by name
        assert jailed.environment()[VISIBLE] == device
