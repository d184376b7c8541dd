"""The console of a run (stderr): one line per finished trial, and the progress of the study (a bar on a terminal,
a line now and then otherwise): budget used, best val_bpb, failures, ETA, elapsed time and LLM spending. Every line
names its study, since `compare` and `reproduce` run several at once."""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from hybrid.study import records, store

if TYPE_CHECKING:
    from hybrid.config import Budget, RunConfig

LINE_EVERY_SECONDS = 30.0  # without a terminal: a progress line at most this often (and after the first trial)
RATE_WINDOW = 20           # the last trials finished in this run, whose pace gives the ETA
BAR_WIDTH = 12
LABEL_WIDTH = 24           # columns of the bar's label (method and study) at most
SEPARATOR = "  "
UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0))


def unit_of(seconds: float) -> tuple[str, float]:
    """The unit a duration reads best in: hours from 2 h, minutes from 2 min, else seconds."""
    return next(((name, size) for name, size in UNITS if seconds >= 2 * size), UNITS[-1])


def in_unit(seconds: float, unit: tuple[str, float]) -> str:
    name, size = unit
    return f"{seconds / size:.0f}" if name == "s" else f"{seconds / size:.1f}"


def duration(seconds: float) -> str:
    """`45 s`, `12.5 min`, `3.2 h`."""
    unit = unit_of(seconds)
    return f"{in_unit(seconds, unit)} {unit[0]}"


def fit(parts: list[str], width: int) -> str:
    """The parts, most important first, that fit in `width` columns together."""
    kept: list[str] = []
    for part in parts:
        if len(SEPARATOR.join([*kept, part])) <= width:
            kept.append(part)
    return SEPARATOR.join(kept)


def trial_line(trial: FrozenTrial, objective: str) -> Text:
    """`trial 7  tpe  gen 0  ok  val_bpb 0.9912  312 s`; a failure adds its reason and log, a success of few steps
    a warning."""
    attrs = trial.user_attrs
    status = str(attrs.get(records.STATUS))
    value = records.ok_value(trial)
    head = f"trial {trial.number}  {attrs.get(records.SOURCE, '-')}  gen {attrs.get(records.GENERATION, 0)}  "
    seconds = f"  {duration(float(attrs.get(records.TOTAL_SECONDS) or 0.0))}"
    if value is not None:
        line = Text(head).append(status, "green").append(f"  val_bpb {value:.4f}{seconds}")
        if records.few_steps(trial, objective):
            line.append(f"  only {attrs[records.NUM_STEPS]} optimizer steps (< {records.MIN_STEPS}): "
                        "its val_bpb says little", "yellow")
        return line
    error = " ".join(str(attrs.get(records.ERROR) or "").split())
    log = attrs.get(records.LOG_PATH)
    return (Text(head).append(status, "red").append(seconds).append(f"  {error}" if error else "")
            .append(f"  log {log}" if log else "", "dim"))


@dataclass(frozen=True)
class Stats:
    """The study's numbers at one moment (finished trials: all of them, this run's included)."""
    finished: int
    pruned: int  # stopped early by the pruner: not a fault
    failed: int
    best: float | None
    seconds_used: float
    llm: records.LLMUsage
    done: float                # in the bar's units: trials, or seconds of trial time
    eta_seconds: float | None  # wall time to the budget at the recent pace


class RunProgress:
    def __init__(self, study: optuna.Study, config: RunConfig, budget: Budget, *, enabled: bool) -> None:
        self.study, self.config, self.budget, self.enabled = study, config, budget, enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now()  # Optuna's datetime_complete: local time, naive
        self.last_line = -LINE_EVERY_SECONDS
        self.bar: Progress | None = None
        self.stats = self._stats()

    # -- what is shown ----------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return f"[{self.config.study}]"

    @property
    def total(self) -> float:
        return float(self.budget.trials) if self.budget.trials is not None else float(self.budget.seconds)

    def _stats(self) -> Stats:
        finished = store.finished_trials(self.study)
        values = [v for t in finished if (v := records.ok_value(t)) is not None]
        pruned = sum(t.user_attrs.get(records.STATUS) == records.PRUNED for t in finished)
        used = store.seconds_used(finished)
        done = float(len(finished)) if self.budget.trials is not None else used
        failed = len(finished) - len(values) - pruned
        return Stats(len(finished), pruned, failed, min(values, default=None), used,
                     records.LLMUsage.of(self.study.get_trials(deepcopy=False)), done, self._eta(finished, done))

    def _eta(self, finished: list[FrozenTrial], done: float) -> float | None:
        """Wall seconds left at the pace of the last RATE_WINDOW trials finished in this run."""
        recent = sorted((t for t in finished if t.datetime_complete and t.datetime_complete >= self.started_at),
                        key=lambda t: t.datetime_complete)
        if not recent:
            return None
        window = recent[-RATE_WINDOW:]
        since = recent[-RATE_WINDOW - 1].datetime_complete if len(recent) > RATE_WINDOW else self.started_at
        span = (datetime.datetime.now() - since).total_seconds()
        units = len(window) if self.budget.trials is not None else store.seconds_used(window)
        if span <= 0 or units <= 0:
            return None
        return max(0.0, self.total - done) / (units / span)

    def budget_text(self) -> str:
        """`12/30 trials`, `2.1/15.0 min of trial time`, or `3.2/24.0 GPU-hours` on the gpu profile."""
        if self.budget.trials is not None:
            return f"{self.stats.finished}/{self.budget.trials} trials"
        if self.config.profile == "gpu":
            return f"{self.stats.seconds_used / 3600:.2f}/{self.total / 3600:g} GPU-hours"
        unit = unit_of(self.total)
        return (f"{in_unit(self.stats.seconds_used, unit)}/{in_unit(self.total, unit)} {unit[0]} of trial time")

    def parts(self, *, eta: bool = True) -> list[str]:
        """The progress, most important first."""
        s = self.stats
        parts = [self.budget_text()]
        if eta and s.eta_seconds is not None:
            parts.append(f"ETA {duration(s.eta_seconds)}")
        parts += [f"best {s.best:.4f}" if s.best is not None else "best -"]
        parts += [f"{s.pruned} pruned"] if s.pruned else []
        parts += [f"{s.failed} failed", f"elapsed {duration(time.monotonic() - self.started)}"]
        if s.llm.tokens or self.config.llm not in (None, "none"):
            cap = f" of ${self.config.llm_max_usd:g}" if self.config.llm_max_usd is not None else ""
            parts.append(f"LLM {s.llm.tokens / 1000:.1f}k tok ${s.llm.usd:.2f}{cap}")
        return parts

    # -- the display ------------------------------------------------------------------------------------------

    def __enter__(self) -> RunProgress:
        if self.live:
            label = f"{self.config.method} {self.config.study}"
            label = label if len(label) <= LABEL_WIDTH else label[:LABEL_WIDTH - 1] + "…"
            width = max(0, self.console.width - len(label) - BAR_WIDTH - 2)
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=BAR_WIDTH),
                                _StatusColumn(self, width), console=self.console)
            self.bar.start()  # filled to what the study had already done (a resumed one)
            self.task = self.bar.add_task(label, total=self.total, completed=min(self.stats.done, self.total))
        elif self.enabled:
            self.say(f"{self.config.method} ({self.config.objective} objective, {self.config.profile} profile), "
                     f"budget {self._describe_total()}; {SEPARATOR.join(self.parts(eta=False)[:3])}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _describe_total(self) -> str:
        if self.budget.trials is not None:
            return f"{self.budget.trials} trials"
        return f"{self.total / 3600:g} GPU-hours" if self.config.profile == "gpu" else f"{duration(self.total)} of trial time"

    def say(self, text: str | Text) -> None:
        """A line naming the study (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(Text.assemble(self.label, " ", text), soft_wrap=True, highlight=False)

    def update(self, trial: FrozenTrial) -> None:
        """A trial finished: its line, then the progress."""
        if not self.enabled:
            return
        self.say(trial_line(trial, self.config.objective))
        self.stats = self._stats()
        if self.bar is not None:
            self.bar.update(self.task, completed=min(self.stats.done, self.total))
        elif time.monotonic() - self.last_line >= LINE_EVERY_SECONDS:
            self.say(SEPARATOR.join(self.parts()))
            self.last_line = time.monotonic()

    def stopped(self, number: int) -> None:
        self.say(f"stopped: trial {number} was killed and does not count (`hybrid resume` runs its slot again)")

    def summary(self, *, resumable: bool = True) -> None:
        """The study at the end of the run; how to continue it unless its budget is spent (or `resumable` is
        False: going on would stop again at once), and how to look at it."""
        if not self.enabled:
            return
        self.stats = self._stats()
        self.say(SEPARATOR.join(self.parts(eta=False)))
        storage = store.masked_url(self.config.storage)
        report = f"`hybrid report --storage {storage} --study {self.config.study} --out DIR`"
        if self.stats.done >= self.total:
            self.say(f"the study spent its budget ({self.budget_text()}); look with {report}")
        elif resumable:
            self.say(f"continue with `hybrid resume --study {self.config.study} --storage {storage}`; look with {report}")
        else:
            self.say(f"look with {report}")


class _StatusColumn(ProgressColumn):
    """The progress parts that fit beside the bar, elapsed time live."""

    def __init__(self, progress: RunProgress, width: int) -> None:
        super().__init__()
        self.progress, self.width = progress, width

    def render(self, task: Task) -> Text:
        return Text(fit(self.progress.parts(), self.width))
