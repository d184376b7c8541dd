"""Pre-train a small GPT for a fixed time budget; the harness scores the model it is handed (val_bpb).

One file, no framework: the knobs, the model, the optimizers (Muon + AdamW) and the training loop.
CUDA: bf16 autocast, torch.compile, FlexAttention. CPU: fp32, eager, SDPA with a sliding-window mask.
"""
import gc
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# ---------------------------------------------------------------------------
# Knobs: the search space of arXiv 2603.24647, with the reference defaults

# Model
DEPTH = 8                  # transformer blocks
ASPECT_RATIO = 64          # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # channels per attention head (rounded to a multiple of 8)
WINDOW_PATTERN = "SSSL"    # attention window per layer, cycled: L = seq_len, S = seq_len // 2; the last layer is L
# Batch
DEVICE_BATCH_SIZE = 128    # rows per forward/backward pass
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step; gradient accumulation makes up the difference
# Optimization
EMBEDDING_LR = 0.6         # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004     # AdamW, lm_head
MATRIX_LR = 0.04           # Muon, the 2-D matrices of the blocks
SCALAR_LR = 0.5            # AdamW, per-layer residual scalars
WEIGHT_DECAY = 0.2         # Muon, cautious, decayed linearly to zero over the budget
WARMUP_RATIO = 0.0         # fraction of the time budget spent warming the LR up from zero
WARMDOWN_RATIO = 0.5       # fraction of the time budget, at the end, spent decaying the LR
FINAL_LR_FRAC = 0.0        # LR multiplier at the end of the warmdown

# Fixed constants
ADAM_BETAS = (0.8, 0.95)
X0_ADAM_BETAS = (0.96, 0.95)
ADAM_EPS = 1e-10
MUON_MOMENTUM = (0.85, 0.95)  # warmed linearly from the first value to the second
MUON_MOMENTUM_WARMUP_STEPS = 300
MUON_BETA2 = 0.95          # NorMuon's second-moment decay
ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 15.0
VE_GATE_CHANNELS = 32      # input channels of the value-embedding gate
LOG_SECONDS = 5.0          # seconds between progress lines

# Polar Express (Amsel et al. 2025): per-step coefficients (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# ---------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    head_dim: int
    window_pattern: str

    @property
    def model_dim(self) -> int:
        return self.n_head * self.head_dim


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def window_sizes(pattern: str, n_layer: int, seq_len: int) -> list[int]:
    """Per layer, how many earlier tokens a query may see besides itself."""
    assert pattern and set(pattern) <= {"S", "L"}, f"WINDOW_PATTERN must be made of S and L, got {pattern!r}"
    sizes = {"L": seq_len, "S": seq_len // 2}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(n_layer)]
    windows[-1] = seq_len
    return windows


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Every other layer, the last one included."""
    return layer % 2 == (n_layer - 1) % 2


Mask = torch.Tensor | BlockMask | None


@lru_cache(maxsize=32)
def window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: 0 <= i - j <= window."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance <= window)


def attention_mask(T: int, window: int, device: torch.device) -> Mask:
    """None for plain causal attention; in compiled CUDA code a FlexAttention block mask (fully masked
    blocks are skipped); otherwise a bool mask for SDPA."""
    if window >= T - 1:
        return None
    if device.type == "cuda" and torch.compiler.is_compiling():
        def causal_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
        return create_block_mask(causal_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return window_mask(T, window, device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Causal attention under `mask` (see attention_mask); q, k, v and the result are (B, H, T, D)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rotary_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position times frequency, (seq_len, 1, head_dim) for (B, T, H, D) tensors: channel pairs
    (i, i + D/2) share a frequency; sin's second half is negated, so that rotation is two multiplies."""
    freqs = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)[:, None, :]
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), -angles.sin()], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: rotates each channel pair (i, i + D/2) by its position's angle."""
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        d = config.model_dim
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.gate_channels = min(VE_GATE_CHANNELS, d)
        self.ve_gate = (nn.Linear(self.gate_channels, config.n_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, mask: Mask):
        B, T, _ = x.shape
        shape = (B, T, self.n_head, self.head_dim)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        dtype = q.dtype  # bf16 under autocast; the norms and the fp32 value embedding promote, attention wants one
        if ve is not None:  # value embedding, mixed in with an input-dependent gate per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(shape)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = attention(*(t.to(dtype).transpose(1, 2) for t in (q, k, v)), mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config.model_dim)

    def forward(self, x, ve, cos, sin, mask: Mask):
        x = x + self.attn(norm(x), ve, cos, sin, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        d, n_layer = config.model_dim, config.n_layer
        self.windows = window_sizes(config.window_pattern, n_layer, config.seq_len)
        self.wte = nn.Embedding(config.vocab_size, d)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, d)
                                           for i in range(n_layer) if has_value_embedding(i, n_layer)})
        self.blocks = nn.ModuleList([Block(config, i) for i in range(n_layer)])
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((n_layer,), 0.1))
        cos, sin = rotary_tables(config.seq_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * self.config.model_dim**-0.5  # uniform with std 1/sqrt(d)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in float32, or the mean cross-entropy when targets are given."""
        T = idx.size(1)
        assert T <= self.config.seq_len, f"sequence of {T} tokens, the model was built for {self.config.seq_len}"
        cos, sin = self.cos[:T], self.sin[:T]
        masks = {w: attention_mask(T, w, idx.device) for w in set(self.windows)}
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.windows[i]])
        logits = self.lm_head(norm(x)).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6 per non-embedding matmul weight, plus attention over its window."""
        embeddings = self.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul = sum(p.numel() for p in self.parameters()) - embeddings - scalars
        c, T = self.config, self.config.seq_len
        attn = sum(12 * c.n_head * c.head_dim * min(w, T) for w in self.windows)
        return 6 * matmul + attn


def build_model(vocab_size: int, seq_len: int, device: torch.device | str = "cpu") -> GPT:
    """The GPT the knobs describe, initialized on `device` (on "meta": shapes only, for the memory model)."""
    head_dim = max(8, round(HEAD_DIM / 8) * 8)  # a multiple of 8: rotary pairs channels, GPU kernels want 8
    model_dim = math.ceil(DEPTH * ASPECT_RATIO / head_dim) * head_dim
    config = GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=DEPTH, n_head=model_dim // head_dim,
                       head_dim=head_dim, window_pattern=WINDOW_PATTERN)
    with torch.device(device):
        return GPT(config)

# ---------------------------------------------------------------------------
# Optimizers


def matrix_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each matrix of a stack (N, rows, cols), as (N, 1, 1)."""
    return x.norm(dim=(-2, -1), keepdim=True)


def polar_express(g: torch.Tensor) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each of a stack of matrices (N, rows, cols), approximately."""
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (matrix_norm(x) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        xxt = x @ x.mT
        x = a * x + (b * xxt + c * (xxt @ xxt)) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, Polar Express orthogonalization, NorMuon per-neuron variance
    reduction and cautious weight decay. Matrices of one shape are stacked and updated together."""

    def __init__(self, params, lr: float, weight_decay: float):
        params = list(params)
        groups = [dict(params=[p for p in params if p.shape == shape]) for shape in sorted({p.shape for p in params})]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM[1]))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            rows, cols = params[0].shape
            grads = torch.stack([p.grad for p in params])
            state = self.state[params[0]]  # the whole stack's state lives with its first matrix
            neuron_dim = -1 if rows >= cols else -2  # NorMuon keeps one statistic per row (per column if wide)
            if not state:
                state["momentum"] = torch.zeros_like(grads)
                state["second_moment"] = torch.zeros_like(grads).mean(dim=neuron_dim, keepdim=True)
            # Nesterov momentum
            state["momentum"].lerp_(grads, 1 - group["momentum"])
            update = polar_express(grads.lerp_(state["momentum"], group["momentum"]))
            # NorMuon: divide each neuron's update by its running RMS, then restore the update's overall norm
            state["second_moment"].lerp_(update.float().square().mean(dim=neuron_dim, keepdim=True), 1 - MUON_BETA2)
            scaled = update * state["second_moment"].clamp_min(1e-10).rsqrt()
            update = scaled * (matrix_norm(update) / matrix_norm(scaled).clamp_min(1e-10))
            # Cautious weight decay: decay only where the update and the weight agree in sign
            stacked = torch.stack(params)
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            decay = group["weight_decay"] * stacked * (update * stacked >= 0)
            stacked.sub_(lr * (update.to(stacked.dtype) + decay))
            torch._foreach_copy_(params, list(stacked.unbind(0)))


def build_optimizers(model: GPT) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' matrices; AdamW for embeddings, lm_head and scalars. Each group keeps its `initial_lr`."""
    scale = (model.config.model_dim / 768) ** -0.5  # AdamW LRs were tuned at model_dim 768
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=X0_ADAM_BETAS),
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, fused=True)
    muon = Muon(model.blocks.parameters(), lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    optimizers = [adamw, muon]
    assert sum(len(g["params"]) for opt in optimizers for g in opt.param_groups) == len(list(model.parameters()))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float) -> float:
    """Linear warmup over WARMUP_RATIO, constant, then linear warmdown to FINAL_LR_FRAC over WARMDOWN_RATIO."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1 - WARMDOWN_RATIO:
        return 1.0
    remaining = max(0.0, 1 - progress) / WARMDOWN_RATIO
    return remaining + (1 - remaining) * FINAL_LR_FRAC


def set_schedule(optimizers: list[torch.optim.Optimizer], progress: float, step: int) -> None:
    lrm = lr_multiplier(progress)
    warm = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["momentum"] = (1 - warm) * MUON_MOMENTUM[0] + warm * MUON_MOMENTUM[1]
                group["weight_decay"] = WEIGHT_DECAY * max(0.0, 1 - progress)

# ---------------------------------------------------------------------------
# Training


def main() -> None:
    from harness import api

    session = api.start()
    device = torch.device(session.device)
    model = build_model(session.vocab_size, session.seq_len, device)
    session.watch(model)  # evaluated at checkpoints of the budget when the run prunes (off the clock)
    tokens_per_pass = DEVICE_BATCH_SIZE * session.seq_len
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, \
        f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * seq_len = {tokens_per_pass}"
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_pass
    optimizers = build_optimizers(model)
    train_model = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    c = model.config
    print(f"params {sum(p.numel() for p in model.parameters()):,} | layers {c.n_layer} | dim {c.model_dim} | "
          f"heads {c.n_head}x{c.head_dim} | windows {model.windows} | grad_accum {grad_accum} | "
          f"device {device} | threads {torch.get_num_threads()}", flush=True)

    batches = session.train_batches(DEVICE_BATCH_SIZE)
    step, progress = 0, 0.0
    t_log, step_logged, smooth_loss = time.perf_counter(), 0, 0.0
    while not session.done:
        set_schedule(optimizers, progress, step)
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            inputs, targets = next(batches)
            with session.autocast():
                loss = train_model(inputs, targets)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss_sum.item() / grad_accum
        progress = session.tick(loss_value)
        step += 1
        if step == 1:  # the garbage collector's pauses cost more than the little garbage it would free
            gc.collect()
            gc.freeze()
            gc.disable()
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        now = time.perf_counter()
        if now - t_log >= LOG_SECONDS or session.done:
            tokens_per_second = (step - step_logged) * TOTAL_BATCH_SIZE / (now - t_log)
            print(f"step {step:05d} | loss {smooth_loss / (1 - 0.9**step):.4f} | progress {100 * progress:5.1f}% | "
                  f"tok/s {tokens_per_second:,.0f}", flush=True)
            t_log, step_logged = now, step
    gc.enable()
    session.finish(model)


if __name__ == "__main__":
    main()
