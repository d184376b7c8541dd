"""`hybrid studies`, `best`, `show`, `delete`, `--version`, and bad input that must leave the database as it was.

Studies are real: `hybrid run` on the surrogate objective (seconds) and on the test profile (real trials, logs)."""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from harness.knobs import find_knobs
from hybrid import __version__
from hybrid.reports import results
from hybrid.study import optuna_compat, store
from hybrid.cli import main
from hybrid.config import RunConfig
from hybrid.paths import PROJECT_ROOT
from util import cli, closed_port

SURROGATE_TRIALS = 12


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def surrogate_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage with one finished surrogate study `s` (TPE, with some predicted OOMs), run as a user would."""
    folder = tmp_path_factory.mktemp("surrogate")
    db = folder / "hybrid.db"
    run = subprocess.run([sys.executable, "-m", "hybrid.cli", "run", "--method", "tpe", "--study", "s",
                          "--objective", "surrogate", "--trials", str(SURROGATE_TRIALS), "--storage", url_of(db)],
                         capture_output=True, text=True, cwd=folder)
    assert run.returncode == 0, run.stderr
    return db


@pytest.fixture
def db(surrogate_db: Path, tmp_path: Path) -> Path:
    """A copy of the surrogate storage this test may change."""
    copy = tmp_path / "hybrid.db"
    shutil.copy(surrogate_db, copy)
    return copy


@pytest.fixture(scope="module")
def test_profile_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Two real trials of train.py on the test profile (logs, trial folders): the database's path."""
    folder = tmp_path_factory.mktemp("real")
    db = folder / "hybrid.db"
    run = subprocess.run([sys.executable, "-m", "hybrid.cli", "run", "--method", "random", "--study", "real",
                          "--profile", "test", "--trials", "2", "--storage", url_of(db), "--sandbox", "off"],
                         capture_output=True, text=True, cwd=folder, env={**os.environ, "HYBRID_DATA_DIR": str(data_dir)})
    assert run.returncode == 0, run.stderr
    return db


def load(db: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url_of(db))


# -- happy paths ------------------------------------------------------------------------------------------

def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"hybrid {__version__}\n"


def test_studies_lists_each_study(db: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(db)
    assert main(["studies", "--storage", url_of(db)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    for column in ("study", "method", "objective/profile", "trials ok/pruned/failed/running", "budget used", "best val_bpb",
                   "last activity"):
        assert column in header
    finished = store.finished_trials(load(db))
    ok = [t for t in finished if t.user_attrs["status"] == "ok"]
    best = min(t.user_attrs["val_bpb"] for t in ok)
    assert row.split()[:4] == ["s", "tpe", "surrogate/gpu", f"{len(ok)}/0/{len(finished) - len(ok)}/0"]
    assert f"{SURROGATE_TRIALS} / {SURROGATE_TRIALS} trials" in row and f"{best:.4f}" in row
    assert digest(db) == before


def test_a_pruned_trial_is_counted_as_pruned_not_failed() -> None:
    study = optuna.create_study()
    for state, status in ((TrialState.COMPLETE, "ok"), (TrialState.PRUNED, "pruned"), (TrialState.PRUNED, "pruned"),
                          (TrialState.FAIL, "crash")):
        study.add_trial(optuna.trial.create_trial(state=state, value=1.5 if status == "ok" else None,
                                                  user_attrs={"status": status, "val_bpb": 1.5}))
    assert results.study_row(study)["trials ok/pruned/failed/running"] == "1/2/1/0"


def test_best_names_the_trial_and_exports_its_code(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(db)
    path = tmp_path / "best_train.py"
    assert main(["best", "--study", "s", "--storage", url_of(db), "--top", "3", "--export", str(path)]) == 0
    out = capsys.readouterr().out
    study = load(db)
    ranked = sorted((t for t in study.trials if t.user_attrs.get("status") == "ok"),
                    key=lambda t: (t.user_attrs["val_bpb"], t.number))
    best = ranked[0]
    table = out.split("\n\n")[0].splitlines()[1:]
    assert [int(line.split()[0]) for line in table] == [t.number for t in ranked[:3]]
    assert f"best of study 's': trial {best.number}, val_bpb {best.user_attrs['val_bpb']:.4f}" in out
    assert f"hybrid best --study s --storage {url_of(db)} --export best_train.py" in out
    assert f"--train-py {path} --as-written" in out
    knobs = find_knobs(path.read_text())
    ran = best.user_attrs["config_ran"]
    assert {k: knobs[k].value for k in ran} == pytest.approx(ran)
    assert digest(db) == before


def test_best_export_is_the_code_that_ran(test_profile_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On real trials the exported train.py is byte for byte the one the harness ran in the trial's folder."""
    path = tmp_path / "best_train.py"
    assert main(["best", "--study", "real", "--storage", url_of(test_profile_run), "--export", str(path)]) == 0
    out = capsys.readouterr().out
    best = results.ranked(load(test_profile_run, "real"))[0]
    ran = Path(best.user_attrs["log_path"]).parent / "train.py"
    assert path.read_text() == ran.read_text()
    assert f"log: {best.user_attrs['log_path']}" in out
    assert "hybrid trial --profile test --seed 0" in out


def test_trial_as_written_runs_the_exported_values(test_profile_run: Path, tmp_path: Path, data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`hybrid trial --as-written` keeps the script's values; without it the profile's defaults replace them."""
    import hybrid.trial

    best = results.ranked(load(test_profile_run, "real"))[0]
    path = tmp_path / "best_train.py"
    path.write_text(results.trial_code(load(test_profile_run, "real"), best))
    seen: dict[str, dict] = {}
    monkeypatch.setattr("harness.runner.run_trial", lambda code, config, *a, **k: seen.setdefault("config", config))
    hybrid.trial.run_single_trial(profile="test", assignments=[], train_py=path, space_path=None, seed=0,
                                  vram_cap_gb=None, out=tmp_path / "t", as_written=True)
    assert seen.pop("config") == {}
    hybrid.trial.run_single_trial(profile="test", assignments=[], train_py=path, space_path=None, seed=0,
                                  vram_cap_gb=None, out=tmp_path / "t")
    assert seen["config"]["DEPTH"] == 2  # the test profile's default


def test_show_prints_attributes_log_code_and_diff(test_profile_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(test_profile_run)
    study = load(test_profile_run, "real")
    trial = study.trials[1]
    assert main(["show", "--study", "real", "1", "--storage", url_of(test_profile_run), "--log", "--lines", "5",
                 "--code", "--diff"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"trial +1\nstate +COMPLETE\n", out) and re.search(rf"\nstatus +{trial.user_attrs['status']}\n", out)
    assert results.trial_code(study, trial) in out
    assert "generation 0 is the base train.py" in out
    log = Path(trial.user_attrs["log_path"]).read_text().splitlines()
    assert out.rstrip("\n").endswith("\n".join(log[-5:]))
    assert digest(test_profile_run) == before


def test_show_of_a_failed_trial_gives_its_reason(db: Path, capsys: pytest.CaptureFixture) -> None:
    failed = next(t for t in load(db).trials if t.user_attrs["status"] != "ok")
    assert main(["show", "--study", "s", str(failed.number), "--storage", url_of(db)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\nstatus +{failed.user_attrs['status']}\nval_bpb +-\nerror +{re.escape(failed.user_attrs['error'])}\n",
                     out) or re.search(rf"\nstatus +{failed.user_attrs['status']}\nerror +{re.escape(failed.user_attrs['error'])}\n", out)


def test_show_diff_of_a_generation(db: Path, capsys: pytest.CaptureFixture) -> None:
    from hybrid.study import generations

    study = load(db)
    base = generations.load_all(study)[0]
    child = generations.create(study, base, base.code.replace("DEPTH = 8", "DEPTH = 9"), base.search_space(),
                               "one layer more")
    ran = study.trials[0]
    study.add_trial(optuna.trial.create_trial(params=ran.params, distributions=ran.distributions, value=ran.value,
                                              user_attrs={**ran.user_attrs, "generation": child.number}))
    assert main(["show", "--study", "s", str(SURROGATE_TRIALS), "--storage", url_of(db), "--diff"]) == 0
    out = capsys.readouterr().out
    assert "generation 1 (candidate) against its parent 0: one layer more" in out
    assert "-DEPTH = 8" in out and "+DEPTH = 9" in out


def test_follow_prints_a_running_trial_until_it_ends(db: Path, tmp_path: Path) -> None:
    study = load(db)
    trial = study.ask()
    log = tmp_path / "log.txt"
    log.write_text("first line\n")
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    def step(seconds: float) -> None:  # the trial goes on as the follower waits, then ends
        if len(lines) == 1:
            with log.open("a") as f:
                f.write("second line\n")
        elif len(lines) == 2:
            trial.set_user_attr("status", "ok")
            study.tell(trial, 1.0)

    reason = results.follow(study, trial.number, log, Out(), sleep=step)
    assert "".join(lines) == "first line\nsecond line\n"
    assert reason == f"trial {trial.number} ended: ok"


def test_follow_stops_for_a_dead_worker(db: Path, tmp_path: Path) -> None:
    study = load(db)
    trial = study.ask()
    optuna_compat.storage(study).set_trial_system_attr(optuna_compat.trial_id(trial), store.HEARTBEAT_KEY, 0.0)
    (tmp_path / "log.txt").write_text("")
    assert "stopped beating" in results.follow(study, trial.number, tmp_path / "log.txt", sleep=lambda s: None)


def test_delete_refuses_without_yes_then_deletes(test_profile_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(test_profile_run.parent, folder)
    db = folder / "hybrid.db"
    artifacts = Path(load(db, "real").user_attrs[store.RUN_KEY]["artifacts"])  # the original's folders
    copied = folder / artifacts.name
    study = load(db, "real")
    study.set_user_attr(store.RUN_KEY, {**study.user_attrs[store.RUN_KEY], "artifacts": str(copied)})
    before = digest(db)
    code, err = cli(capsys, "delete", "--study", "real", "--storage", url_of(db))
    assert code == 2 and err.count("\n") == 1, err
    assert "would delete study 'real'" in err and "2 trials and 2 folders" in err and "add --yes" in err
    assert digest(db) == before and len(list(copied.glob("trial-*"))) == 2
    code, err = cli(capsys, "delete", "--study", "real", "--storage", url_of(db), "--yes")
    assert code == 0, err
    assert "real" not in optuna.get_all_study_names(url_of(db)) and not copied.exists()
    assert len(list(artifacts.glob("trial-*"))) == 2  # the original run's folders are not this study's


# -- the run's summary and the report ---------------------------------------------------------------------

def test_summary_line_names_the_best_trial_and_the_export(db: Path) -> None:
    study = load(db)
    best = results.ranked(study)[0]
    line = results.summary_line(study, url_of(db))
    assert f"best trial {best.number}: val_bpb {best.user_attrs['val_bpb']:.4f}" in line
    assert f"DEPTH={best.user_attrs['config_ran']['DEPTH']}" in line
    assert f"`hybrid best --study s --storage {url_of(db)} --export best_train.py`" in line


def test_report_names_the_best_trial(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(capsys, "report", "--storage", url_of(db), "--out", str(tmp_path / "r"))[0] == 0
    markdown = (tmp_path / "r" / "report.md").read_text()
    best = results.ranked(load(db))[0]
    assert f"- **s**: trial {best.number}, val_bpb {best.user_attrs['val_bpb']:.4f}" in markdown
    assert f"`hybrid best --study s --storage {url_of(db)} --export best_train.py`" in markdown


# -- bad input: one line, exit 2, the database as it was ---------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["studies"], "no database at"),
    (["best", "--study", "s"], "no database at"),
    (["show", "--study", "s", "0"], "no database at"),
    (["delete", "--study", "s", "--yes"], "no database at"),
    (["report", "--out", "{tmp}/r"], "no database at"),
    (["resume", "--study", "s"], "no database at"),
])
def test_reading_a_database_that_does_not_exist_creates_none(argv: list[str], message: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.db"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = cli(capsys, *argv, "--storage", url_of(missing))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["best", "--study", "nope"], "no study 'nope'"),
    (["best", "--study", "  "], "a study needs a name"),
    (["best", "--study", "s", "--top", "0"], "must be > 0"),
    (["best", "--study", "s", "--export", "{tmp}/no/such/folder/train.py"], "cannot write"),
    (["show", "--study", "s", "999"], "has no trial 999"),
    (["show", "--study", "s", "1", "--follow"], "--follow follows the log: add --log"),
    (["show", "--study", "", "1"], "a study needs a name"),
    (["delete", "--study", "nope", "--yes"], "no study 'nope'"),
    (["report", "--study", " ", "--out", "{tmp}/r"], "a study needs a name"),
    (["report", "--out", "{tmp}/file"], "cannot write the report to"),
    (["report", "--out", "{tmp}/file/r"], "cannot write the report to"),
    (["resume", "--study", "\t"], "a study needs a name"),
    (["resume", "--study", "nope"], "no study 'nope'"),
    (["run", "--method", "tpe", "--study", " ", "--objective", "surrogate", "--trials", "1"], "a study needs a name"),
])
def test_bad_input_leaves_the_database_as_it_was(argv: list[str], message: str, db: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    before = digest(db)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = cli(capsys, *argv, "--storage", url_of(db))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert digest(db) == before
    assert not (tmp_path / "r").exists()


def test_best_of_a_study_without_success_says_what_there_is(db: Path, capsys: pytest.CaptureFixture) -> None:
    study = optuna.create_study(storage=url_of(db), study_name="failing")
    store.save_run_info(study, RunConfig(method="tpe", study="failing", storage=url_of(db), objective="surrogate",
                                         profile="gpu", trials=2).to_dict())
    for status in ("oom", "crash"):
        study.add_trial(optuna.trial.create_trial(value=100.0, user_attrs={"status": status, "error": "x"}))
    before = digest(db)
    code, err = cli(capsys, "best", "--study", "failing", "--storage", url_of(db))
    assert code == 2 and "no successful trial yet (2 finished, all failed: oom 1, crash 1)" in err, err
    assert digest(db) == before


def test_explicit_storage_folders_are_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    url = url_of(tmp_path / "no" / "such" / "h.db")
    for argv in (["run", "--method", "tpe", "--study", "s"], ["compare", "--methods", "tpe"]):
        code, err = cli(capsys, *argv, "--objective", "surrogate", "--trials", "1", "--storage", url)
        assert code == 2 and f"no folder {tmp_path / 'no' / 'such'}" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    code, err = cli(capsys, "run", "--method", "tpe", "--study", "s", "--objective", "surrogate", "--trials", "1")
    assert code == 0, err
    assert (tmp_path / "runs" / "hybrid.db").is_file()  # the default folder is created


def test_an_llm_method_without_a_key_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials profile either
    db = tmp_path / "h.db"
    for llm, key in (("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY")):
        code, err = cli(capsys, "run", "--method", "llm-hp", "--study", "s", "--llm", llm, "--objective", "surrogate",
                        "--trials", "1", "--storage", url_of(db))
        assert code == 2 and key in err and err.count("\n") == 1, err
    assert not db.exists()


def test_passwords_are_masked_when_printed_and_stored(db: Path) -> None:
    url = "postgresql://user:s3cret@db.example.org:5432/hybrid"
    assert store.masked_url(url) == "postgresql://user:***@db.example.org:5432/hybrid"
    assert store.masked_url(url_of(db)) == url_of(db)
    assert "s3cret" not in results.export_command(url, "s") and "s3cret" not in results.storage_flag(url)
    study = load(db)
    store.save_run_info(study, {**study.user_attrs[store.RUN_KEY], "storage": url})
    assert load(db).user_attrs[store.RUN_KEY]["storage"] == "postgresql://user:***@db.example.org:5432/hybrid"


def test_unreachable_storage_error_masks_the_password(capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, "run", "--method", "tpe", "--study", "s", "--objective", "surrogate", "--trials", "1",
                    "--storage", f"postgresql://user:s3cret@127.0.0.1:{closed_port()}/db")
    assert code == 2 and "s3cret" not in err and "user:***@127.0.0.1" in err, err


def test_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`hybrid space | head`: the reader goes away; the command stops quietly."""
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run([sys.executable, "-m", "hybrid.cli", "space"], stdout=write, stderr=subprocess.PIPE,
                          text=True, cwd=PROJECT_ROOT)
    os.close(write)
    assert done.returncode == 141 and done.stderr == ""


def test_a_base_range_that_is_invalid_is_refused_whatever_the_profile(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  DEPTH: {type: int, low: 8, high: 4, default: 6}\n"
                     "profiles:\n  test:\n    DEPTH: {low: 1, high: 4, default: 2}\n")
    code, err = cli(capsys, "space", "--space", str(space), "--profile", "test")
    assert code == 2 and "DEPTH: low (8) must be below high (4)" in err and err.count("\n") == 1, err


def test_every_command_has_a_description_flag_help_and_an_example() -> None:
    from hybrid.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description and "examples:\n  hybrid " in text, name
        for action in sub._actions:
            assert action.help or isinstance(action, argparse._SubParsersAction), f"{name} {action.option_strings or action.dest}"
    assert set(commands) >= {"studies", "best", "show", "delete"}
