"""Several machines on one study: separate `hybrid run` processes sharing a PostgreSQL database, one of them
killed in the middle of a trial. Needs PostgreSQL (installed with apt-get where missing; skipped where it cannot be)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pg
import pytest
from optuna.trial import TrialState
from test_resume import ENV, TRIAL_ATTRS, _train_worker_of, check_study, hybrid_cmd, wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    try:
        with pg.postgres_server() as url:
            yield url
    except pg.Unavailable as e:
        pytest.skip(f"no PostgreSQL server: {e}")


def machines(root: Path, n: int, args: tuple[str, ...], env: dict[str, str]) -> list[subprocess.Popen]:
    """The same `hybrid run` on n "machines": processes with working directories of their own (stderr in mN.log)."""
    procs = []
    for i in range(n):
        (root / f"m{i}").mkdir(exist_ok=True)
        with open(root / f"m{i}.log", "a") as log:
            procs.append(subprocess.Popen(hybrid_cmd(*args), cwd=root / f"m{i}", env=env, stderr=log))
    return procs


def logs(root: Path) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(root.glob("m*.log")))


def test_three_machines_one_killed_mid_trial(pg_url: str, tmp_path: Path, data_dir: Path) -> None:
    env = {**ENV, "HYBRID_DATA_DIR": str(data_dir)}
    budget = 4
    procs = machines(tmp_path, 3, ("run", "--method", "tpe", "--study", "train3", "--storage", pg_url, "--objective",
                                   "train", "--profile", "test", "--trials", str(budget)), env)
    victim = procs[1]
    runs = tmp_path / "m1" / "runs" / "train3"
    assert wait_for(lambda: any(runs.glob("trial-*/log.txt")), victim), logs(tmp_path)
    time.sleep(1.0)  # train.py is running
    victim.kill()
    trial_dir = next(runs.glob("trial-*"))
    if (orphan := _train_worker_of(trial_dir)) is not None:  # its train.py would run on to its timeout
        os.kill(orphan, signal.SIGKILL)
    assert [p.wait(timeout=300) for p in procs] == [0, -signal.SIGKILL, 0], logs(tmp_path)

    trials = check_study(pg_url, "train3", budget, attrs=(*TRIAL_ATTRS, "log_path"))
    killed = trials[int(trial_dir.name.split("-")[1])]
    assert killed.state == TrialState.FAIL and "status" not in killed.user_attrs
    dirs = sorted(p.parent.name for p in tmp_path.glob("m*/runs/train3/trial-*/log.txt"))
    ran = [t for t in trials if "surplus" not in t.user_attrs]
    assert len(dirs) == len(set(dirs)) == len(ran)  # every trial ran once, on one machine
