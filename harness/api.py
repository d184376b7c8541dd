"""What train.py may use of the harness: a session with device, data, the training clock, and finish().

CONTRACT (implemented by the harness; train.py relies on exactly this):

    from harness import api
    session = api.start()                  # profile constants, device, seeds set
    session.device, session.seq_len, session.vocab_size, session.bos_id, session.time_budget
    session.autocast()                     # context manager: bf16 autocast on CUDA, nothing on CPU/MPS
    batches = session.train_batches(B)     # iterator of (inputs, targets), int64 (B, seq_len) on device
    progress = session.tick(loss)          # once per optimizer step, loss a float; returns the fraction of
                                           # the training budget spent (0..1); the trial fails as `nan` on nan/inf/>100
    session.done                           # True once the budget is spent
    session.watch(model)                   # optional: the model the harness may evaluate inside tick() at
                                           # checkpoints of the budget (off the clock; steers pruning only)
    session.finish(model)                  # hand the model over; the harness scores it (model(idx) -> logits)

In a trial, this process runs in the sandbox and holds neither data files nor the metric: batches come from the
trusted harness through a pipe, the clock is the harness's (it starts at tick number `warmup_steps`; batches
before it are random tokens, so that compilation steps off the clock learn nothing), and finish() saves the
model for a fresh evaluation process whose logits the trusted scorer turns into val_bpb. When the run prunes, a
tick() at a checkpoint of the budget also answers requests for the watched model's logits of a fixed slice of
validation rows (never those of the final score), while the clock pauses. The model's forward
`model(idx)` must return logits (B, T, vocab) and must be picklable (torch.save of the whole module).
Outside the harness (`python train.py`), a local session reads the prepared data itself and prints a val_bpb
that is not recorded.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from harness.channel import Channel


class Diverged(RuntimeError):
    """The training loss became nan, inf or larger than 100."""


class Session:
    """train.py's side of a trial: constants from the harness, batches and the clock over a channel."""

    def __init__(self, spec: dict[str, Any], channel: Channel):
        self._channel, self._model_path = channel, spec["model_path"]
        self.device = torch.device(spec["device"])
        self.seq_len, self.time_budget = spec["seq_len"], spec["time_budget"]
        self.vocab_size, self.bos_id = spec["vocab_size"], spec["bos_id"]
        self.progress, self.done = 0.0, False
        self._rows = spec.get("intermediate_rows", 0)       # rows of one intermediate request (0: none come)
        self._logits_path = spec.get("intermediate_logits")  # where their logits go (a file the harness reads)
        self._logits: np.ndarray | None = None
        self._watched: torch.nn.Module | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _ask(self, header: dict[str, Any], max_payload: int = 0) -> tuple[dict[str, Any], bytes]:
        self._channel.send(header)
        return self._channel.receive(max_payload)

    def train_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches forever (epoch after epoch), shuffled by the trial's seed."""
        cuda = self.device.type == "cuda"
        row = self.seq_len + 1
        while True:
            _, payload = self._ask({"op": "batch", "rows": int(batch_size)}, max_payload=batch_size * row * 2)
            tokens = torch.from_numpy(np.frombuffer(payload, dtype=np.uint16).reshape(-1, row).astype(np.int64))
            if cuda:
                tokens = tokens.pin_memory().to(self.device, non_blocking=True)
            yield tokens[:, :-1], tokens[:, 1:]

    def watch(self, model: torch.nn.Module) -> None:
        """The model to evaluate at the budget's checkpoints (intermediate val_bpb, for pruning); none: never."""
        self._watched = model
        self._channel.send({"op": "watch"})

    def tick(self, loss: float) -> float:
        """Count one optimizer step; returns the fraction of the budget spent. At a checkpoint, the watched model's
        logits are asked for first (the clock pauses)."""
        most = self._rows * self.seq_len * 4
        answer, payload = self._ask({"op": "tick", "loss": float(loss)}, most)
        while answer.get("op") == "logits":
            if self._logits is None:
                self._logits = np.memmap(self._logits_path, dtype=np.float32, mode="r+",
                                         shape=(self._rows, self.seq_len, self.vocab_size))
            error = write_logits(self._watched, payload, self._logits, self.device, self.autocast())
            if error:
                raise RuntimeError(error)
            answer, payload = self._ask({"op": "logits"}, most)
        if "diverged" in answer:
            raise Diverged(answer["diverged"])
        self.progress, self.done = float(answer["progress"]), bool(answer["done"])
        return self.progress

    def finish(self, model: torch.nn.Module) -> None:
        """Hand the trained model to the harness (saved whole for the evaluation process); the trial ends here."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        torch.save(model, self._model_path)
        report = {"op": "finish", "num_params": sum(p.numel() for p in model.parameters()),
                  "flops_per_token": model.estimate_flops() if hasattr(model, "estimate_flops") else None,
                  "peak_memory_mb": peak_memory_mb(self.device), "peak_reserved_mb": peak_reserved_mb(self.device)}
        self._ask(report)  # the harness ends this process when it has the model


def write_logits(model: torch.nn.Module, ids: bytes, out: np.ndarray, device: torch.device,
                 autocast: contextlib.AbstractContextManager) -> str | None:
    """The model's logits of the token ids (int32 rows of out's length) written into out[:rows], the model in eval
    mode and without gradients (its mode restored after); the error if they are not of shape (rows, T, vocab)."""
    seq_len, vocab = out.shape[1:]
    x = torch.from_numpy(np.frombuffer(ids, dtype=np.int32).reshape(-1, seq_len).astype(np.int64))
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            logits = model(x.to(device))
    finally:
        model.train(training)
    want = (len(x), seq_len, vocab)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return f"model(idx) must return logits of shape {want} (B, T, vocab), got {got}"
    out[:len(x)] = logits.float().cpu().numpy()
    return None


def peak_reserved_mb(device: torch.device) -> float | None:
    """CUDA's peak of reserved memory (what the caching allocator took from the device: what a memory cap and an
    out-of-memory error concern); None off CUDA."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocation, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class LocalSession:
    """`python train.py` outside the harness: the prepared data of $HYBRID_PROFILE read here, the clock kept here,
    and the model scored in this process at finish() (printed, not recorded: nothing here is sandboxed)."""

    def __init__(self) -> None:
        from harness.data import prepared
        from harness.profiles import get_profile
        from harness.tokenizer import Tokenizer

        self.profile = get_profile(os.environ.get("HYBRID_PROFILE"))
        self.data = prepared(self.profile)
        self.device = torch.device("cuda" if torch.cuda.is_available() else
                                   "mps" if torch.backends.mps.is_available() else "cpu")
        self.seq_len, self.time_budget = self.profile.seq_len, self.profile.time_budget
        tokenizer = Tokenizer.load(self.data.tokenizer)
        self.vocab_size, self.bos_id = tokenizer.vocab_size, tokenizer.bos_id
        self.steps, self.start, self.progress, self.done = 0, None, 0.0, False
        torch.manual_seed(0)

    autocast = Session.autocast

    def train_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from harness.loader import batches

        yield from batches(self.data, "train", batch_size, self.seq_len, self.device, seed=0, loop=True)

    def tick(self, loss: float) -> float:
        self.steps += 1
        if not math.isfinite(float(loss)) or float(loss) > 100:
            raise Diverged(f"training loss is {float(loss)} at step {self.steps}")
        if self.start is None and self.steps >= self.profile.warmup_steps:
            self.start = time.perf_counter()
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        self.progress, self.done = min(1.0, elapsed / self.time_budget), elapsed >= self.time_budget
        return self.progress

    def finish(self, model: torch.nn.Module) -> None:
        from harness.scorer import score_in_process

        bpb = score_in_process(model, self.profile, self.data, self.device)
        print(f"val_bpb {bpb:.4f} (standalone run, not recorded)")


_session: Session | LocalSession | None = None  # set by harness.trainer in a trial


def start() -> Session | LocalSession:
    """The trial's session; outside the harness (`python train.py`), a local one for $HYBRID_PROFILE."""
    global _session
    if _session is None:
        _session = LocalSession()
    return _session
