"""What the memory model's probe process costs: its start, a build per new architecture, a cached estimate.

    python benchmarks/memory_probe.py [--repeats 5] [--architectures 20] [--many 384]

The memory model builds train.py's model on the meta device in a child process (hybrid.memory.ShapeProbe),
because an agent's train.py is untrusted. This measures, on the gpu profile and the reference train.py:
- start: the first estimate of a fresh process (probe start and torch import, the check of the shapeless
  knobs, one build), `--repeats` times, each in a fresh probe;
- build: an estimate of an architecture not seen before (one request to the probe), over `--architectures`
  distinct DEPTH x ASPECT_RATIO x HEAD_DIM configs;
- in process: the same builds run in this process (hybrid.memory.build_shapes), the cost without the probe;
- cached: an estimate of a config whose architecture was built already (only learning rates differ);
- memory: the probe's data memory (what its limit, hybrid.memory.PROBE_MEMORY_BYTES above its size at start,
  counts), resident and peak resident memory, after its first build and after `--many` more architectures (a
  long run's worth: a probe that grew with every build would reach its limit and stop predicting).
Writes benchmarks/results/memory_probe.{json,md,log}. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import hybrid.memory
from harness.profiles import get_profile
from hybrid.memory import analytic_peak_bytes, build_shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "memory_probe"
GPU = get_profile("gpu")


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fresh() -> None:
    """A new probe process and empty caches, as in a new run."""
    hybrid.memory._PROBE.close()
    hybrid.memory._built_shapes.cache_clear()
    hybrid.memory.shapeless_knobs.cache_clear()


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def probe_memory_mib() -> dict[str, int]:
    """VmData, VmRSS and VmHWM of the probe process, in MiB (Linux)."""
    fields = {}
    with open(f"/proc/{hybrid.memory._PROBE._process.pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmData", "VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) // 1024
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--architectures", type=int, default=20)
    parser.add_argument("--many", type=int, default=384)
    args = parser.parse_args()
    source = (ROOT / "train.py").read_text()
    log_lines = [f"load average before: {os.getloadavg()[0]:.2f}"]
    architectures = [{"DEPTH": d, "ASPECT_RATIO": a, "HEAD_DIM": h}
                     for d, a, h in itertools.product((4, 6, 8, 10, 12), (48, 64, 96, 128), (64, 128))]
    architectures = architectures[:args.architectures]

    start = []
    for i in range(args.repeats):
        fresh()
        start.append(timed(lambda: analytic_peak_bytes(source, {}, GPU)))
        log_lines.append(f"start {i}: {start[-1]:.3f} s")
    build, cached, in_process = [], [], []
    for config in architectures:
        build.append(timed(lambda: analytic_peak_bytes(source, config, GPU)))
        cached.append(timed(lambda: analytic_peak_bytes(source, {**config, "MATRIX_LR": 0.02}, GPU)))
        knobs = tuple(sorted(config.items()))
        in_process.append(timed(lambda: build_shapes(source, knobs, GPU)))
        log_lines.append(f"{config}: probe {build[-1] * 1000:.1f} ms, cached {cached[-1] * 1000:.3f} ms, "
                         f"in process {in_process[-1] * 1000:.1f} ms")
    fresh()
    analytic_peak_bytes(source, {}, GPU)
    memory = {"after_first_build": probe_memory_mib()}
    many = list(itertools.product(range(2, 26), range(32, 96, 4)))[:args.many]
    for i, (depth, ratio) in enumerate(many):
        analytic_peak_bytes(source, {"DEPTH": depth, "ASPECT_RATIO": ratio}, GPU)
        if (i + 1) % 64 == 0:
            log_lines.append(f"probe memory after {i + 1} more architectures: {probe_memory_mib()}")
    memory[f"after_{len(many)}_more"] = probe_memory_mib()
    fresh()

    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "start": summary(start), "build": summary(build), "in_process": summary(in_process),
        "cached": summary(cached), "architectures": architectures, "probe_memory_mib": memory,
        "probe_memory_limit_mib": memory["after_first_build"]["VmData"] + hybrid.memory.PROBE_MEMORY_BYTES // 2**20,
    }
    memory_rows = [f"| {when.replace('_', ' ')} | {m['VmData']} | {m['VmRSS']} | {m['VmHWM']} |"
                   for when, m in memory.items()]
    rows = [f"| {label} | {report[key]['median_ms']:.3f} | {report[key]['min_ms']:.3f} | {report[key]['max_ms']:.3f} "
            f"| {report[key]['n']} |" for key, label in (("start", "first estimate of a run (probe start)"),
                                                          ("build", "new architecture, through the probe"),
                                                          ("in_process", "new architecture, in process"),
                                                          ("cached", "architecture built before"))]
    md = "\n".join([
        "# The memory model's probe process", "",
        f"Command: `python benchmarks/memory_probe.py --repeats {args.repeats} --architectures {args.architectures}`; "
        f"{report['machine']['cpus']} cores, torch {report['machine']['torch']}, measured {report['measured_at']}. "
        f"Raw output: {NAME}.log, data: {NAME}.json. Reference train.py, gpu profile (estimates only: no GPU).", "",
        "| estimate | median ms | min ms | max ms | n |", "|---|---|---|---|---|", *rows, "",
        "A run pays the start once per worker; a new architecture costs one request to the probe, next to a trial of "
        "300 s on the gpu profile.", "",
        "| probe memory | data MiB | resident MiB | peak resident MiB |", "|---|---|---|---|", *memory_rows, "",
        f"Its data-memory limit: about {report['probe_memory_limit_mib']} MiB (its size when it started serving, plus "
        f"{hybrid.memory.PROBE_MEMORY_BYTES // 2**20} MiB). Builds on the meta device allocate almost nothing: the "
        "probe does not grow toward it.", ""])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(md)
    (RESULTS / f"{NAME}.log").write_text("\n".join(log_lines) + "\n")
    print(md)


if __name__ == "__main__":
    main()
