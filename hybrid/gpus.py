"""Which GPU each worker of a run uses: the i-th of the devices the run was given, one worker per device.

The run's devices are CUDA_VISIBLE_DEVICES as it was set when the run started (a scheduler such as SLURM sets
it: "2,3", or UUIDs), else every device CUDA counts. Pinning a process sets its CUDA_VISIBLE_DEVICES to its one
device and keeps the whole list in ALL_GPUS, so that processes it starts (the other workers) pin from the same
list. More workers than devices is refused (check_workers) unless SHARE is set: workers that share a card each
get their own memory cap, and together can exceed it.
"""
from __future__ import annotations

import os
import sys

from hybrid.errors import UserError

VISIBLE = "CUDA_VISIBLE_DEVICES"
ALL_GPUS = "HYBRID_ALL_GPUS"      # the run's devices, kept once a process is pinned to one of them
SHARE = "HYBRID_SHARE_GPUS"       # "1": let several workers share a GPU (each with its own cap)


def run_gpus() -> list[str]:
    """The run's devices, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs); [] without CUDA."""
    for variable in (ALL_GPUS, VISIBLE):
        if variable in os.environ:
            return [d.strip() for d in os.environ[variable].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def check_workers(workers: int) -> None:
    """UserError when `workers` exceed the run's GPUs (unless SHARE=1); nothing on a machine without CUDA."""
    gpus = run_gpus()
    if gpus and workers > len(gpus) and os.environ.get(SHARE) != "1":
        raise UserError(f"--workers {workers} with {len(gpus)} GPU(s) ({VISIBLE}={','.join(gpus)}): one worker per "
                        f"GPU; use --workers {len(gpus)}, or set {SHARE}=1 to let workers share a GPU")


def pin_gpu(index: int) -> None:
    """Pin this process (worker or slot `index`) to the index-th of the run's GPUs, cyclically (with a warning)
    where there are fewer; trials inherit the pin through the harness. Nothing without CUDA."""
    gpus = run_gpus()
    if not gpus:
        return
    if index >= len(gpus):
        print(f"hybrid: WARNING: worker {index} shares GPU {gpus[index % len(gpus)]} ({len(gpus)} GPU(s) for more "
              "workers): each has its own memory cap, and together they can exceed the card", file=sys.stderr)
    os.environ[ALL_GPUS] = ",".join(gpus)
    os.environ[VISIBLE] = gpus[index % len(gpus)]
