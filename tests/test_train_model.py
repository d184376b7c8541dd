"""The model and optimizers of train.py, imported as a module (no harness, no training loop)."""
import contextlib
import gc
import importlib.util
import math
from pathlib import Path

import pytest
import torch

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
VOCAB, SEQ = 256, 32


@pytest.fixture
def train(monkeypatch):
    """train.py as a fresh module, its knobs set to a tiny model."""
    spec = importlib.util.spec_from_file_location("train_under_test", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in dict(DEPTH=3, ASPECT_RATIO=32, HEAD_DIM=16, DEVICE_BATCH_SIZE=4,
                            TOTAL_BATCH_SIZE=4 * SEQ, WINDOW_PATTERN="SL").items():
        monkeypatch.setattr(module, name, value)
    return module


def test_reference_knobs_are_plain_literals():
    from harness.knobs import find_knobs

    knobs = find_knobs(TRAIN_PY.read_text())
    expected = dict(DEPTH=8, ASPECT_RATIO=64, HEAD_DIM=128, DEVICE_BATCH_SIZE=128, TOTAL_BATCH_SIZE=2**19,
                    EMBEDDING_LR=0.6, UNEMBEDDING_LR=0.004, MATRIX_LR=0.04, SCALAR_LR=0.5, WEIGHT_DECAY=0.2,
                    WARMUP_RATIO=0.0, WARMDOWN_RATIO=0.5, FINAL_LR_FRAC=0.0, WINDOW_PATTERN="SSSL")
    assert {name: knobs[name].value for name in expected} == expected
    assert {name: type(knobs[name].value) for name in expected} == {name: type(v) for name, v in expected.items()}



def test_knobs_are_read_and_written_from_many_threads_at_once():
    """The gpu benchmark and the loop's workers run trials in threads; each parses train.py (CPython gh-106905)."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.knobs import find_knobs, inject_knobs

    code = TRAIN_PY.read_text()

    def one(depth: int) -> int:
        return find_knobs(inject_knobs(code, {"DEPTH": depth}))["DEPTH"].value

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(1, 401))) == list(range(1, 401))

def test_shapes_softcap_and_loss(train):
    torch.manual_seed(0)
    model = train.build_model(VOCAB, SEQ)
    assert model.config.model_dim == 96 and model.config.n_head == 6
    assert sorted(model.value_embeds) == ["0", "2"]  # alternating, the last layer included
    idx = torch.randint(0, VOCAB, (2, SEQ))
    logits = model(idx)
    assert logits.shape == (2, SEQ, VOCAB) and logits.dtype == torch.float32
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    logits = model(idx)
    assert logits.abs().max() <= train.LOGIT_SOFTCAP and logits.abs().max() > 10
    assert model(idx[:, :10]).shape == (2, 10, VOCAB)  # shorter sequences work too (evaluation)
    loss = train.build_model(VOCAB, SEQ)(idx, idx)
    assert loss.shape == () and abs(loss.item() - math.log(VOCAB)) < 0.1  # an untrained model guesses uniformly


def test_causality(train):
    """Changing a later token never changes earlier logits."""
    torch.manual_seed(0)
    model = train.build_model(VOCAB, SEQ)
    train.build_optimizers(model)
    for p in model.parameters():  # move the zero-initialized weights off zero
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 2 else None
    idx = torch.randint(0, VOCAB, (1, SEQ))
    changed = idx.clone()
    changed[0, 20] = (idx[0, 20] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-5)


def test_window_sizes_and_masks(train):
    assert train.window_sizes("SSSL", 6, 2048) == [1024, 1024, 1024, 2048, 1024, 2048]
    assert train.window_sizes("SL", 1, 64) == [64]
    with pytest.raises(AssertionError):
        train.window_sizes("SXL", 4, 64)
    mask = train.window_mask(6, 2, torch.device("cpu"))
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_sliding_window_attention_matches_reference(train):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    for window in (3, 8, 16):
        scores = (q @ k.mT) / math.sqrt(8)
        i = torch.arange(16)
        allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
        reference = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        mask = train.attention_mask(16, window, torch.device("cpu"))
        assert (mask is None) == (window == 16)
        assert torch.allclose(train.attention(q, k, v, mask), reference, atol=1e-5)


def test_rotary_is_a_relative_rotation(train):
    """Norms are kept, and q.k depends on the distance between positions only."""
    torch.manual_seed(0)
    cos, sin = train.rotary_tables(16, 8)
    q, k = torch.randn(2, 1, 1, 8).unbind(0)
    rq = train.apply_rotary(q.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    rk = train.apply_rotary(k.expand(1, 16, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(16))
    assert torch.allclose(rq[0] @ rk[0], q.flatten() @ k.flatten(), atol=1e-5)
    assert torch.allclose(rq[5] @ rk[3], rq[12] @ rk[10], atol=1e-5)
    assert not torch.allclose(rq[5] @ rk[3], rq[5] @ rk[4], atol=1e-3)


def test_polar_express_orthogonalizes(train):
    """Singular values spread over two decades all land near 1; the singular vectors are kept."""
    torch.manual_seed(0)
    for rows, cols in ((64, 64), (128, 32), (32, 128)):
        n = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, n))
        v, _ = torch.linalg.qr(torch.randn(cols, n))
        g = u @ torch.diag(torch.logspace(-2, 0, n)) @ v.T
        x = train.polar_express(g[None])[0]
        singular = torch.linalg.svdvals(x)
        assert singular.min() > 0.6 and singular.max() < 1.3, (rows, cols, singular.min(), singular.max())
        assert torch.allclose(x, u @ u.T @ x @ v @ v.T, atol=1e-4)


def test_loss_decreases_with_the_real_optimizers(train):
    torch.manual_seed(0)
    model = train.build_model(VOCAB, SEQ)
    optimizers = train.build_optimizers(model)
    assert {type(opt).__name__ for opt in optimizers} == {"AdamW", "Muon"}
    idx = torch.randint(0, VOCAB, (4, SEQ + 1))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    losses = []
    for step in range(30):
        train.set_schedule(optimizers, step / 30, step)
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_schedules(train, monkeypatch):
    assert train.lr_multiplier(0.0) == 1.0 and train.lr_multiplier(0.5) == 1.0
    assert train.lr_multiplier(0.75) == pytest.approx(0.5) and train.lr_multiplier(1.0) == 0.0
    model = train.build_model(VOCAB, SEQ)
    adamw, muon = train.build_optimizers(model)
    train.set_schedule([adamw, muon], 0.75, 0)
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.5 * train.UNEMBEDDING_LR * (96 / 768) ** -0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.5 * train.MATRIX_LR)
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.85)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.25 * train.WEIGHT_DECAY)
    train.set_schedule([adamw, muon], 0.8, 150)
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.9)
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.1)
    assert train.lr_multiplier(0.05) == pytest.approx(0.5) and train.lr_multiplier(1.0) == pytest.approx(0.1)


def test_head_dim_is_rounded_to_a_multiple_of_8(train, monkeypatch):
    monkeypatch.setattr(train, "HEAD_DIM", 17)
    model = train.build_model(VOCAB, SEQ, device="meta")
    assert model.config.head_dim == 16 and model.config.model_dim % 16 == 0


def test_meta_device_and_flops(train):
    model = train.build_model(VOCAB, SEQ, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 0
    flops = model.estimate_flops()
    assert isinstance(flops, int) and flops > 0
    # the reference shape: depth 8, dim 512, vocab 8192, seq 2048
    for name, value in dict(DEPTH=8, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL").items():
        setattr(train, name, value)
    reference = train.build_model(8192, 2048, device="meta")
    assert reference.config.model_dim == 512 and reference.config.n_head == 4
    assert 2e8 < reference.estimate_flops() < 4e8


class FakeSession:
    """harness.api's Session as train.py sees it: random batches, a clock that counts steps."""

    def __init__(self, steps: int):
        self.device, self.seq_len, self.vocab_size, self.bos_id, self.time_budget = "cpu", SEQ, VOCAB, 0, 1.0
        self.steps, self.total, self.losses, self.model = 0, steps, [], None

    def autocast(self):
        return contextlib.nullcontext()

    def watch(self, model) -> None:  # noqa: ANN001
        self.watched = model

    def train_batches(self, batch_size: int):
        assert batch_size == 2
        generator = torch.Generator().manual_seed(0)
        fixed = torch.randint(0, VOCAB, (4, SEQ + 1), generator=generator)
        while True:  # two micro-batches, the same two every step: learnable
            for rows in (fixed[:2], fixed[2:]):
                yield rows[:, :-1], rows[:, 1:]

    def tick(self, loss: float) -> float:
        self.steps += 1
        self.losses.append(loss)
        return self.progress

    @property
    def progress(self) -> float:
        return self.steps / self.total

    @property
    def done(self) -> bool:
        return self.steps >= self.total

    def finish(self, model) -> None:
        self.model = model


def test_main_trains_and_hands_over_the_model(train, monkeypatch, capsys):
    from harness import api

    session = FakeSession(steps=20)
    monkeypatch.setattr(api, "start", lambda: session)
    monkeypatch.setattr(train, "DEVICE_BATCH_SIZE", 2)  # TOTAL_BATCH_SIZE 4 rows: two micro-batches
    train.main()
    assert gc.isenabled()
    assert session.steps == 20 and session.losses[-1] < 0.7 * session.losses[0], session.losses
    assert isinstance(session.model, train.GPT)
    out = capsys.readouterr().out
    assert "grad_accum 2" in out and "step 00020 | loss" in out and "val_bpb" not in out
