"""Every use of a private API of Optuna, optuna-dashboard or cmaes, in one place (tests/test_optuna_compat.py tests
each one).

An upgrade of one of them that renames or changes one of these breaks here and in that test, not across the
code. Checked on Optuna 5.0.0, optuna-dashboard 0.21.0 and cmaes 0.13.1.

Optuna gives no public way to write a trial's attributes from a sampler hook (which receives a FrozenTrial), to
settle a trial another process left RUNNING, or to reach a study's tables; its samplers list a study's trials
through `Study._get_trials`, which hybrid.classical.move_sampler.GenerationStudy overrides to show each
generation only its own trials. cmaes keeps CMA-ES's step size and covariance private. Optuna refuses attributes on
a finished trial, so hybrid.reports.dashboard lists a recorded trial's artifacts and writes its note where optuna-dashboard
reads them for a trial: in its study's system attributes.
"""
from __future__ import annotations

from collections.abc import Container
from types import SimpleNamespace

import numpy as np
import optuna
import sqlalchemy
from cmaes import CMA
from optuna.storages import BaseStorage
from optuna.storages._rdb.models import StudySystemAttributeModel
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard._note import note_ver_key
from optuna_dashboard.artifact._backend import _dashboard_artifact_prefix


def storage(study: optuna.Study) -> BaseStorage:
    """The study's storage: `Study._storage` (Optuna 5.0.0; a `_CachedStorage` in front of an RDB storage)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage: `Study._study_id` (Optuna 5.0.0)."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number): `Trial._trial_id` / `FrozenTrial._trial_id` (Optuna 5.0.0)."""
    return trial._trial_id


def backend(storage: BaseStorage) -> BaseStorage:
    """The storage behind Optuna's cache, or the storage itself: `_CachedStorage._backend` (Optuna 5.0.0)."""
    return getattr(storage, "_backend", storage)


def study_system_attrs_table() -> sqlalchemy.Table:
    """The RDB table of study system attributes (study_id, key, value_json; unique per study and key):
    `optuna.storages._rdb.models.StudySystemAttributeModel` (Optuna 5.0.0)."""
    return StudySystemAttributeModel.__table__


def study_trials(study: optuna.Study, *, deepcopy: bool = True, states: Container[TrialState] | None = None,
                 use_cache: bool = False) -> list[FrozenTrial]:
    """The study's trials as Optuna's samplers list them: `Study._get_trials` (Optuna 5.0.0)."""
    return study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)


def cma_sigma(cma: CMA) -> float:
    """CMA-ES's step size: `CMA._sigma` (cmaes 0.13.1)."""
    return float(cma._sigma)


def cma_covariance(cma: CMA) -> np.ndarray:
    """CMA-ES's covariance matrix before scaling by the step size squared: `CMA._C` (cmaes 0.13.1)."""
    return np.array(cma._C)


def dashboard_artifact_key(trial_id: int, artifact_id: str) -> str:
    """The study system attribute under which optuna-dashboard also lists an artifact of trial `trial_id` (how it
    stored a trial's uploads before Optuna had artifacts): `dashboard:artifacts:<trial id>:<artifact id>`,
    `optuna_dashboard.artifact._backend._dashboard_artifact_prefix` (optuna-dashboard 0.21.0)."""
    return _dashboard_artifact_prefix(trial_id) + artifact_id


def dashboard_note_key(trial_id: int) -> str:
    """The study system attribute that exists once trial `trial_id` has a note in optuna-dashboard (its version):
    `optuna_dashboard._note.note_ver_key` (optuna-dashboard 0.21.0)."""
    return note_ver_key(trial_id)


def dashboard_trial(study: optuna.Study, trial: FrozenTrial) -> SimpleNamespace:
    """A finished trial as `optuna_dashboard.save_note` and `get_note` take a trial: they read a live trial's
    `storage`, `study` and `_trial_id` (optuna-dashboard 0.21.0), and an optuna.Trial cannot be made of a finished
    one (its constructor runs the sampler's before_trial)."""
    return SimpleNamespace(storage=storage(study), study=study, _trial_id=trial_id(trial))
