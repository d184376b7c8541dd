"""The memory model: a config's peak GPU memory, predicted before its trial runs.

The estimate is analytic: train.py, with the config injected, builds its model on the meta device (exact
shapes, no memory, no GPU), and the peak follows from those shapes, the micro-batch and what training keeps
alive (weights, gradients, optimizer states, activations saved for the backward pass, logits). The model is
built once per architecture (the code and the knobs that may set a shape); the micro-batch is applied after.
An agent's train.py is untrusted: each build runs in a fresh process of its own in the OS sandbox (ShapeProbe),
that lives for that one build. One that hangs, exits or hogs memory costs its prediction, never the run, and one
that patches torch (or anything else) at import changes no other build's shapes.
Earlier trials of the same code calibrate it: their recorded peaks against their estimates. A config predicted
over the VRAM cap is not run; it is recorded as a failed trial of class `oom-predicted` that cost no GPU time.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.knobs import KnobError, find_knobs, inject_knobs
from harness.profiles import PAPER_CAP_GB, Profile

if TYPE_CHECKING:  # the rest is imported where it is used: the probe's process imports no more than a build needs
    from optuna.trial import FrozenTrial

    from harness.result import TrialResult

MIB, GIB = 2**20, 2**30
FP32, BF16 = 4, 2             # bytes per element
WORKSPACE_BYTES = 256 * MIB   # cuBLAS and attention workspaces, rotary tables, block masks, the batch itself
MUON_STEP_COPIES = 7          # fp32 copies of one stack of matrices alive at once inside Muon.step (see peak_bytes)
MIN_CALIBRATION_POINTS = 3    # successful trials of the same code needed to calibrate
CALIBRATION_POINTS = 10       # calibrate on this many of them, those with the largest estimates (nearest the cap)
PROBE_MODULE = "hybrid_memory_probe"
PROBE_START_SECONDS = 120.0   # for a probe process to start (sandbox, import torch: about 2 s); then for its build:
PROBE_BUILD_SECONDS = 30.0    # a build on the meta device takes about 0.1 s
PROBE_MEMORY_BYTES = 2 * GIB  # what a build may allocate beyond the probe's own (one on the meta device needs MiBs)
PROBE_SANDBOX_BYTES = 16 * GIB  # the sandbox's cap (address space, memory cgroup): torch maps GiBs of libraries
PROBE_ANSWER_BYTES = 2**20    # the most read from a probe's stdout (an answer is a few KiB)
PROBE_CACHE = 4096            # builds kept per ShapeProbe (a few hundred bytes each)
BATCH_KNOBS = ("DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE")  # applied to the shapes of a built model (model_shapes)
# The reference train.py's knobs that set no shape: learning rates, schedule, optimizer constants, attention windows
# (a mask, no tensor kept). Configs that differ only in these and BATCH_KNOBS share one build of the model; any other
# knob, a new one included, is taken to set shapes. An edited train.py keeps them only if shapeless_knobs confirms it.
SHAPELESS_KNOBS = frozenset({
    *BATCH_KNOBS, "EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "WARMUP_RATIO",
    "WARMDOWN_RATIO", "FINAL_LR_FRAC", "WINDOW_PATTERN", "ADAM_EPS", "MUON_MOMENTUM_WARMUP_STEPS", "MUON_BETA2",
    "ROPE_BASE", "LOGIT_SOFTCAP", "LOG_SECONDS"})


@dataclass(frozen=True)
class BlockShape:
    model_dim: int
    n_head: int
    mlp_hidden: int
    value_embedding: bool


@dataclass(frozen=True)
class ModelShapes:
    """What a trial's peak memory depends on, read from the model and optimizers train.py builds."""
    blocks: tuple[BlockShape, ...]
    model_dim: int            # width of the token embedding and of lm_head's input
    vocab_size: int
    seq_len: int
    device_batch_size: int    # rows per forward/backward pass
    total_batch_size: int | None  # tokens per optimizer step (TOTAL_BATCH_SIZE); None where train.py has none
    grad_accum: int           # micro-batches per optimizer step
    eval_rows: int            # rows per forward pass of the harness's evaluation
    params: int
    adam_params: int          # in AdamW: two fp32 states each
    muon_params: int          # in Muon: one fp32 momentum each
    muon_second_moment: int   # NorMuon's per-neuron second moments: one per row (or column) of each matrix
    largest_muon_group: int   # elements of the largest stack of same-shape matrices that Muon updates at once


def activation_bytes_per_token(s: ModelShapes) -> int:
    """Bytes kept for the backward pass per token of a micro-batch, under bf16 autocast and torch.compile.

    Compilation recomputes cheap elementwise work in the backward pass (rotary, RMS norms, relu², the residual
    mixing, weight casts) from what is saved; the tensors below are those it cannot recompute cheaply.
    """
    total = 0
    for b in s.blocks:
        d = b.model_dim
        total += (FP32 * d                  # residual stream entering the block (lambda gradients, attention norm)
                  + FP32 * d                # residual stream after attention (the MLP norm's input)
                  + BF16 * d                # normed input of c_q, c_k, c_v
                  + BF16 * 2 * d            # q and k out of their linears (input of rotary and norm)
                  + BF16 * 3 * d            # q, k, v as the attention kernel's inputs
                  + BF16 * 2 * d            # attention output, and the (B, T, d) copy of it that c_proj reads
                  + FP32 * b.n_head         # attention's log-sum-exp, one per head
                  + BF16 * d                # normed input of c_fc
                  + BF16 * b.mlp_hidden     # c_fc's output (relu² and c_proj's input are recomputed from it)
                  + (FP32 * d if b.value_embedding else 0))  # the value embedding gated into v
    d = s.model_dim
    total += FP32 * d + FP32 * d + BF16 * d   # x0 (normed token embedding), final residual stream, its norm
    total += BF16 * s.vocab_size * 2          # bf16 logits, and their gradient, alive together as backward starts
    return total


def peak_bytes(s: ModelShapes) -> float:
    """Peak CUDA memory a trial allocates (what torch.cuda.max_memory_allocated records): the largest of
    three moments, plus the workspaces. The CUDA context is outside the allocator: neither recorded nor capped.

    - training, as the backward pass starts: weights, optimizer states, every activation saved by the forward
      pass of one micro-batch; gradients too when accumulation keeps them between micro-batches (with one
      micro-batch per step they are allocated while the activations are being freed);
    - the optimizer step: weights, gradients, states, and Muon's working copies of its largest stack of matrices
      (stacked gradients, the scaled and final updates, stacked weights, the decay and two temporaries);
    - the harness's evaluation, eager and without gradients, after train.py returned (optimizers and gradients
      freed): the fp32 logits of one evaluation batch and the two fp32 temporaries of their soft-capping.
    """
    weights = grads = FP32 * s.params
    states = 2 * FP32 * s.adam_params + FP32 * (s.muon_params + s.muon_second_moment)
    tokens = s.device_batch_size * s.seq_len
    training = weights + states + (grads if s.grad_accum > 1 else 0) + tokens * activation_bytes_per_token(s)
    step = weights + grads + states + MUON_STEP_COPIES * FP32 * s.largest_muon_group
    evaluation = weights + s.eval_rows * s.seq_len * 3 * FP32 * s.vocab_size
    return WORKSPACE_BYTES + max(training, step, evaluation)


def grad_accum(total_batch_size: int | None, tokens_per_pass: int) -> int:
    """Micro-batches per optimizer step, as the runner snaps TOTAL_BATCH_SIZE; 2 (gradients kept between
    micro-batches) for a train.py without TOTAL_BATCH_SIZE."""
    return max(1, math.floor(total_batch_size / tokens_per_pass + 0.5)) if total_batch_size else 2


def _load(code: str) -> types.ModuleType:
    """train.py executed as a fresh module that is not `__main__` (its main() never runs). It is registered in
    sys.modules only while it executes, for the dataclasses that look their module up."""
    module = types.ModuleType(PROBE_MODULE)
    sys.modules[PROBE_MODULE] = module
    try:
        exec(compile(code, "train.py", "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[PROBE_MODULE]
    return module


def architecture(config: dict[str, Any], shapeless: frozenset[str] = SHAPELESS_KNOBS) -> tuple[tuple[str, Any], ...]:
    """The knobs of `config` that may set a shape of the model (all but `shapeless`), sorted by name."""
    return tuple(sorted((name, value) for name, value in config.items() if name not in shapeless))


def shapeless_knobs(code: str, profile: Profile, sandbox: str = "auto") -> frozenset[str]:
    """SHAPELESS_KNOBS, checked against this code: it keeps them if a build with every one of them changed has the
    shapes of a build at its defaults. An edit that made one of them set a shape (or a code that cannot be built)
    keeps only the batch knobs: every architecture then gets a build of its own, and no estimate goes wrong.
    Cached per code and profile (shape_probe(sandbox).shapeless_knobs)."""
    return shape_probe(sandbox).shapeless_knobs(code, profile)


def _changed(value: Any) -> Any:
    """Another value of a knob's kind, for shapeless_knobs: flipped, reversed, or moved by a little over half."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value[::-1] + value[:1]
    return value + max(1, abs(value) // 2) if isinstance(value, int) else value * 1.5 + 0.01


def with_batch(shapes: ModelShapes, config: dict[str, Any]) -> ModelShapes:
    """`shapes` with the micro-batch and accumulation of `config` (train.py's own where config leaves them)."""
    batch = int(config.get("DEVICE_BATCH_SIZE", shapes.device_batch_size))
    total = config.get("TOTAL_BATCH_SIZE", shapes.total_batch_size)
    return replace(shapes, device_batch_size=batch, total_batch_size=total,
                   grad_accum=grad_accum(total, batch * shapes.seq_len))


def model_shapes(code: str, config: dict[str, Any], profile: Profile, sandbox: str = "auto") -> ModelShapes | None:
    """The shapes of the model and optimizers that `code` with `config` injected builds for `profile`,
    or None when they cannot be read (no build_model, a failure building it, another model structure).
    The model is built once per (code, architecture, profile), in a sandboxed process of its own (`sandbox`: a
    harness.sandbox mode); the batch knobs of `config` are applied to it."""
    return shape_probe(sandbox).model_shapes(code, config, profile)


def build_shapes(code: str, knobs: tuple[tuple[str, Any], ...], profile: Profile,
                 eval_rows: int | None = None) -> ModelShapes | None:
    """model_shapes with only `knobs` (an architecture) injected, the batch knobs train.py's own; run in this
    process: the untrusted code runs here (ShapeProbe runs it in a sandboxed process of its own).
    `eval_rows`: harness.scorer.forward_rows(profile), given (the probe's process does not import the scorer)."""
    if eval_rows is None:
        from harness.scorer import forward_rows

        eval_rows = forward_rows(profile)
    try:
        module = _load(inject_knobs(code, dict(knobs)))
        model = module.build_model(profile.vocab_size, profile.seq_len, device=torch.device("meta"))
        blocks = tuple(BlockShape(b.attn.c_q.in_features, b.attn.n_head, b.mlp.c_fc.out_features,
                                  b.attn.ve_gate is not None) for b in model.blocks)
        build_optimizers = getattr(module, "build_optimizers", None)
        optimizers = build_optimizers(model) if build_optimizers else [torch.optim.AdamW(model.parameters())]
        batch = int(module.DEVICE_BATCH_SIZE)
        total = getattr(module, "TOTAL_BATCH_SIZE", None)
        model_dim = model.lm_head.in_features
    except (Exception, SystemExit):  # a train.py this model cannot read (or that exits): no prediction, the trial runs
        return None
    adam = muon = second_moment = largest = 0
    for opt in optimizers:
        for group in opt.param_groups:
            numel = sum(p.numel() for p in group["params"])
            if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                adam += numel
            else:  # train.py's Muon: momentum, NorMuon's second moment over the longer side, one stack per group
                muon += numel
                second_moment += sum(max(p.shape) for p in group["params"])
                largest = max(largest, numel)
    return ModelShapes(
        blocks=blocks, model_dim=model_dim, vocab_size=profile.vocab_size, seq_len=profile.seq_len,
        device_batch_size=batch, total_batch_size=total, grad_accum=grad_accum(total, batch * profile.seq_len),
        eval_rows=eval_rows,
        params=sum(p.numel() for p in model.parameters()), adam_params=adam, muon_params=muon,
        muon_second_moment=second_moment, largest_muon_group=largest)


Knobs = tuple[tuple[str, Any], ...]


class ShapeProbe:
    """Builds of train.py's model, each in a fresh process of its own (`python -m hybrid.memory REQUEST`) that
    lives for that one build, in the OS sandbox (harness.sandbox, mode `sandbox`): the project's code and the
    Python environment read-only, the request (code, knobs, profile) a read-only file handed in, nothing of
    the trusted side's environment, capped memory (PROBE_SANDBOX_BYTES; inside, PROBE_MEMORY_BYTES above its
    size once torch is imported) and wall time (PROBE_START_SECONDS to start, PROBE_BUILD_SECONDS to build). The
    answer is a JSON line on its stdout, never a pickle; what train.py prints goes nowhere. A build that hangs,
    exits, dies or says something that is not shapes gives None. Whatever its code does at import dies with it.

    Builds are cached per (code, architecture, profile): a repeat costs no process, a hung or failed build
    included. `processes` counts those started."""

    def __init__(self, sandbox: str = "auto") -> None:
        from harness.sandbox import resolve

        resolve(sandbox)  # now: an unknown mode, or `required` where bubblewrap cannot run, is the caller's error
        self.sandbox = sandbox
        self.trusted: set[str] = set()  # code built in this process (MemoryModel's `trusted`)
        self.processes = 0
        self._builds: dict[tuple[str, Knobs, Profile], ModelShapes | None] = {}
        self._shapeless: dict[tuple[str, Profile], frozenset[str]] = {}
        self._warned: set[str] = set()

    def clear(self) -> None:
        """Forget every build and every trusted code (as a new run would)."""
        self.trusted.clear()
        self._builds.clear()
        self._shapeless.clear()

    def model_shapes(self, code: str, config: dict[str, Any], profile: Profile) -> ModelShapes | None:
        """hybrid.memory.model_shapes, through this probe. The first config of a code is built alongside the
        shapeless check's two builds, as if the check will pass (it does unless an edit made a knob set a shape)."""
        shapeless = self.shapeless_knobs(code, profile, also=architecture(config))
        shapes = self.built(code, architecture(config, shapeless), profile)
        return with_batch(shapes, config) if shapes is not None else None

    def shapeless_knobs(self, code: str, profile: Profile, also: Knobs | None = None) -> frozenset[str]:
        """hybrid.memory.shapeless_knobs, through this probe: its two builds run side by side (and the build of
        the architecture `also` with them, if the check is not cached yet)."""
        key = (code, profile)
        if key not in self._shapeless:
            self._shapeless[key] = self._check_shapeless(code, profile, [] if also is None else [also])
        return self._shapeless[key]

    def _check_shapeless(self, code: str, profile: Profile, also: list[Knobs]) -> frozenset[str]:
        try:
            defaults = {name: knob.value for name, knob in find_knobs(code).items()}
        except KnobError:
            return frozenset(BATCH_KNOBS)
        changed = {name: _changed(v) for name, v in defaults.items() if name in SHAPELESS_KNOBS - {*BATCH_KNOBS}}
        if not changed:
            return SHAPELESS_KNOBS
        base, other, *_ = self.built_all(code, [(), tuple(sorted(changed.items())), *also], profile)
        return SHAPELESS_KNOBS if base is not None and other == base else frozenset(BATCH_KNOBS)

    def built(self, code: str, knobs: Knobs, profile: Profile) -> ModelShapes | None:
        """The shapes `code` with `knobs` builds for `profile`: cached, else one sandboxed process."""
        return self.built_all(code, [knobs], profile)[0]

    def built_all(self, code: str, architectures: list[Knobs], profile: Profile) -> list[ModelShapes | None]:
        """built() for each architecture; those not cached yet are built at once, a process each."""
        new = list(dict.fromkeys(k for k in architectures if (code, k, profile) not in self._builds))
        for knobs, shapes in zip(new, self.build(code, new, profile)):
            if len(self._builds) >= PROBE_CACHE:
                del self._builds[next(iter(self._builds))]  # the oldest
            self._builds[(code, knobs, profile)] = shapes
        return [self._builds.get((code, k, profile)) for k in architectures]

    def build(self, code: str, architectures: list[Knobs], profile: Profile) -> list[ModelShapes | None]:
        """build_shapes of each architecture, each in a fresh sandboxed process, all started at once (no cache);
        in this process for code in `trusted` (the user's own train.py: no agent wrote it)."""
        from harness.sandbox import Jail, Limits, kill
        from harness.scorer import forward_rows

        eval_rows = forward_rows(profile)
        if code in self.trusted:
            return [build_shapes(code, knobs, profile, eval_rows) for knobs in architectures]
        with contextlib.ExitStack() as stack:
            started = []
            for knobs in architectures:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-probe-",
                                                                              ignore_cleanup_errors=True)))
                request = folder / "request.json"
                request.write_text(json.dumps({"code": code, "knobs": knobs, "profile": asdict(profile),
                                               "eval_rows": eval_rows}))
                jail = Jail(self.sandbox, folder / "scratch", handed={"request.json": request},
                            code=("harness", "hybrid"), limits=Limits(memory_bytes=PROBE_SANDBOX_BYTES))
                errors = stack.enter_context(open(folder / "stderr", "w+b"))  # read only if it does not start
                try:
                    proc = jail.popen([sys.executable, "-m", "hybrid.memory", jail.path("request.json")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
                except OSError as e:
                    self._warn(f"{type(e).__name__}: {e}")
                    started.append(None)
                    continue
                self.processes += 1
                stack.callback(proc.stdout.close)
                stack.callback(kill, proc)  # when all are read, before their folders go: each lives for one build
                started.append((proc, time.monotonic(), errors))
            answers = self._answers(started)
        return [replace(shapes, eval_rows=eval_rows) if shapes is not None else None for shapes in answers]

    def _answers(self, started: list) -> list[ModelShapes | None]:
        """The answers of probes started at once, (process, start time, stderr file) each or None, read side by side:
        "ready" within PROBE_START_SECONDS of its start, then shapes (or null) within PROBE_BUILD_SECONDS of that;
        None for anything else (silence, an exit, a line that is not shapes, PROBE_ANSWER_BYTES without a line)."""
        answers: list[ModelShapes | None] = [None] * len(started)
        waiting = {i: (one[1] + PROBE_START_SECONDS, False, bytearray()) for i, one in enumerate(started) if one}
        while waiting:
            now = time.monotonic()
            for i, (deadline, ready, _) in list(waiting.items()):
                if deadline <= now:
                    del waiting[i]
                    if not ready:
                        self._not_started(*started[i])
            streams = {started[i][0].stdout.fileno(): i for i in waiting}
            if not streams:
                break
            readable, _, _ = select.select(list(streams), [], [], min(d for d, _, _ in waiting.values()) - now)
            for fd in readable:
                i = streams[fd]
                deadline, ready, pending = waiting[i]
                chunk = os.read(fd, 65536)
                pending += chunk
                while i in waiting and b"\n" in pending:
                    line, _, rest = bytes(pending).partition(b"\n")
                    pending[:] = rest
                    if ready:
                        answers[i] = _shapes_from_json(line.decode(errors="replace"))
                        del waiting[i]
                    elif line.strip() == b"ready":
                        ready = True
                        waiting[i] = (time.monotonic() + PROBE_BUILD_SECONDS, True, pending)
                    else:  # before "ready", only this module's own code ran: it prints nothing else
                        del waiting[i]
                if i in waiting and (not chunk or len(pending) > PROBE_ANSWER_BYTES):  # it closed, or floods
                    del waiting[i]
                    if not ready:
                        self._not_started(*started[i])
        return answers

    def _not_started(self, proc: subprocess.Popen, started: float, errors) -> None:  # noqa: ANN001
        """Say once per reason (on stderr) why a probe process did not start: its exit status or its silence, and the
        last line it wrote on stderr (before "ready", no agent code has run in it)."""
        code, last = proc.poll(), ""
        with contextlib.suppress(OSError):
            errors.seek(max(0, os.fstat(errors.fileno()).st_size - 2000))
            last = (errors.read().decode(errors="replace").strip().splitlines() or [""])[-1]
        why = f"exit status {code}" if code is not None else f"not ready in {PROBE_START_SECONDS:.0f} s"
        self._warn(f"{why}{': ' + last if last else ''}")

    def _warn(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            print(f"hybrid: a memory model probe process did not start ({why}): no prediction",
                  file=sys.stderr, flush=True)


@functools.cache
def shape_probe(sandbox: str = "auto") -> ShapeProbe:
    """The process's ShapeProbe for a sandbox mode: its cache is shared by every MemoryModel of that mode."""
    return ShapeProbe(sandbox)


def serve(request: str) -> None:
    """A probe process (`python -m hybrid.memory REQUEST`): one build, of the request in the JSON file REQUEST
    (code, knobs, profile, eval_rows). It says "ready" once torch is imported and its limits are set, then the
    build's ModelShapes (or null), JSON lines on stdout; what train.py prints goes to /dev/null. Then it exits."""
    import torch._dynamo  # noqa: F401  (what a build on the meta device imports anyway, through torch._refs: 1-3 s)

    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    _die_with_parent()
    _limit_cpu(PROBE_START_SECONDS + PROBE_BUILD_SECONDS)
    _limit_memory(PROBE_MEMORY_BYTES)
    fields = json.loads(Path(request).read_text())
    knobs = tuple((name, value) for name, value in fields["knobs"])
    profile = Profile(**fields["profile"])
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, sys.stdout.fileno())
    os.dup2(quiet, sys.stderr.fileno())
    answers.write("ready\n")
    answers.flush()
    shapes = build_shapes(fields["code"], knobs, profile, eval_rows=int(fields["eval_rows"]))
    answers.write(json.dumps(asdict(shapes) if shapes is not None else None) + "\n")
    answers.flush()


def _limit_memory(extra: int) -> None:
    """Cap this process's data memory (heap, private mappings) at what it uses now plus `extra` bytes, soft and hard
    (the code that runs next cannot lift it): a train.py that allocates more at import gets a MemoryError (no
    prediction), not the machine's memory. Linux only."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        limit = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _limit_cpu(seconds: float) -> None:
    """Cap this process's CPU time, soft and hard: a build that spins ends even if nothing is left to kill it."""
    with contextlib.suppress(OSError, ValueError):
        used = resource.getrusage(resource.RUSAGE_SELF)
        limit = math.ceil(seconds + used.ru_utime + used.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (limit, limit))


def _die_with_parent() -> None:
    """SIGKILL this process when the one that started it ends (Linux; in bubblewrap, --die-with-parent does it)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _shapes_from_json(answer: str) -> ModelShapes | None:
    """ModelShapes from the probe's answer; None for no shapes, or for anything else it may have said."""
    try:
        fields = json.loads(answer)
        if fields is None:
            return None
        blocks = tuple(BlockShape(**block) for block in fields.pop("blocks"))
        shapes = ModelShapes(blocks=blocks, **fields)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    numbers = [getattr(shapes, name) for name in fields if name != "total_batch_size"]
    numbers += [n for b in blocks for n in (b.model_dim, b.n_head, b.mlp_hidden)]
    ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
    return shapes if ok and isinstance(shapes.total_batch_size, (int, type(None))) else None


def analytic_peak_bytes(code: str, config: dict[str, Any], profile: Profile, sandbox: str = "auto") -> float | None:
    """Predicted peak GPU memory of a trial of `code` with `config` on `profile`, in bytes; None if unknown."""
    shapes = model_shapes(code, config, profile, sandbox)
    return peak_bytes(shapes) if shapes is not None else None


def default_cap_gb(vram_cap_gb: float | None, objective: str, profile: Profile) -> float | None:
    """The cap (GiB) the memory model enforces, or None: it does nothing.

    --vram-cap-gb if given, else the paper's 76 GiB for the surrogate objective (its trials ran under that cap)
    and the gpu profile, else none (cpu and test profiles). Never for trials that run without CUDA: there is
    no GPU memory to run out of, and the peaks they record are the process's RSS."""
    if objective != "surrogate" and not torch.cuda.is_available():
        return None
    if vram_cap_gb is not None:
        return vram_cap_gb
    return PAPER_CAP_GB if objective == "surrogate" or profile.name == "gpu" else None


def recorded_peak_mb(attrs: dict[str, Any]) -> float | None:
    """The peak a trial recorded that a cap concerns: CUDA's reserved memory where recorded (what the caching
    allocator took, and what set_per_process_memory_fraction and an out-of-memory error count), else its
    allocated peak (trials before it was recorded, and the process's RSS on CPU)."""
    return attrs.get("peak_reserved_mb") or attrs.get("peak_memory_mb")


class MemoryModel:
    """Peak memory predictions for one profile, calibrated per code generation.

    Calibration: the estimate times the median ratio of recorded (recorded_peak_mb: reserved where there is one)
    to estimated peaks over the successful trials of the same code (by code_sha) that recorded one, once there
    are MIN_CALIBRATION_POINTS of them; over the CALIBRATION_POINTS with the largest estimates, nearest the cap,
    where the decision is made. Before, the estimate alone, with no margin added: it is conservative already (the
    reference baseline: 46.2 GiB estimated, 44.0 GiB measured on an H100), and the two errors do not cost the
    same: a config refused wrongly is never tried, a real out-of-memory error costs the seconds before it.
    Estimates are cached per (code, config).

    `sandbox`: the harness.sandbox mode of the processes that build the models (auto, required, off), the run's
    --sandbox; a UserError here for an unknown mode, or `required` where bubblewrap cannot run. Code in `trusted`
    (the user's own train.py, generation 0) is built in this process, in milliseconds.
    """

    def __init__(self, profile: Profile, sandbox: str = "auto", trusted: Iterable[str] = ()) -> None:
        self.profile = profile
        self.probe = shape_probe(sandbox)
        self.probe.trusted.update(trusted)
        self._estimates: dict[tuple[str, str], float | None] = {}

    def estimate_mb(self, code: str, config: dict[str, Any]) -> float | None:
        from hybrid.study.store import code_sha

        key = (code_sha(code), repr(sorted(config.items())))
        if key not in self._estimates:
            shapes = self.probe.model_shapes(code, config, self.profile)
            peak = peak_bytes(shapes) if shapes is not None else None
            self._estimates[key] = peak / MIB if peak is not None else None
        return self._estimates[key]

    def calibration(self, code: str, history: Iterable[FrozenTrial]) -> float | None:
        """Median recorded / estimated peak over the largest successful trials of `code` in history (see the
        class); None if too few."""
        from hybrid.study import records
        from hybrid.study.store import code_sha

        sha = code_sha(code)
        points = []  # (estimate, recorded) in MiB
        for trial in history:
            attrs = trial.user_attrs
            recorded = recorded_peak_mb(attrs)
            if attrs.get(records.STATUS) != records.OK or attrs.get(records.CODE_SHA) != sha or not recorded:
                continue
            estimate = self.estimate_mb(code, attrs.get(records.CONFIG_RAN) or trial.params)
            if estimate:
                points.append((estimate, recorded))
        if len(points) < MIN_CALIBRATION_POINTS:
            return None
        largest = sorted(points, reverse=True)[:CALIBRATION_POINTS]
        return statistics.median(recorded / estimate for estimate, recorded in largest)

    def predict_mb(self, code: str, config: dict[str, Any], history: Iterable[FrozenTrial] = ()) -> float | None:
        """Predicted peak memory of a trial in MiB, calibrated on `history` (the study's trials); None if unknown."""
        estimate = self.estimate_mb(code, config)
        if estimate is None:
            return None
        ratio = self.calibration(code, history)
        return estimate * ratio if ratio is not None else estimate

    def check(self, code: str, config: dict[str, Any], cap_gb: float,
              history: Iterable[FrozenTrial] = ()) -> TrialResult | None:
        """The `oom-predicted` result of a config predicted over `cap_gb` (GiB), or None: run it."""
        from harness.result import TrialResult

        predicted = self.predict_mb(code, config, history)
        if predicted is None or predicted * MIB <= cap_gb * GIB:
            return None
        return TrialResult(status="oom-predicted", total_seconds=0.0, config=dict(config),
                           error=f"predicted peak {predicted * MIB / GIB:.1f} GB > cap {cap_gb:g} GB")


if __name__ == "__main__":
    serve(sys.argv[1])
