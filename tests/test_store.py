"""The trial database: storage URLs, how an outcome is recorded, heartbeats, and settling the trials of dead workers."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from harness.result import PENALTY, TrialResult
from hybrid.study import generations, optuna_compat, store
from hybrid.errors import UserError
from hybrid.study.generations import Generation

X = {"x": FloatDistribution(0.0, 1.0)}


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=store.open_storage(f"sqlite:///{tmp_path}/db/h.db"), study_name="s")


def running_trial(study: optuna.Study, **attrs: object) -> optuna.Trial:
    trial = study.ask(X)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def beat(study: optuna.Study, trial: optuna.Trial, age: float) -> None:
    storage = optuna_compat.storage(study)
    storage.set_trial_system_attr(optuna_compat.trial_id(trial), store.HEARTBEAT_KEY, time.time() - age)


def frozen(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return optuna_compat.storage(study).get_trial(optuna_compat.trial_id(trial))


@pytest.mark.parametrize("url", ["runs/hybrid.db", "sqlite://runs/hybrid.db", "sqlite:///:memory:", "sqlite:///",
                                 "redis://localhost/0", "http://example.org/db"])
def test_malformed_storage_urls_are_user_errors(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="storage|SQLite"):
        store.open_storage(url)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_storage_gets_its_folder_and_a_wal_journal(tmp_path: Path) -> None:
    optuna.create_study(storage=store.open_storage(f"sqlite:///{tmp_path}/a/b/h.db"), study_name="s")
    with sqlite3.connect(tmp_path / "a" / "b" / "h.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_plain_postgresql_urls_use_the_installed_driver() -> None:
    url = store._with_driver("postgresql://u@localhost/db")
    driver = url.split("://")[0].partition("+")[2] or "psycopg"
    __import__(driver)


def test_outcomes_are_recorded_as_attributes_and_told(study: optuna.Study) -> None:
    attrs = {"source": "tpe", "generation": 0, "code_sha": "abc", "seed": 1, "method": "tpe"}
    ok = store.record_result(study, running_trial(study), TrialResult(val_bpb=1.25, total_seconds=300.0,
                                                                        log_path="/tmp/log.txt"), attrs)
    oom = store.record_result(study, running_trial(study), TrialResult(status="oom", error="CUDA out of memory",
                                                                         total_seconds=20.0), attrs)
    rejected = store.record_result(study, running_trial(study), TrialResult(status="rejected", error="reads val"),
                                   attrs)

    assert (ok.state, ok.value) == (TrialState.COMPLETE, 1.25)
    assert ok.user_attrs | attrs == ok.user_attrs
    assert [ok.user_attrs[k] for k in ("status", "val_bpb", "log_path")] == ["ok", 1.25, "/tmp/log.txt"]
    assert (oom.state, oom.value, oom.user_attrs["status"]) == (TrialState.COMPLETE, PENALTY, "oom")
    assert "val_bpb" not in oom.user_attrs and oom.user_attrs["error"] == "CUDA out of memory"
    assert (rejected.state, rejected.user_attrs["status"]) == (TrialState.FAIL, "rejected")
    assert [t.number for t in store.finished_trials(study)] == [0, 1, 2]
    assert store.seconds_used(store.finished_trials(study)) == 320.0


def test_a_generation_stored_with_its_train_py_under_source_loads_it_as_code(study: optuna.Study) -> None:
    """A generation's train.py is stored under `code`; records written before, under `source`, still load."""
    record = Generation(0, None, "the baseline train.py", "X = 1\n", {}, status="base").to_record()
    assert record["code"] == "X = 1\n" and "source" not in record
    store.save_generation(study, 0, record)
    old = {**{k: v for k, v in record.items() if k != "code"}, "number": 1, "parent": 0, "source": "X = 2\n"}
    store.save_generation(study, 1, old)
    loaded = generations.load_all(study)
    assert loaded[0].code == "X = 1\n" and loaded[1].code == "X = 2\n"
    assert "source" not in loaded[1].proposal  # read as the field, not kept as a loose key
    assert "source" not in loaded[1].to_record() and loaded[1].to_record()["code"] == "X = 2\n"

def test_heartbeat_keeps_a_running_trial_alive(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "HEARTBEAT_SECONDS", 0.05)  # a beat every 0.05 s: the grace is twenty of them
    monkeypatch.setattr(store, "GRACE_SECONDS", 1.0)
    trial = running_trial(study)
    with store.Heartbeat(study, trial):
        time.sleep(1.5)  # without beats, it would be dead by now
        store.Reaper(study).sweep()
        assert frozen(study, trial).state == TrialState.RUNNING
    assert time.time() - frozen(study, trial).system_attrs[store.HEARTBEAT_KEY] < 1.0


def test_reaper_fails_dead_trials_and_completes_recorded_ones(study: optuna.Study,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # the grace is what a beat's write and a sweep may take under load (1 s was once too little on a loaded machine)
    monkeypatch.setattr(store, "GRACE_SECONDS", 5.0)
    alive, dead, silent = running_trial(study), running_trial(study), running_trial(study)
    # killed after writing `status`, before the tell: everything was recorded, so it is told, not lost
    recorded = running_trial(study, total_seconds=300.0, val_bpb=1.1, source="tpe", status="ok")
    recorded_oom = running_trial(study, total_seconds=30.0, status="oom")
    partial = running_trial(study, total_seconds=300.0, val_bpb=1.0)  # killed before `status`
    for trial in (dead, recorded, recorded_oom, partial):
        beat(study, trial, age=30.0)
    beat(study, alive, age=0.0)

    reaper = store.Reaper(study)
    reaper.sweep()
    states = {t.number: (t.state, t.values) for t in study.get_trials()}
    assert states == {0: (TrialState.RUNNING, None), 1: (TrialState.FAIL, None), 2: (TrialState.RUNNING, None),
                      3: (TrialState.COMPLETE, [1.1]), 4: (TrialState.COMPLETE, [PENALTY]), 5: (TrialState.FAIL, None)}
    time.sleep(5.1)  # the trial that never beat is dead once this process has watched it silent for the grace
    beat(study, alive, age=0.0)
    reaper.sweep()
    assert frozen(study, silent).state == TrialState.FAIL
    assert frozen(study, alive).state == TrialState.RUNNING
    assert [t.number for t in store.finished_trials(study)] == [3, 4]


def test_an_interrupted_enqueued_trial_is_enqueued_again(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "GRACE_SECONDS", 1.0)
    study.enqueue_trial({"x": 0.5}, user_attrs={"source": "baseline"})
    baseline = study.ask(X)
    beat(study, baseline, age=10.0)
    store.Reaper(study).sweep()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    again = study.ask(X)
    assert again.params == {"x": 0.5} and again.user_attrs["source"] == "baseline"


def test_settling_a_finished_trial_changes_nothing(study: optuna.Study) -> None:
    trial = running_trial(study)
    study.tell(trial, 0.3)
    store.settle(study, optuna_compat.trial_id(trial))
    assert (frozen(study, trial).state, frozen(study, trial).value) == (TrialState.COMPLETE, 0.3)


class FlakyStorage:
    """A storage whose heartbeat writes fail after the first one, as a database that went away."""

    def __init__(self, storage, error: Exception) -> None:  # noqa: ANN001
        self.storage, self.error, self.beats = storage, error, 0

    def set_trial_system_attr(self, *args: object) -> None:
        self.beats += 1
        if self.beats > 1:
            raise self.error
        self.storage.set_trial_system_attr(*args)


def test_a_heartbeat_that_keeps_failing_says_so_once_and_goes_on(study: optuna.Study, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "HEARTBEAT_SECONDS", 0.01)
    trial = running_trial(study)
    gone = sqlalchemy.exc.OperationalError("UPDATE", {}, "database is gone")
    flaky = FlakyStorage(optuna_compat.storage(study), gone)
    monkeypatch.setattr(optuna_compat, "storage", lambda _study: flaky)
    with store.Heartbeat(study, trial):
        deadline = time.monotonic() + 60.0
        while flaky.beats < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert flaky.beats >= 10  # it kept trying
    warnings = [line for line in capsys.readouterr().err.splitlines() if "heartbeat" in line]
    assert len(warnings) == 1, warnings
    assert f"trial {trial.number}" in warnings[0]
    assert "OperationalError" in warnings[0] and "database is gone" in warnings[0]


def test_a_heartbeat_stops_quietly_once_its_trial_is_finished(study: optuna.Study, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "HEARTBEAT_SECONDS", 0.01)
    trial = running_trial(study)
    with store.Heartbeat(study, trial) as heartbeat:
        study.tell(trial, 0.5)  # told (or settled by another worker) while the thread still beats
        heartbeat._thread.join(timeout=60.0)
        assert not heartbeat._thread.is_alive()
    assert capsys.readouterr().err == ""


def test_programming_errors_are_not_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(store, "RDBStorage", broken)
    with pytest.raises(TypeError, match="a bug"):
        store.open_storage(f"sqlite:///{tmp_path}/h.db")


@pytest.mark.parametrize("url, reason", [
    ("postgresql+nodriver://u@127.0.0.1/db", "Can't load plugin"),  # a driver name sqlalchemy does not know
    ("mysql+nodriver://u@127.0.0.1:notaport/db", "invalid literal"),  # a malformed port
    ("sqlite:///{tmp}/notes.db", "file is not a database"),
])
def test_storage_errors_are_one_line_user_errors(url: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database, but long enough to be read as one " * 100)
    with pytest.raises(UserError, match="cannot open storage") as e:
        store.open_storage(url.format(tmp=tmp_path))
    assert reason in str(e.value) and "\n" not in str(e.value)
