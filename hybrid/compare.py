"""`hybrid compare`: every method x seed as its own study in one storage, resumable, then the report.

With no arguments on a machine without a GPU: tpe, cmaes, random and hybrid (offline catalog), one seed each,
on the cpu profile's real training, CPU_BUDGET_HOURS of trial time per study (about 8 trials of ~28 s): four
studies in about 15 minutes. Re-running the same command continues what is missing; finished studies are skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import optuna

from hybrid.reports import report

from hybrid.study import store
from hybrid.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from hybrid.config import DEFAULT_BUDGET_HOURS, DEFAULT_STORAGE, METHODS, Budget, RunConfig
from hybrid.gpus import pin_gpu
from hybrid.loop import run
from hybrid.processes import run_each, stop_with

DEFAULT_METHODS = ("tpe", "cmaes", "random", "hybrid")
# Trial time per study on the cpu profile when neither --budget-hours nor --trials is given: a quarter of a
# `hybrid run`'s (0.0625 h, 225 s, about 8 trials), so that the four default studies together take about as long as
# one run, the ~15 minutes promised for `hybrid compare` with no arguments.
CPU_BUDGET_HOURS = DEFAULT_BUDGET_HOURS["cpu"] / len(DEFAULT_METHODS)


def parse_methods(text: str | None) -> list[str]:
    """`a,b,c` into known method names (UserError for an unknown or repeated one)."""
    if text is None:
        return list(DEFAULT_METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r} in --methods: choose from {', '.join(METHODS)}")
    if not names or len(set(names)) != len(names):
        raise UserError(f"--methods needs distinct comma-separated names, got {text!r}")
    return names


def study_name(method: str, seed: int, prefix: str = "") -> str:
    return f"{prefix}{method}-s{seed}"


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'hybrid.db').resolve()}"


def plan(args: argparse.Namespace) -> list[RunConfig]:
    """One finalized RunConfig per method x seed, checked against studies already in the storage. Seed-major
    order: a compare stopped part-way holds whole seeds of every method, and a machine's load, which changes the
    work a timed trial gets done, falls on every method alike."""
    storage = default_storage(args.out) if args.storage == DEFAULT_STORAGE else args.storage
    template = RunConfig.from_args(argparse.Namespace(**{**vars(args), "method": "random", "study": "-",
                                                         "storage": storage, "workers": 1}))
    template.finalize()
    if args.budget_hours is None and args.trials is None and template.profile == "cpu" and template.objective == "train":
        template.budget_hours = CPU_BUDGET_HOURS
    first = args.seed
    seeds = range(first, first + (args.seeds or 1))
    prefix = getattr(args, "prefix", None) or ""
    configs = [dataclasses.replace(template, method=m, study=study_name(m, s, prefix), seed=s, sampler=args.sampler,
                                   artifacts=None).finalize()
               for s in seeds for m in parse_methods(args.methods)]
    check_existing(configs)
    return configs


def check_existing(configs: list[RunConfig]) -> None:
    """UserError, before anything runs, for a study of the same name that was started differently."""
    storage = store.open_storage(configs[0].storage)
    present = set(optuna.get_all_study_names(storage))
    for config in configs:
        if config.study not in present:
            continue
        info = optuna.load_study(study_name=config.study, storage=storage).user_attrs.get(store.RUN_KEY) or {}
        for key in ("method", "objective", "profile", "seed"):
            if key in info and info[key] != getattr(config, key):
                raise UserError(f"study {config.study!r} in {config.storage} ran with {key}={info[key]!r}, not "
                                f"{getattr(config, key)!r}: use another --out (or --storage) for a different setup")


def is_done(config: RunConfig) -> bool:
    """The study exists and its trials spent the budget."""
    storage = store.open_storage(config.storage)
    if config.study not in optuna.get_all_study_names(storage):
        return False
    study = optuna.load_study(study_name=config.study, storage=storage)
    return Budget.of(config).spent(store.finished_trials(study))


def run_one(config: RunConfig) -> int:
    """One study to its budget (skipped when already there); the loop's exit status."""
    if is_done(config):
        print(f"hybrid: {config.study} has spent its budget: skipped", file=sys.stderr)
        return 0
    return run(config)


def _study_process(config: dict[str, Any], slot: int, parent: int) -> None:
    """One study in a process of its own, which ends with the command; with several GPUs, its trials run on GPU
    slot % count. Exit status: the loop's, or 2 after a UserError (said in one line naming the study)."""
    stop_with(parent)
    run_config = RunConfig.from_dict(config)
    if run_config.objective == "train":
        pin_gpu(slot)
    try:
        code = run_one(run_config)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except UserError as e:
        print(f"hybrid: error: [{run_config.study}] {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    sys.exit(code)


def run_studies(configs: list[RunConfig], workers: int) -> None:
    """Every study to its budget: one after another, or `workers` studies at a time in their own processes.
    KeyboardInterrupt when stopped (Ctrl-C, SIGTERM); UserError naming the studies that stopped with an error."""
    if workers <= 1:
        for config in configs:
            if run_one(config) == EXIT_INTERRUPTED:
                raise KeyboardInterrupt
        return
    codes = run_each(_study_process, [(c.to_dict(),) for c in configs], workers)
    if EXIT_INTERRUPTED in codes:
        raise KeyboardInterrupt
    failed = [c.study for c, code in zip(configs, codes) if code != 0]
    if failed:
        raise UserError(f"studies {', '.join(failed)} stopped with an error (said above); the others are done")


def compare(args: argparse.Namespace) -> Path:
    """`hybrid compare`: plan, run what is missing, write the report into --out; returns report.md's path."""
    configs = plan(args)
    first = configs[0]
    budget = f"{first.trials} trials" if first.trials else f"{first.budget_hours:g} GPU-hours"
    print(f"hybrid: compare {len(configs)} studies ({', '.join(c.study for c in configs)}) on the {first.objective} "
          f"objective, {first.profile} profile, {budget} each, storage {first.storage}", file=sys.stderr)
    run_studies(configs, args.workers)
    path = report.write_report(first.storage, [c.study for c in configs], args.out)
    print(f"hybrid: report written to {path}", file=sys.stderr)
    return path
