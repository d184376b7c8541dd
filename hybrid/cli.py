"""The `hybrid` command line: parse flags, call the library, turn bad input into one line and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

from harness.knobs import KnobError
from hybrid.config import DEFAULT_MAX_FAILURES_IN_A_ROW, DEFAULT_STORAGE, METHODS
from hybrid.pruners import DEFAULT_PRUNER, PRUNERS
from hybrid.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from hybrid.space import SpaceError

HELP_WIDTH = 100  # columns of the descriptions in --help
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a writer whose reader went away (`yes | head`)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"hybrid: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples kept as written; each flag's default shown where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or action.help == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


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


def _port(text: str) -> int:
    """A --port value: a TCP port, 1 to 65535."""
    port = _positive(int)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {text}")
    return port


def _study_name(text: str) -> str:
    """A --study value: not empty, not blank (a name nobody could type again)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"a study needs a name, got {text!r}")
    return text


def _command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
             examples: str) -> argparse.ArgumentParser:
    """A subcommand: one line in `hybrid --help`, a description and examples in its own --help."""
    return sub.add_parser(name, help=summary, description=textwrap.fill(description, HELP_WIDTH),
                          epilog="examples:\n" + examples, formatter_class=HelpFormatter)


def _command_group(sub: argparse._SubParsersAction, name: str, summary: str, description: str, examples: str,
                   metavar: str) -> argparse._SubParsersAction:
    """A subcommand whose first argument names one of its own (`hybrid import autoresearch`); where those go."""
    p = _command(sub, name, summary, description, examples)
    return p.add_subparsers(dest=f"{name}_command", required=True, parser_class=Parser, metavar=metavar)


# The defaults of --budget-hours: hybrid.config.DEFAULT_BUDGET_HOURS for a run; for compare on cpu,
# hybrid.compare.CPU_BUDGET_HOURS, a quarter of a run's, so that its four default studies take about one run's time.
RUN_BUDGET_HELP = "GPU-hours of trial wall time (default: 24 on gpu/surrogate, 0.25 on cpu)"
COMPARE_BUDGET_HELP = "GPU-hours of trial wall time per study (default: 24 on gpu/surrogate, 0.0625 on cpu)"
PROFILE_HELP = "gpu, cpu or test (default: gpu where CUDA is found, else cpu)"
STORAGE_HELP = "Optuna storage URL: sqlite:///PATH or postgresql://USER:PASS@HOST/DB"


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)


def _add_study(p: argparse.ArgumentParser, help: str = "the study's name") -> None:
    p.add_argument("--study", required=True, type=_study_name, help=help)


def _add_run_flags(p: argparse.ArgumentParser, workers_help: str = "processes on this machine sharing the study",
                   budget_help: str = RUN_BUDGET_HELP) -> None:
    _add_storage(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of the trials")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-hours", type=_positive(float), help=budget_help)
    budget.add_argument("--trials", type=_positive(int), help="a number of trials instead of a time budget")
    p.add_argument("--objective", choices=("train", "surrogate", "benchmark"), default="train",
                   help="train: real trials of train.py; surrogate: a model of the paper's H200 trials (seconds on a CPU); "
                        "benchmark: the surrogate plus catalog mutations with hidden true effects (hybrid --llm none)")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), help=PROFILE_HELP)
    p.add_argument("--workers", type=_positive(int), default=1, help=workers_help)
    p.add_argument("--llm", choices=("anthropic", "openai", "none"), default=None,
                   help="LLM provider for llm-hp, llm-code, centaur and hybrid (default: none)")
    p.add_argument("--llm-model", help="model name (default: the provider's default)")
    p.add_argument("--llm-base-url", help="base URL of the provider (OpenAI-compatible servers: vLLM, Ollama, llama.cpp)")
    p.add_argument("--sampler", choices=("tpe", "cmaes", "gp"), default=None,
                   help="the classical half of centaur/hybrid (default: cmaes for centaur, tpe for hybrid)")
    p.add_argument("--no-memory-model", action="store_true", help="run configs predicted to exceed the VRAM cap anyway")
    p.add_argument("--vram-cap-gb", type=_positive(float),
                   help="cap on GPU memory per trial (default: 76, the paper's, on gpu and surrogate; none on CPU)")
    p.add_argument("--train-py", type=Path, help="the training script (default: ./train.py, else the project's)")
    p.add_argument("--space", type=Path, help="the search space (default: ./search_space.yaml, else the project's)")
    p.add_argument("--repo", type=Path, help="an autoresearch checkout: its own train.py, prepare.py, data and "
                                            "metric (not hybrid's harness); space default REPO/search_space.yaml")
    p.add_argument("--mutate-every", type=_positive(int), default=None,
                   help="hybrid: trials per generation before a structural move (default: the method's)")
    p.add_argument("--stagnation", type=_positive(int), default=None,
                   help="hybrid: trials without improvement that trigger a structural move (default: the method's)")
    p.add_argument("--repeats", type=_positive(int), default=None,
                   help="hybrid: fresh re-runs of an incumbent (and a candidate's control) per verdict (default: 2)")
    p.add_argument("--benchmark-noise", type=float, default=None,
                   help="benchmark objective: sd of its measurement noise (default: 1e-4, the paper's seed-to-seed)")
    p.add_argument("--llm-fraction", type=float, default=0.3, help="centaur: share of trials proposed by the LLM")
    p.add_argument("--pruner", choices=PRUNERS, default=None,
                   help=f"stop trials whose intermediate val_bpb is hopeless (Optuna's pruners; train objective only; "
                        f"default: {DEFAULT_PRUNER} for train, none otherwise)")
    p.add_argument("--max-failures-in-a-row", type=_positive(int), default=DEFAULT_MAX_FAILURES_IN_A_ROW,
                   help="stop (exit 2, resumable) after this many trials in a row fail for the same reason")
    _add_llm_max_usd(p)
    _add_sandbox_flag(p)


def _add_llm_max_usd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-max-usd", type=_positive(float), default=None,
                   help="no LLM call once the study's recorded LLM cost reaches this many dollars: centaur and hybrid "
                        "go on with their classical half, llm-hp and llm-code stop (default: no cap)")


def _add_sandbox_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sandbox", choices=("auto", "required", "off"), default="auto",
                   help="the OS sandbox (bubblewrap) of the processes that run train.py: auto uses it where the kernel "
                        "allows and warns where not, required refuses to run without it")


def build_parser() -> argparse.ArgumentParser:
    from hybrid import __version__

    parser = Parser(prog="hybrid", formatter_class=HelpFormatter,
                    description="Tune an LLM pre-training script with Optuna samplers, LLM agents or both, in one "
                                "trial database.",
                    epilog="examples:\n  hybrid compare\n  hybrid run --method tpe --study mine --trials 20\n"
                           "  hybrid best --study mine --export best_train.py\n\n"
                           "Every command has --help. Bad input: one line on stderr and exit status 2.")
    parser.add_argument("--version", action="version", version=f"hybrid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = _command(sub, "prepare", "download or build the data, train the tokenizer, cache the tokens",
                 "Prepare a profile's data once: the text, a BPE tokenizer and the token cache (under $HYBRID_DATA_DIR).",
                 "  hybrid prepare --profile cpu\n  hybrid prepare --profile gpu --source climbmix\n"
                 "  hybrid prepare --profile cpu --source 'my_corpus/*.txt'")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), help=PROFILE_HELP)
    p.add_argument("--source", dest="corpus", metavar="SOURCE",  # the flag users know; the data corpus
                   help="builtin | climbmix | PATH, a folder or glob of .txt/.jsonl/.parquet "
                        "(default: the profile's: climbmix on gpu, builtin otherwise)")

    p = _command(sub, "space", "the knobs found in a train.py",
                 "List the knobs of a train.py (its top-level ALL_CAPS literal assignments) and its other constants.",
                 "  hybrid space\n  hybrid space --train-py my_train.py --json\n"
                 "  hybrid space --space search_space.yaml --profile cpu")
    p.add_argument("--train-py", type=Path, help="the training script (default: ./train.py, else the project's)")
    p.add_argument("--space", type=Path, help="also check this search_space.yaml against the script")
    p.add_argument("--init-yaml", type=Path, metavar="OUT", help="write a search_space.yaml proposed for the script")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), default="gpu",
                   help="the profile whose overrides apply to --space")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _command(sub, "trial", "run one trial and print its result",
                 "Run train.py once, as a study would (same harness, sandbox and metric), and print its result. "
                 "Knobs not set take the search space's defaults for the profile, unless --as-written.",
                 "  hybrid trial --profile cpu\n  hybrid trial --profile test --set DEPTH=2 --set MATRIX_LR=0.02 --json\n"
                 "  hybrid trial --profile cpu --train-py best_train.py --as-written")
    p.add_argument("--profile", choices=("gpu", "cpu", "test"), help=PROFILE_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="a knob's value (repeatable)")
    p.add_argument("--train-py", type=Path, help="the training script (default: ./train.py, else the project's)")
    p.add_argument("--space", type=Path, help="the search space (default: ./search_space.yaml, else the project's)")
    p.add_argument("--as-written", action="store_true",
                   help="run the knob values written in the script (one from `hybrid best --export`), not the "
                        "space's defaults")
    p.add_argument("--seed", type=int, default=0, help="the trial's seed")
    p.add_argument("--vram-cap-gb", type=_positive(float), help="cap on GPU memory (default: none)")
    p.add_argument("--out", type=Path, help="trial directory (default: runs/trials/<time>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_sandbox_flag(p)

    p = _command(sub, "run", "run a study: one method against the objective, to a budget",
                 "Create a study (or continue one started with the same flags) and run one method on it until the "
                 "budget is spent. Each finished trial gets a line, the progress a bar. A failed baseline, or trials "
                 "failing the same way again and again, stop the run (exit 2); Ctrl-C stops cleanly; `hybrid resume` "
                 "continues.",
                 "  hybrid run --method tpe --study tpe-s0 --trials 20\n"
                 "  hybrid run --method hybrid --study h0 --budget-hours 24 --workers 8\n"
                 "  hybrid run --method cmaes --study s --objective surrogate --storage sqlite:///runs/paper.db\n"
                 "  hybrid run --method centaur --study c --llm anthropic --llm-max-usd 20 --max-failures-in-a-row 10")
    p.add_argument("--method", required=True, choices=list(METHODS), help="the search method")
    _add_study(p, "the study's name (a new one, or one to continue with the same flags)")
    _add_run_flags(p)

    p = _command(sub, "resume", "continue a study to its budget",
                 "Continue a study with the flags it was created with, to the same budget (after Ctrl-C, a crash, "
                 "SIGKILL).",
                 "  hybrid resume --study tpe-s0\n  hybrid resume --study h0 --storage sqlite:///runs/h.db --workers 4")
    _add_study(p)
    _add_storage(p)
    p.add_argument("--workers", type=_positive(int), default=None, help="processes (default: the study's)")

    p = _command(sub, "compare", "a head-to-head: every method x seed as its own study, then a report",
                 "Run every method with every seed as its own study in one storage (resumable: a rerun continues "
                 "what is missing), then write the report.",
                 "  hybrid compare\n  hybrid compare --methods tpe,random --seeds 3 --objective surrogate --out runs/cmp")
    p.add_argument("--methods", default=None, help="comma-separated (default: tpe,cmaes,random,hybrid)")
    p.add_argument("--seeds", type=_positive(int), default=None, help="seeds per method (default: 1)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder of the database and the report")
    p.add_argument("--prefix", default="", help="prefix of the study names (<prefix><method>-s<seed>)")
    _add_run_flags(p, workers_help="studies run at once, one process each", budget_help=COMPARE_BUDGET_HELP)

    p = _command(sub, "report", "tables, plots and parquet from studies",
                 "Write report.md, summary.json, results.parquet/.csv and the plots (PNG and HTML) of studies.",
                 "  hybrid report --out runs/report\n"
                 "  hybrid report --storage sqlite:///runs/compare/hybrid.db --study tpe-s0 --study random-s0 --out r")
    _add_storage(p)
    p.add_argument("--study", action="append", default=None, type=_study_name,
                   help="a study name (repeatable; default: every study created by hybrid)")
    p.add_argument("--out", type=Path, required=True, help="the folder written (created if missing)")

    p = _command(sub, "studies", "the studies of a storage: method, trials, budget, best val_bpb",
                 "List the studies of a storage: method, objective and profile, trials (ok/pruned/failed/running), budget "
                 "used, best val_bpb and last activity. Reads the storage; never creates it.",
                 "  hybrid studies\n  hybrid studies --storage sqlite:///runs/compare/hybrid.db")
    _add_storage(p)

    p = _command(sub, "best", "a study's best trial, and its train.py with --export",
                 "Show a study's best successful trial (number, val_bpb, generation, config, log) and, with --export, "
                 "write the train.py that ran it: its generation's code with the trial's knob values written in.",
                 "  hybrid best --study tpe-s0\n  hybrid best --study tpe-s0 --top 5\n"
                 "  hybrid best --study h0 --export best_train.py")
    _add_study(p)
    _add_storage(p)
    p.add_argument("--top", type=_positive(int), default=1, help="also list this many best trials")
    p.add_argument("--export", type=Path, metavar="PATH", help="write the best trial's train.py to PATH")

    p = _command(sub, "show", "one trial: attributes, failure reason, log, code, diff",
                 "Show one trial: its state, attributes and failure reason (`error`); with flags, its log, its "
                 "train.py or its generation's diff against the parent.",
                 "  hybrid show --study tpe-s0 7\n  hybrid show --study tpe-s0 7 --log --lines 100\n"
                 "  hybrid show --study h0 12 --log --follow\n  hybrid show --study h0 12 --diff")
    _add_study(p)
    p.add_argument("trial", type=int, help="the trial's number")
    _add_storage(p)
    p.add_argument("--log", action="store_true", help="the tail of the trial's log")
    p.add_argument("--lines", type=_positive(int), default=40, help="lines of the tail with --log")
    p.add_argument("--follow", action="store_true", help="with --log: keep printing a running trial's log until it ends")
    p.add_argument("--code", action="store_true", help="the train.py the trial ran")
    p.add_argument("--diff", action="store_true", help="the diff of the trial's generation against its parent")

    p = _command(sub, "delete", "delete a study and its trial folders",
                 "Delete a study from its storage, with its trial folders and lineage repository. Without --yes it "
                 "only says what it would delete.",
                 "  hybrid delete --study old-test\n  hybrid delete --study old-test --yes")
    _add_study(p)
    _add_storage(p)
    p.add_argument("--yes", action="store_true", help="really delete")

    p = _command(sub, "dashboard", "optuna-dashboard on a storage, with each trial's log, train.py and diff",
                 "Serve optuna-dashboard (in a browser: studies, trials, plots, importances) on a storage. Each "
                 "trial's page has a note with its status (a failure says so, with its reason: its value is the "
                 "penalty told to the sampler, not a result) and, as artifacts, its log, the train.py that ran it "
                 "(its generation's code with the trial's knob values written in) and its generation's diff against "
                 "the parent. Runs upload these as each trial finishes; this command first uploads what the "
                 "storage's studies lack (studies run before, uploads that failed). The artifacts are kept in "
                 "dashboard-artifacts/ beside a SQLite database (under ./runs for other storages). Anyone who can "
                 "reach the address can rename and delete studies: keep --host on loopback unless the network is "
                 "yours. Ctrl-C stops it.",
                 "  hybrid dashboard\n  hybrid dashboard --storage sqlite:///runs/compare/hybrid.db --port 8081\n"
                 "  ssh -L 8080:127.0.0.1:8080 gpu-box hybrid dashboard   # then open http://127.0.0.1:8080/dashboard/")
    _add_storage(p)
    p.add_argument("--port", type=_port, default=8080, help="the TCP port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")

    isub = _command_group(sub, "import", "another tool's history as a study",
                          "Import the history of another tool as a study that `hybrid report` shows and `hybrid run` "
                          "continues.", "  hybrid import autoresearch --repo ~/autoresearch --study night1", "SOURCE")
    pp = _command(isub, "autoresearch", "an autoresearch checkout's results.tsv and branch of kept commits",
                  "One generation per kept commit, one trial per results.tsv row (source import); continue it with "
                  "`hybrid run --method hybrid --study S --repo PATH`. Its metric is the repository's own evaluation.",
                  "  hybrid import autoresearch --repo ~/autoresearch --study night1 --branch autoresearch/mar5")
    pp.add_argument("--repo", type=Path, required=True, help="the checkout (prepare.py, train.py, results.tsv)")
    _add_study(pp)
    pp.add_argument("--branch", help="the night's branch, autoresearch/<tag> (default: the checked-out one)")
    _add_storage(pp)
    pp.add_argument("--space", type=Path, help="the search space (default: REPO/search_space.yaml)")

    p = _command(sub, "reproduce", "reproduce a published comparison",
                 "Run the protocol of a published comparison (arXiv 2603.24647: 24 hours per study, 3 seeds) and write "
                 "its report beside the published figures.",
                 "  hybrid reproduce arxiv-2603.24647 --surrogate --out runs/paper\n"
                 "  hybrid reproduce arxiv-2603.24647 --real --seeds 1 --out runs/paper-real")
    p.add_argument("paper", choices=("arxiv-2603.24647",), help="the paper")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--surrogate", action="store_true", help="on the surrogate objective (default without a GPU)")
    mode.add_argument("--real", action="store_true", help="on the train objective and the gpu profile")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds per method")
    p.add_argument("--out", type=Path, required=True, help="the folder of the database and the report")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in OUT)")
    p.add_argument("--workers", type=_positive(int), default=None,
                   help="studies run at once (default: one per core with --surrogate, one per GPU with --real)")
    p.add_argument("--llm", choices=("anthropic", "openai", "none"), default="none",
                   help="also run the LLM methods with this provider")
    p.add_argument("--llm-model", help="model name (default: the provider's default)")
    p.add_argument("--llm-base-url", help="base URL of the provider")
    _add_llm_max_usd(p)
    _add_sandbox_flag(p)

    ssub = _command_group(sub, "surrogate", "the surrogate model of the paper's trials",
                          "The surrogate objective on its own: predictions for configs of the paper's space.",
                          "  hybrid surrogate predict --in configs.csv --out predicted.csv", "COMMAND")
    pp = _command(ssub, "predict", "add val_bpb_pred, p_fail, wall_seconds_pred to a CSV of configs",
                  "Read a CSV with one config a row (a column per knob) and write it with val_bpb_pred, p_fail and "
                  "wall_seconds_pred added.",
                  "  hybrid surrogate predict --in configs.csv --out predicted.csv")
    pp.add_argument("--in", dest="inp", type=Path, required=True, help="the CSV of configs")
    pp.add_argument("--out", type=Path, required=True, help="the CSV written")
    return parser


# -- commands ---------------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from harness.data import prepare
    from harness.profiles import get_profile

    prepare(get_profile(args.profile), args.corpus)
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from harness.knobs import find_constants, find_knobs
    from hybrid.paths import project_file
    from hybrid.space import check_against_code, load_space

    path = args.train_py or project_file("train.py")
    if args.init_yaml:
        from hybrid.space_init import write_proposal

        proposal = write_proposal(path, args.init_yaml)
        print(f"wrote {args.init_yaml}: {len(proposal.knobs)} knobs ({len(proposal.marked)} marked REVIEW), "
              f"{len(proposal.left_out)} constants left out (the reasons are in the file)")
        return 0
    code = _read(path)
    knobs, constants = find_knobs(code), find_constants(code)
    if args.space:
        check_against_code(load_space(args.space, args.profile), code)
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
    from hybrid.reports.results import readable
    from hybrid.trial import run_single_trial

    result = run_single_trial(profile=args.profile, assignments=args.set, train_py=args.train_py, space_path=args.space,
                              seed=args.seed, vram_cap_gb=args.vram_cap_gb, out=args.out, sandbox=args.sandbox,
                              as_written=args.as_written)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        shown = {k: v for k, v in result.to_dict().items() if k != "config"}
        width = max(map(len, shown))
        for k, v in shown.items():
            print(f"{k:<{width}}  {readable(v)}")
    return 0 if result.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from hybrid.config import RunConfig
    from hybrid.llm.client import make_provider
    from hybrid.loop import run

    config = RunConfig.from_args(args).finalize()
    _check_folder(args.storage)
    if config.llm != "none":
        make_provider(config)  # no key, or a server that lists no model: refused before the study is created
    return run(config)


def cmd_resume(args: argparse.Namespace) -> int:
    from hybrid.study import store
    from hybrid.loop import resume

    store.require_database(args.storage)
    return resume(args.study, args.storage, workers=args.workers)


def cmd_compare(args: argparse.Namespace) -> int:
    from hybrid.compare import compare

    _check_folder(args.storage)
    compare(args)
    return 0


def _check_folder(storage: str | None) -> None:
    """An explicit SQLite storage's folder must exist (only the default runs/ is created)."""
    from hybrid.study import store

    if storage not in (None, DEFAULT_STORAGE):
        store.require_folder(storage)


def cmd_report(args: argparse.Namespace) -> int:
    from hybrid.reports.report import write_report

    out = write_report(args.storage, args.study, args.out)
    print(f"report written to {out}")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from hybrid.reports.results import studies_table

    print(studies_table(args.storage).to_string(index=False))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from hybrid.reports import results

    study = results.open_study(args.storage, args.study)
    best = results.best_trials(study, args.top)
    if args.top > 1:
        print(results.top_table(best).to_string(index=False), end="\n\n")
    print(results.best_text(study, best[0], args.storage))
    if args.export:
        print(results.export(study, best[0], args.export))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from hybrid.reports import results

    if args.follow and not args.log:
        raise UserError("--follow follows the log: add --log")
    study = results.open_study(args.storage, args.study)
    trial = results.find_trial(study, args.trial)
    print(results.trial_text(trial))
    if args.code:
        print(f"\n# train.py of trial {trial.number}\n{results.trial_code(study, trial)}", end="")
    if args.diff:
        print(f"\n{results.generation_diff(study, trial)}", end="")
    if args.log:
        path = results.log_path(study, trial)
        print(f"\n# log {path}")
        if args.follow:
            print(f"hybrid: {results.follow(study, trial.number, path)}", file=sys.stderr)
        else:
            print(results.tail(path, args.lines), end="")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from hybrid.reports import dashboard, results

    study = results.open_study(args.storage, args.study)
    plan = results.deletion_plan(study, args.storage)
    if not args.yes:
        raise UserError(f"would delete {plan}: add --yes to delete them")
    artifacts = dashboard.remove_artifacts(study, args.storage)
    results.delete_study(study)
    print(f"deleted {plan}" + (f", and its {artifacts} dashboard artifacts" if artifacts else ""))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from hybrid.reports.dashboard import serve

    return serve(args.storage, host=args.host, port=args.port)


def cmd_import(args: argparse.Namespace) -> int:
    from hybrid.autoresearch import import_night

    print(import_night(args.repo, args.study, storage_url=args.storage, branch=args.branch, space_path=args.space))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from hybrid.reproduce import reproduce

    _check_folder(args.storage)
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
        code = command(args)
        sys.stdout.flush()  # here, where a closed pipe can be handled, rather than at exit
        return code
    except BrokenPipeError:  # `hybrid space | head`: the reader is gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is silent too
        return EXIT_BROKEN_PIPE
    except (UserError, SpaceError, KnobError) as e:
        print(f"hybrid: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hybrid: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
