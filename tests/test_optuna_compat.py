"""One test per private Optuna or cmaes API that hybrid/study/optuna_compat.py wraps: an upgrade that changes one fails
here."""
from __future__ import annotations

import inspect
import json
import wsgiref.util
from pathlib import Path

import numpy as np
import optuna
import optuna_dashboard
import pytest
import sqlalchemy
from cmaes import CMA
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hybrid.study import optuna_compat, store
from hybrid.classical.move_sampler import GenerationStudy
from hybrid.study.records import GENERATION
from hybrid.classical.samplers import make_sampler

SPACE = {"x": FloatDistribution(0.0, 1.0), "n": IntDistribution(1, 8)}


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=store.open_storage(f"sqlite:///{tmp_path}/h.db"), study_name="s")


def test_storage_is_the_studys_own(study: optuna.Study) -> None:
    storage = optuna_compat.storage(study)
    trial = study.ask(SPACE)
    storage.set_trial_user_attr(optuna_compat.trial_id(trial), "k", 1)
    assert study.get_trials()[0].user_attrs == {"k": 1}


def test_backend_is_the_rdb_storage_behind_optunas_cache(study: optuna.Study) -> None:
    rdb = optuna_compat.backend(optuna_compat.storage(study))
    assert isinstance(rdb, RDBStorage) and rdb is not optuna_compat.storage(study)
    memory = optuna.storages.InMemoryStorage()
    assert optuna_compat.backend(memory) is memory  # a storage without a cache is its own backend


def test_study_id_is_the_storages_id_of_the_study(study: optuna.Study) -> None:
    other = optuna.create_study(storage=optuna_compat.storage(study), study_name="other")
    storage = optuna_compat.storage(study)
    assert storage.get_study_id_from_name("s") == optuna_compat.study_id(study)
    assert storage.get_study_id_from_name("other") == optuna_compat.study_id(other) != optuna_compat.study_id(study)


def test_trial_id_names_the_trial_in_its_storage_for_trials_and_frozen_trials(study: optuna.Study) -> None:
    optuna.create_study(storage=optuna_compat.storage(study), study_name="other").ask(SPACE)  # ids differ from numbers
    trial = study.ask(SPACE)
    storage = optuna_compat.storage(study)
    assert storage.get_trial(optuna_compat.trial_id(trial)).number == trial.number == 0
    frozen = study.get_trials()[0]
    assert optuna_compat.trial_id(frozen) == optuna_compat.trial_id(trial) != trial.number
    storage.set_trial_state_values(optuna_compat.trial_id(frozen), TrialState.COMPLETE, [0.5])
    assert study.get_trials()[0].value == 0.5


def test_the_study_system_attrs_table_is_where_optuna_keeps_them(study: optuna.Study) -> None:
    table = optuna_compat.study_system_attrs_table()
    assert {"study_id", "key", "value_json"} <= set(table.c.keys())
    optuna_compat.storage(study).set_study_system_attr(optuna_compat.study_id(study), "probe", {"a": 1})
    engine = optuna_compat.backend(optuna_compat.storage(study)).engine
    with engine.connect() as conn:
        mine = (table.c.study_id == optuna_compat.study_id(study)) & (table.c.key == "probe")
        rows = conn.execute(sqlalchemy.select(table.c.value_json).where(mine)).all()
    assert [r[0] for r in rows] == ['{"a": 1}']
    # the structural lease's compare-and-set relies on the unique key refusing a second row
    with pytest.raises(sqlalchemy.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sqlalchemy.insert(table).values(study_id=optuna_compat.study_id(study), key="probe",
                                                     value_json="2"))


def test_study_trials_takes_the_arguments_optunas_samplers_pass(study: optuna.Study) -> None:
    parameters = inspect.signature(optuna.Study._get_trials).parameters
    assert {"deepcopy", "states", "use_cache"} <= set(parameters)
    done, running = study.ask(SPACE), study.ask(SPACE)
    study.tell(done, 0.1)
    assert [t.number for t in optuna_compat.study_trials(study, deepcopy=False, use_cache=True)] == [0, 1]
    complete = optuna_compat.study_trials(study, states=(TrialState.COMPLETE,))
    assert [t.number for t in complete] == [done.number] and running.number == 1


class Spy(GenerationStudy):
    """A generation's view that counts how often a sampler listed trials through it."""

    def __init__(self, study: optuna.Study, generation: int) -> None:
        super().__init__(study, generation)
        self.calls, self.inside = 0, False

    def _get_trials(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self.calls, self.inside = self.calls + 1, True
        try:
            return super()._get_trials(*args, **kwargs)
        finally:
            self.inside = False


@pytest.mark.parametrize("name", ["tpe", "cmaes", "gp"])
def test_samplers_list_trials_only_through_study_get_trials(name: str, study: optuna.Study,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """GenerationStudy shows a sampler one generation's trials by overriding `Study._get_trials`: that only works
    while Optuna's samplers list trials through it and never through the storage directly."""
    rng = np.random.default_rng(0)
    for generation in (0, 1):
        for _ in range(6):
            trial = study.ask(SPACE)
            trial.set_user_attr(GENERATION, generation)
            study.tell(trial, float(rng.random()))
    sampler = make_sampler(name, seed=0, n_startup=2)
    view = Spy(study, 1)
    storage = optuna_compat.storage(study)
    frozen = storage.get_trial(optuna_compat.trial_id(study.ask()))
    listed = storage.get_all_trials

    def only_through_the_view(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        assert view.inside, f"{name} listed the study's trials around Study._get_trials"
        return listed(*args, **kwargs)

    monkeypatch.setattr(storage, "get_all_trials", only_through_the_view)
    space = sampler.infer_relative_search_space(view, frozen)
    params = sampler.sample_relative(view, frozen, space)
    for param, distribution in SPACE.items():
        if param not in params:
            params[param] = sampler.sample_independent(view, frozen, param, distribution)
    assert view.calls > 0 and set(params) == set(SPACE)
    assert all(SPACE[k]._contains(SPACE[k].to_internal_repr(v)) for k, v in params.items())


def test_cma_sigma_and_covariance_are_the_distribution_cma_es_samples_from() -> None:
    cma = CMA(mean=np.array([0.5, 0.5, 0.5]), sigma=0.2, seed=0)
    assert optuna_compat.cma_sigma(cma) == pytest.approx(0.2)
    np.testing.assert_allclose(optuna_compat.cma_covariance(cma), np.eye(3))
    rng = np.random.default_rng(1)
    for _ in range(5):  # a few generations on an elongated bowl: sigma and C move away from the start
        cma.tell([(x, float(x[0] ** 2 + 10 * x[1] ** 2 + rng.normal(0, 1e-3))) for x in
                  (cma.ask() for _ in range(cma.population_size))])
    sigma, covariance = optuna_compat.cma_sigma(cma), optuna_compat.cma_covariance(cma)
    assert isinstance(sigma, float) and sigma != pytest.approx(0.2) and covariance.shape == (3, 3)
    np.testing.assert_allclose(covariance, covariance.T)
    assert np.all(np.linalg.eigvalsh(covariance) > 0)
    samples = np.array([cma.ask() for _ in range(20000)])  # x ~ N(mean, sigma^2 C), unbounded
    np.testing.assert_allclose(samples.mean(axis=0), cma.mean, atol=4 * sigma * np.sqrt(covariance.max() / 20000))
    np.testing.assert_allclose(np.cov(samples.T), sigma ** 2 * covariance, rtol=0.1, atol=0.05 * sigma ** 2)


def dashboard_trial_json(study: optuna.Study, number: int) -> dict:
    """The trial as optuna-dashboard's API serves it (GET /api/studies/<id>), from its WSGI app in process."""
    environ: dict = {"PATH_INFO": f"/api/studies/{optuna_compat.study_id(study)}"}
    wsgiref.util.setup_testing_defaults(environ)
    body = b"".join(optuna_dashboard.wsgi(optuna_compat.storage(study))(environ, lambda *response: None))
    return json.loads(body)["trials"][number]


def test_a_finished_trials_artifact_listed_under_the_dashboard_key_is_shown_as_the_trials(study: optuna.Study) -> None:
    study.tell(study.ask(SPACE), 0.5)
    frozen = study.get_trials()[0]
    meta = {"artifact_id": "0f0f", "filename": "train.py", "mimetype": "text/plain", "encoding": None}
    storage = optuna_compat.storage(study)
    storage.set_study_system_attr(optuna_compat.study_id(study),
                                  optuna_compat.dashboard_artifact_key(optuna_compat.trial_id(frozen), "0f0f"),
                                  json.dumps(meta))
    assert dashboard_trial_json(study, 0)["artifacts"] == [meta]


def test_a_finished_trials_note_is_saved_through_its_dashboard_handle_and_found_by_its_key(study: optuna.Study) -> None:
    study.tell(study.ask(SPACE), 0.5)
    frozen = study.get_trials()[0]
    handle = optuna_compat.dashboard_trial(study, frozen)
    noted = optuna_compat.dashboard_note_key(optuna_compat.trial_id(frozen))
    storage = optuna_compat.storage(study)
    assert optuna_dashboard.get_note(handle) == ""
    assert noted not in storage.get_study_system_attrs(optuna_compat.study_id(study))
    optuna_dashboard.save_note(handle, "## failed\n" + "x" * 5000)  # longer than one attribute holds
    assert optuna_dashboard.get_note(handle) == "## failed\n" + "x" * 5000
    assert noted in storage.get_study_system_attrs(optuna_compat.study_id(study))
    assert dashboard_trial_json(study, 0)["note"] == {"version": 1, "body": "## failed\n" + "x" * 5000}
