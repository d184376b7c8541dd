"""What the LLM methods share: the research brief and the trial attributes of an LLM call."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hybrid.errors import UserError
from hybrid.llm.client import ProviderError, Reply
from hybrid.paths import project_file

ANSWER_CHARS = 20_000  # of the raw answer kept with the trial, for reading what the model said


def read_program(repo: str | None = None) -> str:
    """program.md: a --repo checkout's own, else ./program.md if the user has one, else the project's default brief."""
    path = Path(repo) / "program.md" if repo and (Path(repo) / "program.md").is_file() else project_file("program.md")
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the research brief {path}: {e.strerror}") from None


def reply_attrs(reply: Reply) -> dict[str, Any]:
    """LLM usage, model and (clipped) answer, recorded with the trial that used it."""
    return {**reply.usage.attrs(), "llm_model": reply.model, "llm_answer": reply.text[:ANSWER_CHARS],
            **({"llm_truncated": True} if reply.truncated else {})}


def failure_attrs(error: ProviderError) -> dict[str, Any]:
    """What a failed call cost, and why it failed."""
    return {**error.usage.attrs(), "llm_error": str(error)}
