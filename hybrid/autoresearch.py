"""`hybrid import autoresearch`: an autoresearch night (results.tsv and its branch of kept commits) as a study.

One generation per kept row (its commit's train.py, the previous kept one as parent, the diff, the row's description;
status base for the first, promoted for the others: the agent kept them), one trial per row (source `import`,
val_bpb, memory, status ok for keep and discard rows and crash for crash rows, the row's own status in
`autoresearch_status`). A discarded or crashed commit whose train.py differs from its generation's only in knob
values is a trial of that generation with those values as params (what a classical sampler is warm-started
from); one that changed code has no generation (its val_bpb belongs to code no generation holds). The study is
written as `hybrid run --method hybrid --study S --repo PATH` finds it, and continues from the last kept commit.
"""
from __future__ import annotations

import ast
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.knobs import KnobError, find_knobs, inject_knobs, parse_python
from harness.result import PENALTY
from hybrid.study import generations, records, store
from hybrid.errors import UserError
from hybrid.foreign import Repo
from hybrid.config import RunConfig
from hybrid.study.generations import Generation
from hybrid.space import SearchSpace, SpaceError, load_space
from hybrid.space_init import widened

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUS = {"keep": records.OK, "discard": records.OK, "crash": "crash"}  # autoresearch's status -> hybrid's trial status
KEPT_REASON = "kept by the autoresearch agent (val_bpb below its parent's, no noise margin)"


@dataclass(frozen=True)
class Row:
    """One row of results.tsv; `line` counts the header as line 1."""
    line: int
    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str


def read_results(path: Path) -> list[Row]:
    """The rows of results.tsv, checked; UserError naming the first bad line."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    except FileNotFoundError:
        raise UserError(f"no {path.name} in {path.parent}: the autoresearch run writes it there") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {str(e).strip().splitlines()[-1]}") from None
    if list(frame.columns) != COLUMNS:
        raise UserError(f"{path}: the header must be {' '.join(COLUMNS)} (tab-separated), "
                        f"got {' '.join(frame.columns)}")
    if frame.empty:
        raise UserError(f"{path} has no rows: nothing to import")
    return [_row(path, i + 2, record) for i, record in enumerate(frame.fillna("").to_dict("records"))]


def _row(path: Path, line: int, record: dict[str, str]) -> Row:
    where = f"{path.name} line {line}"
    status = record["status"].strip()
    if status not in STATUS:
        raise UserError(f"{where}: status {status!r} is not one of {', '.join(STATUS)}")
    if not record["commit"].strip():
        raise UserError(f"{where}: no commit")
    try:
        val_bpb, memory = float(record["val_bpb"]), float(record["memory_gb"] or 0)
    except ValueError:
        raise UserError(f"{where}: val_bpb {record['val_bpb']!r} and memory_gb {record['memory_gb']!r} must be "
                        "numbers") from None
    if status != "crash" and not (math.isfinite(val_bpb) and val_bpb > 0):
        raise UserError(f"{where}: a {status} row needs a positive val_bpb, got {record['val_bpb']!r}")
    return Row(line, record["commit"].strip(), val_bpb, memory, status, record["description"].strip())


@dataclass
class Night:
    """What the import writes: generations and trials, found and checked before anything is written."""
    space: SearchSpace
    generations: list[Generation]
    trials: list[optuna.trial.FrozenTrial]
    warnings: list[str]


def read_night(repo: Repo, branch: str | None, space: SearchSpace) -> Night:
    """The night of `repo` on `branch` (default: the checked-out one) in the knob space `space`."""
    rows = read_results(repo.path / "results.tsv")
    vcs = _git(repo.path)
    tip = _branch(vcs, branch)
    night = Night(space, [], [], [])
    for number, row in enumerate(rows):
        commit = _commit(vcs, row.commit)
        if row.status == "keep":
            if commit is None or not vcs.is_ancestor(commit, tip):
                where = "missing from git" if commit is None else f"not on branch {tip.name}"
                raise UserError(f"results.tsv line {row.line}: kept commit {row.commit} is {where}: pass the night's "
                                "--branch, or fix the row")
            night.generations.append(_generation(night, row, commit, number))
        elif commit is None:
            night.warnings.append(f"results.tsv line {row.line}: {row.status} commit {row.commit} is missing from git "
                                  "(garbage-collected?): imported without its code")
        night.trials.append(_trial(night, row, commit))
    if not night.generations:
        raise UserError("results.tsv has no keep row: there is no kept commit to continue from")
    return night


def _git(path: Path) -> git.Repo:
    try:
        return git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UserError(f"{path} is not a git repository: the import reads the night's commits from it") from None


def _branch(vcs: git.Repo, name: str | None) -> git.Head:
    if name is None:
        if vcs.head.is_detached:
            raise UserError("the repository's HEAD is detached: pass --branch autoresearch/<tag>")
        return vcs.active_branch
    heads = {h.name: h for h in vcs.heads}
    if name not in heads:
        raise UserError(f"no branch {name!r} in {vcs.working_dir} (branches: {', '.join(sorted(heads))})")
    return heads[name]


def _commit(vcs: git.Repo, sha: str) -> git.Commit | None:
    """The commit (reachable or not: discarded ones are reset away but kept by git a while), or None."""
    try:
        return vcs.commit(sha)
    except (git.BadName, git.BadObject, ValueError):
        return None


def _code(commit: git.Commit, row: Row) -> str:
    try:
        return (commit.tree / "train.py").data_stream.read().decode("utf-8")
    except KeyError:
        raise UserError(f"results.tsv line {row.line}: commit {row.commit} has no train.py") from None


def _generation(night: Night, row: Row, commit: git.Commit, number: int) -> Generation:
    """The kept row's generation: its train.py, in the knob space widened to hold its values."""
    code = _code(commit, row)
    space = _space_of(night.space, code, row)
    parent = night.generations[-1] if night.generations else None
    return Generation(len(night.generations), parent.number if parent else None, row.description, code,
                      space.to_dict(), diff=generations.unified_diff(parent.code, code) if parent else "",
                      status="promoted" if parent else "base", commit=commit.hexsha, agent="autoresearch",
                      mutation=f"autoresearch {row.commit}", proposal={"tsv_line": row.line},
                      created_after_trial=number - 1, reason=KEPT_REASON if parent is not None else None,
                      warm_start_trials=[t.number for t in night.trials if parent is not None
                                         and t.user_attrs.get(records.GENERATION) == parent.number])


def _space_of(space: SearchSpace, code: str, row: Row) -> SearchSpace:
    """The declared knobs that `code` defines, with its values as defaults (ranges widened to hold them)."""
    found = find_knobs(code)
    knobs = {}
    for name, knob in space.knobs.items():
        if name in found:
            try:
                knobs[name] = widened(knob, found[name].value)
            except SpaceError:
                continue  # another type in this commit: not a knob of its generation
    if not knobs:
        raise UserError(f"results.tsv line {row.line}: the train.py of {row.commit} defines none of the knobs of "
                        f"the search space ({', '.join(space.knobs)})")
    return SearchSpace(knobs)


def _knob_only(base: str, code: str) -> bool:
    """Whether `code` is `base` with other knob values (comments and layout aside)."""
    ours, theirs = find_knobs(base), find_knobs(code)
    if ours.keys() != theirs.keys():
        return False
    values = {name: knob.value for name, knob in theirs.items()}
    try:
        return ast.dump(parse_python(inject_knobs(base, values))) == ast.dump(parse_python(inject_knobs(code, values)))
    except KnobError:
        return False


def _trial(night: Night, row: Row, commit: git.Commit | None) -> optuna.trial.FrozenTrial:
    """The row as a finished trial: in its generation, with its knob values as params, where its code is one."""
    status = STATUS[row.status]
    attrs: dict[str, Any] = {records.SOURCE: "import", records.METHOD: "autoresearch", records.STATUS: status,
                             records.SEED: 0, "autoresearch_status": row.status, "description": row.description,
                             "commit": row.commit, "tsv_line": row.line}
    if status == records.OK:
        attrs[records.VAL_BPB] = row.val_bpb
    else:
        attrs[records.ERROR] = f"crashed in the autoresearch run (results.tsv line {row.line}): {row.description}"
    if row.memory_gb > 0:
        attrs["peak_memory_mb"] = row.memory_gb * 1024
    params: dict[str, Any] = {}
    gen = night.generations[-1] if night.generations else None
    code = None if commit is None else _code(commit, row)
    if code is not None:
        attrs[records.CODE_SHA] = store.code_sha(code)
        found = find_knobs(code)
        attrs[records.CONFIG_RAN] = {n: found[n].value for n in night.space.knobs if n in found}
        if gen is not None and (row.status == "keep" or _knob_only(gen.code, code)):
            attrs[records.GENERATION] = gen.number
            params = _params(gen.search_space(), attrs[records.CONFIG_RAN])
        elif gen is not None:
            attrs["based_on_generation"] = gen.number
    space = gen.search_space() if gen is not None else night.space
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=row.val_bpb if status == records.OK else PENALTY, params=params,
        distributions={name: space.knobs[name].distribution() for name in params}, user_attrs=attrs)


def _params(space: SearchSpace, values: dict[str, Any]) -> dict[str, Any]:
    """The values that are points of the space's knobs (a discarded value outside a range is left out)."""
    params = {}
    for name, knob in space.knobs.items():
        try:
            params[name] = knob.check(values[name])
        except (SpaceError, KeyError):
            continue
    return params


def import_night(repo_path: Path, study_name: str, *, storage_url: str, branch: str | None = None,
                 space_path: Path | None = None) -> str:
    """`hybrid import autoresearch`: write the study; returns what to tell the user. Nothing is written unless the
    whole night reads (UserError naming what is wrong)."""
    repo = Repo.open(repo_path)
    space_file = Path(space_path) if space_path else repo.path / "search_space.yaml"
    config = RunConfig(method="hybrid", study=study_name, storage=storage_url, repo=str(repo.path),
                       train_py=str(repo.train_py), space=str(space_file)).finalize()
    if not space_file.is_file():
        raise UserError(f"no search space at {space_file}: write one with `hybrid space --train-py {repo.train_py} "
                        f"--init-yaml {space_file}` and review it, or pass --space")
    space = load_space(space_file, config.profile)
    night = read_night(repo, branch, space)
    storage = store.open_storage(storage_url)
    if store.study_exists(storage, study_name):
        raise UserError(f"study {study_name!r} exists in {storage_url}: import into a new --study name")
    study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize")
    try:
        study.set_user_attr(store.SPACE_KEY, space.to_dict())
        for generation in night.generations:
            generations.save(study, generation)
        for trial in night.trials:
            study.add_trial(trial)
        store.save_run_info(study, config.to_dict())  # last: a study without it is still being written
    except BaseException:
        optuna.delete_study(study_name=study_name, storage=storage)
        raise
    for warning in night.warnings:
        print(f"hybrid: warning: {warning}", file=sys.stderr)
    return _summary(night, study_name, config, repo)


def _summary(night: Night, study: str, config: RunConfig, repo: Repo) -> str:
    statuses = pd.Series([t.user_attrs["autoresearch_status"] for t in night.trials]).value_counts()
    ok = [t for t in night.trials if t.user_attrs[records.STATUS] == records.OK]
    best = min(ok, key=lambda t: t.value) if ok else None
    best_text = f"; best val_bpb {best.value:.6f} (commit {best.user_attrs['commit']})" if best else ""
    return (f"imported {len(night.trials)} rows ({', '.join(f'{n} {s}' for s, n in statuses.items())}) as study "
            f"{study!r}: {len(night.generations)} generations{best_text}. The metric is the repository's own "
            f"evaluation, not hybrid's harness.\ncontinue with: hybrid run --method hybrid --study {study} "
            f"--repo {repo.path} --storage {config.storage}")
