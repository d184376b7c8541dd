"""Run profiles: the fixed constants of one protocol (sequence length, budget, evaluation size, data)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


# The reference protocol's GPU memory cap, GiB: the paper's runs set CUDA_MEM_FRACTION 0.543 of an H200's 140 GiB.
PAPER_CAP_GB = 76.0

# The slice of the intermediate evaluations, per profile, sized so that the three of a trial cost at most 3 % of
# its wall time on the gpu profile (benchmarks/results/pruning.md). Each costs a forward pass of the slice in the
# training process and its logits through a shared file (tokens x vocabulary x 4 bytes) to the trusted scorer.
# gpu: 32768 tokens, 1 GiB of logits each (4 requests of 256 MiB, 0.21 s each through the file on a loaded CPU
#      box), a forward pass of milliseconds: about 1-1.5 s each, 3-4.5 s of a ~330 s trial, 1-1.4 % (an estimate:
#      not yet measured on a GPU).
# cpu: 8192 tokens (32 rows): measured 1.57 s each on a loaded 2-core box (8.1 % of a trial's wall time for three),
#      0.12 of the final evaluation's time there; about 0.1 s each on a quiet one (0.12 x its 0.9 s, estimated).
# test: 1024 tokens (16 rows).
GPU_INTERMEDIATE_TOKENS = 32768
CPU_INTERMEDIATE_TOKENS = 8192
TEST_INTERMEDIATE_TOKENS = 1024


@dataclass(frozen=True)
class Profile:
    name: str
    seq_len: int             # tokens per row (plus one for the shifted target)
    time_budget: float       # training seconds counted by the harness clock
    eval_tokens: int         # validation tokens scored by evaluate_bpb
    vocab_size: int          # BPE vocabulary, special tokens included
    corpus: str              # default corpus: builtin | climbmix | a path
    warmup_steps: int        # first steps kept off the clock (compilation), at most this many
    max_startup_seconds: float  # wall time allowed before the clock must be running
    timeout_seconds: float   # hard wall-clock cap of a whole trial
    eval_batch_tokens: int   # tokens per forward pass of the evaluation (capped: harness.scorer.MAX_LOGIT_TOKENS)
    # Intermediate evaluations (for pruning): at these fractions of the budget, off the clock, val_bpb of a fixed
    # slice of this many validation tokens, the rows right after the final evaluation's (harness.scorer).
    intermediate_tokens: int = 0
    intermediate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)


PROFILES: dict[str, Profile] = {
    # The reference protocol: one GPU, 5 minutes of training, climbmix.
    "gpu": Profile("gpu", seq_len=2048, time_budget=300.0, eval_tokens=40 * 524288, vocab_size=8192,
                   corpus="climbmix", warmup_steps=10, max_startup_seconds=240.0, timeout_seconds=900.0,
                   eval_batch_tokens=262144, intermediate_tokens=GPU_INTERMEDIATE_TOKENS),
    # The same code path scaled to a laptop: seconds per trial on 2 cores, offline corpus.
    "cpu": Profile("cpu", seq_len=256, time_budget=20.0, eval_tokens=32768, vocab_size=2048,
                   corpus="builtin", warmup_steps=1, max_startup_seconds=60.0, timeout_seconds=180.0,
                   eval_batch_tokens=8192, intermediate_tokens=CPU_INTERMEDIATE_TOKENS),
    # The test suite's scale: a trial in a few seconds. Shares the cpu profile's data and tokenizer.
    "test": Profile("test", seq_len=64, time_budget=1.5, eval_tokens=4096, vocab_size=2048,
                    corpus="builtin", warmup_steps=1, max_startup_seconds=60.0, timeout_seconds=120.0,
                    eval_batch_tokens=4096, intermediate_tokens=TEST_INTERMEDIATE_TOKENS),
}


def get_profile(name: str | None) -> Profile:
    """The named profile, or the machine's default (gpu where CUDA is found, else cpu)."""
    if name is None:
        name = default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def default_profile_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def data_dir() -> Path:
    """Where prepared data, tokenizers and token caches live ($HYBRID_DATA_DIR, default ~/.cache/hybrid)."""
    return Path(os.environ.get("HYBRID_DATA_DIR", Path.home() / ".cache" / "hybrid")).expanduser()
