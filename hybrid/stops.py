"""When a run stops before its budget, with exit status 2 and one line (the study stays resumable): its baseline
failed (nothing after it can be judged), or its trials keep failing for the same reason. Only trials finished
since the run started count towards a streak, so that `hybrid resume` after a fix starts afresh; a failed baseline
is run again by the resumed run (retry_failed_baseline) before anything else."""
from __future__ import annotations

import datetime
from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hybrid.study import records, store
from hybrid.errors import UserError

# `oom-predicted` trials in a row (they cost no time) after which a run stops: every config is over the cap.
REFUSALS_IN_A_ROW = 100
REFUSED = "oom-predicted"
BASELINE = "baseline"


class StopRules:
    """The rules of one run: `check` raises UserError when the study's recent trials say the run must stop."""

    def __init__(self, study_name: str, storage: str, max_failures_in_a_row: int,
                 since: datetime.datetime | None = None) -> None:
        self.study_name, self.storage = study_name, store.masked_url(storage)
        self.max_failures_in_a_row = max_failures_in_a_row
        self.since = since or datetime.datetime.now()  # Optuna's datetime_complete: local time, naive

    def check(self, trials: Iterable[FrozenTrial]) -> None:
        """`trials`: the study's, finished or not."""
        trials = list(trials)
        self._baseline(trials)
        recent = sorted((t for t in trials if records.is_finished(t) and t.datetime_complete >= self.since),
                        key=lambda t: (t.datetime_complete, t.number))
        self._streak(recent)

    def _resume(self) -> str:
        return f"`hybrid resume --study {self.study_name} --storage {self.storage}`"

    def _baseline(self, trials: list[FrozenTrial]) -> None:
        """The study's last baseline failed (and none is waiting to run again)."""
        baselines = [t for t in trials if t.user_attrs.get(records.SOURCE) == BASELINE]
        if not baselines or not records.is_finished(last := baselines[-1]) or records.ok_value(last) is not None:
            return
        hint = " (raise --vram-cap-gb, or --no-memory-model)" if last.user_attrs.get(records.STATUS) == REFUSED else ""
        raise UserError(f"study {self.study_name!r}: the baseline (trial {last.number}) failed, so nothing after it "
                        f"can be judged: {records.failure_reason(last)}{_log(last)}; fix it{hint}, then "
                        f"{self._resume()} runs the baseline again")

    def _streak(self, recent: list[FrozenTrial]) -> None:
        if not recent:
            return
        last = recent[-1]
        key = _streak_key(last)
        if key is None:
            return
        count = 0
        for trial in reversed(recent):
            if _streak_key(trial) != key:
                break
            count += 1
        refused = key == REFUSED
        if count < (REFUSALS_IN_A_ROW if refused else self.max_failures_in_a_row):
            return
        if refused:
            raise UserError(f"study {self.study_name!r}: the memory model refused {count} configs in a row as over the "
                            f"VRAM cap ({last.user_attrs.get(records.ERROR)}): raise --vram-cap-gb, narrow the search "
                            "space, or turn the model off with --no-memory-model")
        raise UserError(f"study {self.study_name!r}: {count} trials in a row failed the same way (trials "
                        f"{recent[-count].number}-{last.number}: {key}){_log(last)}; fix the cause, then "
                        f"{self._resume()} continues the study")


def _streak_key(trial: FrozenTrial) -> str | None:
    """What makes failures `the same`: a refusal of the memory model (whatever its figures), else the failure class
    and its message; None for a success."""
    if trial.user_attrs.get(records.STATUS) == REFUSED:
        return REFUSED
    return records.failure_reason(trial)


def _log(trial: FrozenTrial) -> str:
    path = trial.user_attrs.get(records.LOG_PATH)
    return f" (log {path})" if path else ""


def retry_failed_baseline(study: optuna.Study) -> bool:
    """Enqueue the baseline again when its last run failed and none waits or runs (a resume after a fix)."""
    baselines = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(records.SOURCE) == BASELINE]
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) or records.ok_value(t) is not None for t in baselines):
        return False
    failed = [t for t in baselines if records.is_finished(t)]
    if not failed:
        return False
    study.enqueue_trial(dict(failed[-1].params), user_attrs={records.SOURCE: BASELINE})
    return True
