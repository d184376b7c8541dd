"""The gpu profile on a real GPU, in one short window: throughput, overhead, a real OOM, the memory model's error.

    python benchmarks/gpu_trials.py [--minutes 6.5] [--out DIR] [--dry-run]

Phases, in order of value. Each one, as it ends, rewrites OUT/gpu_trials.json and OUT/gpu_trials.md and has
appended the raw log of each of its trials to OUT/gpu_trials.log, so that a run cut off still returns what it did.
A phase that needs more than the minutes left is skipped, and says so; no trial runs past the deadline.

1. throughput: one trial at the defaults of search_space.yaml, 60 s on the clock, compile cache cold: tokens/s,
   MFU, and the wall time outside the budget by phase (goals on an H100: the reference's 499.6 M tokens in 300 s,
   MFU 39.8 %; 25.8 s outside the budget).
2. overhead: the same config again, compile cache warm, 15 s on the clock: per-trial overhead by phase, warm
   against the cold one above (goal: at most 10 s).
3. oom: the defaults under a VRAM cap far below their peak: the status (goal `oom`) and the wall time until the
   trial was over (goal: under 10 s; the compile cache is warm by then, as it is for a repeated architecture).
4. memory: random configs of the space (seeded), MEMORY_PARALLEL at a time on the one GPU, each under its share
   of the device's memory as a cap, 5 s on the clock and one warm-up step: recorded peaks, allocated and reserved,
   against the memory model's uncalibrated estimate (goal: within 10 % of reserved).
5. profile: one compiled training step of the defaults under torch.profiler, in this process (the project's own
   train.py, trusted): the kernels that take the step's time (the attention's share).
6. long-window: the defaults with every layer full causal (WINDOW_PATTERN LLLL), 30 s: tokens/s against phase 1
   prices the short-window (FlexAttention) layers.

Data: the bundled corpus (`builtin`, no network), tokenized at the gpu profile's 8192 tokens; its validation
split scores EVAL_TOKENS (the profile's 21 M need climbmix). Trials run in the sandbox where bubblewrap runs
(`--sandbox auto`: without it, as plain processes; the JSON says which).

`--dry-run` runs every phase on the CPU in about a minute (the `test` profile, budgets of seconds, a model far
too large for the trial's address space as the OOM): a smoke test of the script, not a measurement.

On the device machine (Python 3.12 and its own torch, no network): the packages the harness needs beyond its
image travel as wheels. Here, once, from the repository root:

    bash benchmarks/gpu_wheels.sh          # rustbpe, optuna, SQLAlchemy, alembic, Mako, colorlog, greenlet: 7 MB

then the device tool's `run` with command "bash benchmarks/gpu_run.sh", carry [".whl"] and timeout_s 540 (6.5
minutes of phases plus the data's preparation: about 8 minutes of device time with the machine's start). Copy
the files that come back (gpu_trials.json, .md, .log, .stdout) into benchmarks/results/ and commit them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from harness.data import prepare
from harness.profiles import Profile, get_profile
from harness.result import TrialResult
from harness.runner import compile_cache, peak_flops, run_trial
from harness.sandbox import bwrap_problem
from hybrid.memory import MemoryModel
from hybrid.space import load_space

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "gpu_trials"
DEFAULT_MINUTES = 6.5      # of phases: about 8 minutes of device time with the machine's start and the data
RESERVE_SECONDS = 15.0     # kept back from the deadline for writing what was measured
MEMORY_PARALLEL = 3        # memory trials at once on the GPU (peaks are per process: they do not mix)
MEMORY_SHARE = 0.9         # of the device's memory, split between them as their caps
EVAL_TOKENS = 49152        # validation tokens the bundled corpus fills at sequence 2048
PROFILE_STEPS = 3          # steps before the profiled one (compilation, warm-up)
PROFILE_ROWS = 25          # kernels in the profiler's table
SEED = 0
PROFILED_MODULE = "gpu_trials_train"   # train.py as the profile phase imports it
MEMORY_KNOBS = ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE")
TRIAL_MEMORY = "HYBRID_TRIAL_MEMORY_GB"  # harness.sandbox's host memory cap of a trial process


@dataclass(frozen=True)
class Mode:
    """What one mode of the script runs: the profile, the seconds on the clock of each phase's trials, the OOM."""
    profile: str
    throughput_seconds: float
    overhead_seconds: float
    memory_seconds: float
    memory_configs: int
    long_window_seconds: float
    oom_config: dict[str, Any]        # knobs over the defaults
    oom_cap_gb: float | None          # the VRAM cap of the OOM trial
    oom_host_gb: float | None         # the host memory (address space) of the OOM trial, on the CPU
    eval_tokens: int | None           # validation tokens (None: the profile's)
    needs: dict[str, float] = field(default_factory=dict)  # seconds a phase needs left to start


GPU = Mode("gpu", throughput_seconds=60, overhead_seconds=15, memory_seconds=5, memory_configs=6,
           long_window_seconds=30, oom_config={}, oom_cap_gb=4.0, oom_host_gb=None, eval_tokens=EVAL_TOKENS,
           needs={"throughput": 150, "overhead": 60, "oom": 45, "memory": 120, "profile": 60, "long-window": 120})
# On the CPU: a model whose first block matrix (32768 squared, fp32: 4 GiB) exceeds a 4 GiB address space.
DRY = Mode("test", throughput_seconds=3, overhead_seconds=1.5, memory_seconds=1.5, memory_configs=2,
           long_window_seconds=1.5, oom_config={"DEPTH": 1, "ASPECT_RATIO": 2**15, "HEAD_DIM": 64}, oom_cap_gb=None,
           oom_host_gb=4.0, eval_tokens=None, needs={"throughput": 20, "overhead": 10, "oom": 10, "memory": 10, "profile": 5,
                                    "long-window": 10})
PHASES = ("throughput", "overhead", "oom", "memory", "profile", "long-window")


def random_configs(space_path: Path, profile: str, n: int, seed: int = SEED) -> list[dict[str, Any]]:
    """n configs drawn uniformly from the space (as the random method would)."""
    distributions = load_space(space_path, profile).distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(distributions).params for _ in range(n)]


def row(result: TrialResult) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("status", "val_bpb", "error", "total_seconds", "training_seconds",
                                            "startup_seconds", "eval_seconds", "tokens_per_second", "mfu",
                                            "peak_memory_mb", "peak_reserved_mb", "num_params", "num_steps",
                                            "phases", "config")}


class Bench:
    """One run of the script: the deadline, the trials' folder, and what has been measured so far (written out
    after every phase)."""

    def __init__(self, mode: Mode, minutes: float, out: Path, work: Path):
        self.mode, self.out, self.work = mode, out, work
        self.deadline = time.monotonic() + 60 * minutes
        profile = get_profile(mode.profile)
        self.profile = replace(profile, eval_tokens=mode.eval_tokens) if mode.eval_tokens else profile
        self.space_path = ROOT / "search_space.yaml"
        self.code = (ROOT / "train.py").read_text()
        self.defaults = load_space(self.space_path, self.profile.name).defaults()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / f"{NAME}.log", "w")
        self.report: dict[str, Any] = {
            "dry_run": mode is DRY, "profile": self.profile.name, "corpus": "builtin",
            "eval_tokens": self.profile.eval_tokens, "device": _device_name(), "minutes": minutes,
            "sandbox": bwrap_problem() or "bubblewrap", "peak_bf16_flops": _peak(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cuda": torch.version.cuda}, "phases": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, line: str) -> None:
        print(line, flush=True)
        with self._lock:
            self.log.write(line + "\n")
            self.log.flush()

    def trial(self, label: str, config: dict[str, Any], budget: float, *, vram_cap_gb: float | None = None,
              warmup_steps: int | None = None) -> dict[str, Any]:
        """One trial of train.py through the harness, never past the deadline; its raw log appended to the log."""
        profile = replace(self.profile, time_budget=budget,
                          warmup_steps=self.profile.warmup_steps if warmup_steps is None else warmup_steps)
        timeout = min(profile.timeout_seconds, self.remaining() - RESERVE_SECONDS)
        result = run_trial(self.code, config, profile, self.work / label, seed=SEED, vram_cap_gb=vram_cap_gb,
                           timeout=max(1.0, timeout))
        line = (f"{label}: {result.status} val_bpb={result.val_bpb} total={result.total_seconds:.1f}s "
                f"training={result.training_seconds:.1f}s tok/s={result.tokens_per_second} mfu={result.mfu} "
                f"allocated={result.peak_memory_mb} MiB reserved={result.peak_reserved_mb} MiB "
                f"phases={json.dumps(result.phases)} error={result.error}")
        text = Path(result.log_path).read_text(errors="replace") if result.log_path else ""
        print(line, flush=True)
        with self._lock:
            self.log.write(f"===== {line}\n{text}\n")
            self.log.flush()
        return row(result)

    def run(self, name: str, phase: Callable[[], dict[str, Any]]) -> None:
        """A phase if it fits the time left; its outcome (or why not) written out at once."""
        left = self.remaining()
        if left < self.mode.needs[name]:
            outcome: dict[str, Any] = {"skipped": f"{left:.0f}s left, the phase needs {self.mode.needs[name]:.0f}s"}
        else:
            t0 = time.monotonic()
            try:
                outcome = phase()
            except Exception as e:  # a broken phase must not cost the others
                self.note(traceback.format_exc())
                outcome = {"error": f"{type(e).__name__}: {e}"}
            outcome["phase_seconds"] = time.monotonic() - t0
        self.note(f"----- phase {name}: {json.dumps(outcome, default=str)[:2000]}")
        self.report["phases"][name] = outcome
        self.write()

    def write(self) -> None:
        self.report["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (self.out / f"{NAME}.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / f"{NAME}.md").write_text(markdown(self.report))

    # -- the phases ----------------------------------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        t = self.trial("throughput", self.defaults, self.mode.throughput_seconds)
        return {"trial": t, "overhead_seconds": t["total_seconds"] - t["training_seconds"]}

    def overhead(self) -> dict[str, Any]:
        t = self.trial("overhead-warm", self.defaults, self.mode.overhead_seconds)
        return {"trial": t, "overhead_seconds": t["total_seconds"] - t["training_seconds"]}

    def oom(self) -> dict[str, Any]:
        host = {TRIAL_MEMORY: str(self.mode.oom_host_gb)} if self.mode.oom_host_gb else {}
        with _environment(host):
            t = self.trial("oom", {**self.defaults, **self.mode.oom_config}, self.mode.throughput_seconds,
                           vram_cap_gb=self.mode.oom_cap_gb)
        return {"trial": t, "config": self.mode.oom_config, "vram_cap_gb": self.mode.oom_cap_gb,
                "host_memory_gb": self.mode.oom_host_gb}

    def memory(self) -> dict[str, Any]:
        model = MemoryModel(self.profile, trusted=[self.code])
        configs = random_configs(self.space_path, self.profile.name, self.mode.memory_configs)
        cap = (MEMORY_SHARE * torch.cuda.get_device_properties(self.device).total_memory / 2**30 / MEMORY_PARALLEL
               if self.device.type == "cuda" else None)

        def one(i: int, config: dict[str, Any]) -> dict[str, Any]:
            t = self.trial(f"memory-{i}", config, self.mode.memory_seconds, vram_cap_gb=cap, warmup_steps=1)
            t["estimate_mb"] = model.estimate_mb(self.code, t["config"] or config)
            return t

        with ThreadPoolExecutor(MEMORY_PARALLEL) as pool:
            trials = list(pool.map(one, range(len(configs)), configs))
        return {"vram_cap_gb": cap, "parallel": MEMORY_PARALLEL, "trials": trials,
                "error_vs_reserved": _errors(trials, "peak_reserved_mb"),
                "error_vs_allocated": _errors(trials, "peak_memory_mb")}

    def profile_step(self) -> dict[str, Any]:
        return {"table": profile_table(self.code, self.defaults, self.profile, self.device)}

    def long_window(self) -> dict[str, Any]:
        t = self.trial("long-window", {**self.defaults, "WINDOW_PATTERN": "LLLL"}, self.mode.long_window_seconds)
        return {"trial": t}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _errors(trials: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """The estimate's relative error against a recorded peak, over the successful trials that recorded it."""
    errors = [t["estimate_mb"] / t[key] - 1 for t in trials if t["status"] == "ok" and t[key] and t["estimate_mb"]]
    if not errors:
        return None
    return {"n": len(errors), "median_abs": statistics.median(map(abs, errors)), "max_abs": max(map(abs, errors)),
            "mean": statistics.mean(errors)}


def profile_table(code: str, config: dict[str, Any], profile: Profile, device: torch.device) -> str:
    """torch.profiler's table of one training step of train.py with `config`, compiled on CUDA, after
    PROFILE_STEPS unprofiled ones; its compile cache is the trials' (warm by now)."""
    import types

    from harness.knobs import inject_knobs
    from harness.tokenizer import Tokenizer
    from harness.data import prepared

    cache = compile_cache(code)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    module = sys.modules[PROFILED_MODULE] = types.ModuleType(PROFILED_MODULE)  # its dataclasses look it up
    exec(compile(inject_knobs(code, config), "train.py", "exec"), module.__dict__)
    vocab = Tokenizer.load(prepared(profile).tokenizer).vocab_size
    model = module.build_model(vocab, profile.seq_len, device)
    optimizers = module.build_optimizers(model)
    step_model = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    tokens = torch.randint(0, vocab, (module.DEVICE_BATCH_SIZE, profile.seq_len + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)

    def step() -> None:
        with autocast:
            loss = step_model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(PROFILE_STEPS):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS, max_name_column_width=60)


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA: peaks are process RSS)"


def _peak() -> float | None:
    return peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _trial_lines(label: str, t: dict[str, Any]) -> Iterator[str]:
    mfu = _fmt(100 * t["mfu"], ".1f", " %") if t["mfu"] is not None else "-"
    yield (f"- {label}: `{t['status']}`, {_fmt(t['tokens_per_second'], ',.0f')} tokens/s, MFU {mfu}, "
           f"{t['num_steps']} steps, {_fmt(t['training_seconds'])} s on the clock of {_fmt(t['total_seconds'])} s "
           f"in all ({_fmt(t['total_seconds'] - t['training_seconds'])} s outside the budget), val_bpb "
           f"{_fmt(t['val_bpb'], '.4f')}, peak {_fmt(t['peak_memory_mb'], ',.0f')} MiB allocated / "
           f"{_fmt(t['peak_reserved_mb'], ',.0f')} MiB reserved" + (f"; {t['error']}" if t["error"] else ""))
    if t["phases"]:
        yield "  - phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t["phases"].items())


def markdown(r: dict[str, Any]) -> str:
    title = "# The gpu profile on a GPU" + (" (DRY RUN on the CPU: a smoke test, not a measurement)"
                                            if r["dry_run"] else "")
    lines = [title, "",
             f"Device: {r['device']}; profile {r['profile']}, data {r['corpus']}, {r['eval_tokens']:,} validation "
             f"tokens; Python {r['machine']['python']}, torch {r['machine']['torch']} (CUDA {r['machine']['cuda']}); "
             f"sandbox: {r['sandbox']}; measured {r.get('measured_at')}. Produced by "
             f"`python benchmarks/gpu_trials.py{' --dry-run' if r['dry_run'] else ''}` within {r['minutes']:g} "
             f"minutes (log: {NAME}.log, data: {NAME}.json).", ""]
    phases = r["phases"]
    for name in PHASES:
        p = phases.get(name)
        if p is None:
            lines.append(f"## {name}: not reached")
            continue
        lines.append(f"## {name}" + (f" ({p['phase_seconds']:.0f} s)" if "phase_seconds" in p else ""))
        if "skipped" in p or "error" in p:
            lines.append(f"- {p.get('skipped') and 'skipped: ' + p['skipped'] or 'failed: ' + p['error']}")
        elif name in ("throughput", "overhead", "long-window"):
            lines += _trial_lines(name, p["trial"])
        elif name == "oom":
            cap = (f"a VRAM cap of {p['vram_cap_gb']:g} GiB" if p["vram_cap_gb"] else
                   f"{p['host_memory_gb']:g} GiB of address space")
            lines += [f"- defaults with {p['config']} under {cap}: status `{p['trial']['status']}` after "
                      f"{p['trial']['total_seconds']:.1f} s of wall time (goal: `oom` in under 10 s). "
                      f"{p['trial']['error']}"]
        elif name == "memory":
            lines += _memory_lines(p)
        elif name == "profile":
            lines += ["```", p["table"].rstrip(), "```"]
        lines.append("")
    return "\n".join(lines) + "\n"


def _memory_lines(p: dict[str, Any]) -> list[str]:
    lines = [f"- {len(p['trials'])} random configs, {p['parallel']} at a time, cap {_fmt(p['vram_cap_gb'])} GiB each."]
    for key, label in (("error_vs_reserved", "reserved"), ("error_vs_allocated", "allocated")):
        e = p[key]
        if e:
            lines.append(f"- Estimate against {label} peaks, {e['n']} trials: median |error| "
                         f"{100 * e['median_abs']:.1f} %, max {100 * e['max_abs']:.1f} %, mean (signed) "
                         f"{100 * e['mean']:+.1f} % (goal: within 10 %).")
    lines += ["", f"| trial | status | allocated MiB | reserved MiB | estimate MiB | {' | '.join(MEMORY_KNOBS)} |",
              "|---" * (5 + len(MEMORY_KNOBS)) + "|"]
    for i, t in enumerate(p["trials"]):
        lines.append(f"| memory-{i} | {t['status']} | {_fmt(t['peak_memory_mb'], ',.0f')} | "
                     f"{_fmt(t['peak_reserved_mb'], ',.0f')} | {_fmt(t['estimate_mb'], ',.0f')} | "
                     + " | ".join(str(t["config"].get(k, "-")) for k in MEMORY_KNOBS) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"wall-clock budget of the phases (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the json, md and log go")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU in about a minute")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU, or with --dry-run for the smoke test on the CPU")
    mode = DRY if args.dry_run else GPU
    profile = get_profile(mode.profile)
    prepare(replace(profile, eval_tokens=mode.eval_tokens) if mode.eval_tokens else profile, "builtin")
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(mode, args.minutes, args.out, Path(work))
        bench.note(f"{NAME}: {bench.report['device']}, torch {torch.__version__}, sandbox {bench.report['sandbox']}, "
                   f"{args.minutes:g} minutes")
        for name, phase in zip(PHASES, (bench.throughput, bench.overhead, bench.oom, bench.memory,
                                        bench.profile_step, bench.long_window)):
            bench.run(name, phase)
        bench.log.close()
    print(markdown(bench.report))
    return bench.report


if __name__ == "__main__":
    main(sys.argv[1:])
