"""What a trial record holds, and the questions every module asks of one: is it finished, did it succeed, which
is the best. A trial's attributes (Optuna user attributes) are named here; hybrid.store writes them.

Trial attributes: SOURCE (who proposed the move: tpe, cmaes, llm-hp, catalog, repeat, baseline, import, ...),
GENERATION (the code generation that ran), CODE_SHA, SEED, METHOD, STATUS (ok or a failure class, written last),
VAL_BPB and the other measurements of harness.result.TrialResult, ERROR (a failure's one-line reason), LOG_PATH,
CONFIG_RAN (the knob values the trial ran), SURPLUS (a slot another worker filled first: never counted).
"""
from __future__ import annotations

import math

from optuna.trial import FrozenTrial, TrialState

SOURCE = "source"
GENERATION = "generation"
CODE_SHA = "code_sha"
SEED = "seed"
METHOD = "method"
STATUS = "status"
VAL_BPB = "val_bpb"
ERROR = "error"
LOG_PATH = "log_path"
CONFIG_RAN = "config_ran"
SURPLUS = "surplus"
TOTAL_SECONDS = "total_seconds"

OK = "ok"  # the STATUS of a trial that ran to a finite val_bpb


def is_finished(trial: FrozenTrial) -> bool:
    """A trial whose outcome was recorded (not an interrupted or still-running one)."""
    return trial.state in (TrialState.COMPLETE, TrialState.FAIL) and STATUS in trial.user_attrs


def ok_value(trial: FrozenTrial) -> float | None:
    """The trial's val_bpb if it ran to a finite result, else None."""
    value = trial.user_attrs.get(VAL_BPB)
    if trial.user_attrs.get(STATUS) != OK or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The successful trial with the lowest val_bpb (the earliest among equals); None before any success."""
    ok = [t for t in trials if ok_value(t) is not None]
    return min(ok, key=lambda t: (ok_value(t), t.number)) if ok else None
