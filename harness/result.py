"""The result of one trial, as written by the harness (never parsed from train.py's output)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

OK = "ok"
# Failure classes. The first five come from running train.py; the others are decided before it runs.
FAILURES = ("oom", "crash", "timeout", "nan", "invalid", "rejected", "oom-predicted")
# Stopped by the run's pruner on an intermediate val_bpb (harness.training): no final value, and not a failure.
PRUNED = "pruned"
PENALTY = 100.0  # the val_bpb a failed trial is reported as to the samplers (the paper's convention)
# Words of allocation failures, lower case: the CUDA caching allocator and runtime, cuBLAS, cuDNN, the CPU allocator.
OOM_PATTERNS = ("out of memory", "cuda_error_out_of_memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cudnn_status_not_enough_workspace", "can't allocate memory", "cannot allocate memory", "bad_alloc")


def is_oom(message: str) -> bool:
    """Whether an error message or log text tells of a failed memory allocation."""
    message = message.lower()
    return any(pattern in message for pattern in OOM_PATTERNS)


@dataclass
class TrialResult:
    status: str = OK                       # "ok" or one of FAILURES
    val_bpb: float | None = None
    error: str | None = None               # one line: why it failed
    training_seconds: float = 0.0          # on the harness clock
    startup_seconds: float = 0.0           # process start until the clock ran (imports, data, build, compile)
    eval_seconds: float = 0.0
    total_seconds: float = 0.0             # wall time of the whole trial: what it costs the budget
    peak_memory_mb: float | None = None    # CUDA max allocated, or the process's peak RSS on CPU
    peak_reserved_mb: float | None = None  # CUDA max reserved (what a cap and an OOM concern); None on CPU
    tokens_per_second: float | None = None
    mfu: float | None = None               # model FLOPs utilization, CUDA only
    num_params: int | None = None
    num_steps: int = 0
    total_tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the knob values that ran (after snapping)
    # Where the wall time went, seconds: imports (interpreter, torch), data (tokenizer, token cache), setup
    # (train.py until its clock ran: model, optimizers, compilation, warm-up steps), training, intermediate
    # (evaluations at checkpoints, off the clock), eval, teardown.
    phases: dict[str, float] = field(default_factory=dict)
    log_path: str | None = None
    intermediate: list[list[float]] = field(default_factory=list)  # [fraction of the budget, val_bpb of the slice]

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def objective(self) -> float:
        """What the sampler is told: val_bpb, or the penalty for a failure."""
        return self.val_bpb if self.ok and self.val_bpb is not None else PENALTY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> TrialResult:
        return cls.from_dict(json.loads(path.read_text()))
