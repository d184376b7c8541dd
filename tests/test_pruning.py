"""Pruning on the test profile: intermediate val_bpb from the training process, a condemned trial stopped and
recorded `pruned`, the pruner kept by resume, refused where there are no learning curves."""
from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from harness.profiles import get_profile
from harness.runner import run_trial
from hybrid import pruners
from hybrid.reports import plots, report
from hybrid.study import records, store
from tests.conftest import TINY_TRAIN_PY
from tests.util import cli

TEST = get_profile("test")
DECISION_BOUND = 5.0  # seconds from the pruner's decision to the trial's result (kill, log, result.json), generously
# The tiny train.py watching its model; in MODE "fixed" it learns in its first FIXED_STEPS steps only, then ticks
# until done: its final model does not depend on how many steps the clock allowed.
WATCHING = TINY_TRAIN_PY.replace("    opt = torch.optim", "    session.watch(model)\n    opt = torch.optim").replace(
    '''        opt.step()
''', '''        if MODE != "fixed" or step <= 3:
            opt.step()
        else:
            time.sleep(0.01)
''')


def always_prune() -> optuna.pruners.BasePruner:
    """Optuna's threshold pruner with a bar no val_bpb passes: every prunable trial is condemned at once."""
    return pruners.GenerationPruner(optuna.pruners.ThresholdPruner(upper=0.0))


def test_a_condemned_trial_ends_at_the_decision(data_dir, tmp_path):
    decided: list[float] = []

    def report(fraction: float, value: float) -> bool:
        decided.append(time.perf_counter())
        return True

    r = run_trial(WATCHING, {}, TEST, tmp_path / "t", report=report)
    ended = time.perf_counter()
    assert r.status == "pruned" and r.error.startswith("pruned at") and "of the budget: intermediate val_bpb" in r.error
    assert len(decided) == 1 and len(r.intermediate) == 1 and r.intermediate[0][0] in TEST.intermediate_fractions
    assert 0 < r.intermediate[0][1] < 20 and r.val_bpb is None and r.eval_seconds == 0  # never scored at the end
    assert ended - decided[0] < DECISION_BOUND and r.training_seconds < TEST.time_budget


def test_the_final_val_bpb_is_the_same_with_intermediate_evaluations(data_dir, tmp_path):
    plain = run_trial(WATCHING, {"MODE": "fixed"}, TEST, tmp_path / "plain", seed=3)
    told: list[tuple[float, float]] = []
    watched = run_trial(WATCHING, {"MODE": "fixed"}, TEST, tmp_path / "watched", seed=3,
                        report=lambda f, v: told.append((f, v)) is not None)
    assert plain.ok and watched.ok, (plain.error, watched.error)
    assert [f for f, _ in told] == [f for f, _ in watched.intermediate] and told
    assert watched.val_bpb == plain.val_bpb and plain.intermediate == []
    assert watched.phases["intermediate"] > 0 == plain.phases["intermediate"]


@pytest.mark.parametrize("mode, status", [("nan", "nan"), ("raise", "crash")])
def test_failures_still_stop_at_once(data_dir, tmp_path, mode, status):
    r = run_trial(WATCHING, {"MODE": mode}, TEST, tmp_path / mode, report=lambda f, v: False)
    assert r.status == status and r.training_seconds < TEST.time_budget


def tiny_run(tmp_path, *flags: str) -> list[str]:  # noqa: ANN001
    """`hybrid run` arguments for the watching tiny train.py, its LR the one knob."""
    train_py, space = tmp_path / "train.py", tmp_path / "space.yaml"
    train_py.write_text(WATCHING)
    space.write_text("knobs:\n  LR: {type: float, low: 0.001, high: 0.1, default: 0.01, log: true}\n")
    return ["run", "--method", "random", "--storage", f"sqlite:///{tmp_path}/db.sqlite", "--profile", "test",
            "--train-py", str(train_py), "--space", str(space), *flags]


def test_a_run_records_pruned_trials_and_their_curves(data_dir, tmp_path, capsys, monkeypatch):
    """Every trial but the baseline is condemned at its first checkpoint: recorded `pruned` (Optuna's PRUNED), its
    wall time counted in the budget, its intermediate value kept where Optuna (and the dashboard) read it."""
    monkeypatch.setattr("hybrid.loop.make_pruner", lambda name: always_prune())
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    code, err = cli(capsys, *tiny_run(tmp_path, "--study", "p", "--trials", "2", "--pruner", "median"))
    assert code == 0, err
    assert "1 pruned  0 failed" in err  # the run's summary counts a pruned trial apart
    study = optuna.load_study(study_name="p", storage=storage)
    baseline, *others = sorted(study.get_trials(), key=lambda t: t.number)
    assert baseline.state == TrialState.COMPLETE and baseline.intermediate_values  # never pruned
    assert set(baseline.intermediate_values) <= {25, 50, 75} and len(others) == 1
    for trial in others:  # condemned at its first checkpoint (a slow step may pass one over)
        assert trial.state == TrialState.PRUNED and trial.user_attrs[records.STATUS] == "pruned"
        (step, value), = trial.intermediate_values.items()
        assert step in (25, 50, 75) and trial.value == value and trial.user_attrs["error"].startswith("pruned at")
        assert trial.user_attrs["total_seconds"] > 0 and records.is_finished(trial)
    assert store.seconds_used(study.get_trials()) == pytest.approx(
        sum(t.user_attrs["total_seconds"] for t in study.get_trials()))
    assert store.run_info(study)["pruner"] == "median"
    frame = report.trials_frame([study])  # the report counts it pruned, not failed, and keeps its curve
    assert frame["pruned"].tolist() == [False, True] and not frame["failed"].any()
    assert frame["intermediate"].notna().all()
    figure = plots.plot_curves(frame, {"random": "#1f77b4"}, tmp_path)  # and draws it
    assert figure.name == "curves" and (tmp_path / "curves.png").exists() and (tmp_path / "curves.html").exists()


def test_a_resumed_study_keeps_its_pruner(data_dir, tmp_path, capsys, monkeypatch):
    made: list[str | None] = []
    monkeypatch.setattr("hybrid.loop.make_pruner", lambda name: made.append(name) or pruners.make_pruner(name))
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    code, err = cli(capsys, *tiny_run(tmp_path, "--study", "r", "--trials", "1", "--pruner", "sha"))
    assert code == 0, err
    code, err = cli(capsys, "resume", "--study", "r", "--storage", storage)
    assert code == 0, err
    assert made == ["sha", "sha"]
    study = optuna.load_study(study_name="r", storage=storage)
    assert store.run_info(study)["pruner"] == "sha"


@pytest.mark.parametrize("extra", [["--objective", "surrogate"], ["--objective", "benchmark"]])
def test_no_pruner_without_learning_curves(tmp_path, capsys, extra):
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    code, err = cli(capsys, "run", "--method", "tpe", "--study", "s", "--storage", storage, "--trials", "2",
                    "--pruner", "median", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--pruner median" in err and "no intermediate val_bpb" in err and not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("name", pruners.PRUNERS)
def test_every_pruner_is_optunas_seen_per_generation(name):
    pruner = pruners.make_pruner(name)
    assert isinstance(pruner, pruners.GenerationPruner)
    assert type(pruner.pruner).__module__.startswith("optuna.pruners")


def test_a_pruner_compares_a_trial_with_its_generation_and_those_it_names():
    """Median pruning of generation 1's trial: against its own (none: kept), then against its parent's too."""
    study = optuna.create_study(pruner=pruners.make_pruner("median"))
    for value in (1.0, 1.1, 1.2, 1.3, 1.4):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={25: value},
                                                  user_attrs={records.GENERATION: 0}))
    trial = study.ask()
    trial.set_user_attr(records.GENERATION, 1)
    trial.report(2.0, step=25)
    assert not trial.should_prune()
    trial.set_user_attr(records.PRUNE_WITH, [0])
    assert trial.should_prune()
