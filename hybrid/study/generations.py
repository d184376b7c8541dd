"""Code generations: versions of train.py with their parent, diff, knob space and fate; stored in the study and in
git. The Lineage numbers, saves, commits and settles them, under the study's structural lease."""
from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import git
import optuna

from hybrid.study import store
from hybrid.study.lease import StructuralLease
from hybrid.promotion import Verdict
from hybrid.space import SearchSpace

# A generation's status: base (generation 0), candidate (on probation), promoted / rejected (hybrid),
# kept / reverted (llm-code).
STATUSES = ("base", "candidate", "promoted", "rejected", "kept", "reverted")
LEASE_POLL_SECONDS = 0.2  # while another worker holds the structural lease


@dataclass
class Generation:
    """One version of train.py: where it came from, the knobs it is tuned over, and what became of it."""
    number: int
    parent: int | None
    description: str
    code: str                                      # the whole train.py
    space: dict[str, Any]                          # its knob space (SearchSpace.to_dict)
    diff: str = ""                                 # against its parent
    status: str = "candidate"
    code_sha: str = ""
    # how it came about
    agent: str | None = None                       # who proposed it: catalog, llm-code, autoresearch
    mutation: str | None = None                    # the structural move's name
    trigger: str | None = None                     # hybrid: why its parent was mutated (the schedule's reason)
    form: str | None = None                        # llm-code: the form of the edit (diff, file)
    new_knobs: dict[str, Any] = field(default_factory=dict)   # the knobs it opened (their declarations)
    removed_knobs: list[str] = field(default_factory=list)
    created_after_trial: int = -1                  # the last trial number when it was made
    warm_start_trials: list[int] = field(default_factory=list)  # its parent's trials it was warm-started from
    proposal: dict[str, Any] = field(default_factory=dict)      # the agent's own record (LLM usage, notes)
    # what became of it
    commit: str | None = None                      # its commit on the run's branch
    reason: str | None = None                      # why it was refused or kept without a verdict (see `why`)
    verdict: Verdict | None = None                 # hybrid: the promotion verdict
    decided_after_trial: int | None = None
    trial: int | None = None                       # llm-code: the trial that decided it, its val_bpb or status
    val_bpb: float | None = None
    result: str | None = None

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    @property
    def why(self) -> str | None:
        """Why it stands where it does: its verdict's reason, else the reason recorded with it."""
        return self.verdict.reason if self.verdict else self.reason

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["code_sha"] = store.code_sha(self.code)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Generation:
        """A stored generation; keys of no field (older records kept them loose, or under `extra`) go to proposal.
        Older records hold the train.py under `source`: it is read as `code`."""
        flat = {**record, **(record.get("extra") or {})}
        flat.pop("extra", None)
        if "source" in flat:
            flat.setdefault("code", flat.pop("source"))
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in flat.items() if k in names}
        verdict = values.get("verdict") or ({k: flat[k] for k in VERDICT_FIELDS & set(flat)}
                                            if VERDICT_REQUIRED <= set(flat) else None)
        values["verdict"] = Verdict(**verdict) if verdict else None
        loose = {k: v for k, v in flat.items() if k not in names and k not in VERDICT_FIELDS}
        values["proposal"] = {**loose, **(values.get("proposal") or {})}
        return cls(**values)


VERDICT_FIELDS = {f.name for f in fields(Verdict)}
VERDICT_REQUIRED = {f.name for f in fields(Verdict) if f.default is MISSING}  # what every stored verdict has


def unified_diff(old: str, new: str, name: str = "train.py") -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def load_all(study: optuna.Study) -> dict[int, Generation]:
    return {n: Generation.from_record(r) for n, r in sorted(store.load_generations(study).items())}


def save(study: optuna.Study, generation: Generation) -> None:
    store.save_generation(study, generation.number, generation.to_record())


def create(study: optuna.Study, parent: Generation, code: str, space: SearchSpace, description: str, *,
           diff_from: str | None = None, **details: Any) -> Generation:
    """A new generation after `parent` (numbered next, saved; callers hold the structural lease). Its diff is
    against the parent's train.py, or against `diff_from` (the text an agent was shown)."""
    number = max(load_all(study), default=-1) + 1
    generation = Generation(number, parent.number, description, code, space.to_dict(),
                            diff=unified_diff(parent.code if diff_from is None else diff_from, code), **details)
    save(study, generation)
    return generation


def set_status(study: optuna.Study, generation: Generation, status: str, **details: Any) -> Generation:
    """The generation's new status, and what decided it (fields of Generation)."""
    if status not in STATUSES:
        raise ValueError(f"unknown generation status {status!r}")
    for name, value in {"status": status, **details}.items():
        if not hasattr(generation, name):
            raise TypeError(f"a generation has no field {name!r}")
        setattr(generation, name, value)
    save(study, generation)
    return generation


class Lineage:
    """A study's generations as a run changes them: one worker at a time (the study's structural lease: `held()`
    waits for it, `lease` for those that would rather not wait), each generation committed on the run's branch."""

    def __init__(self, study: optuna.Study, artifacts: str | Path) -> None:
        self.study = study
        self.lease = StructuralLease(study)
        self._root = Path(artifacts) / "lineage"
        self._git: GitLineage | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        while not self.lease.try_acquire():
            time.sleep(LEASE_POLL_SECONDS)
        try:
            yield
        finally:
            self.lease.release()

    def load(self) -> dict[int, Generation]:
        return load_all(self.study)

    def create(self, parent: Generation, code: str, space: SearchSpace, description: str, **details: Any) -> Generation:
        return create(self.study, parent, code, space, description, **details)

    def settle(self, generation: Generation, status: str, **details: Any) -> Generation:
        return set_status(self.study, generation, status, **details)

    def commit(self, generation: Generation) -> str:
        """The generation's commit on the run's branch, its ancestors committed first where this machine's repository
        lacks them (another worker made them); each generation records the first commit made of it."""
        return self._commit(self.load() | {generation.number: generation}, generation.number)

    def _commit(self, gens: dict[int, Generation], number: int) -> str:
        if self._git is None:
            self._git = GitLineage(self._root, self.study.study_name)
        gen = gens[number]
        sha = next((t.commit.hexsha for t in self._git.repo.tags if t.name == f"gen-{number}"), None)
        if sha is None:
            parent = None if gen.parent is None else self._commit(gens, gen.parent)
            sha = self._git.commit(gen, parent)
        if gen.commit is None:
            gen.commit = sha
            save(self.study, gen)
        return gen.commit


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
        (self.root / "train.py").write_text(generation.code)
        self.repo.index.add(["train.py"])
        message = f"generation {generation.number}: {generation.description}"
        commit = self.repo.index.commit(message)
        self.repo.create_tag(f"gen-{generation.number}", ref=commit, force=True)  # rejected ones stay reachable
        return commit.hexsha
