"""What train.py may use of the harness: a session with device, data, the training clock, and finish().

CONTRACT (implemented by the harness; train.py relies on exactly this):

    from harness import api
    session = api.start()                  # profile constants, device, seeds set
    session.device, session.seq_len, session.vocab_size, session.bos_id, session.time_budget
    session.autocast()                     # context manager: bf16 autocast on CUDA, nothing on CPU/MPS
    batches = session.train_batches(B)     # iterator of (inputs, targets), int64 (B, seq_len) on device
    progress = session.tick(loss)          # once per optimizer step, loss a float; returns the fraction of
                                           # the training budget spent (0..1); raises Diverged on nan/inf/>100
    session.done                           # True once the budget is spent
    session.finish(model)                  # hand the model over; the harness scores it (model(idx) -> logits)

The first `profile.warmup_steps` steps are kept off the clock (compilation); time before the clock runs is
bounded by `profile.max_startup_seconds`. The model's forward `model(idx)` must return logits (B, T, vocab).
Once running, the clock counts all wall time until finish(): work after the last tick is not free.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator

import torch

from harness import loader
from harness.data import Prepared, prepared
from harness.profiles import Profile, get_profile
from harness.tokenizer import Tokenizer


class Diverged(RuntimeError):
    """The training loss became nan, inf or larger than 100."""


class Session:
    def __init__(self, profile: Profile, data: Prepared, device: torch.device | str, seed: int = 0):
        self.profile, self.data, self.seed = profile, data, seed
        self.device = torch.device(device)
        self.seq_len, self.time_budget = profile.seq_len, profile.time_budget
        tokenizer = Tokenizer.load(data.tokenizer)
        self.vocab_size, self.bos_id = tokenizer.vocab_size, tokenizer.bos_id
        self.steps = 0
        self.tokens = 0                       # tokens handed out while the clock ran
        self.clock_start: float | None = None  # perf_counter when the clock started
        self.clock_wall: float | None = None   # the same moment as time.time(), for startup_seconds
        self.training_seconds = 0.0
        self.model: torch.nn.Module | None = None
        self.finished_at: float | None = None  # perf_counter at finish()

    def _start_clock(self) -> None:
        self.clock_start, self.clock_wall = time.perf_counter(), time.time()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches forever (epoch after epoch), shuffled by the trial's seed."""
        for x, y in loader.batches(self.data, "train", batch_size, self.seq_len, self.device, seed=self.seed, loop=True):
            if self.clock_start is None and self.profile.warmup_steps == 0:
                self._start_clock()
            if self.clock_start is not None:
                self.tokens += x.numel()
            yield x, y

    def tick(self, loss: float) -> float:
        """Count one optimizer step; returns the fraction of the budget spent."""
        loss = float(loss)
        self.steps += 1
        if not math.isfinite(loss) or loss > 100:
            raise Diverged(f"training loss is {loss} at step {self.steps}")
        if self.clock_start is None:
            if self.steps >= self.profile.warmup_steps:
                self._start_clock()
        else:
            self.training_seconds = time.perf_counter() - self.clock_start
        return self.progress

    @property
    def progress(self) -> float:
        return min(1.0, self.training_seconds / self.time_budget)

    @property
    def done(self) -> bool:
        return self.training_seconds >= self.time_budget

    def finish(self, model: torch.nn.Module) -> None:
        """Hand the trained model to the harness, which scores it after train.py returns."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.finished_at = time.perf_counter()
        if self.clock_start is not None:
            self.training_seconds = self.finished_at - self.clock_start
        self.model = model
        if _standalone:
            from harness.evaluate import evaluate_bpb

            print(f"val_bpb {evaluate_bpb(model, self.profile, self.data, self.device):.4f} (standalone run, not recorded)")


_session: Session | None = None  # set by harness.worker before it runs train.py
_standalone = False


def start() -> Session:
    """The trial's session; outside the harness (`python train.py`), one for $HYBRID_PROFILE on the best device."""
    global _session, _standalone
    if _session is None:
        profile = get_profile(os.environ.get("HYBRID_PROFILE"))
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        torch.manual_seed(0)
        _session, _standalone = Session(profile, prepared(profile), device), True
    return _session
