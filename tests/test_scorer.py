"""The trusted scorer (harness.scorer): bits per byte from logits, bounded forward passes, and the causality check
with twins, down to full trials of models that read ahead, mix the rows of a batch or keep state between calls;
an honest model (the real train.py's) passes the check at the evaluation's shapes in bf16."""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness.scorer
from harness.prepared import Prepared
from harness.knobs import inject_knobs
from harness.loader import batches, token_rows
from harness.profiles import Profile, get_profile
from harness.runner import run_trial
from harness.sandbox import PROJECT_ROOT
from harness.scorer import (CAUSAL_TOLERANCE, MAX_LOGIT_TOKENS, Twins, bits_per_byte, drift, forward_rows, make_twins,
                            score_in_process, target_logprobs, val_rows)
from harness.tokenizer import Tokenizer

TEST = get_profile("test")


def token_bytes(data: Prepared) -> torch.Tensor:
    return torch.from_numpy(Tokenizer.load(data.tokenizer).token_bytes())


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


def test_a_uniform_model_scores_log2_vocab_bits_per_token(prepared_test):
    rows = val_rows(TEST, prepared_test)
    targets = torch.from_numpy(rows[:, 1:])
    lengths = token_bytes(prepared_test)[targets]
    expected = math.log2(2048) * (lengths > 0).sum().item() / lengths.sum().item()  # special tokens: no bytes
    logprobs = target_logprobs(torch.zeros(*targets.shape, 2048), targets)
    assert logprobs.dtype == torch.float64 and torch.allclose(logprobs, torch.full_like(logprobs, -math.log(2048)))
    assert bits_per_byte(logprobs, targets, token_bytes(prepared_test)) == pytest.approx(expected, rel=1e-7)
    in_process = score_in_process(Uniform(2048), TEST, prepared_test, torch.device("cpu"))
    assert in_process == pytest.approx(expected, rel=1e-6)


def test_val_rows(prepared_test):
    rows = val_rows(TEST, prepared_test)
    assert rows.shape == (TEST.eval_tokens // TEST.seq_len, TEST.seq_len + 1) and rows.dtype == np.int64
    assert (rows == np.stack(list(islice(token_rows(prepared_test, "val", TEST.seq_len), len(rows))))).all()
    with pytest.raises(RuntimeError, match="validation split ran out"):
        val_rows(replace(TEST, eval_tokens=10**9), prepared_test)


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
    counts = token_bytes(data)[y.flatten()]
    with torch.no_grad():
        nll = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten(), reduction="none")
    return (nll * (counts > 0)).sum().item() / (math.log(2) * counts.sum().item())


@pytest.mark.parametrize("cap, eval_tokens", [(256, 4096), (192, 64 * 37), (10**6, 64 * 37)])
def test_chunked_bpb_is_the_unchunked_bpb(prepared_test, monkeypatch, cap, eval_tokens):
    monkeypatch.setattr(harness.scorer, "MAX_LOGIT_TOKENS", cap)
    profile = replace(TEST, eval_tokens=eval_tokens)
    model = Bigram(TEST.vocab_size)
    bpb = score_in_process(model, profile, prepared_test, torch.device("cpu"))
    per_call = min(cap, profile.eval_batch_tokens) // TEST.seq_len * TEST.seq_len
    rest = eval_tokens % per_call
    assert model.tokens_seen == [per_call] * (eval_tokens // per_call) + [rest] * (rest > 0)
    model.tokens_seen.clear()
    assert bpb == pytest.approx(unchunked_bpb(model, profile, prepared_test), rel=1e-6)


def test_forward_rows():
    gpu = get_profile("gpu")
    assert forward_rows(gpu) * gpu.seq_len == MAX_LOGIT_TOKENS < gpu.eval_batch_tokens
    assert forward_rows(TEST) == TEST.eval_batch_tokens // TEST.seq_len  # under the cap: the profile's batch
    assert forward_rows(replace(TEST, seq_len=2 * MAX_LOGIT_TOKENS)) == 1


def test_twins_keep_a_prefix_and_change_the_rest(prepared_test):
    real = val_rows(TEST, prepared_test)[:, :-1]
    before = real.copy()
    twins = make_twins(real, 200, 5, 900, np.random.default_rng(0))
    assert twins.inputs.shape == (200, TEST.seq_len) and twins.inputs.dtype == real.dtype
    assert (real == before).all()  # the real rows are untouched
    assert ((0 <= twins.of) & (twins.of < len(real))).all() and len(set(twins.of.tolist())) > 1
    assert ((1 <= twins.split) & (twins.split < TEST.seq_len)).all() and len(set(twins.split.tolist())) > 10
    for twin, row, p in zip(twins.inputs, twins.of, twins.split):
        assert (twin[:p] == real[row, :p]).all()
        suffix = twin[p:]
        assert ((5 <= suffix) & (suffix < 900)).all() and (suffix != real[row, p:]).any()


def test_drift():
    twins = Twins(inputs=np.zeros((3, 8), dtype=np.int64), of=np.array([2, 0, 2]), split=np.array([3, 8, 1]))
    real = torch.randn(4, 8, dtype=torch.float64)
    twin = real[twins.of].clone()
    twin[0, 3:] += 5.0  # at and after the split: the model may see the change there
    twin[2, 1:] -= 5.0
    assert drift(twins, twin, real) == (0.0, -1, -1)
    twin[1, 6] += 0.25  # before the split of twin 1 (all of it): a read-ahead, or state between calls
    worst, which, position = drift(twins, twin, real)
    assert (which, position) == (1, 6) and worst == pytest.approx(0.25)
    twin[2, 0] = float("nan")
    assert drift(twins, twin, real)[0] == math.inf


@pytest.mark.parametrize("mode", ["reads-ahead", "mixes-rows", "stateful"])
def test_a_model_that_is_not_causal_fails_its_trial(prepared_test, tiny_train_py, tmp_path, mode):
    """A whole trial, scored in sandboxed processes: reading the next token, averaging over the batch's rows, or
    answering differently in each call all show up as drift between twins and their rows."""
    r = run_trial(tiny_train_py.read_text(), {"MODE": mode}, replace(TEST, time_budget=0.5), tmp_path / mode)
    assert (r.status, r.val_bpb) == ("invalid", None), r.error
    assert "not causal" in r.error and "\n" not in r.error


def load_train_py(tmp_path, **knobs) -> object:
    """The project's train.py as a module, with small knob values written in."""
    path = tmp_path / "train_small.py"
    path.write_text(inject_knobs((PROJECT_ROOT / "train.py").read_text(), knobs))
    spec = importlib.util.spec_from_file_location("train_small", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_small"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["train_small"]
    return module


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices)
def test_an_honest_model_passes_at_the_evaluations_shapes_in_bf16(prepared_test, tmp_path, device):
    """The real GPT of train.py, its weights made sharp (zero-initialized projections filled in, a large head), in
    bf16 autocast: twins in calls of their own, at the evaluation's batch shape, drift less than the tolerance
    from their rows before the split, though they move a lot after it."""
    profile = TEST  # 64 rows of 64 tokens per call; sliding-window masks (WINDOW_PATTERN) and full causal layers
    train = load_train_py(tmp_path, DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32)
    torch.manual_seed(0)
    model = train.build_model(2048, profile.seq_len, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0, 1.5 * p.shape[1] ** -0.5)
    model.eval()
    rows = val_rows(profile, prepared_test)
    inputs, targets = rows[:, :-1], torch.from_numpy(rows[:, 1:]).to(device)
    chunk = forward_rows(profile)
    rng = np.random.default_rng(1)
    twins = make_twins(inputs, 2 * chunk, 0, 2047, rng)

    def logprobs(x: np.ndarray, y: torch.Tensor) -> torch.Tensor:
        assert x.shape == (chunk, profile.seq_len)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return target_logprobs(model(torch.from_numpy(x).to(device)), y).cpu()

    twin_lp = torch.cat([logprobs(twins.inputs[i:i + chunk], targets[twins.of[i:i + chunk]])
                         for i in range(0, len(twins.of), chunk)])
    real_lp = torch.cat([logprobs(inputs[i:i + chunk], targets[i:i + chunk]) for i in range(0, len(rows), chunk)])
    worst, twin, position = drift(twins, twin_lp, real_lp)
    assert worst <= CAUSAL_TOLERANCE, (worst, twin, position)
    # not vacuous: the model is far from uniform, and the twins' changed tokens change what it predicts after them
    assert real_lp.std() > 0.5
    after = max((twin_lp[i, p:] - real_lp[r, p:]).abs().max().item()
                for i, (r, p) in enumerate(zip(twins.of, twins.split)))
    assert after > 50 * CAUSAL_TOLERANCE
