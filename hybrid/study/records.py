"""What a trial record holds, and the questions every module asks of one: is it finished, did it succeed, which
is the best. A trial's attributes (Optuna user attributes) are named here; hybrid.study.store writes them.

Trial attributes: SOURCE (who proposed the move: tpe, cmaes, llm-hp, catalog, repeat, baseline, import, ...),
GENERATION (the code generation that ran), CODE_SHA, SEED, METHOD, STATUS (ok or a failure class, written last),
VAL_BPB and the other measurements of harness.result.TrialResult (NUM_STEPS: optimizer steps, warm-up included),
ERROR (a failure's one-line reason), LOG_PATH, CONFIG_RAN (the knob values the trial ran), SURPLUS (a slot another
worker filled first: never counted), PRUNE_WITH (generations besides its own that the pruner compares it with:
hybrid.pruners), and the LLM usage of the move (LLM_TOKENS, LLM_COST_USD: hybrid.llm.client).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from harness.result import PRUNED  # the STATUS of a trial the pruner stopped early (Optuna's PRUNED)

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
PRUNE_WITH = "prune_with"
TOTAL_SECONDS = "total_seconds"
NUM_STEPS = "num_steps"
LLM_TOKENS = ("llm_input_tokens", "llm_output_tokens", "llm_cache_read_tokens", "llm_cache_write_tokens")
LLM_COST_USD = "llm_cost_usd"

OK = "ok"  # the STATUS of a trial that ran to a finite val_bpb
REJECTED = "rejected"  # the STATUS of a move refused before it ran (one of harness.result.FAILURES)
MIN_STEPS = 10  # a successful trial of fewer optimizer steps is flagged: its val_bpb says little


def is_finished(trial: FrozenTrial) -> bool:
    """A trial whose outcome was recorded (not an interrupted or still-running one)."""
    return trial.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) and STATUS in trial.user_attrs


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


def few_steps(trial: FrozenTrial, objective: str | None) -> bool:
    """A successful trial that ran fewer than MIN_STEPS optimizer steps, where the objective counts them (the
    surrogate and the benchmark predict whole runs; imported trials record no steps)."""
    steps = trial.user_attrs.get(NUM_STEPS)
    return (objective not in ("surrogate", "benchmark") and isinstance(steps, int) and steps < MIN_STEPS
            and ok_value(trial) is not None)


def failure_reason(trial: FrozenTrial) -> str | None:
    """`status: error` of a failed trial (its one-line reason), None for a success or a pruned trial."""
    status = trial.user_attrs.get(STATUS)
    if status in (OK, PRUNED):
        return None
    error = " ".join(str(trial.user_attrs.get(ERROR) or "").split())
    return f"{status}: {error}" if error else str(status)


@dataclass(frozen=True)
class LLMUsage:
    """The LLM tokens and dollars recorded with trials (a model without a listed price adds no dollars)."""
    tokens: int = 0
    usd: float = 0.0

    @classmethod
    def of(cls, trials: Iterable[FrozenTrial]) -> LLMUsage:
        tokens, usd = 0, 0.0
        for t in trials:
            tokens += sum(int(t.user_attrs.get(name) or 0) for name in LLM_TOKENS)
            usd += float(t.user_attrs.get(LLM_COST_USD) or 0.0)
        return cls(tokens, usd)
