"""Method `llm-code`: an LLM edits train.py; a better val_bpb keeps the change, anything else reverts it (autoresearch).

Each edit that passes the guard is a candidate generation; a kept one becomes the incumbent and a commit on the
run's branch (the study's Lineage: hybrid.study.generations). The agent is shown the incumbent's train.py with the knob
values that ran written in, so an edit's literals are the config it runs with: the new generation's space is the
declared space restricted to the knobs the edited file still assigns validly, and its config is those values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from harness.knobs import find_knobs, inject_knobs
from hybrid.study import generations, records, store
from hybrid.classical.move_sampler import MoveSampler
from hybrid.study.generations import Generation, Lineage
from hybrid.llm import prompts
from hybrid.llm.agent import failure_attrs, read_program, reply_attrs
from hybrid.llm.client import Advisor, ProviderError, make_provider
from hybrid.llm.edits import describe, read_edit
from hybrid.llm.guard import PatchRejected, check_patch
from hybrid.move import Move
from hybrid.study.records import ok_value
from hybrid.space import SearchSpace, SpaceError

if TYPE_CHECKING:
    from hybrid.config import RunConfig

ALIVE = ("base", "kept")  # generations the incumbent may come from
DIFF_CHARS = 20_000       # of a diff kept with its trial (the generation keeps all of it)


def generation_space(declared: SearchSpace, code: str) -> tuple[SearchSpace, dict[str, Any]]:
    """The declared knobs that `code` still assigns with a value inside the space, and those values."""
    found = find_knobs(code)
    knobs, config = {}, {}
    for name, knob in declared.knobs.items():
        if name not in found:
            continue
        try:
            config[name] = knob.check(found[name].value)
        except SpaceError:
            continue  # a value outside the declared range: the file's own, no longer tuned
        knobs[name] = knob
    if not knobs:
        raise PatchRejected("the edit leaves none of the search space's knobs in train.py")
    return SearchSpace(knobs), config


def diff_summary(diff: str) -> str:
    lines = diff.splitlines()
    added = sum(1 for s in lines if s.startswith("+") and not s.startswith("+++"))
    removed = sum(1 for s in lines if s.startswith("-") and not s.startswith("---"))
    return f"+{added} -{removed} lines"


@dataclass(frozen=True)
class Incumbent:
    """The best kept generation, the config it ran with, and its val_bpb (None while nothing succeeded)."""
    generation: Generation
    config: dict[str, Any]
    value: float | None

    @property
    def code(self) -> str:
        """Its train.py with the config written in: what the agent sees and edits."""
        return inject_knobs(self.generation.code, self.config)

    @property
    def space(self) -> SearchSpace:
        return self.generation.search_space()


def incumbent(gens: dict[int, Generation], trials: list[FrozenTrial]) -> Incumbent:
    """The best trial of a base or kept generation; generation 0 with the baseline's config before any success."""
    ran = [t for t in trials if gens[t.user_attrs[records.GENERATION]].status in ALIVE]
    ok = [t for t in ran if ok_value(t) is not None]
    if ok:
        best = min(ok, key=ok_value)
        return Incumbent(gens[best.user_attrs[records.GENERATION]], dict(best.params), ok_value(best))
    baseline = next((t for t in ran if t.user_attrs.get(records.GENERATION) == 0 and t.params), None)
    base = gens[0].search_space()
    return Incumbent(gens[0], dict(baseline.params) if baseline else base.defaults(), None)


def history(gens: dict[int, Generation], trials: list[FrozenTrial]) -> list[prompts.Change]:
    """The agent's past proposals in order: what ran (kept or reverted, with the diff and result) and what was refused."""
    changes, best = [], None
    for t in trials:
        attrs = t.user_attrs
        value = ok_value(t)
        if attrs.get(records.SOURCE) == "llm-code" and attrs.get(records.STATUS) == records.REJECTED:
            changes.append(prompts.Change("refused before running", attrs.get("description", ""),
                                          attrs.get(records.ERROR, "")))
        elif attrs.get(records.SOURCE) == "llm-code":
            gen = gens[attrs[records.GENERATION]]
            result = (f"val_bpb {value:.4f}" if value is not None
                      else f"{attrs.get(records.STATUS)}: {attrs.get(records.ERROR, '')}")
            before = f" (best before: {best:.4f})" if best is not None else ""
            changes.append(prompts.Change(f"generation {gen.number}, {gen.status}", gen.description, result + before, gen.diff))
        if value is not None and gens[attrs[records.GENERATION]].status in ALIVE:
            best = value if best is None else min(best, value)
    return changes


class LLMCodeMethod:
    """Propose an edit of the incumbent's train.py, run it once, keep it if it beats the incumbent, else revert."""

    def __init__(self, config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> None:
        self.space, self.code = space, code
        self.sampler = MoveSampler.random(seed)
        self.advisor = Advisor(make_provider(config))
        self.program = read_program(config.repo)
        self.foreign_base = code if config.repo else None  # the repository's own train.py (guard.check_code)
        self.lineage = Lineage(study, config.artifacts)
        with self.lineage.held():
            self.lineage.commit(self.lineage.load()[0])

    def next_move(self, study: optuna.Study) -> Move:
        gens, trials = generations.load_all(study), store.finished_trials(study)
        inc = incumbent(gens, trials)
        current = inc.code
        prefix = prompts.prefix(self.program, current, inc.space)
        try:
            reply = self.advisor.ask(prefix, prompts.code_task(history(gens, trials), inc.value))
        except ProviderError as e:
            return self._refused(inc, f"LLM provider error: {e}", failure_attrs(e))
        attrs = {**reply_attrs(reply), "description": describe(reply.text)}
        try:
            edit = read_edit(reply.text, current)
            attrs["edit_form"] = edit.form
            check_patch(current, edit.code, foreign_base=self.foreign_base)
            space, config = generation_space(self.space, edit.code)
        except PatchRejected as e:
            return self._refused(inc, e.reason, attrs)
        with self.lineage.held():  # the diff is against the file the agent saw
            gen = self.lineage.create(inc.generation, edit.code, space, edit.description, diff_from=current,
                                      agent="llm-code", form=edit.form)
        attrs.update(diff=gen.diff[:DIFF_CHARS], diff_summary=diff_summary(gen.diff))
        return Move("llm-code", gen.number, edit.code, space, config=config, attrs=attrs)

    def _refused(self, inc: Incumbent, reason: str, attrs: dict[str, Any]) -> Move:
        """A recorded rejection at the incumbent (zero time), its config pinned so that no sampler runs for it."""
        space = inc.space
        return Move("llm-code", inc.generation.number, inc.code, space,
                    config={k: v for k, v in inc.config.items() if k in space.knobs}, rejected=reason, attrs=attrs)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        if move.source != "llm-code" or move.rejected is not None:
            return
        with self.lineage.held():
            gens = self.lineage.load()
            gen = gens[move.generation]
            others = [t for t in store.finished_trials(study) if t.number != trial.number]
            best = incumbent(gens, others).value
            value = ok_value(trial)
            if value is not None and (best is None or value < best):
                self.lineage.commit(gen)
                self.lineage.settle(gen, "kept", trial=trial.number, val_bpb=value)
            else:
                self.lineage.settle(gen, "reverted", trial=trial.number, result=trial.user_attrs.get(records.STATUS))
