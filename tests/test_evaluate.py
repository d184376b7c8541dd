"""evaluate_bpb in bounded forward passes: the same val_bpb as one unchunked pass, never more logits than the cap."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import harness.evaluate
from harness.data import Prepared
from harness.evaluate import MAX_LOGIT_TOKENS, evaluate_bpb, forward_rows
from harness.loader import batches
from harness.profiles import Profile, get_profile
from harness.tokenizer import Tokenizer

TEST = get_profile("test")


class Bigram(torch.nn.Module):
    """A causal model with random weights (next-token logits from the current token) that records its batch sizes."""

    def __init__(self, vocab: int, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
        self.tokens_seen: list[int] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.tokens_seen.append(idx.numel())
        return self.head(torch.tanh(self.emb(idx)))


def unchunked_bpb(model: torch.nn.Module, profile: Profile, data: Prepared) -> float:
    """The reference: every evaluated row in one forward pass, one cross-entropy."""
    rows = -(-profile.eval_tokens // profile.seq_len)
    x, y = next(batches(data, "val", rows, profile.seq_len, "cpu"))
    counts = torch.from_numpy(Tokenizer.load(data.tokenizer).token_bytes())[y.flatten()]
    with torch.no_grad():
        nll = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten(), reduction="none")
    return (nll * (counts > 0)).sum().item() / (math.log(2) * counts.sum().item())


@pytest.mark.parametrize("cap, eval_tokens", [(256, 4096), (192, 64 * 37), (10**6, 64 * 37)])
def test_chunked_bpb_is_the_unchunked_bpb(prepared_test, monkeypatch, cap, eval_tokens):
    monkeypatch.setattr(harness.evaluate, "MAX_LOGIT_TOKENS", cap)
    profile = replace(TEST, eval_tokens=eval_tokens)
    model = Bigram(TEST.vocab_size)
    bpb = evaluate_bpb(model, profile, prepared_test, "cpu")
    scored = model.tokens_seen[:1] + model.tokens_seen[2:]  # the second call is the causal check's two rows
    per_call = min(cap, profile.eval_batch_tokens) // TEST.seq_len * TEST.seq_len
    assert scored == [per_call] * (eval_tokens // per_call) + [eval_tokens % per_call] * (eval_tokens % per_call > 0)
    model.tokens_seen.clear()
    assert bpb == pytest.approx(unchunked_bpb(model, profile, prepared_test), rel=1e-6)


def test_forward_rows():
    gpu = get_profile("gpu")
    assert forward_rows(gpu) * gpu.seq_len == MAX_LOGIT_TOKENS < gpu.eval_batch_tokens
    assert forward_rows(TEST) == TEST.eval_batch_tokens // TEST.seq_len  # under the cap: the profile's batch
    assert forward_rows(replace(TEST, seq_len=2 * MAX_LOGIT_TOKENS)) == 1
