"""`hybrid resume`, Ctrl-C and crash safety: real runs interrupted (SIGINT) or killed (SIGKILL) at random moments,
then resumed: the study ends with exactly its budget, no trial lost or counted twice."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hybrid.loop
from harness.result import TrialResult
from hybrid.study import records, store
from hybrid.cli import main
from hybrid.study.generations import Generation, save
from hybrid.paths import PROJECT_ROOT
from hybrid.space import load_space

TRIAL_ATTRS = ("source", "generation", "code_sha", "status", "seed", "method", "total_seconds", "config_ran")
ENV = {**os.environ, "HYBRID_HEARTBEAT_SECONDS": "1", "PYTHONPATH": str(PROJECT_ROOT)}  # dead after 3 s


def check_study(storage: str, name: str, budget: int, *, attrs: tuple[str, ...] = TRIAL_ATTRS) -> list[FrozenTrial]:
    """The invariants of a study that reached its --trials budget through kills, interrupts and resumes."""
    study = optuna.load_study(study_name=name, storage=store.open_storage(storage))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # no duplicates, no gaps
    finished = [t for t in trials if records.is_finished(t)]
    assert len(finished) == budget
    for t in finished:
        assert all(k in t.user_attrs for k in attrs), (t.number, t.user_attrs)
        told = TrialState.FAIL if t.user_attrs["status"] == "rejected" else TrialState.COMPLETE
        assert t.state == told and (t.value == t.user_attrs.get("val_bpb", 100.0) or t.state == TrialState.FAIL)
    for t in trials:
        if not records.is_finished(t):  # interrupted (or a surplus slot): failed, never counted
            assert t.state == TrialState.FAIL and "status" not in t.user_attrs, (t.number, t.state, t.user_attrs)
    baselines = [t for t in finished if t.user_attrs["source"] == "baseline"]
    assert len(baselines) == 1 and baselines[0].params == load_space(PROJECT_ROOT / "search_space.yaml",
                                                                      study.user_attrs[store.RUN_KEY]["profile"]).defaults()
    return trials


def hybrid_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybrid.cli", *args]


def count(db: Path, sql: str) -> int:
    """A count straight from the SQLite file (cheap enough to poll; 0 before the tables exist)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


TRIALS = "SELECT count(*) FROM trials"
CREATED = "SELECT count(*) FROM study_user_attributes WHERE key = 'hybrid.run'"
RUNNING = "SELECT count(*) FROM trials WHERE state = 'RUNNING'"
RUNNING_FROM = "SELECT count(*) FROM trials WHERE state = 'RUNNING' AND number >= {}"  # this run's trial in flight


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, every: float = 0.02) -> bool:  # noqa: ANN001
    """Poll until predicate() holds (True) or the process exits (False); the deadline is for a machine under heavy
    load (a quiet one needs seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(every)
    return True


# -- in process: resume, Ctrl-C, sampler state ----------------------------------------------------------------

class InterruptingObjective:
    """Instant trials; trial `at` gets a SIGINT to this process (Ctrl-C) and ends as a stopped train.py trial does."""
    name = "fake"

    def __init__(self, at: int) -> None:
        self.at = at

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        if trial_number == self.at:
            os.kill(os.getpid(), signal.SIGINT)  # the run's handler only asks to stop ...
            raise KeyboardInterrupt  # ... and run_trial, seeing that, kills its train.py and raises
        return TrialResult(val_bpb=1.0 + config["MATRIX_LR"], total_seconds=300.0, config=config)


def test_ctrl_c_then_resume_continues_the_sampler_to_the_same_budget(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: InterruptingObjective(at=15))
    assert main(["run", "--method", "cmaes", "--study", "s", "--trials", "26", "--profile", "test"]) == 130
    study = optuna.load_study(study_name="s", storage="sqlite:///runs/hybrid.db")
    trials = study.get_trials()
    assert len(trials) == 16 and all(map(records.is_finished, trials[:15]))
    assert trials[15].state == TrialState.FAIL and "status" not in trials[15].user_attrs

    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: InterruptingObjective(at=-1))
    assert main(["resume", "--study", "s"]) == 0
    trials = check_study("sqlite:///runs/hybrid.db", "s", 26)
    # CMA-ES went on from the state it had stored in the database, not from a new start
    generation = [t.system_attrs.get("cmawm:generation") for t in trials]
    assert generation[16:] and min(generation[16:]) >= max(g for g in generation[:15] if g is not None) >= 1


class SlowInProcessObjective:
    """Trial `at` is a slow in-process evaluation that gets two SIGINTs (Ctrl-C twice); the others finish at once."""
    name = "fake"

    def __init__(self, at: int) -> None:
        self.at, self.survived_first = at, False

    def evaluate(self, code: str, config: dict, *, seed: int, trial_number: int, trial_dir: Path) -> TrialResult:
        if trial_number == self.at:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the first Ctrl-C only asks: nothing is raised in here
            self.survived_first = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the second one raises, at once
            raise AssertionError("a second SIGINT did not interrupt the trial")
        return TrialResult(val_bpb=1.0 + config["MATRIX_LR"], total_seconds=300.0, config=config)


def test_the_first_ctrl_c_asks_and_the_second_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    objective = SlowInProcessObjective(at=3)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: objective)
    assert main(["run", "--method", "tpe", "--study", "s", "--trials", "10", "--profile", "test"]) == 130
    assert objective.survived_first  # and the second one cut the 5 s sleep (or the AssertionError would fail the run)
    trials = optuna.load_study(study_name="s", storage="sqlite:///runs/hybrid.db").get_trials()
    assert len(trials) == 4 and trials[3].state == TrialState.FAIL and "status" not in trials[3].user_attrs


def test_a_study_whose_creation_was_cut_short_is_completed_by_the_next_run(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: InterruptingObjective(at=-1))
    monkeypatch.setattr(store, "GRACE_SECONDS", 0.5)  # how long a run waits for another process creating it
    space = load_space(PROJECT_ROOT / "search_space.yaml", "test")
    study = optuna.create_study(storage=store.open_storage("sqlite:///runs/hybrid.db"), study_name="s")
    study.set_user_attr(store.SPACE_KEY, space.to_dict())  # killed here, before the baseline and the run config
    save(study, Generation(0, None, "the baseline train.py", "", space.to_dict(), status="base"))
    assert main(["run", "--method", "tpe", "--study", "s", "--trials", "4", "--profile", "test"]) == 0
    check_study("sqlite:///runs/hybrid.db", "s", 4)


# -- real processes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a scheduler (SLURM) or `kill`
def test_a_stop_signal_ends_the_run_cleanly_and_resume_completes(tmp_path: Path, stop: signal.Signals) -> None:
    db, budget = tmp_path / "runs" / "hybrid.db", 14
    proc = subprocess.Popen(hybrid_cmd("run", "--method", "tpe", "--study", "s", "--objective", "surrogate",
                                       "--trials", str(budget)),
                            cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: count(db, TRIALS) >= 3 + random.randrange(8), proc)
    proc.send_signal(stop)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code == 130, err[-3000:]
    assert "hybrid resume --study s" in err
    with sqlite3.connect(db) as conn:
        states = [s for (s,) in conn.execute("SELECT state FROM trials")]
    assert "RUNNING" not in states and states.count("FAIL") <= 1 and len(states) < budget

    done = subprocess.run(hybrid_cmd("resume", "--study", "s"), cwd=tmp_path, env=ENV, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_study(f"sqlite:///{db}", "s", budget)


def test_runs_killed_at_random_moments_lose_nothing(tmp_path: Path) -> None:
    seed = random.randrange(10**6)
    rng, db, budget = random.Random(seed), tmp_path / "runs" / "hybrid.db", 80  # the kills take ~20 trials
    # random: what is tested is the database's bookkeeping, the same for every sampler (and TPE's is slower)
    run = ("run", "--method", "random", "--study", "s", "--objective", "surrogate", "--trials", str(budget))

    def start() -> subprocess.Popen:
        args = ("resume", "--study", "s") if count(db, CREATED) else run
        return subprocess.Popen(hybrid_cmd(*args), cwd=tmp_path, env=ENV, stderr=subprocess.DEVNULL)

    proc = start()  # killed anywhere in its start: imports, creating the database and the study, the first trials
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=rng.uniform(1.0, 5.0))
    proc.kill()
    proc.wait()
    mid_trial = 0
    for _ in range(8):  # then in the trial loop (mostly database writes) until three kills landed inside a trial
        proc = start()
        ours = RUNNING_FROM.format(count(db, TRIALS))
        wait_for(lambda: count(db, ours) > 0, proc, every=0.001)  # a trial of this run is in flight (milliseconds)
        time.sleep(rng.uniform(0.0, 0.01))  # killed in it, or in recording it, or just after
        proc.kill()
        proc.wait()
        mid_trial += count(db, ours) > 0
        if mid_trial == 3:
            break
    done = subprocess.run(hybrid_cmd(*(("resume", "--study", "s") if count(db, CREATED) else run)), cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (seed, done.stderr)
    check_study(f"sqlite:///{db}", "s", budget)
    assert mid_trial == 3, f"kill seed {seed}: only {mid_trial} kills landed inside a trial"


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
    return out


def _children_running(pid: int, marker: bytes) -> list[int]:
    """The children of `pid` whose command line contains `marker`."""
    found = []
    for child in _children(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_stop_when_their_run_is_killed(tmp_path: Path) -> None:
    """`--workers 2`, the run SIGKILLed: its other worker stops too (its trial in flight failed, never counted).
    (The memory model builds the user's own train.py in process: no probe process to outlive the run.)"""
    db = tmp_path / "runs" / "hybrid.db"
    proc = subprocess.Popen(hybrid_cmd("run", "--method", "random", "--study", "s", "--objective", "surrogate",
                                       "--budget-hours", "100000", "--workers", "2"),
                            cwd=tmp_path, env=ENV, stderr=subprocess.DEVNULL)
    try:
        def run_family() -> list[int]:
            """The second worker (multiprocessing's spawn)."""
            return _children_running(proc.pid, b"spawn_main")

        assert wait_for(lambda: count(db, TRIALS) >= 30 and len(run_family()) == 1, proc)
        family = run_family()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60.0  # workers look for their run every second
    while any(map(_alive, family)):
        if time.monotonic() > deadline:
            for pid in filter(_alive, family):
                os.kill(pid, signal.SIGKILL)
            pytest.fail("a worker outlived its run")
        time.sleep(0.1)
    assert count(db, RUNNING) <= 1  # the killed run's own trial, failed by the next run; the worker's is settled
    settled = count(db, TRIALS)
    time.sleep(2.0)
    assert count(db, TRIALS) == settled


def _train_worker_of(trial_dir: Path) -> int | None:
    """The pid of the harness worker training in trial_dir (it runs in a session of its own)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(trial_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_train_trials_interrupted_and_killed_mid_trial(tmp_path: Path, data_dir: Path) -> None:
    """The real objective: Ctrl-C in the middle of trial 1, resume, SIGKILL in the middle of trial 2, resume."""
    db, budget = tmp_path / "runs" / "hybrid.db", 3
    env = {**ENV, "HYBRID_DATA_DIR": str(data_dir)}
    cmds = [hybrid_cmd("run", "--method", "random", "--study", "s", "--objective", "train", "--profile", "test",
                       "--trials", str(budget)), hybrid_cmd("resume", "--study", "s")]
    for number, stop in ((1, signal.SIGINT), (None, signal.SIGKILL)):
        proc = subprocess.Popen(cmds[number is None], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        target = number if number is not None else count(db, TRIALS)
        trial_dir = tmp_path / "runs" / "s" / f"trial-{target:05d}"
        # the trial's processes are running (a fixed sleep after its log appears may outlast a whole test-profile trial)
        assert wait_for(lambda: _train_worker_of(trial_dir) is not None, proc)
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == (130 if stop == signal.SIGINT else -signal.SIGKILL)
        deadline = time.monotonic() + 10.0  # the trial's worker watches its runner and ends with it
        while _train_worker_of(trial_dir) is not None:
            assert time.monotonic() < deadline, "the trial outlived the run that started it"
            time.sleep(0.1)
        with sqlite3.connect(db) as conn:
            state, = conn.execute("SELECT state FROM trials WHERE number = ?", (target,)).fetchone()
        assert state == ("FAIL" if stop == signal.SIGINT else "RUNNING")  # a killed one is failed by the next run

    done = subprocess.run(cmds[1], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = check_study(f"sqlite:///{db}", "s", budget, attrs=(*TRIAL_ATTRS, "log_path", "training_seconds"))
    assert [t.state for t in trials].count(TrialState.FAIL) == 2
