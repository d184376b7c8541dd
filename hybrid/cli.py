"""The `hybrid` command line: parse flags, call the library, turn bad input into one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.knobs import KnobError
from hybrid.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from hybrid.space import SpaceError

METHODS = ("random", "tpe", "cmaes", "gp", "llm-hp", "llm-code", "centaur", "hybrid")
DEFAULT_STORAGE = "sqlite:///runs/hybrid.db"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"hybrid: error: {message} (see `{self.prog} --help`)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


# The defaults of --budget-hours: hybrid.loop.DEFAULT_BUDGET_HOURS for a run; for compare on cpu,
# hybrid.compare.CPU_BUDGET_HOURS, a quarter of a run's, so that its four default studies take about one run's time.
RUN_BUDGET_HELP = "GPU-hours of trial wall time (default: 24 on gpu/surrogate, 0.25 on cpu)"
COMPARE_BUDGET_HELP = "GPU-hours of trial wall time per study (default: 24 on gpu/surrogate, 0.0625 on cpu)"


def _add_run_flags(p: argparse.ArgumentParser, workers_help: str = "processes on this machine sharing the study",
                   budget_help: str = RUN_BUDGET_HELP) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-hours", type=_positive(float), help=budget_help)
    budget.add_argument("--trials", type=_positive(int), help="a number of trials instead of a time budget")
    p.add_argument("--objective", choices=("train", "surrogate"), default="train")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), help="default: gpu where CUDA is found, else cpu")
    p.add_argument("--workers", type=_positive(int), default=1, help=workers_help)
    p.add_argument("--llm", choices=("anthropic", "openai", "none"), default=None,
                   help="LLM provider for llm-hp, llm-code, centaur and hybrid (default: none)")
    p.add_argument("--llm-model", help="model name (default: the provider's default)")
    p.add_argument("--llm-base-url", help="base URL of the provider (OpenAI-compatible servers: vLLM, Ollama, llama.cpp)")
    p.add_argument("--sampler", choices=("tpe", "cmaes", "gp"), default=None, help="the classical half of centaur/hybrid")
    p.add_argument("--no-memory-model", action="store_true", help="run configs predicted to exceed the VRAM cap anyway")
    p.add_argument("--vram-cap-gb", type=_positive(float), help="cap on GPU memory per trial (the paper: 76)")
    p.add_argument("--train-py", type=Path, help="the training script (default: ./train.py)")
    p.add_argument("--space", type=Path, help="the search space (default: ./search_space.yaml)")
    p.add_argument("--repo", type=Path, help="an autoresearch checkout: its own train.py, prepare.py, data and "
                                            "metric (not hybrid's harness); space default REPO/search_space.yaml")
    p.add_argument("--mutate-every", type=_positive(int), default=None, help="hybrid: trials per generation before a structural move")
    p.add_argument("--stagnation", type=_positive(int), default=None, help="hybrid: trials without improvement that trigger a structural move")
    p.add_argument("--llm-fraction", type=float, default=0.3, help="centaur: share of trials proposed by the LLM")
    _add_sandbox_flag(p)


def _add_sandbox_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sandbox", choices=("auto", "required", "off"), default="auto",
                   help="the OS sandbox (bubblewrap) of the processes that run train.py: auto uses it where the kernel "
                        "allows and warns where not, required refuses to run without it (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hybrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("prepare", help="download or build the data, train the tokenizer, cache the tokens")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"))
    p.add_argument("--source", help="builtin | climbmix | PATH (a folder or glob of .txt/.jsonl/.parquet)")

    p = sub.add_parser("space", help="the knobs found in a train.py")
    p.add_argument("--train-py", type=Path)
    p.add_argument("--space", type=Path, help="also check this search_space.yaml against the script")
    p.add_argument("--init-yaml", type=Path, metavar="OUT", help="write a search_space.yaml proposed for the script")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), default="gpu")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("trial", help="run one trial and print its result")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"))
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE")
    p.add_argument("--train-py", type=Path)
    p.add_argument("--space", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vram-cap-gb", type=_positive(float))
    p.add_argument("--out", type=Path, help="trial directory (default: runs/trials/<time>)")
    p.add_argument("--json", action="store_true")
    _add_sandbox_flag(p)

    p = sub.add_parser("run", help="run a study: one method against the objective, to a budget")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--study", required=True)
    _add_run_flags(p)

    p = sub.add_parser("resume", help="continue a study to its budget")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--workers", type=_positive(int), default=None)

    p = sub.add_parser("compare", help="a head-to-head: every method x seed as its own study, then a report")
    p.add_argument("--methods", default=None, help="comma-separated (default: tpe,cmaes,random,hybrid)")
    p.add_argument("--seeds", type=_positive(int), default=None)
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--prefix", default="", help="prefix of the study names (<prefix><method>-s<seed>)")
    _add_run_flags(p, workers_help="studies run at once, one process each", budget_help=COMPARE_BUDGET_HELP)

    p = sub.add_parser("report", help="tables, plots and parquet from studies")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study", action="append", default=None, help="a study name (repeatable; default: all)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("import", help="another tool's history as a study")
    isub = p.add_subparsers(dest="import_command", required=True, parser_class=Parser)
    pp = isub.add_parser("autoresearch", help="an autoresearch checkout's results.tsv and branch of kept commits")
    pp.add_argument("--repo", type=Path, required=True, help="the checkout (prepare.py, train.py, results.tsv)")
    pp.add_argument("--study", required=True)
    pp.add_argument("--branch", help="the night's branch, autoresearch/<tag> (default: the checked-out one)")
    pp.add_argument("--storage", default=DEFAULT_STORAGE)
    pp.add_argument("--space", type=Path, help="the search space (default: REPO/search_space.yaml)")

    p = sub.add_parser("reproduce", help="reproduce a published comparison")
    p.add_argument("paper", choices=("arxiv-2603.24647",))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--surrogate", action="store_true", help="on the surrogate objective (default without a GPU)")
    mode.add_argument("--real", action="store_true", help="on the train objective and the gpu profile")
    p.add_argument("--seeds", type=_positive(int), default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--storage", default=None, help="default: sqlite in OUT")
    p.add_argument("--workers", type=_positive(int), default=None,
                   help="studies run at once (default: one per core with --surrogate, one per GPU with --real)")
    p.add_argument("--llm", choices=("anthropic", "openai", "none"), default="none")
    p.add_argument("--llm-model")
    p.add_argument("--llm-base-url")
    _add_sandbox_flag(p)

    p = sub.add_parser("surrogate", help="the surrogate model of the paper's trials")
    ssub = p.add_subparsers(dest="surrogate_command", required=True, parser_class=Parser)
    pp = ssub.add_parser("predict", help="add val_bpb_pred, p_fail, wall_seconds_pred to a CSV of configs")
    pp.add_argument("--in", dest="inp", type=Path, required=True)
    pp.add_argument("--out", type=Path, required=True)
    return parser


# -- commands ---------------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from harness.data import prepare
    from harness.profiles import get_profile

    prepare(get_profile(args.profile), args.source)
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from harness.knobs import find_constants, find_knobs
    from hybrid.paths import project_file
    from hybrid.space import check_against_source, load_space

    path = args.train_py or project_file("train.py")
    if args.init_yaml:
        from hybrid.space_init import write_proposal

        proposal = write_proposal(path, args.init_yaml)
        print(f"wrote {args.init_yaml}: {len(proposal.knobs)} knobs ({len(proposal.marked)} marked REVIEW), "
              f"{len(proposal.left_out)} constants left out (the reasons are in the file)")
        return 0
    source = _read(path)
    knobs, constants = find_knobs(source), find_constants(source)
    if args.space:
        check_against_source(load_space(args.space, args.profile), source)
    if args.json:
        print(json.dumps({"train_py": str(path),
                          "knobs": {k.name: {"type": k.type, "value": k.value, "line": k.line} for k in knobs.values()},
                          "constants": constants}, indent=1))
        return 0
    width = max(map(len, [*knobs, *constants]), default=0)
    print(f"{len(knobs)} knobs in {path}:")
    for k in knobs.values():
        print(f"  {k.name:<{width}}  {k.type:<6} {k.value!r}")
    if constants:
        print("other constants (not tuned):")
        for name, text in constants.items():
            print(f"  {name:<{width}}  {text}")
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    from hybrid.trial import run_single_trial

    result = run_single_trial(profile=args.profile, assignments=args.set, train_py=args.train_py, space_path=args.space,
                              seed=args.seed, vram_cap_gb=args.vram_cap_gb, out=args.out, sandbox=args.sandbox)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        shown = {k: v for k, v in result.to_dict().items() if k != "config"}
        width = max(map(len, shown))
        for k, v in shown.items():
            print(f"{k:<{width}}  {_readable(v)}")
    return 0 if result.ok else 1


def _readable(value: Any) -> str:
    """A result field for people: floats rounded, phases as seconds, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in value.items())
    return str(value)


def cmd_run(args: argparse.Namespace) -> int:
    from hybrid.loop import RunConfig, run

    return run(RunConfig.from_args(args))


def cmd_resume(args: argparse.Namespace) -> int:
    from hybrid.loop import resume

    return resume(args.study, args.storage, workers=args.workers)


def cmd_compare(args: argparse.Namespace) -> int:
    from hybrid.compare import compare

    compare(args)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hybrid.report import write_report

    out = write_report(args.storage, args.study, args.out)
    print(f"report written to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from hybrid.autoresearch import import_night

    print(import_night(args.repo, args.study, storage_url=args.storage, branch=args.branch, space_path=args.space))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from hybrid.reproduce import reproduce

    reproduce(args)
    return 0


def cmd_surrogate(args: argparse.Namespace) -> int:
    from hybrid.surrogate import predict_csv

    predict_csv(args.inp, args.out)
    return 0


def _read(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = globals()[f"cmd_{args.command}"]
    try:
        return command(args)
    except (UserError, SpaceError, KnobError) as e:
        print(f"hybrid: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hybrid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
