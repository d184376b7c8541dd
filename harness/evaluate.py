"""The metric: validation bits per byte, computed by the harness from the model's logits."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from harness.data import Prepared
from harness.loader import batches
from harness.profiles import Profile
from harness.tokenizer import Tokenizer


class InvalidOutput(ValueError):
    """The model's forward did not return logits of shape (B, T, vocab_size)."""


CAUSAL_TOLERANCE = 0.05  # logits are soft-capped to +-15; bf16 kernels may differ this much between calls
MAX_LOGIT_TOKENS = 32768  # tokens whose logits one forward pass of the evaluation may hold (1 GiB fp32 at vocab 8192)


def check_causal(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, autocast) -> None:  # noqa: ANN001
    """InvalidOutput if changing the later half of the tokens changes the logits of the earlier half:
    a model that reads ahead would score a metric it did not earn."""
    half = x.size(1) // 2
    rows = x[:2].clone()
    rows[:, half:] = torch.roll(rows[:, half:], shifts=1, dims=0 if len(rows) > 1 else 1) + 1
    rows[:, half:] %= logits.size(-1)
    with autocast:
        changed = model(rows)
    drift = (changed[:, :half].float() - logits[: len(rows), :half].float()).abs().max().item()
    if not drift <= CAUSAL_TOLERANCE:
        raise InvalidOutput(f"the model is not causal: logits before position {half} moved by {drift:.3g} "
                            "when only later tokens changed")


def forward_rows(profile: Profile) -> int:
    """Rows per forward pass of the evaluation: profile.eval_batch_tokens, capped at MAX_LOGIT_TOKENS, at least one."""
    return max(1, min(profile.eval_batch_tokens, MAX_LOGIT_TOKENS) // profile.seq_len)


def evaluate_bpb(model: torch.nn.Module, profile: Profile, data: Prepared, device: torch.device | str) -> float:
    """Bits per byte on the first profile.eval_tokens target tokens of the validation split, the same for every trial.

    nll (nats) summed over targets that stand for raw bytes, divided by ln 2 times the sum of those byte counts;
    special tokens (BOS) count for neither. The model sees forward_rows(profile) rows at a time: it returns the
    logits of every row it is given, so the rows per call bound the memory they take.
    """
    device = torch.device(device)
    token_bytes = torch.from_numpy(Tokenizer.load(data.tokenizer).token_bytes()).to(device)
    rows = -(-profile.eval_tokens // profile.seq_len)
    chunk = forward_rows(profile)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    done = 0
    with torch.no_grad():
        for x, y in batches(data, "val", chunk, profile.seq_len, device):
            x, y = x[:rows - done], y[:rows - done]
            with autocast:
                logits = model(x)
            want = (*x.shape, len(token_bytes))
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InvalidOutput(f"model(idx) must return logits of shape {want} (B, T, vocab), got {got}")
            if done == 0:
                check_causal(model, x, logits, autocast)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            counts = token_bytes[y.flatten()]
            nats += torch.where(counts > 0, nll, 0.0).sum(dtype=torch.float64)
            nbytes += counts.sum()
            done += len(x)
            if done == rows:
                break
    if done < rows:
        raise RuntimeError(f"the validation split ran out after {done * profile.seq_len} of {profile.eval_tokens} tokens")
    return nats.item() / (math.log(2) * nbytes.item())
