"""The hybrid method: the classical sampler tunes the current generation's knobs; when the generation is due, a
structural agent proposes a code mutation that opens new knobs, and the new generation, warm-started from
its parent and first probed at the parent's incumbent one new knob at a time (hybrid.probes), is kept only if it
beats the parent by more than the measured noise. Verdicts compare fresh re-runs
(hybrid.promotion): of the parent's incumbent, of the candidate's incumbent, and of the candidate's incumbent with its
move switched off (the control), never the runs that selected an incumbent.

Everything is derived from the study at every move (generations, their trials, repeats, verdicts), so a
resumed run and the other workers of the study reconstruct the same state. Structural moves and verdicts are
made under the study's structural lease, one worker at a time; the others keep tuning meanwhile.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from harness.knobs import KnobError
from hybrid import evidence
from hybrid.study import generations, records
from hybrid.classical.move_sampler import MoveSampler
from hybrid.classical.samplers import make_sampler
from hybrid.classical.warmstart import best_configs, cma_source_trials
from hybrid.study.generations import Generation, Lineage
from hybrid.move import Move
from hybrid.probes import joint_probe, probe_configs
from hybrid.promotion import (REPEATS, Schedule, control_config, fresh_score, incumbent, is_tuning, judge,
                              pooled_noise, runs_of, score)
from hybrid.study.records import ok_value
from hybrid.space import Knob, SearchSpace, SpaceError, check_against_code
from hybrid.llm.catalog import CatalogAgent
from hybrid.llm.structural_agent import LLMStructuralAgent
from hybrid.structural import Context, Proposal, StructuralAgent

if TYPE_CHECKING:
    from hybrid.config import RunConfig

# (mutate every M trials, stagnation after W) by profile: a few generations within the profile's default budget.
# Kept as they were by the structural benchmark (benchmarks/results/structural_benchmark.md): no schedule tried
# differed in false promotions or power; mutating most often ended worst (a hint, within the intervals).
DEFAULT_SCHEDULES = {"gpu": Schedule(30, 15), "cpu": Schedule(6, 3), "test": Schedule(3, 2)}
WARM_CONFIGS = 2   # tpe/gp: the parent's best configs (projected) that a new generation runs first
# tpe/gp: trials of a generation before its model takes over (the baseline, or a child's warm starts): few, so
# that a generation searches around its best configs so far rather than uniformly; big jumps are structural.
# (A whole study of the tpe or gp method starts with hybrid.classical.samplers.STUDY_N_STARTUP random trials.)
GENERATION_N_STARTUP = 2
# Plans per move: a verdict changes the current generation, so the move is planned again; after this many (other
# workers deciding meanwhile) the worker tunes the current generation instead.
PLANS_PER_MOVE = 3
# Seed offset per generation number, so that each generation's sampler draws a sequence of its own (a prime, like
# the offset per worker, hybrid.loop.WORKER_SEED_STRIDE, but another one).
GENERATION_SEED_STRIDE = 1009


@dataclass
class Snapshot:
    """The study as the hybrid method sees it: generations, and their trials (finished, or also in flight)."""
    generations: dict[int, Generation]
    finished: dict[int, list[FrozenTrial]]
    attempted: dict[int, list[FrozenTrial]]  # finished or running
    last_trial: int

    @classmethod
    def load(cls, study: optuna.Study) -> Snapshot:
        trials = study.get_trials(deepcopy=False)
        gens = generations.load_all(study)
        finished: dict[int, list[FrozenTrial]] = {n: [] for n in gens}
        attempted: dict[int, list[FrozenTrial]] = {n: [] for n in gens}
        for t in trials:
            number = t.user_attrs.get(records.GENERATION)
            if number not in gens:
                continue
            if records.is_finished(t):
                finished[number].append(t)
            if records.is_finished(t) or t.state == TrialState.RUNNING:
                attempted[number].append(t)
        return cls(gens, finished, attempted, max((t.number for t in trials), default=-1))

    @property
    def current(self) -> Generation:
        """The candidate on probation if there is one, else the latest promoted generation (or the base)."""
        candidates = [g for g in self.generations.values() if g.status == "candidate"]
        if candidates:
            return max(candidates, key=lambda g: g.number)
        return max((g for g in self.generations.values() if g.status in ("base", "promoted")), key=lambda g: g.number)

    @property
    def noise(self) -> float | None:
        return pooled_noise(self.finished)

    def epoch_after(self, number: int) -> int:
        """The last trial number before the generation's latest child was created (-1 without children)."""
        return max((g.created_after_trial for g in self.generations.values() if g.parent == number), default=-1)

    def parent_trials(self, generation: Generation) -> list[FrozenTrial]:
        """The parent's trials that had finished when `generation` was created: what it is warm-started from.

        Recorded by number: with several workers, a parent trial older than the generation may finish after it."""
        numbers = set(generation.warm_start_trials)
        return [t for t in self.finished.get(generation.parent, []) if t.number in numbers]


@dataclass(frozen=True)
class Due:
    """A structural action the current generation is ready for: its verdict (a candidate) or a mutation."""
    generation: Generation
    reason: str


class HybridMethod:
    """Structural mutations by an agent (the catalog or an LLM), numeric knobs by a classical sampler."""

    def __init__(self, config: RunConfig, study: optuna.Study, space: SearchSpace, code: str, seed: int) -> None:
        self.config, self.seed, self.study = config, seed, study
        self.sampler_name = config.sampler or "tpe"
        default = DEFAULT_SCHEDULES.get(config.profile or "gpu", DEFAULT_SCHEDULES["gpu"])
        self.schedule = Schedule(config.mutate_every or default.mutate_every, config.stagnation or default.stagnation)
        self.repeats = config.repeats or REPEATS
        self.agent: StructuralAgent = CatalogAgent() if config.llm in (None, "none") else LLMStructuralAgent(config)
        self.sampler = MoveSampler(self._make_sampler)
        self.lineage = Lineage(study, config.artifacts)
        self.lease = self.lineage.lease

    # -- the Method protocol ------------------------------------------------------------------------------

    def next_move(self, study: optuna.Study) -> Move:
        for _ in range(PLANS_PER_MOVE):  # a verdict changes the current generation: plan again
            plan = self._plan(Snapshot.load(study))
            if isinstance(plan, Move):
                return plan
            if not self.lease.try_acquire():
                return self._tune(plan.generation)  # another worker is making the structural move
            try:
                plan = self._plan(Snapshot.load(study))  # what holds under the lease
                move = plan if isinstance(plan, Move) else self._act(study, plan)
            finally:
                self.lease.release()
            if move is not None:
                return move
        return self._tune(Snapshot.load(study).current)

    def observe(self, study: optuna.Study, trial: FrozenTrial, move: Move) -> None:
        """Nothing to keep: the next move is derived from the study."""

    def summary(self) -> None:
        """The lineage, printed at the end of a run."""
        print(format_lineage(lineage_table(self.study)), file=sys.stderr)

    # -- planning -----------------------------------------------------------------------------------------

    def _plan(self, snap: Snapshot) -> Move | Due:
        gen = snap.current
        warm = self._warm_start(snap, gen)
        if warm is not None:
            return warm
        reason = self.schedule.due(snap.finished[gen.number], snap.epoch_after(gen.number), snap.noise)
        if reason is None:
            return self._tune(gen)
        best = incumbent(snap.finished[gen.number])
        if best is not None:
            for config, attrs in _fresh_runs(gen, best):
                rerun = [t for t in runs_of(snap.attempted[gen.number], config) if not is_tuning(t)]
                if len(rerun) < self.repeats:
                    return self._move("repeat", gen, config=config, attrs=attrs)
        return Due(gen, reason)

    def _warm_start(self, snap: Snapshot, gen: Generation) -> Move | None:
        """A candidate's first trials: the parent's incumbent, its probes (each new knob moved alone), their joint
        probe (the knobs that improved, together), then (tpe, gp) the parent's next best configs."""
        if gen.status != "candidate":
            return None
        configs = _warm_configs(snap, gen)
        tried = snap.attempted[gen.number]
        if not tried:
            return self._first_move(gen, configs[0])
        space = gen.search_space()
        knobs = [space.knobs[name] for name in gen.new_knobs]
        probes = _untried(tried, probe_configs(configs[0], knobs))
        if probes:
            return self._move("probe", gen, config=probes[0])
        joint = _joint_probe(snap.finished[gen.number], configs[0], knobs)
        if joint is not None and not runs_of(tried, joint):
            return self._move("probe", gen, config=joint, attrs={"joint_probe": True})
        if self.sampler_name == "cmaes":
            return None  # CMA-ES is warm-started through its source trials instead
        fresh = _untried(tried, configs[1:])
        return self._move("warmstart", gen, config=fresh[0]) if fresh else None

    def _first_move(self, gen: Generation, incumbent_config: dict[str, Any]) -> Move:
        """A candidate's first trial: the parent's incumbent, projected into the candidate's space."""
        return self._move(gen.agent or "catalog", gen, config=incumbent_config, attrs={"mutation": gen.mutation})

    def _tune(self, gen: Generation) -> Move:
        return self._move(self.sampler_name, gen)

    def _move(self, source: str, gen: Generation, *, config: dict[str, Any] | None = None,
              rejected: str | None = None, space: SearchSpace | None = None,
              attrs: dict[str, Any] | None = None) -> Move:
        """A move on `gen`; a candidate's trials are screened against its parent's learning curves when the run
        prunes (low fidelity first; repeats, which judge it, never are: hybrid.pruners.UNPRUNED)."""
        screen = (gen.parent,) if gen.status == "candidate" and gen.parent is not None else ()
        return Move(source, gen.number, gen.code, space or gen.search_space(), config, rejected, attrs or {},
                    prune_with=screen)

    # -- structural actions (under the lease) -------------------------------------------------------------

    def _act(self, study: optuna.Study, due: Due) -> Move | None:
        """Judge a candidate (None: plan again), or mutate the current generation."""
        snap = Snapshot.load(study)
        if due.generation.status == "candidate":
            gen = due.generation
            trials = snap.finished[gen.number]
            best = incumbent(trials)
            control = fresh_score(trials, control_config(dict(best.params), gen.new_knobs)) if best else None
            verdict = judge(score(snap.finished[gen.parent]), score(trials), snap.noise, control)
            if not self.lease.renew():
                return None  # it expired meanwhile: whoever holds it now decides
            self.lineage.settle(gen, "promoted" if verdict.promoted else "rejected", verdict=verdict,
                                decided_after_trial=snap.last_trial)
            return None
        return self._mutate(study, snap, due)

    def _mutate(self, study: optuna.Study, snap: Snapshot, due: Due) -> Move:
        parent = due.generation
        best = incumbent(snap.finished[parent.number])
        found = evidence.gather(snap.generations, snap.finished[parent.number], parent.search_space(), snap.noise)
        context = Context(parent, snap.generations, dict(best.params) if best else parent.search_space().defaults(),
                          ok_value(best) if best else None, found)
        proposal = self.agent.propose(context)
        if proposal is None:
            return self._tune(parent)  # the agent has nothing left to try: tuning goes on
        foreign_base = snap.generations[0].code if self.config.repo else None  # the repository's own train.py
        rejected = proposal.rejected or _check(parent, proposal, foreign_base)
        space = parent.search_space() if rejected else parent.search_space().with_changes(proposal.added,
                                                                                          proposal.removed)
        if not self.lease.renew():
            return self._tune(parent)  # the agent took longer than the lease: another worker may be mutating
        gen = self.lineage.create(  # under the lease: the number is ours
            parent, proposal.code, space, proposal.description, status="rejected" if rejected else "candidate",
            mutation=proposal.name, agent=self.agent.source, trigger=due.reason, reason=rejected,
            new_knobs={k: v.to_dict() for k, v in proposal.added.items()}, removed_knobs=proposal.removed,
            created_after_trial=snap.last_trial, proposal=proposal.attrs,
            warm_start_trials=sorted(t.number for t in snap.finished[parent.number]))
        attrs = {"mutation": proposal.name, **proposal.attrs}
        if rejected:
            parent_best = best_configs(snap.finished[parent.number], space, 1) or [space.defaults()]
            return self._move(self.agent.source, gen, config=parent_best[0], rejected=rejected, space=space, attrs=attrs)
        self.lineage.commit(gen)
        # From the snapshot taken before the move: another worker may already be running the candidate's first
        # config (it sees the candidate as soon as it is saved); running it twice only measures it twice.
        first = self._first_move(gen, _warm_configs(snap, gen)[0])
        first.attrs.update(attrs)
        return first

    # -- samplers -----------------------------------------------------------------------------------------

    def _make_sampler(self, number: int) -> BaseSampler:
        """The classical sampler of one generation; CMA-ES of a child starts from its parent's trials."""
        snap = Snapshot.load(self.study)
        gen = snap.generations[number]
        space = gen.search_space()
        seed = self.seed + GENERATION_SEED_STRIDE * number
        if self.sampler_name == "cmaes" and gen.parent is not None:
            sources = cma_source_trials(snap.parent_trials(gen), space)
            if sources:
                return make_sampler("cmaes", seed, source_trials=sources)
        return make_sampler(self.sampler_name, seed, x0=space.defaults(), n_startup=GENERATION_N_STARTUP)


def _fresh_runs(gen: Generation, best: FrozenTrial) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The configs to re-run before the generation is judged or mutated, with the attributes of their trials: its
    incumbent, and for a candidate its control (the incumbent with the move's knobs at their defaults)."""
    runs = [(dict(best.params), {"repeat_of": best.number})]
    control = control_config(dict(best.params), gen.new_knobs)
    if gen.status == "candidate" and control != runs[0][0]:
        runs.append((control, {"repeat_of": best.number, "control_of": best.number}))
    return runs


def _untried(tried: list[FrozenTrial], configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configs that no trial of `tried` ran."""
    return [c for c in configs if not runs_of(tried, c)]


def _joint_probe(finished: list[FrozenTrial], first: dict[str, Any], knobs: list[Knob]) -> dict[str, Any] | None:
    """The joint probe once every probe has finished (None before, or when fewer than two knobs improved)."""
    if _untried(finished, probe_configs(first, knobs)):
        return None
    return joint_probe(first, knobs, [(dict(t.params), v) for t in finished if (v := records.ok_value(t)) is not None])


def _warm_configs(snap: Snapshot, gen: Generation) -> list[dict[str, Any]]:
    """The parent's best configs when `gen` was created, projected into its space (best first)."""
    space = gen.search_space()
    return best_configs(snap.parent_trials(gen), space, WARM_CONFIGS) or [space.defaults()]


def _check(parent: Generation, proposal: Proposal, foreign_base: str | None) -> str | None:
    """Why the proposal may not run (the patch guard, or knobs it declares that its code lacks), or None.
    `foreign_base`: a --repo run's own train.py (the guard's foreign rules)."""
    from hybrid.llm.guard import PatchRejected, check_patch

    try:
        check_patch(parent.code, proposal.code, foreign_base=foreign_base)
        space = parent.search_space().with_changes(proposal.added, proposal.removed)
        check_against_code(space, proposal.code)
    except PatchRejected as e:
        return f"patch guard: {e.reason}"
    except (SpaceError, KnobError) as e:
        return f"knob space: {e}"
    return None


# -- the lineage ------------------------------------------------------------------------------------------

def lineage_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per generation: what it changed, its knobs, its trials and best val_bpb, and its verdict."""
    snap = Snapshot.load(study)
    rows = []
    for number, gen in snap.generations.items():
        trials = snap.finished[number]
        values = [v for t in trials if (v := ok_value(t)) is not None]
        measured = score(trials)
        verdict = gen.verdict
        rows.append({
            "generation": number, "parent": gen.parent, "status": gen.status,
            "mutation": gen.mutation or ("baseline" if gen.parent is None else ""),
            "description": gen.description, "agent": gen.agent,
            "new_knobs": sorted(gen.new_knobs), "knobs": len(gen.space),
            "trials": len(trials), "repeats": sum(t.user_attrs.get(records.SOURCE) == "repeat" for t in trials),
            "best_val_bpb": min(values) if values else None,
            "selection": measured.selection if measured else None, "score": measured.value if measured else None,
            "control_score": verdict.control_score if verdict else None,
            "parent_score": verdict.parent_score if verdict else None, "delta": verdict.delta if verdict else None,
            "margin": verdict.margin if verdict else None, "noise": verdict.noise if verdict else None,
            "reason": gen.why, "trigger": gen.trigger, "commit": gen.commit,
        })
    return rows


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_lineage(rows: list[dict[str, Any]]) -> str:
    """The lineage as a text table, with each generation's verdict on a line of its own."""
    lines = ["lineage: gen  parent  status     trials  best      score     delta     margin    mutation (new knobs)"]
    for r in rows:
        parent = "-" if r["parent"] is None else str(r["parent"])
        knobs = f" ({', '.join(r['new_knobs'])})" if r["new_knobs"] else ""
        lines.append(f"         {r['generation']:<4} {parent:<7} {r['status']:<10} {r['trials']:<7} "
                     f"{_number(r['best_val_bpb']):<9} {_number(r['score']):<9} {_number(r['delta']):<9} "
                     f"{_number(r['margin']):<9} {r['mutation']}{knobs}")
        if r["reason"]:
            lines.append(f"              {r['reason']}")
    return "\n".join(lines)
