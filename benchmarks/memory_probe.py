"""What the memory model's probe costs: a build per new architecture, each in a fresh sandboxed process; a cached estimate.

    python benchmarks/memory_probe.py [--repeats 5] [--architectures 20]

The memory model builds train.py's model on the meta device in a fresh process per build, in the OS sandbox
(hybrid.memory.ShapeProbe; bubblewrap in the `auto` mode where the kernel allows it), because an agent's train.py is
untrusted. This measures, on the gpu profile and the reference train.py:
- first estimate of a code: a new run's first estimate (the shapeless-knob check's two builds and the config's
  own, side by side: one round of processes), `--repeats` times, from an empty cache;
- new architecture, sandboxed: an estimate of an architecture not seen before (one process in bubblewrap), over
  `--architectures` distinct DEPTH x ASPECT_RATIO x HEAD_DIM configs;
- new architecture, `--sandbox off`: the same through a plain child process (allow-listed environment and limits,
  no bubblewrap): what bubblewrap itself adds; and the CPU time of that process;
- in process: the same builds run in this process (hybrid.memory.build_shapes): the build alone, no process;
- cached: an estimate of a config whose architecture was built already (only learning rates differ): no process;
- memory: the peak resident memory of a probe process (`off`, its own rusage), and its data-memory limit.
Writes benchmarks/results/memory_probe.{json,md,log}. Run it on a quiet machine: the load average is logged.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import hybrid.memory
from harness.profiles import get_profile
from harness.sandbox import bwrap_problem
from hybrid.memory import ShapeProbe, build_shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "memory_probe"
GPU = get_profile("gpu")
# The last run with one long-lived probe process for every build (commit f540411, same machine type, load 0.21).
BEFORE = {"start_ms": 2151.6, "build_ms": 17.95, "in_process_ms": 17.99, "cached_ms": 0.023, "probe_data_mib": 327}


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that ended (the `off` probes; bubblewrap's are
    grandchildren, not all counted)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--architectures", type=int, default=20)
    args = parser.parse_args()
    code = (ROOT / "train.py").read_text()
    sandboxed, plain = ShapeProbe("auto"), ShapeProbe("off")
    contained = bwrap_problem() is None
    log_lines = [f"load average before: {os.getloadavg()[0]:.2f}", f"bubblewrap: {bwrap_problem() or 'yes'}"]
    architectures = [{"DEPTH": d, "ASPECT_RATIO": a, "HEAD_DIM": h}
                     for d, a, h in itertools.product((4, 6, 8, 10, 12), (48, 64, 96, 128), (64, 128))]
    architectures = architectures[:args.architectures]

    first = []
    for i in range(args.repeats):
        sandboxed.clear()
        before = sandboxed.processes
        first.append(timed(lambda: sandboxed.model_shapes(code, {"DEPTH": 7}, GPU)))
        log_lines.append(f"first estimate {i}: {first[-1]:.3f} s, {sandboxed.processes - before} processes at once")
    build, build_off, cpu_off, cached, in_process = [], [], [], [], []
    plain.model_shapes(code, {}, GPU)  # its shapeless check, as `sandboxed` has done
    build_shapes(code, (), GPU)  # this process's first build imports torch._dynamo (a probe's, before "ready")
    for config in architectures:
        before = sandboxed.processes, plain.processes
        build.append(timed(lambda: sandboxed.model_shapes(code, config, GPU)))
        children = children_cpu()
        build_off.append(timed(lambda: plain.model_shapes(code, config, GPU)))
        cpu_off.append(children_cpu() - children)
        assert (sandboxed.processes, plain.processes) == (before[0] + 1, before[1] + 1)
        cached.append(timed(lambda: sandboxed.model_shapes(code, {**config, "MATRIX_LR": 0.02}, GPU)))
        assert sandboxed.processes == before[0] + 1
        knobs = tuple(sorted(config.items()))
        in_process.append(timed(lambda: build_shapes(code, knobs, GPU)))
        log_lines.append(f"{config}: sandboxed {build[-1] * 1000:.1f} ms, off {build_off[-1] * 1000:.1f} ms "
                         f"(its CPU {cpu_off[-1] * 1000:.0f} ms), "
                         f"cached {cached[-1] * 1000:.3f} ms, in process {in_process[-1] * 1000:.1f} ms")
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024  # the largest `off` probe
    log_lines.append(f"largest probe process (off): {peak_rss_mib} MiB resident at its peak")
    log_lines.append(f"load average after: {os.getloadavg()[0]:.2f}")

    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "bubblewrap": contained, "load_average_before": float(log_lines[0].split()[-1]),
                    "load_average_after": os.getloadavg()[0]},
        "first_estimate": summary(first), "build_sandboxed": summary(build), "build_off": summary(build_off),
        "build_off_cpu": summary(cpu_off),
        "in_process": summary(in_process), "cached": summary(cached), "architectures": architectures,
        "probe_peak_rss_mib": peak_rss_mib, "probe_memory_limit_mib": hybrid.memory.PROBE_MEMORY_BYTES // 2**20,
    }
    rows = [f"| {label} | {report[key]['median_ms']:.3f} | {report[key]['min_ms']:.3f} | {report[key]['max_ms']:.3f} "
            f"| {report[key]['n']} |" for key, label in (
                ("first_estimate", "first estimate of a code (3 processes at once)"),
                ("build_sandboxed", "new architecture, a process in bubblewrap" if contained
                 else "new architecture, sandbox `auto` (no bubblewrap here)"),
                ("build_off", "new architecture, a plain process (`--sandbox off`)"),
                ("build_off_cpu", "the same, CPU time of its process (user + system)"),
                ("in_process", "new architecture, in process (no probe: unsafe)"),
                ("cached", "architecture built before"))]
    per_build = report["build_sandboxed"]["median_ms"]
    busy = max(report["machine"]["load_average_before"], report["machine"]["load_average_after"]) > 0.5 * os.cpu_count()
    load_note = (f"This machine was not quiet for this run (load average above half its cores; the in-process build "
                 f"took {report['in_process']['median_ms']:.0f} ms against {BEFORE['in_process_ms']:.0f} ms then). "
                 if busy else "")
    md = "\n".join([
        "# The memory model's probe: one sandboxed process per build", "",
        f"Command: `python benchmarks/memory_probe.py --repeats {args.repeats} --architectures {args.architectures}`; "
        f"{report['machine']['cpus']} cores, torch {report['machine']['torch']}, measured {report['measured_at']}, "
        f"load average {report['machine']['load_average_before']:.2f} before and "
        f"{report['machine']['load_average_after']:.2f} after. Raw output: {NAME}.log, data: {NAME}.json. "
        "Reference train.py, gpu profile (estimates only: no GPU).", "",
        "| estimate | median ms | min ms | max ms | n |", "|---|---|---|---|---|", *rows, "",
        f"What changed: the last run with one long-lived probe (commit f540411, load 0.21) measured a run's first "
        f"estimate at {BEFORE['start_ms'] / 1000:.2f} s (probe start, then its builds), a new architecture at "
        f"{BEFORE['build_ms']:.1f} ms through the probe ({BEFORE['in_process_ms']:.1f} ms in process), a cached one at "
        f"{BEFORE['cached_ms']:.3f} ms; its probe held {BEFORE['probe_data_mib']} MiB of data memory for the whole run. "
        f"{load_note}A probe process is busy on a core for almost all of its life (CPU time "
        f"{report['build_off_cpu']['median_ms'] / 1000:.1f} s of {report['build_off']['median_ms'] / 1000:.1f} s).", "",
        "Each build now runs in a fresh process that lives for that one build (train.py's module-level code, a patch "
        "of torch included, dies with it), where one long-lived probe served every build before. A new architecture "
        f"therefore pays a process start (sandbox, Python, torch and torch._dynamo imports: {per_build / 1000:.1f} s "
        f"here) instead of one request to a warm probe ({report['in_process']['median_ms']:.0f} ms, the build alone); "
        "next to a trial of 300 s on the gpu profile, and once per architecture (the cache serves every other "
        "estimate, without a process). A new code's shapeless-knob check runs its two builds and the first "
        "config's at once (on a machine with fewer free cores than that, they queue: the first estimate above).", "",
        f"A probe process peaks at {peak_rss_mib} MiB resident; a build may allocate "
        f"{hybrid.memory.PROBE_MEMORY_BYTES // 2**20} MiB beyond what the process holds once torch is imported "
        "(RLIMIT_DATA, soft and hard), inside the sandbox's own cap "
        f"({hybrid.memory.PROBE_SANDBOX_BYTES // 2**30} GiB of address space and memory cgroup). Nothing accumulates "
        "across builds: no process outlives its build.", ""])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(md)
    (RESULTS / f"{NAME}.log").write_text("\n".join(log_lines) + "\n")
    print(md)


if __name__ == "__main__":
    main()
