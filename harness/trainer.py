"""A trial's training process, in the sandbox: `python -m harness.trainer SPEC TRAIN_PY IN_FD OUT_FD`.

Runs agent code. It sets the seeds, device and threads the spec asks for, gives train.py a session that talks
to the trusted harness over the channel (fds IN_FD, OUT_FD), and runs train.py as __main__. What it reports
(a failure's class and message, the model's size and peak memory) is treated as untrusted by the harness.
"""
from __future__ import annotations

import json
import random
import runpy
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from harness import api
from harness.channel import Channel, ChannelError
from harness.result import is_oom


def classify(e: BaseException) -> str:
    """The failure class of an exception raised by train.py."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or is_oom(str(e)):
        return "oom"
    return "nan" if isinstance(e, api.Diverged) else "crash"


def one_line(e: BaseException, file: str = "train.py") -> str:
    """`Type: message (train.py:LINE)`, the message cut to its first line."""
    where = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).name == file]
    message = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {message}" + (f" ({file}:{where[-1].lineno})" if where else "")


def set_up(spec: dict) -> None:
    """Seeds, CPU threads, the CUDA device and its memory cap (cooperative: agent code could lift it)."""
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda"):
        device = torch.device(spec["device"])
        torch.cuda.set_device(device)
        if spec.get("vram_cap_gb"):
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["vram_cap_gb"] * 2**30 / total), device)


def main(spec_path: str, train_py: str, in_fd: int, out_fd: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    channel = Channel.from_fds(in_fd, out_fd)
    set_up(spec)
    api._session = api.Session(spec, channel)
    channel.send({"op": "ready"})
    try:
        try:
            runpy.run_path(train_py, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise RuntimeError(f"train.py exited with status {e.code}") from None
        channel.send({"op": "returned"})
    except ChannelError:
        pass  # the harness ended the trial
    except BaseException as e:  # every failure of train.py becomes a report
        traceback.print_exc()
        try:
            channel.send({"op": "error", "status": classify(e), "error": one_line(e)})
        except ChannelError:
            pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
