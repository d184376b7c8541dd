"""The trial database: one Optuna storage holding studies, trials, their attributes and code generations.

Study user attributes (all JSON):
  hybrid.run          the RunConfig the study was created with (method, seed, objective, profile, budget, ...)
  hybrid.space        the search space of generation 0
  hybrid.gen.<N>      one code generation: parent, description, diff, code, sha, space, status, margin
Trial user attributes: `source` (who proposed the move), `generation`, `code_sha`, `status` (ok or a failure
class), `seed`, the measurements of harness.result.TrialResult, `log_path`, `error`, and LLM usage.
A trial is *finished* once `status` is recorded (it is written last, then the trial is told). A RUNNING
trial whose worker died (its heartbeat stopped) is settled by the other workers or by `resume`: told its
recorded outcome if `status` was written, failed otherwise and then never counted.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from harness.result import PRUNED, TrialResult
from harness.scrub import scrub
from hybrid.study import optuna_compat, records
from hybrid.errors import UserError
from hybrid.study.records import is_finished

HEARTBEAT_SECONDS = float(os.environ.get("HYBRID_HEARTBEAT_SECONDS", 10))
GRACE_SECONDS = 3 * HEARTBEAT_SECONDS  # three missed beats and a trial is declared dead
HEARTBEAT_KEY = "hybrid.heartbeat"  # trial system attribute: time.time() of the worker's last beat
RUN_KEY = "hybrid.run"
SPACE_KEY = "hybrid.space"
GEN_PREFIX = "hybrid.gen."
# Opening a new database from several machines at once: tries, and the first wait (one second longer each time).
OPEN_ATTEMPTS = 5
OPEN_RETRY_SECONDS = 0.5
# What opening a storage raises for the user's database: sqlalchemy's errors (bad host, credentials, file, driver
# name), a driver that is not installed (ImportError), tables of another Optuna version (RuntimeError). Anything
# else is a fault of the code and is not turned into "cannot open storage".
OPEN_ERRORS = (SQLAlchemyError, ImportError, RuntimeError)
HEARTBEAT_FAILURES_TO_WARN = 2  # failed beats in a row before a warning (three make the trial dead to the others)
MEASUREMENTS = (records.VAL_BPB, "training_seconds", "startup_seconds", "eval_seconds", records.TOTAL_SECONDS,
                "peak_memory_mb", "peak_reserved_mb", "tokens_per_second", "mfu", "num_params", records.NUM_STEPS,
                "total_tokens", records.ERROR, records.LOG_PATH, "phases")

# The password of a storage URL (scheme://user:PASSWORD@host/db): never printed, never stored.
URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def code_sha(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()[:16]


def masked_url(url: str) -> str:
    """The storage URL as it may be shown or stored: postgresql://u:***@host/db."""
    return URL_PASSWORD.sub(r"\1***@", url)


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for other storages."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def require_database(url: str) -> None:
    """UserError for a SQLite file that does not exist (opening it would create it empty)."""
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise UserError(f"no database at {path}: pass --storage sqlite:///PATH of an existing run")


def require_folder(url: str) -> None:
    """UserError for a SQLite file whose folder does not exist (an explicit path's folder is not created)."""
    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        raise UserError(f"no folder {path.parent} for the database {path.name}: create it first, or pass another "
                        "--storage sqlite:///PATH")


def open_storage(url: str) -> RDBStorage:
    """An RDB storage for an Optuna URL; SQLite files get their folder, WAL and a busy timeout."""
    if not isinstance(url, str) or "://" not in url:
        raise UserError(f"malformed storage URL {masked_url(str(url))!r}: expected e.g. sqlite:///runs/hybrid.db or postgresql://user@host/db")
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise UserError(f"unsupported storage {scheme!r} in {masked_url(url)!r}: use sqlite:///PATH, postgresql://... or mysql://...")
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:":
            raise UserError(f"malformed SQLite URL {url!r}: expected sqlite:///relative/path.db or sqlite:////abs/path.db")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        make_url(_with_driver(url))
    except (ArgumentError, ValueError) as e:  # e.g. a port that is not a number
        raise UserError(f"cannot open storage {masked_url(url)!r}: {str(e).splitlines()[0]}") from None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = RDBStorage(_with_driver(url), engine_kwargs=engine_kwargs)
            break
        except (IntegrityError, ProgrammingError) as e:  # machines creating the tables of a new database together
            error = e
            time.sleep(OPEN_RETRY_SECONDS + attempt)
        except OPEN_ERRORS as e:
            raise UserError(f"cannot open storage {masked_url(url)!r}: {str(e).splitlines()[0]}") from None
    else:
        raise UserError(f"cannot open storage {masked_url(url)!r}: {str(error).splitlines()[0]}")
    if scheme == "sqlite":
        _tune_sqlite(storage)
    return storage


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg (3), earlier versions as psycopg2: use the one installed."""
    installed = importlib.util.find_spec
    if url.startswith("postgresql://") and not installed("psycopg") and installed("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _tune_sqlite(storage: RDBStorage) -> None:
    """WAL journal: concurrent readers, and commits that survive a killed process without an fsync each."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record):  # noqa: ANN001
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()


def study_exists(storage: RDBStorage, name: str) -> bool:
    return name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


def save_run_info(study: optuna.Study, info: dict[str, Any]) -> None:
    """Store the run config in the study, its storage URL without the password."""
    study.set_user_attr(RUN_KEY, {**info, "storage": masked_url(info["storage"])})


def run_info(study: optuna.Study) -> dict[str, Any]:
    info = study.user_attrs.get(RUN_KEY)
    if info is None:
        raise UserError(f"study {study.study_name!r} was not created by hybrid (no {RUN_KEY} attribute), or its "
                        "creation was cut short: run the same `hybrid run` again")
    return info


# -- trials -----------------------------------------------------------------------------------------------

def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if is_finished(t)]


def seconds_used(trials: list[FrozenTrial]) -> float:
    """Trial wall time spent (the budget's currency): failures cost what they used, rejections nothing."""
    return sum(float(t.user_attrs.get(records.TOTAL_SECONDS) or 0.0) for t in trials if is_finished(t))


def record_result(study: optuna.Study, trial: optuna.Trial, result: TrialResult, attrs: dict[str, Any]) -> FrozenTrial:
    """Store a trial's outcome and tell the sampler: val_bpb, or the penalty for a failure (rejections: FAIL).
    `status` is written last: a trial that has it has all its attributes, whatever happens before the tell."""
    values = {k: getattr(result, k) for k in MEASUREMENTS}
    values.update(attrs)
    values[records.CONFIG_RAN] = result.config or None
    values[records.STATUS] = result.status
    for key, value in values.items():
        if value not in (None, {}):
            trial.set_user_attr(key, scrub(value) if isinstance(value, str) else value)  # no secret into the database
    state, told = _outcome(result)
    return study.tell(trial, told, state=state)


def _outcome(result: TrialResult) -> tuple[TrialState, list[float] | None]:
    if result.status == records.REJECTED:
        return TrialState.FAIL, None
    if result.status == PRUNED:  # Optuna records its last intermediate value as its value
        return TrialState.PRUNED, None
    return TrialState.COMPLETE, [result.objective]


class Heartbeat:
    """Beats for a running trial from a thread (a trial system attribute), so that the other workers can tell
    a trial in progress from one whose worker was killed. A beat that fails is tried again at the next one; beats
    that keep failing say so once on stderr, with the error (the other workers may then declare the trial dead)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._storage = optuna_compat.storage(study)
        self._trial_id = optuna_compat.trial_id(trial)
        self._number = trial.number
        self._failures = 0
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_KEY, time.time())

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except UpdateFinishedTrialError:
                return  # told meanwhile (by this worker, or settled by another): nothing left to keep alive
            except Exception as e:  # the thread goes on beating whatever failed: retried at the next beat
                self._failed(e)
            else:
                self._failures = 0

    def _failed(self, error: Exception) -> None:
        self._failures += 1
        if self._failures >= HEARTBEAT_FAILURES_TO_WARN and not self._warned:
            self._warned = True
            reason = scrub(str(error).splitlines()[0]) if str(error) else ""
            print(f"hybrid: warning: the heartbeat of trial {self._number} failed {self._failures} times in a row "
                  f"({type(error).__name__}: {reason}); the other workers may declare the trial dead",
                  file=sys.stderr)

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Reaper:
    """Settles the RUNNING trials of dead workers (killed, crashed, powered off).

    A trial is dead once its last beat is GRACE_SECONDS old (clocks of the machines in sync, as NTP keeps
    them), or, if it never beat (its worker died right after creating it), once this process has watched it
    stay silent for GRACE_SECONDS."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._silent_since: dict[int, float] = {}

    def sweep(self) -> list[FrozenTrial]:
        """The study's trials, after settling the dead ones."""
        trials = self.study.get_trials(deepcopy=False)
        running = {optuna_compat.trial_id(t): t for t in trials if t.state == TrialState.RUNNING}
        self._silent_since = {i: s for i, s in self._silent_since.items() if i in running}
        dead = [i for i, t in running.items() if self._dead(i, t)]
        for trial_id in dead:
            settle(self.study, trial_id)
        return self.study.get_trials(deepcopy=False) if dead else trials

    def _dead(self, trial_id: int, trial: FrozenTrial) -> bool:
        beat = trial.system_attrs.get(HEARTBEAT_KEY)
        if beat is not None:
            return time.time() - beat > GRACE_SECONDS
        return time.monotonic() - self._silent_since.setdefault(trial_id, time.monotonic()) > GRACE_SECONDS


def settle(study: optuna.Study, trial_id: int) -> None:
    """Finish a trial its worker left RUNNING: with its outcome if `status` was recorded, else FAIL (and an
    enqueued config, such as the baseline, is enqueued again so that it still runs)."""
    storage = optuna_compat.storage(study)
    trial = storage.get_trial(trial_id)
    recorded = records.STATUS in trial.user_attrs
    state, values = _outcome(TrialResult.from_dict(trial.user_attrs)) if recorded else (TrialState.FAIL, None)
    try:
        storage.set_trial_state_values(trial_id, state, values)
    except UpdateFinishedTrialError:
        return  # settled meanwhile, by its worker or another
    fixed = trial.system_attrs.get("fixed_params")
    if not recorded and fixed is not None:
        study.enqueue_trial(fixed, user_attrs={records.SOURCE: trial.user_attrs.get(records.SOURCE, "enqueued")})


# -- generations ------------------------------------------------------------------------------------------

def save_generation(study: optuna.Study, number: int, record: dict[str, Any]) -> None:
    study.set_user_attr(f"{GEN_PREFIX}{number}", record)


def load_generations(study: optuna.Study) -> dict[int, dict[str, Any]]:
    attrs = study.user_attrs
    return {int(k[len(GEN_PREFIX):]): v for k, v in attrs.items() if k.startswith(GEN_PREFIX)}
