"""`hybrid dashboard`: optuna-dashboard on the trial database, unchanged, with each trial's log, train.py and
generation diff as artifacts and its status in a note; served by the real command in a subprocess and read over its
HTTP API (and, where Debian's chromium is installed, in a headless browser)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from test_loop import FakeObjective

import hybrid.loop
from harness.result import TrialResult
from hybrid.reports import dashboard as dash
from hybrid.reports import results
from hybrid.study import generations, store
from hybrid.cli import main
from util import cli, closed_port

STARTUP_SECONDS = 60  # the dashboard process imports optuna-dashboard, then uploads what the studies lack
FAKE_TRIALS = {"s": 6, "h": 8}


class LoggingFake(FakeObjective):
    """The fake objective of the loop's tests, writing the log it names as a trial would."""

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        result = super().evaluate(code, config, seed=seed, trial_number=trial_number, trial_dir=trial_dir)
        trial_dir.mkdir(parents=True, exist_ok=True)
        Path(result.log_path).write_text(f"trial {trial_number}: step 1 loss 4.2\n")
        return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """runs/hybrid.db with three studies: `real` (one real trial of the test profile), `h` (the hybrid method on the
    fake objective: generations with diffs, failures) uploaded by the loop as their trials finished, and `s` (TPE on
    the fake objective, one failure) run with the upload off, as a study from before the dashboard existed."""
    folder = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert main(["run", "--method", "random", "--study", "real", "--trials", "1", "--profile", "test",
                     "--sandbox", "off"]) == 0
        mp.setattr(hybrid.loop, "objective_for", lambda *a, **k: LoggingFake())
        assert main(["run", "--method", "hybrid", "--study", "h", "--trials", str(FAKE_TRIALS["h"]), "--profile",
                     "test", "--mutate-every", "3", "--stagnation", "2"]) == 0
        mp.setattr(dash, "publish", lambda *a: None)
        assert main(["run", "--method", "tpe", "--study", "s", "--trials", str(FAKE_TRIALS["s"]),
                     "--profile", "test"]) == 0
    with sqlite3.connect(folder / "runs" / "hybrid.db") as db, sqlite3.connect(folder / "unpublished.db") as copy:
        db.backup(copy)  # before `hybrid dashboard` uploads (with what the write-ahead log holds)
    return folder / "runs"


def url_of(db: Path) -> str:
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def server(runs: Path) -> Iterator[tuple[str, Path]]:
    """`hybrid dashboard` on a free loopback port: its base URL and the file of its stderr."""
    port = closed_port()
    err = runs.parent / "dashboard.err"
    with err.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "hybrid.cli", "dashboard", "--storage",
                                    url_of(runs / "hybrid.db"), "--port", str(port)],
                                   cwd=runs.parent, stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/meta", process, err)
        yield base, err
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, err: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"hybrid dashboard exited {process.returncode}: {err.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"hybrid dashboard did not answer within {STARTUP_SECONDS} s: {err.read_text()}")


@pytest.fixture(scope="module")
def dashboard(server: tuple[str, Path]) -> str:
    return server[0]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read()


def get(url: str) -> dict:
    return json.loads(fetch(url))


def study_ids(dashboard: str) -> dict[str, int]:
    return {s["study_name"]: s["study_id"] for s in get(f"{dashboard}/api/studies")["study_summaries"]}


def attrs_of(trial: dict) -> dict:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


# -- the database as optuna-dashboard reads it ------------------------------------------------------------

def test_studies_and_trials_with_their_attributes_are_listed(dashboard: str) -> None:
    ids = study_ids(dashboard)
    assert set(ids) == {"real", "h", "s"}
    detail = get(f"{dashboard}/api/studies/{ids['s']}")
    assert {a["key"] for a in detail["user_attrs"]} >= {store.RUN_KEY, store.SPACE_KEY}
    trials = detail["trials"]
    assert [t["number"] for t in trials] == list(range(6))
    assert [t["state"] for t in trials] == ["Complete"] * 6
    attrs = [attrs_of(t) for t in trials]
    assert attrs[0]["source"] == "baseline" and {a["source"] for a in attrs[1:]} == {"tpe"}
    assert [a["status"] for a in attrs] == ["ok", "ok", "ok", "oom", "ok", "ok"]
    assert all({"generation", "code_sha", "total_seconds", "log_path", "seed", "method"} <= a.keys() for a in attrs)
    assert trials[3]["values"] == [100.0] and len(trials[0]["params"]) == 14
    assert {a["key"] for a in detail["union_user_attrs"]} >= {"source", "status", "val_bpb", "total_seconds"}


def test_the_dashboard_page_and_plots_render(dashboard: str) -> None:
    assert b"<html" in fetch(f"{dashboard}/dashboard").lower()
    importances = get(f"{dashboard}/api/studies/{study_ids(dashboard)['s']}/param_importances")
    assert importances["param_importances"]


# -- each trial's artifacts and note ----------------------------------------------------------------------

def expected_files(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    """What the dashboard must serve for a trial: its log, its train.py and, past generation 0, the diff."""
    files = {"log.txt": Path(trial.user_attrs["log_path"]).read_text(), "train.py": results.trial_code(study, trial)}
    generation = trial.user_attrs["generation"]
    if generation:
        files[f"generation-{generation}.diff"] = results.generation_diff(study, trial)
    return files


@pytest.mark.parametrize("name", ["real", "h", "s"])
def test_every_trial_has_its_log_code_and_diff_and_a_note(name: str, dashboard: str, runs: Path) -> None:
    """Uploaded as the trials finished (real, h) or by `hybrid dashboard` before it served (s); the same either way."""
    study_id = study_ids(dashboard)[name]
    study = optuna.load_study(study_name=name, storage=url_of(runs / "hybrid.db"))
    served = get(f"{dashboard}/api/studies/{study_id}")["trials"]
    assert len(served) == len(study.trials) == {"real": 1, **FAKE_TRIALS}[name]
    for trial, page in zip(study.trials, served, strict=True):
        artifacts = {a["filename"]: a for a in page["artifacts"]}
        expected = expected_files(study, trial)
        assert set(artifacts) == set(expected), trial.number
        for filename, text in expected.items():
            artifact = artifacts[filename]
            assert artifact["mimetype"].startswith("text/plain")
            body = fetch(f"{dashboard}/artifacts/{study_id}/{page['trial_id']}/{artifact['artifact_id']}")
            assert body.decode() == text, (trial.number, filename)
        note = page["note"]["body"]
        if trial.user_attrs["status"] == "ok":
            assert note.startswith(f"## Trial {trial.number}: ok, val_bpb {trial.user_attrs['val_bpb']:.4f}")
            assert "FAILED" not in note
        else:
            assert note.startswith(f"## Trial {trial.number}: FAILED ({trial.user_attrs['status']})")
            assert "**Not a result**: the value 100 shown for it is the penalty told to the sampler" in note
            assert trial.user_attrs["error"] in note
        assert f"- generation: {trial.user_attrs['generation']} (" in note
        assert f"- source: {trial.user_attrs['source']}" in note


def test_the_hybrid_study_has_generations_with_diffs(runs: Path) -> None:
    """What the diff artifacts of the test above stand on: the hybrid study tried code mutations."""
    study = optuna.load_study(study_name="h", storage=url_of(runs / "hybrid.db"))
    assert {t.user_attrs["generation"] for t in study.trials} > {0}
    children = [g for g in generations.load_all(study).values() if g.parent is not None]
    assert children and all(g.diff.startswith("--- a/train.py") for g in children)


def test_the_dashboard_uploaded_only_what_was_missing(server: tuple[str, Path], runs: Path) -> None:
    _, err = server
    text = err.read_text()
    assert f"hybrid: study s: uploaded the log, code and note of {FAKE_TRIALS['s']} trials" in text
    assert "study h:" not in text and "study real:" not in text
    assert f"(artifacts in {runs / 'dashboard-artifacts'})" in text
    storage = store.open_storage(url_of(runs / "hybrid.db"))
    artifacts = dash.artifact_store(url_of(runs / "hybrid.db"))
    for name in ("real", "h", "s"):  # a second pass finds nothing to do
        assert dash.backfill(optuna.load_study(study_name=name, storage=storage), artifacts) == 0


def test_an_artifact_deleted_in_the_dashboard_is_uploaded_again(dashboard: str, runs: Path) -> None:
    study_id = study_ids(dashboard)["s"]
    trial = get(f"{dashboard}/api/studies/{study_id}")["trials"][0]
    code = next(a for a in trial["artifacts"] if a["filename"] == "train.py")
    request = urllib.request.Request(f"{dashboard}/api/artifacts/{study_id}/{trial['trial_id']}/"
                                     f"{code['artifact_id']}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:  # optuna-dashboard 0.21 deletes the file and unlists it,
        urllib.request.urlopen(request, timeout=30)  # then fails writing the finished trial's own attribute
    assert refused.value.code == 500
    listed = get(f"{dashboard}/api/studies/{study_id}")["trials"][0]["artifacts"]
    assert "train.py" not in {a["filename"] for a in listed}
    study = optuna.load_study(study_name="s", storage=url_of(runs / "hybrid.db"))
    assert dash.backfill(study, dash.artifact_store(url_of(runs / "hybrid.db"))) == 1
    again = get(f"{dashboard}/api/studies/{study_id}")["trials"][0]["artifacts"]
    assert sorted(a["filename"] for a in again) == ["log.txt", "train.py"]


# -- failures of the upload, bad input --------------------------------------------------------------------

def test_a_failed_upload_is_said_once_and_fails_no_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: LoggingFake())
    monkeypatch.setattr(dash, "_warned", False)

    def unwritable(url: str) -> None:
        raise PermissionError(13, "Permission denied", "runs/dashboard-artifacts")

    monkeypatch.setattr(dash, "artifact_store", unwritable)
    code, err = cli(capsys, "run", "--method", "random", "--study", "u", "--trials", "4", "--profile", "test")
    assert code == 0, err
    assert err.count("were not uploaded for the dashboard") == 1
    assert "trial 0's log, code and note were not uploaded for the dashboard (PermissionError: " in err
    study = optuna.load_study(study_name="u", storage="sqlite:///runs/hybrid.db")
    assert len(store.finished_trials(study)) == 4


def test_delete_removes_the_studys_artifacts_and_no_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: LoggingFake())
    for name in ("gone", "kept"):
        assert main(["run", "--method", "random", "--study", name, "--trials", "2", "--profile", "test"]) == 0
    files = tmp_path / "runs" / "dashboard-artifacts"
    assert len(list(files.iterdir())) == 8  # two trials of two studies: a log and a train.py each
    capsys.readouterr()
    assert main(["delete", "--study", "gone", "--yes"]) == 0
    assert capsys.readouterr().out.endswith(", and its 4 dashboard artifacts\n")
    kept = optuna.load_study(study_name="kept", storage="sqlite:///runs/hybrid.db")
    assert len(list(files.iterdir())) == 4 and dash.backfill(kept, dash.artifact_store("sqlite:///runs/hybrid.db")) == 0


def test_a_missing_database_is_refused_and_not_created(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, "dashboard", "--storage", url_of(tmp_path / "none.db"))
    assert code == 2 and f"hybrid: error: no database at {tmp_path / 'none.db'}" in err
    assert not list(tmp_path.iterdir())


def test_a_taken_port_is_refused_before_anything_is_written(runs: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "hybrid.db"
    shutil.copy(runs.parent / "unpublished.db", db)  # study s lacks its uploads: `dashboard` would write them
    before = digest(db)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, err = cli(capsys, "dashboard", "--storage", url_of(db), "--port", str(port))
    assert code == 2 and err.startswith(f"hybrid: error: cannot listen on 127.0.0.1:{port} (")
    assert digest(db) == before and not (tmp_path / "dashboard-artifacts").exists()


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_bad_port_is_refused(port: str, capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, "dashboard", "--port", port)
    assert code == 2 and err.startswith("hybrid: error: argument --port: ")


# -- in a browser -----------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium (as root it needs --no-sandbox), given time for the page's scripts to fetch and render."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=15000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`apt-get install chromium`; "
                                            ".ci/run installs it where it can)")
def test_a_failed_trial_page_shows_its_note_and_artifacts_in_a_browser(dashboard: str, runs: Path,
                                                                        tmp_path: Path) -> None:
    study = optuna.load_study(study_name="h", storage=url_of(runs / "hybrid.db"))
    trial = next(t for t in reversed(study.trials) if t.user_attrs["status"] != "ok")
    page = f"{dashboard}/dashboard/studies/{study_ids(dashboard)['h']}/trials?numbers={trial.number}"
    dom = chromium("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = (f"Trial {trial.number}: FAILED (oom)", "Not a result", "fake out of memory", *expected_files(study, trial))
    for text in shown:
        assert text in dom.stdout, text
    shot = Path(os.environ.get("HYBRID_DASHBOARD_SCREENSHOT") or tmp_path / "trial.png")
    taken = chromium("--window-size=1280,1100", f"--screenshot={shot}", page)
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.parametrize("status, state, heading", [
    ("ok", optuna.trial.TrialState.COMPLETE, "Trial 3: ok, val_bpb 1.2345"),
    ("pruned", optuna.trial.TrialState.PRUNED, "Trial 3: pruned"),
    ("oom", optuna.trial.TrialState.FAIL, "Trial 3: FAILED (oom)"),
])
def test_a_notes_heading_says_what_the_trial_is(status: str, state, heading: str) -> None:  # noqa: ANN001
    trial = optuna.trial.create_trial(state=state, value=1.2345 if status == "ok" else None,
                                      user_attrs={"status": status, "val_bpb": 1.2345 if status == "ok" else None})
    trial.number = 3
    text = dash.note(trial, None)
    assert text.startswith(f"## {heading}") and ("Not a result" in text) == (status != "ok")
