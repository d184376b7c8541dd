"""The optimization loop: ask a method for a move, run it, record it, tell the sampler; until the budget is spent."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from harness import scrub
from harness.profiles import get_profile
from harness.sandbox import share_cores
from harness.result import TrialResult
from harness.seal import seal as seal_harness
from hybrid import stops
from hybrid.reports import dashboard, results
from hybrid.study import generations, optuna_compat, records, store
from hybrid.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from hybrid.study.generations import Generation
from hybrid.config import Budget, RunConfig
from hybrid.classical.move_sampler import MoveSampler
from hybrid.llm.spending import LLMBudgetSpent
from hybrid.methods import build_method
from hybrid.move import Method, Move
from hybrid.objectives import Objective, ensure_prepared, make_objective
from hybrid.paths import project_file
from hybrid.gpus import check_workers, pin_gpu
from hybrid.processes import stop_with
from hybrid.progress import RunProgress
from hybrid.pruners import UNPRUNED, make_pruner, reporter
from hybrid.space import SearchSpace, check_against_code, load_space

# Seed offset per worker: a prime far above a study's trial count (hundreds), so that a worker's seed, which also
# moves on by one per trial finished before a resume, does not meet another worker's.
WORKER_SEED_STRIDE = 7919
CREATION_POLL_SECONDS = 0.1  # while waiting for another process to finish creating the study

# How a worker gets its objective: from the run config, the study (its trials feed the memory model) and the
# event that stops a trial in flight. The CLI's is objective_for; a test passes a small one of its own.
ObjectiveFactory = Callable[[RunConfig, optuna.Study, threading.Event], Objective]


# -- starting and resuming --------------------------------------------------------------------------------

def run(config: RunConfig, objective: ObjectiveFactory | None = None) -> int:
    """`hybrid run`: create (or continue) the study, then work on it with config.workers processes. `objective`:
    how worker 0 builds its objective (default objective_for; the other workers' processes always use that)."""
    config.finalize()
    if config.repo:  # the repository's train.py and search_space.yaml; its own data and metric
        from hybrid.foreign import configure

        configure(config)
    code_path = Path(config.train_py) if config.train_py else project_file("train.py")
    space_path = Path(config.space) if config.space else project_file("search_space.yaml")
    try:
        code = code_path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {code_path}: {e.strerror}") from None
    space = load_space(space_path, config.profile)
    check_against_code(space, code)
    if config.objective == "train" and not config.repo:
        ensure_prepared(get_profile(config.profile))
    storage = store.open_storage(config.storage)
    study = _open_study(storage, config, space, code)
    return _work_all(study.study_name, config, objective)


def resume(study_name: str, storage_url: str, *, workers: int | None = None,
           objective: ObjectiveFactory | None = None) -> int:
    """`hybrid resume`: the stored run config, the stored code and space, the same budget."""
    storage = store.open_storage(storage_url)
    if not store.study_exists(storage, study_name):
        raise UserError(f"no study {study_name!r} in {storage_url}: `hybrid run` creates one")
    config = RunConfig.from_dict(store.run_info(optuna.load_study(study_name=study_name, storage=storage)))
    config.storage = storage_url
    if workers:
        config.workers = workers
    return _work_all(study_name, config, objective)


def _open_study(storage, config: RunConfig, space: SearchSpace, code: str) -> optuna.Study:  # noqa: ANN001
    """The study, created if new: by one process, when several machines start the same command together. The
    run config is written last: a study without it is being created, or its creation was cut short (killed),
    in which case this run completes it."""
    study = None
    if not store.study_exists(storage, config.study):
        with contextlib.suppress(optuna.exceptions.DuplicatedStudyError):  # another machine was first
            study = optuna.create_study(storage=storage, study_name=config.study, direction="minimize")
    if study is None:
        study = optuna.load_study(study_name=config.study, storage=storage)
        if any(t.state != TrialState.WAITING for t in study.get_trials()) or _created_meanwhile(study):
            _check_same_run(study, config, space)
            return study
    study.set_user_attr(store.SPACE_KEY, space.to_dict())
    generations.save(study, Generation(0, None, "the baseline train.py", code, space.to_dict(), status="base"))
    study.enqueue_trial(space.defaults(), user_attrs={records.SOURCE: "baseline"}, skip_if_exists=True)
    store.save_run_info(study, config.to_dict())
    return study


def _created_meanwhile(study: optuna.Study) -> bool:
    """Whether the study gets its run config within the heartbeat grace (its creator is alive)."""
    deadline = time.monotonic() + store.GRACE_SECONDS
    while store.RUN_KEY not in study.user_attrs:
        if time.monotonic() > deadline:
            return False
        time.sleep(CREATION_POLL_SECONDS)
    return True


def _check_same_run(study: optuna.Study, config: RunConfig, space: SearchSpace) -> None:
    old = store.run_info(study)
    for key in ("method", "objective", "profile", "seed"):
        if old.get(key) != getattr(config, key):
            raise UserError(f"study {config.study!r} exists with {key}={old.get(key)!r}, not {getattr(config, key)!r}: "
                            "choose another --study name, or `hybrid resume --study` to continue it")
    if study.user_attrs.get(store.SPACE_KEY) != space.to_dict():
        raise UserError(f"study {config.study!r} exists with another search space: choose another --study name")


def _work_all(study_name: str, config: RunConfig, objective: ObjectiveFactory | None) -> int:
    """Worker 0 here (with the progress display), workers 1..N-1 as processes on the same study. A baseline that
    failed in an earlier run runs again first (the user fixed what failed it, or it fails and stops the run again)."""
    stops.retry_failed_baseline(optuna.load_study(study_name=study_name, storage=store.open_storage(config.storage)))
    if config.workers > 1:  # CPU trials of parallel workers split the cores instead of fighting over them
        share_cores(config.workers)
        check_workers(config.workers)
        pin_gpu(0)
    ctx = multiprocessing.get_context("spawn")
    others = [ctx.Process(target=_worker_process, args=(study_name, config.to_dict(), i, os.getpid()), daemon=False)
              for i in range(1, config.workers)]
    for p in others:
        p.start()
    stopped = True
    try:
        code = run_worker(study_name, config, 0, objective or objective_for, show=True)
        stopped = code == EXIT_INTERRUPTED
    finally:
        if stopped:  # Ctrl-C reaches the whole process group; a `kill`, or a stop for an error, only this process
            for p in others:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        for p in others:
            p.join()
    return code


def _worker_process(study_name: str, config: dict[str, Any], index: int, parent: int) -> None:
    pin_gpu(index)
    stop_with(parent)
    try:
        run_worker(study_name, RunConfig.from_dict(config), index, objective_for, show=False)
    except KeyboardInterrupt:
        pass
    except UserError as e:  # e.g. every config refused: said in one line, as the first worker says it
        print(f"hybrid: worker {index}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# -- one worker -------------------------------------------------------------------------------------------

POLL_SECONDS = min(2.0, store.HEARTBEAT_SECONDS / 2)  # while waiting for the trials of other workers


class TrialStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped trial `number` in flight (or before it ran): failed, never counted."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler, or the run stopping its workers) stop the run cleanly. They set
    `stop`: a train.py trial in flight is killed at once (its runner raises KeyboardInterrupt; the trial is failed,
    never counted), and whatever else is under way (a proposal, an in-process evaluation, recording a result)
    finishes first. Nothing is raised inside library code (the database's, torch's) unless a second Ctrl-C insists."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.stop.is_set()

    def _ctrl_c(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def _term(self, signum: int, frame: object) -> None:
        self.stop.set()

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._ctrl_c),
                              signal.SIGTERM: signal.signal(signal.SIGTERM, self._term)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(signum, previous)


def objective_for(config: RunConfig, study: optuna.Study, stop: threading.Event) -> Objective:
    """The objective config names, for a worker of `study`; `stop` ends its train.py trial in flight."""
    return make_objective(config.objective, get_profile(config.profile), vram_cap_gb=config.vram_cap_gb,
                          memory_model=config.memory_model, history=lambda: study.get_trials(deepcopy=False),
                          stop=stop, sandbox=config.sandbox, trusted_code=(generations.load_all(study)[0].code,),
                          repo=config.repo, seed=config.seed, benchmark_noise=config.benchmark_noise)


def run_worker(study_name: str, config: RunConfig, worker: int, objective: ObjectiveFactory, *, show: bool) -> int:
    """Worker number `worker` of the study: its method, seeded for it, and its objective, then work."""
    study = optuna.load_study(study_name=study_name, storage=store.open_storage(config.storage),
                              pruner=make_pruner(config.pruner))
    space = SearchSpace.from_dict(study.user_attrs[store.SPACE_KEY])
    # A resumed run continues from a fresh but deterministic seed: replaying the original seed would repeat
    # the configs already tried. Workers get seeds of their own.
    seed = config.seed + WORKER_SEED_STRIDE * worker + len(store.finished_trials(study))
    method = build_method(config, study, space, generations.load_all(study)[0].code, seed)
    interrupt = Interrupt()
    return work(study, config, method, objective(config, study, interrupt.stop), interrupt, show=show)


def work(study: optuna.Study, config: RunConfig, method: Method, objective: Objective, interrupt: Interrupt, *,
         show: bool = True) -> int:
    """Run the method's moves on the objective until the budget is spent and no trial is in flight; returns the
    exit status (130 after Ctrl-C or SIGTERM, which `interrupt` catches while this runs)."""
    base = generations.load_all(study)[0]
    space = SearchSpace.from_dict(study.user_attrs[store.SPACE_KEY])
    budget = Budget.of(config)
    baseline = Move("baseline", 0, base.code, space, config=space.defaults())
    study.sampler = method.sampler
    scrub.register(config.storage, config.llm_base_url)  # never shown back by a trial's text
    progress = RunProgress(study, config, budget, enabled=show)
    reaper = store.Reaper(study)
    rules = stops.StopRules(study.study_name, config.storage, config.max_failures_in_a_row)
    llm_spent = False
    harness_seal = seal_harness(get_profile(config.profile) if config.objective == "train" else None)
    with progress, interrupt:
        while not interrupt.requested:
            trials = reaper.sweep()
            finished = [t for t in trials if records.is_finished(t)]
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if budget.spent(finished) and not running:
                break
            rules.check(trials)  # UserError: the baseline failed, or trials keep failing the same way
            if budget.spent(finished) or (budget.trials is not None and len(finished) + running >= budget.trials):
                time.sleep(POLL_SECONDS)  # the last trials are in flight elsewhere (or their worker died)
                continue
            harness_seal.verify()  # HarnessChanged: a one-line UserError naming the file
            try:
                frozen = _one_trial(study, method, objective, config, budget, interrupt, baseline)
            except TrialStopped as e:  # the trial in flight was failed
                progress.stopped(e.number)
                interrupt.stop.set()
                break
            except LLMBudgetSpent as e:  # llm-hp, llm-code: every move is the LLM's
                progress.say(f"{e}: {config.method} makes every move with the LLM, so the run stops here")
                llm_spent = True
                break
            if frozen is not None:
                progress.update(frozen)
    progress.summary(resumable=not llm_spent)
    if show:
        print(results.summary_line(study, config.storage), file=sys.stderr)
    if show and hasattr(method, "summary"):  # e.g. the hybrid method's lineage
        method.summary()
    return EXIT_INTERRUPTED if interrupt.requested else 0


def _one_trial(study: optuna.Study, method: Method, objective: Objective, config: RunConfig, budget: Budget,
               interrupt: Interrupt, baseline: Move) -> optuna.trial.FrozenTrial | None:
    """Ask for a trial, decide its move, run and record it; None if it was not ours to run (another worker took
    the slot). The trial is asked first, so that its slot is taken before anything is proposed (an LLM call, a
    GP fit) and it beats meanwhile; the enqueued baseline (which store.settle enqueues again if its worker dies)
    runs generation 0's code at its defaults, whatever the method would propose."""
    trial = study.ask()
    with store.Heartbeat(study, trial):
        if budget.trials is not None and _ahead_of(study, trial.number) >= budget.trials:
            trial.set_user_attr(records.SURPLUS, True)  # the --trials budget was filled by other workers meanwhile
            study.tell(trial, state=TrialState.FAIL)
            return None
        try:
            move = baseline if trial.user_attrs.get(records.SOURCE) == "baseline" else method.next_move(study)
            _start(trial, move, method.sampler)
            # A repeat re-measures its config on a seed of its own, so that the noise margin includes seed noise.
            seed = config.seed + trial.number if move.source == "repeat" else config.seed
            if move.rejected is not None:
                result = TrialResult(status=records.REJECTED, error=move.rejected)
            else:
                if interrupt.requested:  # Ctrl-C while the trial was being proposed: it never runs
                    raise KeyboardInterrupt
                # intermediate val_bpb for the pruner, from an objective with learning curves (the train objective)
                prunes = config.prunes and getattr(objective, "curves", False)
                pruning = {"report": reporter(trial, move.source not in UNPRUNED)} if prunes else {}
                result = objective.evaluate(move.code, dict(trial.params), seed=seed, trial_number=trial.number,
                                            trial_dir=Path(config.artifacts) / f"trial-{trial.number:05d}", **pruning)
        except BaseException as e:  # Ctrl-C, or a bug: the trial is failed, never counted
            store.settle(study, optuna_compat.trial_id(trial))
            if isinstance(e, KeyboardInterrupt):
                raise TrialStopped(trial.number) from None
            raise
        attrs = {records.CODE_SHA: store.code_sha(move.code), records.SEED: seed, records.METHOD: config.method,
                 **move.attrs}
        frozen = store.record_result(study, trial, result, attrs)
        dashboard.publish(study, frozen, config.storage)  # its log, code, diff and note; never fails the trial
    method.observe(study, frozen, move)
    return frozen


def _start(trial: optuna.Trial, move: Move, sampler: MoveSampler) -> None:
    """The one place a trial's generation and source are written, then its config: the move's fixed config, or
    the sampler of its generation's."""
    trial.set_user_attr(records.GENERATION, move.generation)
    trial.set_user_attr(records.SOURCE, move.source)
    if move.prune_with:
        trial.set_user_attr(records.PRUNE_WITH, list(move.prune_with))
    sampler.prepare(move.generation, move.config)
    _suggest(trial, move.space.distributions())


def _suggest(trial: optuna.Trial, distributions: dict[str, BaseDistribution]) -> None:
    """What `study.ask(distributions)` does, here after the trial has started beating."""
    for name, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(name, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


def _ahead_of(study: optuna.Study, number: int) -> int:
    """Trials before this one that are finished or still running (they hold a slot of a --trials budget)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and (records.is_finished(t) or t.state == TrialState.RUNNING))
