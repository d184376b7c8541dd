"""optuna-dashboard on a trial database, with each trial's code, diff and log beside it.

Every finished trial gets, in an Optuna artifact store (FileSystemArtifactStore, `dashboard-artifacts/` beside a
SQLite database, else under the run's artifacts root), its log (`log.txt`), the train.py that ran it (its
generation's code with the trial's knob values written in) and, for a generation with a parent, the generation's
diff (`generation-N.diff`); and a note (Markdown, on its page in optuna-dashboard) with its status and, for a
failure, the reason and that its value is the penalty told to the sampler, not a result. The loop publishes each
trial as it is recorded (`publish`, which never fails a trial); `hybrid dashboard` first publishes what a study
lacks (`backfill`: studies run before, uploads that failed), then serves optuna-dashboard.

Optuna refuses attributes on a finished trial, so a recorded trial's artifacts are uploaded with
optuna.artifacts.upload_artifact through a storage view that lists them where optuna-dashboard also looks for a
trial's artifacts: in its study's system attributes (hybrid.study.optuna_compat). `optuna.artifacts.get_all_artifact_meta`
does not see them; the dashboard does.
"""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from harness.scrub import scrub
from hybrid.reports import results
from hybrid.study import generations, optuna_compat, records, store
from hybrid.config import artifacts_root
from hybrid.errors import UserError
from hybrid.study.generations import Generation

FOLDER = "dashboard-artifacts"  # the artifact store, beside the database (or under ./runs)
TEXT = "text/plain; charset=utf-8"  # every artifact is text: shown in the browser, not downloaded
LOG_NAME = "log.txt"
CODE_NAME = "train.py"

_warned = False  # a failed upload is said once per process


# -- where ------------------------------------------------------------------------------------------------

def artifact_folder(storage_url: str) -> Path:
    """The folder of a storage's artifacts: beside a SQLite database, else under ./runs."""
    return artifacts_root(storage_url) / FOLDER


def artifact_store(storage_url: str) -> FileSystemArtifactStore:
    folder = artifact_folder(storage_url)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


class _Listed:
    """What a study holds for optuna-dashboard, read once: each trial's artifacts and whether it has a note (its
    system attributes), and its generations. Also the storage that upload_artifact writes a trial's artifact record
    to: into the study's system attributes, under the key where optuna-dashboard lists that trial's artifacts."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = optuna_compat.storage(study)
        self._study_id = optuna_compat.study_id(study)
        self._attrs = self._storage.get_study_system_attrs(self._study_id)
        self._generations = generations.load_all(study)

    def generation(self, trial: FrozenTrial) -> Generation | None:
        """The trial's generation; None where the study lacks it (an imported trial whose code git no longer had)."""
        return self._generations.get(int(trial.user_attrs.get(records.GENERATION) or 0))

    def files(self, trial: FrozenTrial) -> dict[str, str]:
        """File name -> artifact id of the trial's artifacts listed when this was read (one deleted in the
        dashboard is listed as null)."""
        prefix = optuna_compat.dashboard_artifact_key(optuna_compat.trial_id(trial), "")
        metas = [m for k, v in self._attrs.items() if k.startswith(prefix) and (m := json.loads(v))]
        return {m["filename"]: m["artifact_id"] for m in metas}

    def noted(self, trial: FrozenTrial) -> bool:
        return optuna_compat.dashboard_note_key(optuna_compat.trial_id(trial)) in self._attrs

    def set_trial_system_attr(self, trial_id: int, key: str, value: str) -> None:
        artifact_id = json.loads(value)["artifact_id"]
        self._storage.set_study_system_attr(self._study_id, optuna_compat.dashboard_artifact_key(trial_id, artifact_id),
                                            value)


# -- what a trial shows -----------------------------------------------------------------------------------

def trial_files(study: optuna.Study, trial: FrozenTrial, generation: Generation | None
                ) -> dict[str, Callable[[], Path | str]]:
    """File name -> what makes the file (the log's path; the text of train.py and of the diff, made when called:
    writing a trial's values into its code takes tens of milliseconds), for the artifacts the trial has."""
    files: dict[str, Callable[[], Path | str]] = {}
    log = trial.user_attrs.get(records.LOG_PATH)
    if log and Path(log).is_file():
        files[LOG_NAME] = lambda: Path(log)
    if generation is None:
        return files
    files[CODE_NAME] = lambda: results.trial_code(study, trial)
    if generation.parent is not None:
        files[f"generation-{generation.number}.diff"] = lambda: results.generation_diff(study, trial)
    return files


def note(trial: FrozenTrial, generation: Generation | None) -> str:
    """The trial's note (Markdown): its outcome first (a failure says so, its reason and that its value is a
    penalty), then where it came from and what it ran."""
    attrs = trial.user_attrs
    value = records.ok_value(trial)
    if value is not None:
        lines = [f"## Trial {trial.number}: ok, val_bpb {value:.4f}"]
    elif attrs.get(records.STATUS) == records.PRUNED:
        lines = [f"## Trial {trial.number}: pruned", "", "Stopped early by the pruner: its intermediate val_bpb (its "
                 "learning curve on this page) was worse than the others' at the same point. Not a result: it has "
                 "no final val_bpb."]
    else:
        lines = [f"## Trial {trial.number}: FAILED ({attrs.get(records.STATUS)})", "",
                 f"**Not a result**: {_value_text(trial)}"]
        if attrs.get(records.ERROR):
            lines += ["", "Reason:", "", "```", str(attrs[records.ERROR]), "```"]
    about = f" ({generation.status}: {generation.description})" if generation else ""
    lines += ["", f"- source: {attrs.get(records.SOURCE, '-')}",
              f"- generation: {attrs.get(records.GENERATION, 0)}{about}",
              f"- seed: {attrs.get(records.SEED, '-')}",
              f"- seconds: {results.readable(attrs.get(records.TOTAL_SECONDS))}",
              f"- steps: {results.readable(attrs.get(records.NUM_STEPS))}",
              f"- log: `{attrs.get(records.LOG_PATH) or '-'}`",
              f"- config: {results.config_text(results.trial_config(trial)) or '-'}"]  # plain text: it wraps
    return "\n".join(lines)


def _value_text(trial: FrozenTrial) -> str:
    if trial.value is None:
        return "it has no value (it never ran, or was refused before it ran)."
    return (f"the value {trial.value:g} shown for it is the penalty told to the sampler for every failure, "
            "not a val_bpb.")


# -- publishing -------------------------------------------------------------------------------------------

def publish(study: optuna.Study, trial: FrozenTrial, storage_url: str) -> None:
    """The loop's hook, after a trial is recorded: its artifacts and note. Never raises: the first failure in this
    process is said once on stderr (`hybrid dashboard` uploads what is missing later)."""
    global _warned
    try:
        _publish(study, trial, artifact_store(storage_url), _Listed(study))
    except Exception as e:  # a full disk, a busy database, a bug: none of it may fail the trial
        if not _warned:
            _warned = True
            reason = scrub(str(e).splitlines()[0]) if str(e) else ""
            print(f"hybrid: warning: trial {trial.number}'s log, code and note were not uploaded for the dashboard "
                  f"({type(e).__name__}: {reason}); the trials are unaffected, and `hybrid dashboard` uploads what "
                  "is missing (later failures are not shown)", file=sys.stderr)


def _publish(study: optuna.Study, trial: FrozenTrial, artifacts: FileSystemArtifactStore, listed: _Listed) -> bool:
    """Upload the trial's artifacts that are not listed, then its note if it has none; whether anything was
    missing."""
    uploaded = listed.files(trial)
    generation = listed.generation(trial)
    missing = {name: make for name, make in trial_files(study, trial, generation).items() if name not in uploaded}
    for name, make in missing.items():
        _upload(trial, name, make(), artifacts, listed)
    noted = listed.noted(trial)
    if not noted:
        optuna_dashboard.save_note(optuna_compat.dashboard_trial(study, trial), note(trial, generation))
    return bool(missing) or not noted


def _upload(trial: FrozenTrial, name: str, file: Path | str, artifacts: FileSystemArtifactStore,
            listed: _Listed) -> None:
    """One artifact of the trial: a file, or a text written to a file of that name first."""
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(file, str):
            (Path(folder) / name).write_text(file)
            file = Path(folder) / name
        upload_artifact(artifact_store=artifacts, file_path=str(file), study_or_trial=trial, storage=listed,
                        mimetype=TEXT)


def backfill(study: optuna.Study, artifacts: FileSystemArtifactStore) -> int:
    """Publish what the study's finished trials lack; how many trials lacked something."""
    listed = _Listed(study)
    return sum(_publish(study, t, artifacts, listed) for t in store.finished_trials(study))


def remove_artifacts(study: optuna.Study, storage_url: str) -> int:
    """Delete the files of the study's trial artifacts (`hybrid delete`, before the study goes); how many there
    were. Nothing is lost that the study still needs: `hybrid dashboard` uploads them again."""
    folder = artifact_folder(storage_url)
    if not folder.is_dir():
        return 0
    artifacts, listed = FileSystemArtifactStore(str(folder)), _Listed(study)
    ids = [i for t in study.get_trials(deepcopy=False) for i in listed.files(t).values()]
    for artifact_id in ids:
        with contextlib.suppress(ArtifactNotFound):  # removed by hand, or never written (a failed upload)
            artifacts.remove(artifact_id)
    return len(ids)


# -- serving ----------------------------------------------------------------------------------------------

def serve(storage_url: str, host: str, port: int) -> int:
    """`hybrid dashboard`: refuse a missing database or a taken port, publish what hybrid's studies lack, then serve
    optuna-dashboard with the artifact store until Ctrl-C."""
    storage = results.open_storage(storage_url)
    _check_port(host, port)
    artifacts = artifact_store(storage_url)
    for study in _hybrid_studies(storage):
        count = backfill(study, artifacts)
        if count:
            print(f"hybrid: study {study.study_name}: uploaded the log, code and note of {count} trials",
                  file=sys.stderr)
    print(f"hybrid: optuna-dashboard of {store.masked_url(storage_url)} at http://{host}:{port}/dashboard/ "
          f"(artifacts in {artifact_folder(storage_url)}); Ctrl-C stops it", file=sys.stderr)
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=artifacts)
    return 0


def _hybrid_studies(storage: BaseStorage) -> list[optuna.Study]:
    """The studies hybrid created (others are shown, never written to)."""
    studies = [optuna.load_study(study_name=name, storage=storage) for name in optuna.get_all_study_names(storage)]
    return [s for s in studies if store.RUN_KEY in s.user_attrs]


def _check_port(host: str, port: int) -> None:
    """UserError, before anything is written, if the address cannot be listened on."""
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
