"""The console of a run: a line per finished trial, runs that stop early (a failed baseline, failures in a row), the
progress (units, the bar of a resumed study, 80 columns), Ctrl-C, studies named in compare, processes that end with
their command (SIGTERM), and LLM spending (shown, capped)."""
from __future__ import annotations

import datetime
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from llm_server import FakeLLM, config_answer
from optuna.trial import FrozenTrial, TrialState, create_trial
from rich.console import Console
from test_llm_methods import SPACE, llm_env, load, quick, quick_objective, run_config  # noqa: F401 (fixtures)
from test_resume import ENV, TRIALS, _alive, _children, count, hybrid_cmd, wait_for

import hybrid.loop
import hybrid.progress
from harness.result import TrialResult
from hybrid import loop, stops
from hybrid.study import records, store
from hybrid.config import Budget, RunConfig
from hybrid.errors import UserError
from hybrid.study.generations import load_all
from hybrid.llm import centaur
from hybrid.llm.structural_agent import LLMStructuralAgent
from hybrid.progress import RunProgress, duration, fit
from hybrid.structural import Context
from util import cli

RUN = ("run", "--method", "tpe", "--study", "s", "--profile", "test")


class Scripted:
    """Instant trials of 300 s and 500 steps; chosen ones fail (a reason each), are stopped, or run only 3 steps."""
    name = "scripted"

    def __init__(self, fail: dict[int, str] | None = None, few_steps: tuple[int, ...] = (), stop_at: int | None = None,
                 fail_from: int | None = None) -> None:
        self.fail, self.few_steps, self.stop_at, self.fail_from = fail or {}, few_steps, stop_at, fail_from

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        if trial_number == self.stop_at:
            raise KeyboardInterrupt  # what the runner raises when Ctrl-C kills the trial in flight
        reason = self.fail.get(trial_number) or (
            "ValueError: boom (train.py line 12)" if self.fail_from is not None and trial_number >= self.fail_from
            else None)
        if reason:
            return TrialResult(status="crash", error=reason, total_seconds=5.0, log_path=str(trial_dir / "log.txt"))
        value = 1.0 + abs(config["MATRIX_LR"] - 0.04) + config["WEIGHT_DECAY"] / 10
        return TrialResult(val_bpb=value, training_seconds=280.0, total_seconds=300.0, config=config,
                           num_steps=3 if trial_number in self.few_steps else 500, log_path=str(trial_dir / "log.txt"))


@pytest.fixture
def objective(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Set `objective.value` to the Scripted objective the runs in this test use (in a fresh folder)."""
    monkeypatch.chdir(tmp_path)

    class Holder:
        value = Scripted()

    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: Holder.value)
    return Holder


def lines_of(err: str, study: str = "s") -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"[{study}] trial ")]


# -- a line per trial ------------------------------------------------------------------------------------------

def test_every_finished_trial_gets_a_line_with_its_reason_and_log(objective, capsys) -> None:
    objective.value = Scripted(fail={2: "RuntimeError: shapes do not match (train.py line 88)"}, few_steps=(3,))
    code, err = cli(capsys, *RUN, "--trials", "5")
    assert code == 0, err
    lines = lines_of(err)
    assert [line.split()[2] for line in lines] == ["0", "1", "2", "3", "4"]  # every trial, in order
    assert lines[0].startswith("[s] trial 0  baseline  gen 0  ok  val_bpb ") and lines[0].endswith("  5.0 min")
    assert lines[2] == ("[s] trial 2  tpe  gen 0  crash  5 s  RuntimeError: shapes do not match (train.py line 88)"
                        f"  log {Path('runs/s/trial-00002/log.txt').resolve()}")
    assert "only 3 optimizer steps (< 10): its val_bpb says little" in lines[3]
    assert all("optimizer steps" not in line for line in lines[:3] + lines[4:])


def test_few_steps_are_flagged_in_the_report_but_not_on_the_surrogate(objective, capsys, tmp_path) -> None:
    objective.value = Scripted(few_steps=(1,))
    assert cli(capsys, *RUN, "--trials", "3")[0] == 0
    assert cli(capsys, "report", "--study", "s", "--out", "out")[0] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Trials of fewer than 10 optimizer steps" in report and "| s | 1 | 3 |" in report
    surrogate = create_trial(value=1.0, user_attrs={"status": "ok", "val_bpb": 1.0, "num_steps": 0})
    assert records.few_steps(surrogate, "train") and not records.few_steps(surrogate, "surrogate")
    imported = create_trial(value=1.0, user_attrs={"status": "ok", "val_bpb": 1.0})  # no step count recorded
    assert not records.few_steps(imported, "train")


# -- runs that stop early -------------------------------------------------------------------------------------

def test_a_failed_baseline_stops_the_run_and_resume_runs_it_again(objective, capsys) -> None:
    objective.value = Scripted(fail={0: "FileNotFoundError: no tokenizer"})
    code, err = cli(capsys, *RUN, "--trials", "4")
    assert code == 2
    assert "hybrid: error: study 's': the baseline (trial 0) failed, so nothing after it can be judged: crash: " \
           "FileNotFoundError: no tokenizer" in err and "hybrid resume --study s" in err
    assert [t.user_attrs["status"] for t in store.finished_trials(load_study())] == ["crash"]

    objective.value = Scripted()  # fixed
    code, err = cli(capsys, "resume", "--study", "s")
    assert code == 0, err
    trials = store.finished_trials(load_study())
    assert [t.user_attrs["source"] for t in trials[:2]] == ["baseline", "baseline"] and len(trials) == 4
    assert records.ok_value(trials[1]) is not None


def test_trials_failing_the_same_way_stop_the_run_and_resume_keeps_the_limit(objective, capsys) -> None:
    objective.value = Scripted(fail_from=1)
    code, err = cli(capsys, *RUN, "--trials", "20", "--max-failures-in-a-row", "3")
    assert code == 2
    assert ("study 's': 3 trials in a row failed the same way (trials 1-3: crash: ValueError: boom (train.py line 12))"
            in err) and "hybrid resume --study s" in err
    assert len(store.finished_trials(load_study())) == 4
    assert store.run_info(load_study())["max_failures_in_a_row"] == 3
    code, err = cli(capsys, "resume", "--study", "s")  # not fixed: three more, and the same stop
    assert code == 2 and "3 trials in a row failed the same way (trials 4-6" in err
    assert len(store.finished_trials(load_study())) == 7


def test_failures_for_different_reasons_do_not_stop_the_run(objective, capsys) -> None:
    objective.value = Scripted(fail={n: f"crash number {n}" for n in range(1, 6)})
    code, err = cli(capsys, *RUN, "--trials", "7", "--max-failures-in-a-row", "2")
    assert code == 0, err
    assert len(store.finished_trials(load_study())) == 7


def finished(number: int, status: str, error: str = "", source: str = "tpe") -> FrozenTrial:
    trial = create_trial(value=1.0 if status == "ok" else 100.0,
                         user_attrs={"source": source, "status": status, "error": error, "val_bpb": 1.0})
    trial.number = number
    return trial


def test_refusals_and_failures_in_a_row_are_one_rule(monkeypatch) -> None:
    """Refusals of the memory model (no time spent) stop after REFUSALS_IN_A_ROW whatever their figures; other
    failures after --max-failures-in-a-row with the same reason."""
    monkeypatch.setattr(stops, "REFUSALS_IN_A_ROW", 4)
    rules = stops.StopRules("s", "sqlite:///x.db", 3, since=datetime.datetime(2000, 1, 1))
    base = [finished(0, "ok", source="baseline")]
    refused = [finished(n, "oom-predicted", f"predicted peak {n}0 GB > cap 1 GB") for n in range(1, 5)]
    rules.check(base + refused[:3])
    with pytest.raises(UserError, match="refused 4 configs in a row"):
        rules.check(base + refused)
    crashes = [finished(n, "crash", "ValueError: boom") for n in range(5, 8)]
    rules.check(base + refused + crashes[:2] + [finished(8, "crash", "another reason")])
    with pytest.raises(UserError, match="3 trials in a row failed the same way"):
        rules.check(base + refused + crashes)


def load_study(name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage="sqlite:///runs/hybrid.db")


# -- progress ------------------------------------------------------------------------------------------------

def test_durations_read_in_units_that_fit() -> None:
    assert [duration(s) for s in (45, 150, 900, 7300, 86400)] == ["45 s", "2.5 min", "15.0 min", "2.0 h", "24.0 h"]
    assert fit(["12/30 trials", "best 0.9876", "3 failed"], 25) == "12/30 trials  best 0.9876"
    assert fit(["a very long first part", "b"], 5) == "b"


def progress_of(study: optuna.Study, config: RunConfig, width: int = 80) -> tuple[RunProgress, Console]:
    progress = RunProgress(study, config, Budget.of(config), enabled=True)
    progress.console = Console(file=io.StringIO(), force_terminal=True, width=width)
    progress.live = True
    return progress, progress.console


def test_budget_units_say_gpu_hours_only_on_a_gpu(objective, capsys) -> None:
    assert cli(capsys, *RUN, "--trials", "3")[0] == 0
    study = load_study()
    cpu = RunConfig(method="tpe", study="s", budget_hours=0.25, profile="cpu")
    gpu = RunConfig(method="tpe", study="s", budget_hours=24, profile="gpu")
    used = 3 * 300.0  # three trials of 300 s
    assert RunProgress(study, cpu, Budget.of(cpu), enabled=True).budget_text() == \
           f"{used / 60:.1f}/15.0 min of trial time"
    assert RunProgress(study, gpu, Budget.of(gpu), enabled=True).budget_text() == \
           f"{used / 3600:.2f}/24 GPU-hours"


def test_the_bar_of_a_resumed_study_starts_filled_and_fits_80_columns(objective, capsys) -> None:
    assert cli(capsys, *RUN, "--trials", "6")[0] == 0
    config = RunConfig(method="tpe", study="s", trials=10, profile="test")
    progress, _ = progress_of(load_study(), config)
    with progress:
        assert progress.bar.tasks[0].completed == 6 and progress.bar.tasks[0].total == 10
        out = Console(file=io.StringIO(), width=80, color_system=None)
        out.print(progress.bar.get_renderable())
        rendered = out.file.getvalue().splitlines()
    assert len(rendered) == 1 and len(rendered[0]) <= 80, rendered
    assert "6/10 trials" in rendered[0] and "best " in rendered[0]


def test_ctrl_c_names_the_trial_killed_and_the_study_stays_resumable(objective, capsys) -> None:
    objective.value = Scripted(stop_at=2)
    code, err = cli(capsys, *RUN, "--trials", "5")
    assert code == 130
    assert "[s] stopped: trial 2 was killed and does not count" in err
    assert "continue with `hybrid resume --study s" in err
    trials = load_study().get_trials()
    assert trials[2].state == TrialState.FAIL and not records.is_finished(trials[2])


def test_every_line_of_compare_names_its_study(objective, capsys) -> None:
    code, err = cli(capsys, "compare", "--methods", "random,tpe", "--trials", "2", "--profile", "test", "--out", "out")
    assert code == 0, err
    studies = ("random-s0", "tpe-s0")
    unnamed = [line for line in err.splitlines() if not any(s in line for s in studies)]
    assert unnamed == [line for line in err.splitlines() if line.startswith("hybrid: report written")], unnamed
    assert len(lines_of(err, "random-s0")) == len(lines_of(err, "tpe-s0")) == 2


def descendants(root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_sigterm_ends_every_process_of_reproduce(tmp_path: Path) -> None:
    """`timeout` or a scheduler stops `reproduce --workers 2` with SIGTERM: none of its processes lives on."""
    db = tmp_path / "out" / "hybrid.db"
    proc = subprocess.Popen(hybrid_cmd("reproduce", "arxiv-2603.24647", "--surrogate", "--seeds", "1", "--workers", "2",
                                       "--out", str(tmp_path / "out")), cwd=tmp_path, env=ENV, stderr=subprocess.PIPE,
                            text=True)
    family: set[int] = set()

    def studies_running() -> bool:
        family.update(descendants(proc.pid))
        return count(db, TRIALS) >= 20 and len(family) >= 2

    try:
        assert wait_for(studies_running, proc, timeout=300), proc.stderr.read()[-3000:]
        family.update(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        code, err = proc.wait(timeout=120), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, err[-3000:]
    deadline = time.monotonic() + 5.0
    while any(map(_alive, family)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in family if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == [], err[-3000:]
    assert "hybrid: interrupted" in err


# -- LLM spending ----------------------------------------------------------------------------------------------

CAP = 0.0001  # dollars: spent by the first answer


def test_llm_hp_stops_with_exit_0_once_its_cap_is_spent_and_resume_keeps_the_cap(tmp_path, quick, capsys) -> None:
    with FakeLLM(responder=lambda system, prompt: config_answer(SPACE.defaults())) as llm:
        config = run_config(tmp_path, "llm-hp", llm.base_url, 6, llm_max_usd=CAP)
        assert loop.run(config, quick_objective) == 0
        err = capsys.readouterr().err
        assert len(llm.requests) == 1
        assert "[llm-hp] the study's LLM cost reached $" in err and "of its --llm-max-usd 0.0001" in err
        assert "llm-hp makes every move with the LLM, so the run stops here" in err
        assert "hybrid resume" not in err
        progress = [line for line in err.splitlines() if line.startswith("[llm-hp] ") and " tok $" in line]
        assert progress and "of $0.0001" in progress[-1]  # the study's LLM tokens and cost so far, and the cap
        assert loop.resume(config.study, config.storage, objective=quick_objective) == 0
        assert len(llm.requests) == 1
    finished = store.finished_trials(load(config))
    assert [t.user_attrs["source"] for t in finished] == ["baseline", "llm-hp"]
    assert records.LLMUsage.of(finished).usd >= CAP


def test_centaur_goes_on_with_cma_es_once_its_cap_is_spent(tmp_path, quick, capsys, monkeypatch) -> None:
    monkeypatch.setattr(centaur, "WARMUP_TRIALS", 1)
    with FakeLLM(responder=lambda system, prompt: config_answer(SPACE.defaults())) as llm:
        config = run_config(tmp_path, "centaur", llm.base_url, 6, llm_fraction=1.0, llm_max_usd=CAP)
        assert loop.run(config, quick_objective) == 0
    err = capsys.readouterr().err
    assert len(llm.requests) == 1
    assert [t.user_attrs["source"] for t in store.finished_trials(load(config))] == \
           ["baseline", "centaur-llm", "cmaes", "cmaes", "cmaes", "cmaes"]
    assert err.count("no more LLM calls; centaur goes on with CMA-ES alone") == 1


def test_the_structural_agent_proposes_nothing_once_the_cap_is_spent(tmp_path, quick) -> None:
    config = run_config(tmp_path, "tpe", "http://127.0.0.1:9/never-called", 2, llm="none")
    assert loop.run(config, quick_objective) == 0
    study = load(config)
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"status": "rejected", "llm_cost_usd": 0.5}))
    agent = LLMStructuralAgent(RunConfig(**{**config.to_dict(), "method": "hybrid", "llm": "anthropic",
                                            "llm_max_usd": 0.5}))
    base = load_all(study)[0]
    assert agent.propose(Context(base, {0: base}, SPACE.defaults(), None)) is None


def test_the_run_config_keeps_both_limits(objective, capsys) -> None:
    assert cli(capsys, *RUN, "--trials", "2", "--llm-max-usd", "2.5", "--max-failures-in-a-row", "7")[0] == 0
    info = store.run_info(load_study())
    assert (info["llm_max_usd"], info["max_failures_in_a_row"]) == (2.5, 7)
    code, err = cli(capsys, *RUN, "--trials", "2", "--max-failures-in-a-row", "0")
    assert code == 2 and "--max-failures-in-a-row" in err and err.count("\n") == 1

