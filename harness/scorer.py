"""The metric, computed where agent code cannot reach: validation bits per byte from logits, and the causality check.

The trusted scorer holds the validation rows and their targets. Fresh evaluation processes (harness.evaluator,
sandboxed, agent code) receive token ids only and write logits into a shared file; the scorer turns them into
nats and bytes itself. Bits per byte counts the raw bytes of each target token (the BPE ranks' lengths,
special tokens zero), never a decoded string's length.

Causality is checked with "twins": copies of real rows whose tokens from a random position p on are replaced by
random tokens. An honest model gives a twin the same log-probabilities as its real row before p; a model that
reads ahead, keeps state between calls, mixes rows of a batch, or adapts to the validation data does not. Twins
run at the evaluation's own batch shape, in a call before the real rows and after them (filling the last call)
in the main process, and in a second fresh process that never sees the real rows (it cannot replay what the
first answered). Any drift beyond CAUSAL_TOLERANCE fails the trial as `invalid`.
"""
from __future__ import annotations

import functools
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.agent_process import CLOSED, AgentProcess
from harness.prepared import Prepared
from harness.loader import token_rows
from harness.profiles import Profile
from harness.tokenizer import Tokenizer

MAX_LOGIT_TOKENS = 32768  # tokens whose logits one forward pass of the evaluation may hold (1 GiB fp32 at vocab 8192)
CHECK_CALLS = 2           # calls of twins in the second process
CAUSAL_TOLERANCE = 0.02   # nats: the largest drift of a target's log-probability between a row and its twin
RESCORE_TOLERANCE = 1e-4  # bits per byte: a rescore on another order must agree this well


class InvalidOutput(ValueError):
    """The model's output cannot be scored (wrong shape, reads ahead, not reproducible)."""


def forward_rows(profile: Profile) -> int:
    """Rows per forward pass of the evaluation: profile.eval_batch_tokens, capped at MAX_LOGIT_TOKENS, at least one."""
    return max(1, min(profile.eval_batch_tokens, MAX_LOGIT_TOKENS) // profile.seq_len)


def _split_rows(profile: Profile, data: Prepared, tokens: int) -> np.ndarray:
    """The first rows of the validation split that hold `tokens` tokens: (rows, seq_len + 1) int64."""
    rows = -(-tokens // profile.seq_len)
    got = list(zip(range(rows), token_rows(data, "val", profile.seq_len)))
    if len(got) < rows:
        raise RuntimeError(f"the validation split ran out after {len(got) * profile.seq_len} of {tokens} tokens")
    return np.stack([row for _, row in got]).astype(np.int64)


@functools.lru_cache(maxsize=4)
def val_rows(profile: Profile, data: Prepared) -> np.ndarray:
    """The validation rows every trial is scored on: (rows, seq_len + 1) int64, inputs then shifted targets; packed
    once per process (the seal keeps the token cache unchanged); callers do not modify it."""
    return _split_rows(profile, data, profile.eval_tokens)


@functools.lru_cache(maxsize=4)
def intermediate_rows(profile: Profile, data: Prepared) -> np.ndarray:
    """The fixed slice of the intermediate evaluations: the validation rows right after the final evaluation's,
    profile.intermediate_tokens of them. The training process gets them (train.py could learn them): they are
    never part of the final val_bpb."""
    final = len(val_rows(profile, data))
    return _split_rows(profile, data, final * profile.seq_len + profile.intermediate_tokens)[final:]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position, float64: (rows, T) from logits (rows, T, vocab)."""
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").double().view(targets.shape)


def bits_per_byte(logprobs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> float:
    """Nats over targets that stand for raw bytes, divided by ln 2 times those bytes."""
    counts = token_bytes[targets]
    nats = torch.where(counts > 0, -logprobs, 0.0).sum()
    return nats.item() / (math.log(2) * counts.sum().item())


@dataclass
class Twins:
    """Check rows: twin i is real row `of[i]` with its tokens from position `split[i]` on replaced."""
    inputs: np.ndarray  # (n, T) int64
    of: np.ndarray      # (n,) indices into the real rows
    split: np.ndarray   # (n,)


def make_twins(real: np.ndarray, n: int, low: int, high: int, rng: np.random.Generator) -> Twins:
    """n twins of random real rows (inputs (rows, T)), each replaced from a random position with ids in [low, high)."""
    of = rng.integers(0, len(real), n)
    split = rng.integers(1, real.shape[1], n)
    inputs = real[of].copy()
    for i, p in enumerate(split):
        inputs[i, p:] = rng.integers(low, high, real.shape[1] - p)
    return Twins(inputs, of, split)


def drift(twins: Twins, twin_logprobs: torch.Tensor, real_logprobs: torch.Tensor) -> tuple[float, int, int]:
    """The largest |log p| difference before the split between twins and their real rows: (drift, twin, position)."""
    worst = (0.0, -1, -1)
    for i, (r, p) in enumerate(zip(twins.of, twins.split)):
        diff = (twin_logprobs[i, :p] - real_logprobs[r, :p]).abs()
        if not torch.isfinite(diff).all():
            return math.inf, i, 0
        j = int(diff.argmax())
        if diff[j].item() > worst[0]:
            worst = (diff[j].item(), i, j)
    return worst


@dataclass
class Score:
    val_bpb: float | None = None
    status: str = "ok"
    error: str | None = None
    eval_seconds: float = 0.0


class Evaluation:
    """A process that answers with logits of (rows, T) token ids, read from its shared file by the scorer: a fresh
    evaluation process, or the training process at an intermediate evaluation (started by `start` either way)."""

    def __init__(self, start: Callable[[Path], AgentProcess], logits_path: Path, rows: int, seq_len: int, vocab: int):
        self.shape = (rows, seq_len, vocab)
        logits_path.unlink(missing_ok=True)
        with open(logits_path, "wb") as f:
            f.truncate(rows * seq_len * vocab * 4)
        self.logits = np.memmap(logits_path, dtype=np.float32, mode="r", shape=self.shape)
        self.process = start(logits_path)

    def expect(self, op: str, deadline: float) -> None:
        """Wait for message `op` (past the process's "started"); _Failed with a status for anything else."""
        while True:
            message = self.process.receive(min(1.0, deadline - time.perf_counter()))
            if message is None:
                if time.perf_counter() >= deadline:
                    raise _Failed("timeout", "the evaluation did not answer before the trial's wall-clock limit")
                continue
            if message is CLOSED:
                raise _Failed("crash", "the evaluation process ended before it answered")
            if message.get("op") == "error":
                status = message.get("status") if message.get("status") in ("oom", "crash", "invalid") else "crash"
                raise _Failed(status, str(message.get("error"))[:500])
            if message.get("op") == op:
                return
            if message.get("op") == "started":
                continue
            raise _Failed("crash", f"the evaluation process sent an unexpected message ({str(message.get('op'))[:40]})")

    def logprobs(self, inputs: np.ndarray, targets: torch.Tensor, device: torch.device, deadline: float) -> torch.Tensor:
        """log p(targets) for these inputs, from the logits the process wrote (copied before they are read)."""
        if not self.process.send({"op": "logits", "rows": len(inputs)}, inputs.astype(np.int32).tobytes()):
            raise _Failed("crash", "the evaluation process ended before it answered")
        self.expect("logits", deadline)
        logits = torch.from_numpy(np.array(self.logits[:len(inputs)])).to(device)
        if not torch.isfinite(logits).all():
            raise _Failed("nan", "the model's logits are not finite")
        return target_logprobs(logits, targets.to(device))


class _Failed(Exception):
    def __init__(self, status: str, error: str):
        super().__init__(error)
        self.status, self.error = status, error


def score_intermediate(training: Evaluation, rows: np.ndarray, token_bytes: torch.Tensor, device: torch.device,
                       deadline: float) -> Score:
    """Bits per byte of the slice `rows` from the logits the training process wrote, a forward pass of
    training.shape[0] rows at a time. Advisory (it steers pruning, never the final val_bpb): no causality check."""
    t0 = time.perf_counter()
    chunk, targets = training.shape[0], torch.from_numpy(rows[:, 1:])
    try:
        lp = torch.cat([training.logprobs(rows[i:i + chunk, :-1], targets[i:i + chunk], device, deadline).cpu()
                        for i in range(0, len(rows), chunk)])
    except _Failed as e:
        return Score(status=e.status, error=e.error, eval_seconds=time.perf_counter() - t0)
    return Score(val_bpb=bits_per_byte(lp, targets, token_bytes), eval_seconds=time.perf_counter() - t0)


def score(evaluations: list[Evaluation], profile: Profile, data: Prepared, device: torch.device, deadline: float, *,
          reorder: bool = False, stop: threading.Event | None = None) -> Score:
    """Score the saved model with two fresh evaluation processes (main, then check: twins only), which are killed
    before it returns; `reorder` shuffles the real rows. Setting `stop` raises KeyboardInterrupt."""
    t0 = time.perf_counter()
    tokenizer = Tokenizer.load(data.tokenizer)
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)
    rows = val_rows(profile, data)
    rng = np.random.default_rng(secrets.randbits(64))
    order = rng.permutation(len(rows)) if reorder else np.arange(len(rows))
    real_inputs, targets = rows[:, :-1], torch.from_numpy(rows[:, 1:])
    chunk = forward_rows(profile)
    pad = -len(rows) % chunk
    twins = make_twins(real_inputs, chunk + pad + CHECK_CALLS * chunk, 0, tokenizer.bos_id, rng)
    twin_targets = targets[twins.of]
    real_lp = torch.zeros(targets.shape, dtype=torch.float64)
    twin_lp = torch.zeros(twin_targets.shape, dtype=torch.float64)
    # main: a call of twins, the real rows in order, the last call filled with twins; check: only twins
    main_calls = [("twin", np.arange(chunk))] + [("real", order[i:i + chunk]) for i in range(0, len(rows), chunk)]
    if pad:
        main_calls[-1] = ("mixed", main_calls[-1][1])
    check_calls = [("twin", chunk + pad + np.arange(c * chunk, (c + 1) * chunk)) for c in range(CHECK_CALLS)]
    failures: list[_Failed] = []

    def drive(evaluation: Evaluation, calls: list) -> None:  # noqa: ANN001
        try:
            evaluation.process.send({"op": "load"})
            evaluation.expect("ready", deadline)
            for kind, index in calls:
                if kind == "twin":
                    inputs, want = twins.inputs[index], twin_targets[index]
                elif kind == "real":
                    inputs, want = real_inputs[index], targets[index]
                else:  # the real rows left, then twins chunk..chunk+pad
                    filler = np.arange(chunk, chunk + pad)
                    inputs = np.concatenate([real_inputs[index], twins.inputs[filler]])
                    want = torch.cat([targets[index], twin_targets[filler]])
                lp = evaluation.logprobs(inputs, want, device, deadline).cpu()
                if kind == "twin":
                    twin_lp[index] = lp
                elif kind == "real":
                    real_lp[index] = lp
                else:
                    real_lp[index], twin_lp[filler] = lp[:len(index)], lp[len(index):]
        except _Failed as e:
            failures.append(e)

    threads = [threading.Thread(target=drive, args=args) for args in zip(evaluations, (main_calls, check_calls))]
    try:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            threads[0].join(0.1) if threads[0].is_alive() else threads[1].join(0.1)
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
    finally:
        for evaluation in evaluations:  # no state of agent code survives the scoring
            evaluation.process.kill()
    seconds = time.perf_counter() - t0
    if failures:
        return Score(status=failures[0].status, error=failures[0].error, eval_seconds=seconds)
    worst, twin, position = drift(twins, twin_lp, real_lp)
    if not worst <= CAUSAL_TOLERANCE:
        return Score(status="invalid", eval_seconds=seconds,
                     error=f"the model is not causal: the log-probability at position {position} of a validation row "
                           f"moved by {worst:.3g} nats when only tokens from position {twins.split[twin]} on changed "
                           f"(or when it ran in another call or process)")
    return Score(val_bpb=bits_per_byte(real_lp, targets, token_bytes.cpu()), eval_seconds=seconds)


def score_in_process(model: torch.nn.Module, profile: Profile, data: Prepared, device: torch.device) -> float:
    """Bits per byte of a model in this process (`python train.py` outside the harness: not sandboxed, not recorded)."""
    rows = val_rows(profile, data)
    token_bytes = torch.from_numpy(Tokenizer.load(data.tokenizer).token_bytes())
    chunk = forward_rows(profile)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.eval()
    lps = []
    with torch.no_grad(), autocast:
        for i in range(0, len(rows), chunk):
            x, y = torch.from_numpy(rows[i:i + chunk, :-1]), torch.from_numpy(rows[i:i + chunk, 1:])
            lps.append(target_logprobs(model(x.to(device)), y.to(device)).cpu())
    return bits_per_byte(torch.cat(lps), torch.from_numpy(rows[:, 1:]), token_bytes)
