"""BPE tokenizer: trained with rustbpe, run with tiktoken, special tokens appended after the merges."""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from harness.errors import UserError

BOS = "<|bos|>"
SPECIAL_TOKENS = (BOS,)
# GPT-4's split pattern, with numbers split into groups of at most two digits (small vocabularies).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], pattern: str):
        self.ranks, self.pattern = ranks, pattern
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("hybrid", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.bos_id = specials[BOS]
        self.vocab_size = self.enc.n_vocab

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Token ids of each text (special-token strings in the text are plain text, never specials)."""
        return self.enc.encode_ordinary_batch(texts, num_threads=threads or os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """Bytes of raw text each token stands for (int32, indexed by id); special tokens are 0."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps({"ranks": self.ranks, "pattern": self.pattern}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        d = pickle.loads(Path(path).read_bytes())
        return cls(d["ranks"], d["pattern"])


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BPE tokenizer with exactly vocab_size ids (merges + the special tokens) learned from the texts."""
    merges_vocab = vocab_size - len(SPECIAL_TOKENS)
    if merges_vocab <= 256:
        raise UserError(f"vocab_size must be above {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), merges_vocab, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != merges_vocab:
        raise UserError(f"the corpus is too small for a vocabulary of {vocab_size}: only {len(ranks)} merges found")
    return Tokenizer(ranks, bpe.get_pattern())
