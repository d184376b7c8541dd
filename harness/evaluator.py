"""A trial's evaluation process, in the sandbox: `python -m harness.evaluator SPEC TRAIN_PY MODEL LOGITS IN_FD OUT_FD`.

Runs agent code, and never sees a target or the metric: it loads train.py's module (its main() does not run)
and the model the training process saved, then answers each request (token ids in) by writing the model's
logits into the shared file LOGITS, for the trusted scorer to read. A fresh process: no state of training
survives into it.
"""
from __future__ import annotations

import contextlib
import json
import sys
import traceback
import types
from pathlib import Path

import numpy as np
import torch

from harness import api
from harness.channel import Channel, ChannelError
from harness.trainer import classify, one_line, set_up


class NoTraining:
    """The session train.py finds when the evaluation imports it: training belongs in main()."""

    def __getattr__(self, name: str) -> None:
        raise RuntimeError("train.py uses its session at import time: put training in main(), run under "
                           "`if __name__ == \"__main__\":`, so that the evaluation can import the model's classes")


def load_model(train_py: str, model_path: str, device: torch.device) -> torch.nn.Module:
    """The saved model, its classes taken from train.py run as a module (the pickle names them __main__.*)."""
    module = types.ModuleType("__trial__")
    module.__file__ = train_py
    api._session = NoTraining()
    sys.modules["__trial__"] = sys.modules["__main__"] = module
    exec(compile(Path(train_py).read_text(), train_py, "exec"), module.__dict__)
    return torch.load(model_path, map_location=device, weights_only=False)


def main(spec_path: str, train_py: str, model_path: str, logits_path: str, in_fd: int, out_fd: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    channel = Channel.from_fds(in_fd, out_fd)
    rows, seq_len, vocab = spec["eval_rows"], spec["seq_len"], spec["vocab_size"]
    try:
        set_up(spec | {"threads": spec["eval_threads"]})
        device = torch.device(spec["device"])
        channel.send({"op": "started"})
        channel.receive()  # the model is saved: load it
        model = load_model(train_py, model_path, device)
        model.eval()
        out = np.memmap(logits_path, dtype=np.float32, mode="r+", shape=(rows, seq_len, vocab))
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        channel.send({"op": "ready"})
        while True:
            _, payload = channel.receive(max_payload=rows * seq_len * 4)
            error = api.write_logits(model, payload, out, device, autocast)
            if error:
                channel.send({"op": "error", "status": "invalid", "error": error})
                return
            channel.send({"op": "logits"})
    except ChannelError:
        pass  # the scorer is done with this process
    except BaseException as e:
        traceback.print_exc()
        with contextlib.suppress(ChannelError):
            channel.send({"op": "error", "status": classify(e), "error": one_line(e)})


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]), int(sys.argv[6]))
