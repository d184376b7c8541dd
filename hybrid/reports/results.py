"""What a run found, for people: the studies of a storage, the best trials and their code, one trial, deletion.

Everything here reads the storage as it is (a SQLite file that does not exist is an error, never created);
only `delete_study` writes.
"""
from __future__ import annotations

import datetime
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from harness.knobs import inject_knobs
from hybrid.study import generations, optuna_compat, records, store
from hybrid.config import DEFAULT_STORAGE
from hybrid.errors import UserError

FOLLOW_POLL_SECONDS = 0.5  # `hybrid show --log --follow`: how often the log and the trial's state are read
HIDDEN_ATTRS = (records.CONFIG_RAN,)  # shown apart (as the config), not among the attributes
FIRST_ATTRS = (records.STATUS, records.VAL_BPB, records.ERROR, records.LOG_PATH, records.SOURCE, records.GENERATION,
               records.SEED)  # shown first by `show`


# -- opening ----------------------------------------------------------------------------------------------

def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at url, which must exist (a SQLite file is never created here)."""
    store.require_database(url)
    return store.open_storage(url)


def open_study(url: str, name: str) -> optuna.Study:
    """The study `name` of an existing storage; UserError naming the studies there if it has none of that name."""
    storage = open_storage(url)
    present = optuna.get_all_study_names(storage)
    if name not in present:
        have = ", ".join(present) or "none"
        raise UserError(f"no study {name!r} in {store.masked_url(url)} (studies there: {have})")
    return optuna.load_study(study_name=name, storage=storage)


# -- values -----------------------------------------------------------------------------------------------

def readable(value: Any) -> str:
    """A field for people: floats rounded, phases (a dict of seconds) as seconds, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f} s" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in value.items())
    return str(value)


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The study's successful trials, lowest val_bpb first (earlier trial first among equals)."""
    ok = [t for t in study.get_trials(deepcopy=False) if records.ok_value(t) is not None]
    return sorted(ok, key=lambda t: (records.ok_value(t), t.number))


def trial_config(trial: FrozenTrial) -> dict[str, Any]:
    """The knob values the trial ran with (after the harness snapped them), else the sampled ones."""
    ran = trial.user_attrs.get(records.CONFIG_RAN)
    return dict(ran) if isinstance(ran, dict) and ran else dict(trial.params)


def config_text(config: dict[str, Any]) -> str:
    """`DEPTH=4 MATRIX_LR=0.0412 ...`: floats with 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def trial_code(study: optuna.Study, trial: FrozenTrial) -> str:
    """The train.py that ran the trial: its generation's code with the trial's knob values written in."""
    number = int(trial.user_attrs.get(records.GENERATION) or 0)
    generation = generations.load_all(study).get(number)
    if generation is None:
        raise UserError(f"study {study.study_name!r} has no generation {number} (trial {trial.number}'s)")
    return inject_knobs(generation.code, trial_config(trial))


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial `number` of the study; UserError saying which numbers exist."""
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise UserError(f"study {study.study_name!r} has no trial {number} (trials 0 to {len(trials) - 1})"
                        if trials else f"study {study.study_name!r} has no trials yet")
    return trials[number]


def storage_flag(url: str) -> str:
    """` --storage URL` (password masked), or nothing for the default storage."""
    return "" if url == DEFAULT_STORAGE else f" --storage {store.masked_url(url)}"


def export_command(url: str, study: str) -> str:
    """The command that writes a study's best train.py."""
    return f"hybrid best --study {study}{storage_flag(url)} --export best_train.py"


def rerun_command(study: optuna.Study, trial: FrozenTrial, path: Path | str) -> str:
    """The `hybrid trial` command that reruns an exported train.py as the trial ran it."""
    info = study.user_attrs.get(store.RUN_KEY) or {}
    seed = trial.user_attrs.get(records.SEED, info.get("seed", 0))
    return f"hybrid trial --profile {info.get('profile') or 'gpu'} --seed {seed} --train-py {path} --as-written"


# -- hybrid studies ---------------------------------------------------------------------------------------

def _budget(info: dict[str, Any], finished: list[FrozenTrial]) -> str:
    """`used / budget`: trials, or hours of trial time."""
    if info.get("trials"):
        return f"{len(finished)} / {info['trials']} trials"
    if info.get("budget_hours"):
        return f"{store.seconds_used(finished) / 3600:.2f} / {info['budget_hours']:g} h"
    return "-"


def _last_activity(trials: list[FrozenTrial]) -> str:
    times = [t for trial in trials for t in (trial.datetime_complete, trial.datetime_start) if t is not None]
    return max(times).isoformat(sep=" ", timespec="minutes") if times else "-"


def study_row(study: optuna.Study) -> dict[str, Any]:
    """One line of `hybrid studies`: name, method, setup, trials, budget, best val_bpb, last activity."""
    info = study.user_attrs.get(store.RUN_KEY) or {}
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if store.is_finished(t)]
    statuses = [t.user_attrs.get(records.STATUS) for t in finished]
    ok, pruned = statuses.count(records.OK), statuses.count(records.PRUNED)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    best = ranked(study)
    return {"study": study.study_name, "method": info.get("method", "- (not hybrid's)"),
            "objective/profile": f"{info['objective']}/{info['profile']}" if info else "-",
            "trials ok/pruned/failed/running": f"{ok}/{pruned}/{len(finished) - ok - pruned}/{running}",
            "budget used": _budget(info, finished),
            "best val_bpb": f"{best[0].user_attrs[records.VAL_BPB]:.4f}" if best else "-",
            "last activity": _last_activity(trials)}


def studies_table(url: str) -> pd.DataFrame:
    """`hybrid studies`: one row per study of the storage (UserError if it has none)."""
    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if not names:
        raise UserError(f"no studies in {store.masked_url(url)}: `hybrid run` creates one")
    return pd.DataFrame([study_row(optuna.load_study(study_name=n, storage=storage)) for n in names])


# -- hybrid best ------------------------------------------------------------------------------------------

def best_trials(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The `top` best successful trials; UserError saying what there is when none succeeded."""
    best = ranked(study)
    if not best:
        finished = store.finished_trials(study)
        raise UserError(f"study {study.study_name!r} has no successful trial yet ({failures_text(finished)}): "
                        f"see them with `hybrid show --study {study.study_name} N`")
    return best[:top]


def failures_text(finished: list[FrozenTrial]) -> str:
    """`3 finished, all failed: oom 2, crash 1`, or `no finished trial`."""
    if not finished:
        return "no finished trial"
    counts = pd.Series([t.user_attrs.get(records.STATUS) for t in finished]).value_counts()
    return f"{len(finished)} finished, all failed: " + ", ".join(f"{s} {n}" for s, n in counts.items())


def top_table(trials: list[FrozenTrial]) -> pd.DataFrame:
    """The best trials side by side: number, val_bpb, generation, source, seconds, config."""
    return pd.DataFrame([{"trial": t.number, "val_bpb": f"{t.user_attrs[records.VAL_BPB]:.4f}",
                          "generation": t.user_attrs.get(records.GENERATION, 0),
                          "source": t.user_attrs.get(records.SOURCE, "-"),
                          "seconds": readable(t.user_attrs.get(records.TOTAL_SECONDS)),
                          "config": config_text(trial_config(t))} for t in trials])


def best_text(study: optuna.Study, trial: FrozenTrial, url: str) -> str:
    """The best trial for people: number, val_bpb, generation, config, log, and how to take it out."""
    a = trial.user_attrs
    return "\n".join([
        f"best of study {study.study_name!r}: trial {trial.number}, val_bpb {a[records.VAL_BPB]:.4f}, generation "
        f"{a.get(records.GENERATION, 0)}, source {a.get(records.SOURCE, '-')}, seed {a.get(records.SEED, '-')}",
        f"config: {config_text(trial_config(trial))}",
        f"log: {a.get(records.LOG_PATH) or '- (none recorded)'}",
        f"its train.py: {export_command(url, study.study_name)}"])


def summary_line(study: optuna.Study, url: str) -> str:
    """One line for the end of a run: the best trial, its config and the export command (or that none succeeded)."""
    best = ranked(study)
    if not best:
        return f"hybrid: no successful trial in study {study.study_name!r} ({failures_text(store.finished_trials(study))})"
    t = best[0]
    return (f"hybrid: best trial {t.number}: val_bpb {t.user_attrs[records.VAL_BPB]:.4f} (generation "
            f"{t.user_attrs.get(records.GENERATION, 0)}) with {config_text(trial_config(t))}; "
            f"its train.py: `{export_command(url, study.study_name)}`")


def export(study: optuna.Study, trial: FrozenTrial, path: Path) -> str:
    """Write the trial's train.py to path; returns what was done and how to rerun it."""
    try:
        Path(path).write_text(trial_code(study, trial))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    info = study.user_attrs.get(store.RUN_KEY) or {}
    note = " (the study ran on the surrogate objective: this trains it for real)" if info.get("objective") == "surrogate" else ""
    return (f"wrote trial {trial.number}'s train.py (generation {trial.user_attrs.get(records.GENERATION, 0)}, "
            f"val_bpb {trial.user_attrs[records.VAL_BPB]:.4f}) to {path}; "
            f"rerun it{note}: {rerun_command(study, trial, path)}")


# -- hybrid show ------------------------------------------------------------------------------------------

def trial_fields(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's state, times and attributes (the failure reason is `error`)."""
    fields: dict[str, Any] = {"trial": trial.number, "state": trial.state.name,
                              "started": _time(trial.datetime_start), "completed": _time(trial.datetime_complete)}
    attrs = trial.user_attrs
    fields.update({k: attrs[k] for k in FIRST_ATTRS if k in attrs})
    fields.update({k: attrs[k] for k in sorted(attrs) if k not in HIDDEN_ATTRS and k not in fields})
    return fields


def _time(moment: datetime.datetime | None) -> str | None:
    return moment.isoformat(sep=" ", timespec="seconds") if moment else None


def trial_text(trial: FrozenTrial) -> str:
    """`hybrid show`: one field a line, then the config."""
    fields = trial_fields(trial)
    width = max(map(len, fields))
    lines = [f"{k:<{width}}  {readable(v)}" for k, v in fields.items()]
    return "\n".join([*lines, f"{'config':<{width}}  {config_text(trial_config(trial)) or '-'}"])


def log_path(study: optuna.Study, trial: FrozenTrial) -> Path:
    """The trial's log: the recorded path, else where a running trial writes it (<artifacts>/trial-NNNNN/log.txt)."""
    recorded = trial.user_attrs.get(records.LOG_PATH)
    if recorded:
        return Path(recorded)
    artifacts = (study.user_attrs.get(store.RUN_KEY) or {}).get("artifacts")
    if not artifacts:
        raise UserError(f"trial {trial.number} has no log: its study records no artifact folder")
    return Path(artifacts) / f"trial-{trial.number:05d}" / "log.txt"


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log; UserError if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"cannot read the log {path}: {e.strerror}") from None
    return "".join(text.splitlines(keepends=True)[-lines:])


def follow(study: optuna.Study, number: int, path: Path, out: TextIO = sys.stdout,
           sleep: Callable[[float], None] = time.sleep) -> str:
    """Print a running trial's log as it grows (from its tail) until the trial ends or its worker stops beating;
    returns why it stopped."""
    position = 0
    while True:
        trial = find_trial(study, number)  # read before the log: what the log holds then is all of a finished trial
        if path.is_file():
            with path.open("rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            out.write(chunk.decode("utf-8", errors="replace"))
            out.flush()
        if trial.state != TrialState.RUNNING:
            return f"trial {number} ended: {trial.user_attrs.get(records.STATUS) or trial.state.name.lower()}"
        beat = trial.system_attrs.get(store.HEARTBEAT_KEY)
        if beat is not None and time.time() - beat > store.GRACE_SECONDS:
            return f"trial {number}'s worker stopped beating {time.time() - beat:.0f} s ago: it is dead"
        sleep(FOLLOW_POLL_SECONDS)


def generation_diff(study: optuna.Study, trial: FrozenTrial) -> str:
    """The diff of the trial's generation against its parent (a line saying so for the base)."""
    number = int(trial.user_attrs.get(records.GENERATION) or 0)
    generation = generations.load_all(study).get(number)
    if generation is None or generation.parent is None:
        return f"generation {number} is the base train.py: it has no parent to differ from\n"
    header = f"generation {number} ({generation.status}) against its parent {generation.parent}: {generation.description}\n"
    return header + (generation.diff or "(no change)\n")


# -- hybrid delete ----------------------------------------------------------------------------------------

def trial_folders(study: optuna.Study) -> list[Path]:
    """The folders hybrid wrote for the study: each trial's, and the lineage repository, that exist."""
    artifacts = (study.user_attrs.get(store.RUN_KEY) or {}).get("artifacts")
    if not artifacts:
        return []
    root = Path(artifacts)
    return sorted(p for p in [*root.glob("trial-[0-9]*"), root / "lineage"] if p.is_dir())


def deletion_plan(study: optuna.Study, url: str) -> str:
    """What `hybrid delete` removes, in words."""
    folders = trial_folders(study)
    where = f" under {folders[0].parent}" if folders else ""
    return (f"study {study.study_name!r} in {store.masked_url(url)}: {len(study.get_trials(deepcopy=False))} trials "
            f"and {len(folders)} folders{where}")


def delete_study(study: optuna.Study) -> None:
    """Delete the study from its storage, then its folders (and the artifact folder if that leaves it empty)."""
    folders = trial_folders(study)
    optuna.delete_study(study_name=study.study_name, storage=optuna_compat.storage(study))
    for folder in folders:
        shutil.rmtree(folder)
    if folders and not any(folders[0].parent.iterdir()):
        folders[0].parent.rmdir()
