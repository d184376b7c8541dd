"""Where the harness keeps one prepared corpus: its tokenizer and token cache, for one vocabulary size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prepared:
    """Where one prepared corpus lives, for one vocabulary size."""
    corpus: str       # corpus id: builtin | climbmix | local-<name>-<hash>
    vocab_size: int
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / f"tokenizer-{self.vocab_size}.pkl"

    @property
    def tokens(self) -> Path:
        return self.root / f"tokens-{self.vocab_size}"

    def to_dict(self) -> dict:
        return {"corpus": self.corpus, "vocab_size": self.vocab_size, "root": str(self.root)}

    @classmethod
    def from_dict(cls, d: dict) -> Prepared:
        return cls(d["corpus"] if "corpus" in d else d["source"], d["vocab_size"], Path(d["root"]))
