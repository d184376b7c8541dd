"""Progress of a run: trials, failures, best val_bpb, budget used and left, seconds per trial."""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import optuna
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hybrid import records, store

if TYPE_CHECKING:
    from hybrid.config import Budget, RunConfig

LINE_EVERY_SECONDS = 5.0  # without a terminal: one log line at most this often


class RunProgress:
    def __init__(self, study: optuna.Study, config: RunConfig, budget: Budget, *, enabled: bool) -> None:
        self.study, self.config, self.budget, self.enabled = study, config, budget, enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.started = time.monotonic()
        self.last_line = 0.0
        self.bar: Progress | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                                TimeElapsedColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(f"{self.config.method} {self.config.study}", total=self._total(), stats="")
        elif self.enabled:
            print(f"hybrid: {self.config.method} on study {self.config.study!r} ({self.config.objective}, "
                  f"{self.config.profile}), budget {self._describe_total()}", file=sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _total(self) -> float:
        return float(self.budget.trials) if self.budget.trials is not None else self.budget.seconds / 3600

    def _describe_total(self) -> str:
        return f"{self.budget.trials} trials" if self.budget.trials is not None else f"{self.budget.seconds / 3600:g} GPU-hours"

    def stats(self) -> tuple[str, float]:
        finished = store.finished_trials(self.study)
        ok = [v for t in finished if (v := records.ok_value(t)) is not None]
        failed = len(finished) - len(ok)
        hours = store.seconds_used(finished) / 3600
        done = len(finished) if self.budget.trials is not None else hours
        per_trial = store.seconds_used(finished) / max(1, len(finished))
        remaining = max(0, self.budget.trials - len(finished)) if self.budget.trials is not None else None
        left = (f"{remaining} trial{'' if remaining == 1 else 's'} left" if remaining is not None
                else f"{max(0.0, self.budget.seconds / 3600 - hours):.3f} h left")
        best = f"{min(ok):.4f}" if ok else "-"
        text = (f"trials {len(finished)} ({failed} failed)  best val_bpb {best}  "
                f"used {hours:.3f} h, {left}  {per_trial:.1f} s/trial")
        return text, done

    def update(self, trial: optuna.trial.FrozenTrial) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.live and now - self.last_line < LINE_EVERY_SECONDS and self.config.objective == "surrogate":
            return
        text, done = self.stats()
        if self.bar is not None:
            self.bar.update(self.task, completed=done, stats=text)
        else:
            status = trial.user_attrs.get("status")
            value = trial.user_attrs.get("val_bpb")
            shown = f"{value:.4f}" if status == "ok" and value is not None else status
            print(f"trial {trial.number} [{trial.user_attrs.get('source')}] {shown} | {text}", file=sys.stderr)
        self.last_line = now

    def summary(self) -> None:
        if not self.enabled:
            return
        text, _ = self.stats()
        print(f"hybrid: study {self.config.study!r} {text}", file=sys.stderr)
        print(f"hybrid: continue with `hybrid resume --study {self.config.study} --storage {self.config.storage}`; "
              f"look with `hybrid report --storage {self.config.storage} --study {self.config.study} --out DIR`",
              file=sys.stderr)
