"""The trusted side of a trial's training: the data feed, the clock and the watchdog of the training process.

The training process (harness.trainer, agent code) asks for batches and reports each optimizer step; this side
answers from the prepared training split, keeps the clock and decides when the budget is spent:

- The clock starts at step number `profile.warmup_steps` (compilation, warm-up) or, without warm-up steps, at
  the first batch. Until then every batch is random tokens: work done off the clock, at import or in warm-up
  steps, cannot learn from the data. Time before the clock is bounded (`startup_limit`).
- Once running, the clock counts all wall time until the model is handed over (saving it included). A trial
  that keeps training after `done` is told, for longer than its own longest step allows, is `invalid`.
- Tokens, steps and seconds are counted here; the process's own reports (size, peak memory) are informational.
- Intermediate evaluations (when the run prunes, and train.py watches its model): at the first tick past each
  checkpoint of the budget, the clock pauses while the training process writes the logits of the validation
  slice and the trusted scorer turns them into val_bpb, told to the run, which may stop the trial (`pruned`).
  The pause counts off the clock up to PAUSE_STEPS steps' worth of the slice's tokens plus PAUSE_SLACK of the
  budget: what is longer is the trial's own time (work hidden in a pause is bounded).
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np

from harness.agent_process import CLOSED, AgentProcess
from harness.prepared import Prepared
from harness.loader import token_rows
from harness.profiles import Profile
from harness.result import PRUNED
from harness.scorer import Score

MAX_BATCH_ROWS = 1 << 16   # rows in one batch request, at most
LATE_STEPS = 2             # finish() may come this many of the trial's longest steps after `done` ...
LATE_SECONDS = 0.5         # ... plus this, plus the time to save the model at SAVE_BYTES_PER_SECOND
SAVE_BYTES_PER_SECOND = 100e6
OVERRUN = 30.0             # seconds past the budget (plus a quarter of it) before the watchdog gives up
POLL = 0.1                 # seconds between looks at the watchdog and the stop event
REPORTED = ("num_params", "flops_per_token", "peak_memory_mb", "peak_reserved_mb")  # informational, from finish()
PAUSE_STEPS = 1.0          # an evaluation is off the clock for as long as training on its slice took so far ...
PAUSE_SLACK = 0.01         # ... plus this share of the budget (its logits through a file, the scoring)


class Feed:
    """Training rows of the trial's seed, handed out in order; random tokens until the clock runs.

    One deep: as a batch goes out, the next one of the same size is packed on a thread while the step runs (the
    first while the warm-up steps get random tokens). Rows packed ahead and not asked for stay first in line, so
    the sequence of rows is the split's whatever the sizes asked: the same seed gives the same batches."""

    def __init__(self, data: Prepared, profile: Profile, seed: int, bos_id: int):
        self.seq_len, self.bos_id = profile.seq_len, bos_id
        self.noise = np.random.default_rng([seed, 0x5EED])
        self._rows = token_rows(data, "train", profile.seq_len, seed=seed, loop=True)
        self._packer = ThreadPoolExecutor(1, thread_name_prefix="feed")
        self._next: Future[np.ndarray] | None = None                      # the batch being packed ahead
        self._head = np.empty((0, profile.seq_len + 1), dtype=np.uint16)  # rows packed, not yet handed out

    def _pack(self, rows: int) -> np.ndarray:
        return np.stack([next(self._rows) for _ in range(rows)])

    def _prefetch(self, rows: int) -> None:
        self._next = self._packer.submit(self._pack, rows)

    def batch(self, rows: int, real: bool) -> np.ndarray:
        """(rows, seq_len + 1) uint16: the next rows of the split, or random tokens (each row starts with BOS)."""
        if not real:
            if self._next is None:
                self._prefetch(rows)
            batch = self.noise.integers(0, self.bos_id, size=(rows, self.seq_len + 1), dtype=np.uint16)
            batch[:, 0] = self.bos_id
            return batch
        ready = self._head
        if self._next is not None:  # the packer is idle once its result is in: the rows are this thread's again
            ahead = self._next.result()
            ready = np.concatenate([ready, ahead]) if len(ready) else ahead
        if len(ready) < rows:
            ready = np.concatenate([ready, self._pack(rows - len(ready))])
        batch, self._head = ready[:rows], ready[rows:]
        self._prefetch(rows)
        return batch

    def close(self) -> None:
        self._packer.shutdown(wait=False, cancel_futures=True)


@dataclass
class Checkpoints:
    """The intermediate evaluations of one trial: at each fraction of the budget, `measure()` (the slice's val_bpb
    from the training process's logits), then `report(fraction, val_bpb)`, True to stop the trial."""
    fractions: tuple[float, ...]
    tokens: int                           # in the slice
    measure: Callable[[], Score]
    report: Callable[[float, float], bool]


@dataclass
class Training:
    """What the trusted side saw of one training process."""
    status: str = "ok"                    # ok, or the failure class
    error: str | None = None
    launched: float = field(default_factory=time.perf_counter)
    ready: float | None = None            # the harness's imports in the process were done
    clock_start: float | None = None
    finished: float | None = None         # perf_counter when the model was handed over
    steps: int = 0
    tokens: int = 0                       # tokens handed out while the clock ran
    longest_step: float = 0.0
    reported: dict[str, Any] = field(default_factory=dict)  # REPORTED: size and memory, as the process said
    watched: bool = False                 # train.py named the model to evaluate at checkpoints
    paused: float = 0.0                   # seconds of intermediate evaluations kept off the clock
    evaluating: float = 0.0               # seconds the intermediate evaluations took (wall time)
    intermediate: list[tuple[float, float]] = field(default_factory=list)  # (fraction, val_bpb) as measured

    @property
    def training_seconds(self) -> float:
        if self.clock_start is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.clock_start - self.paused

    def fail(self, status: str, error: str) -> None:
        if self.status == "ok":
            self.status, self.error = status, error


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else None


def _evaluate(t: Training, checkpoints: Checkpoints, fraction: float, budget: float) -> None:
    """One intermediate evaluation, the clock paused (within the bound); the trial ends `pruned` if the run says so."""
    began = time.perf_counter()
    scored = checkpoints.measure()
    if scored.status != "ok":
        t.fail(scored.status, f"at the intermediate evaluation at {fraction:.0%} of the budget: {scored.error}")
        return
    t.intermediate.append((fraction, scored.val_bpb))
    stop = checkpoints.report(fraction, scored.val_bpb)
    per_token = t.training_seconds / max(1, t.tokens)
    took = time.perf_counter() - began
    t.evaluating += took
    t.paused += min(took, PAUSE_STEPS * checkpoints.tokens * per_token + PAUSE_SLACK * budget)
    if stop:
        t.fail(PRUNED, f"pruned at {fraction:.0%} of the budget: intermediate val_bpb {scored.val_bpb:.4f}")


def supervise(process: AgentProcess, feed: Feed, profile: Profile, *, startup_limit: float, deadline: float,
              model_bytes: Callable[[], int], stop: threading.Event | None = None,
              checkpoints: Checkpoints | None = None) -> Training:
    """Serve the training process until it hands over its model, fails, or a limit ends it (`deadline`: the trial's
    wall-clock limit, perf_counter); never raises for what the process does. `model_bytes()` is the size of the
    saved model; setting `stop` raises KeyboardInterrupt; `checkpoints`: the intermediate evaluations, if any."""
    t = Training()
    budget, last_tick, done_at, done_steps = profile.time_budget, None, None, 0
    pending = list(checkpoints.fractions) if checkpoints else []
    while t.status == "ok" and t.finished is None:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        now = time.perf_counter()
        if now > deadline:
            t.fail("timeout", "killed at the wall-clock limit of a trial")
            break
        if t.clock_start is None and now - t.launched > startup_limit:
            t.fail("timeout", f"the training clock did not start within {startup_limit:g}s (startup: imports, model, "
                              f"compilation and {profile.warmup_steps} warm-up step(s))")
            break
        if t.training_seconds > budget * 1.25 + OVERRUN:
            t.fail("timeout", f"training ran past {budget * 1.25 + OVERRUN:.0f}s on the clock without finish() "
                              f"(budget {budget:.0f}s: stop when session.done)")
            break
        message = process.receive(POLL)
        if message is None:
            continue
        op = message.get("op")
        if message is CLOSED:
            t.fail("crash", "the training process ended without handing over a model")
        elif op == "ready" and t.ready is None:
            t.ready = time.perf_counter()
        elif op == "watch":
            t.watched = True
        elif op == "batch":
            rows = message.get("rows")
            if not isinstance(rows, int) or isinstance(rows, bool) or not 0 < rows <= MAX_BATCH_ROWS:
                t.fail("crash", f"train_batches({rows!r}): the batch size must be between 1 and {MAX_BATCH_ROWS}")
                break
            if t.clock_start is None and profile.warmup_steps == 0:
                t.clock_start = time.perf_counter()
            real = t.clock_start is not None
            batch = feed.batch(rows, real)
            t.tokens += rows * profile.seq_len if real else 0
            process.send({"rows": rows}, batch)
        elif op == "tick":
            now = time.perf_counter()
            loss = message.get("loss")
            t.steps += 1
            if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss > 100:
                t.fail("nan", f"training loss is {loss} at step {t.steps}")
                process.send({"diverged": f"training loss is {loss} at step {t.steps}"})
                break
            if last_tick is not None and t.clock_start is not None:
                t.longest_step = max(t.longest_step, now - last_tick)
            last_tick = now
            if t.clock_start is None and t.steps >= profile.warmup_steps:
                t.clock_start = now
            if done_at is not None:
                t.fail("invalid", f"trained {t.steps - done_steps} step(s) past session.done")
                break
            spent = t.training_seconds
            reached = [f for f in pending if spent >= f * budget]
            if reached and spent < budget and t.watched:
                _evaluate(t, checkpoints, reached[-1], budget)
                if t.status != "ok":
                    break
                spent = t.training_seconds
            pending = [f for f in pending if f not in reached]
            if spent >= budget:
                done_at, done_steps = time.perf_counter(), t.steps
            process.send({"progress": min(1.0, spent / budget), "done": spent >= budget})
        elif op == "finish":
            t.finished = time.perf_counter()
            t.reported = {k: _number(message.get(k)) for k in REPORTED}
            if t.clock_start is None:
                t.fail("invalid", "the training clock never ran: call session.tick(loss) once per optimizer step")
            elif done_at is not None:
                late = t.finished - done_at
                allowed = LATE_STEPS * t.longest_step + LATE_SECONDS + model_bytes() / SAVE_BYTES_PER_SECOND
                if late > allowed:
                    t.fail("invalid", f"finish() came {late:.1f}s after session.done (allowed {allowed:.1f}s): "
                                      "training past the budget")
        elif op == "returned":
            t.fail("invalid", "train.py never called session.finish(model)")
        elif op == "error":
            status = message.get("status") if message.get("status") in ("oom", "nan", "crash") else "crash"
            t.fail(status, str(message.get("error"))[:500])
        else:
            t.fail("crash", f"the training process sent an unknown message ({str(op)[:40]})")
    return t
