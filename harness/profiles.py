"""Run profiles: the fixed constants of one protocol (sequence length, budget, evaluation size, data)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


# The reference protocol's GPU memory cap, GiB: the paper's runs set CUDA_MEM_FRACTION 0.543 of an H200's 140 GiB.
PAPER_CAP_GB = 76.0


@dataclass(frozen=True)
class Profile:
    name: str
    seq_len: int             # tokens per row (plus one for the shifted target)
    time_budget: float       # training seconds counted by the harness clock
    eval_tokens: int         # validation tokens scored by evaluate_bpb
    vocab_size: int          # BPE vocabulary, special tokens included
    source: str              # default data source: builtin | climbmix | a path
    warmup_steps: int        # first steps kept off the clock (compilation), at most this many
    max_startup_seconds: float  # wall time allowed before the clock must be running
    timeout_seconds: float   # hard wall-clock cap of a whole trial
    eval_batch_tokens: int   # tokens per forward pass of the evaluation (capped: harness.scorer.MAX_LOGIT_TOKENS)


PROFILES: dict[str, Profile] = {
    # The reference protocol: one GPU, 5 minutes of training, climbmix.
    "gpu": Profile("gpu", seq_len=2048, time_budget=300.0, eval_tokens=40 * 524288, vocab_size=8192,
                   source="climbmix", warmup_steps=10, max_startup_seconds=240.0, timeout_seconds=900.0,
                   eval_batch_tokens=262144),
    # The same code path scaled to a laptop: seconds per trial on 2 cores, offline corpus.
    "cpu": Profile("cpu", seq_len=256, time_budget=20.0, eval_tokens=32768, vocab_size=2048,
                   source="builtin", warmup_steps=1, max_startup_seconds=60.0, timeout_seconds=180.0,
                   eval_batch_tokens=8192),
    # The test suite's scale: a trial in a few seconds. Shares the cpu profile's data and tokenizer.
    "test": Profile("test", seq_len=64, time_budget=1.5, eval_tokens=4096, vocab_size=2048,
                    source="builtin", warmup_steps=1, max_startup_seconds=60.0, timeout_seconds=120.0,
                    eval_batch_tokens=4096),
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
