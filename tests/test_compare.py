"""`hybrid compare`: studies per method x seed in one storage, resumable, then the report; its defaults; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

import harness.profiles
import hybrid.loop
from harness.result import TrialResult
from hybrid.study import store
from hybrid.cli import build_parser
from hybrid.compare import CPU_BUDGET_HOURS, plan
from util import cli


class FakeObjective:
    """Instant trials: every third one fails (oom, 20 s), the others take 300 s."""
    name = "fake"

    def evaluate(self, source: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        if trial_number % 3 == 2:
            return TrialResult(status="oom", error="fake out of memory", total_seconds=20.0, config=config)
        return TrialResult(val_bpb=1.0 + abs(config["MATRIX_LR"] - 0.04), total_seconds=300.0, config=config)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: FakeObjective())


def finished(out: Path) -> dict[str, int]:
    storage = store.open_storage(f"sqlite:///{out / 'hybrid.db'}")
    return {name: len(store.finished_trials(optuna.load_study(study_name=name, storage=storage)))
            for name in optuna.get_all_study_names(storage)}


def test_compare_runs_every_study_resumes_and_reports(fake: None, capsys: pytest.CaptureFixture) -> None:
    argv = ["compare", "--methods", "random,tpe", "--seeds", "2", "--trials", "4", "--profile", "test", "--out", "out"]
    code, err = cli(capsys, *argv)
    assert code == 0, err
    assert finished(Path("out")) == {"random-s0": 4, "random-s1": 4, "tpe-s0": 4, "tpe-s1": 4}
    summary = json.loads(Path("out/summary.json").read_text())
    assert set(summary["methods"]) == {"random", "tpe"} and summary["methods"]["tpe"]["n_seeds"] == 2
    assert "## Pairwise tests" in Path("out/report.md").read_text()

    code, err = cli(capsys, *argv)  # nothing left to do: every study is skipped
    assert code == 0 and err.count("has spent its budget: skipped") == 4
    assert finished(Path("out")) == {"random-s0": 4, "random-s1": 4, "tpe-s0": 4, "tpe-s1": 4}

    argv[argv.index("4")] = "6"  # a larger budget continues the same studies
    assert cli(capsys, *argv)[0] == 0
    assert set(finished(Path("out")).values()) == {6}


def test_prefix_and_explicit_storage(fake: None, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    args = build_parser().parse_args(["compare", "--methods", "cmaes", "--seeds", "2", "--seed", "5", "--trials", "3",
                                      "--profile", "test", "--storage", f"sqlite:///{tmp_path}/x.db", "--out", "o"])
    args.prefix = "exp1-"
    configs = plan(args)
    assert [c.study for c in configs] == ["exp1-cmaes-s5", "exp1-cmaes-s6"] and [c.seed for c in configs] == [5, 6]
    assert {c.storage for c in configs} == {f"sqlite:///{tmp_path}/x.db"}


def test_studies_run_seed_by_seed(fake: None) -> None:
    """Every method's seed 0 before any seed 1: a compare stopped part-way holds whole seeds."""
    configs = plan(build_parser().parse_args(["compare", "--methods", "tpe,random", "--seeds", "2", "--trials", "3",
                                              "--profile", "test"]))
    assert [c.study for c in configs] == ["tpe-s0", "random-s0", "tpe-s1", "random-s1"]


def test_defaults_are_the_cpu_head_to_head(fake: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.profiles, "default_profile_name", lambda: "cpu")
    configs = plan(build_parser().parse_args(["compare"]))
    assert [c.study for c in configs] == ["tpe-s0", "cmaes-s0", "random-s0", "hybrid-s0"]
    assert {(c.objective, c.profile, c.budget_hours, c.trials, c.llm) for c in configs} == {
        ("train", "cpu", CPU_BUDGET_HOURS, None, "none")}
    assert {c.storage for c in configs} == {f"sqlite:///{Path('runs/compare/hybrid.db').resolve()}"}


@pytest.mark.parametrize("argv, message", [
    (["--methods", "tpe,bogus"], "unknown method 'bogus' in --methods"),
    (["--methods", "tpe,tpe"], "distinct"),
    (["--methods", "centaur"], "needs an LLM"),
    (["--methods", "hybrid", "--objective", "surrogate"], "surrogate objective cannot evaluate"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv: list[str], message: str, fake: None,
                                                          capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, "compare", *argv, "--profile", "test", "--trials", "2", "--out", "out")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not Path("out").exists()


def test_a_study_started_differently_is_refused_before_anything_runs(fake: None, capsys: pytest.CaptureFixture) -> None:
    assert cli(capsys, "compare", "--methods", "tpe", "--trials", "2", "--profile", "test", "--out", "out")[0] == 0
    code, err = cli(capsys, "compare", "--methods", "random,tpe", "--trials", "2", "--profile", "cpu", "--out", "out")
    assert code == 2 and "ran with profile='test', not 'cpu'" in err, err
    assert finished(Path("out")) == {"tpe-s0": 2}


def test_workers_run_the_studies_in_processes_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The real surrogate objective, two studies at a time in spawned processes, a budget of a few trials."""
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "compare", "--methods", "random,cmaes", "--objective", "surrogate", "--budget-hours", "0.3",
                    "--workers", "2", "--out", "out")
    assert code == 0, err
    counts = finished(Path("out"))
    assert set(counts) == {"random-s0", "cmaes-s0"} and min(counts.values()) >= 2
    assert json.loads(Path("out/summary.json").read_text())["studies"]["cmaes-s0"]["gpu_hours"] >= 0.3
