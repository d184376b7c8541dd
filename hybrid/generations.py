"""Code generations: versions of train.py with their parent, diff, knob space and fate; stored in the study and in git."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import git
import optuna

from hybrid import store
from hybrid.space import SearchSpace

# A generation's status: base (generation 0), candidate (on probation), promoted / rejected (hybrid),
# kept / reverted (llm-code).
STATUSES = ("base", "candidate", "promoted", "rejected", "kept", "reverted")


@dataclass
class Generation:
    number: int
    parent: int | None
    description: str
    source: str
    space: dict[str, Any]
    diff: str = ""
    status: str = "candidate"
    code_sha: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # mutation name, margin, commit, new knobs, ...

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["code_sha"] = store.code_sha(self.source)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Generation:
        known = {k: record[k] for k in ("number", "parent", "description", "source", "space", "diff", "status", "code_sha")
                 if k in record}
        extra = dict(record.get("extra") or {})
        extra.update({k: v for k, v in record.items() if k not in known and k != "extra"})
        return cls(**known, extra=extra)


def unified_diff(old: str, new: str, name: str = "train.py") -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def load_all(study: optuna.Study) -> dict[int, Generation]:
    return {n: Generation.from_record(r) for n, r in sorted(store.load_generations(study).items())}


def save(study: optuna.Study, generation: Generation) -> None:
    store.save_generation(study, generation.number, generation.to_record())


def create(study: optuna.Study, parent: Generation, source: str, space: SearchSpace, description: str,
           **extra: Any) -> Generation:
    """A new candidate generation after `parent`, stored in the study (callers hold the structural lease)."""
    number = max(load_all(study), default=-1) + 1
    generation = Generation(number, parent.number, description, source, space.to_dict(),
                            diff=unified_diff(parent.source, source), extra=extra)
    save(study, generation)
    return generation


def set_status(study: optuna.Study, generation: Generation, status: str, **extra: Any) -> Generation:
    if status not in STATUSES:
        raise ValueError(f"unknown generation status {status!r}")
    generation.status = status
    generation.extra.update(extra)
    save(study, generation)
    return generation


class GitLineage:
    """Each generation as a commit of train.py (tagged gen-N) on the run's branch `hybrid/<study>`, in a repository of its own."""

    def __init__(self, root: Path, study_name: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repo = git.Repo(self.root) if (self.root / ".git").exists() else git.Repo.init(self.root)
        with self.repo.config_writer() as cfg:
            cfg.set_value("user", "name", "hybrid")
            cfg.set_value("user", "email", "hybrid@localhost")
        self.branch = f"hybrid/{study_name}"

    def commit(self, generation: Generation, parent_commit: str | None = None) -> str:
        """Commit the generation's train.py on top of its parent's commit; returns the commit sha."""
        if parent_commit is not None:
            self.repo.git.checkout("-B", self.branch, parent_commit)
        elif self.repo.head.is_valid():
            self.repo.git.checkout("-B", self.branch)
        else:
            self.repo.git.checkout("--orphan", self.branch)
        (self.root / "train.py").write_text(generation.source)
        self.repo.index.add(["train.py"])
        message = f"generation {generation.number}: {generation.description}"
        commit = self.repo.index.commit(message)
        self.repo.create_tag(f"gen-{generation.number}", ref=commit, force=True)  # rejected ones stay reachable
        return commit.hexsha
