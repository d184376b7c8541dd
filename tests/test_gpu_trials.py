"""benchmarks/gpu_trials.py in its dry run on the CPU: every phase runs (or is skipped for time) and each one's
outcome is written as it ends, so that a short GPU window returns what it measured."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from harness.sandbox import PROJECT_ROOT


@pytest.fixture(scope="module")
def gpu_trials():
    spec = importlib.util.spec_from_file_location("gpu_trials", PROJECT_ROOT / "benchmarks" / "gpu_trials.py")
    module = sys.modules["gpu_trials"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_asks_for_the_dry_run(gpu_trials, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_trials.main(["--out", str(tmp_path)])
    assert stopped.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_phases_that_do_not_fit_are_skipped_and_said(gpu_trials, data_dir, tmp_path):
    report = gpu_trials.main(["--dry-run", "--minutes", "0.01", "--out", str(tmp_path)])
    assert list(report["phases"]) == list(gpu_trials.PHASES)
    assert all("skipped" in p for p in report["phases"].values())
    written = json.loads((tmp_path / "gpu_trials.json").read_text())
    assert written["phases"].keys() == report["phases"].keys() and written["dry_run"]
    md = (tmp_path / "gpu_trials.md").read_text()
    assert "DRY RUN" in md and md.count("skipped:") == len(gpu_trials.PHASES)


@pytest.mark.slow
def test_the_dry_run_exercises_every_phase(gpu_trials, data_dir, tmp_path):
    report = gpu_trials.main(["--dry-run", "--out", str(tmp_path)])
    phases = report["phases"]
    assert not [name for name, p in phases.items() if "skipped" in p or "error" in p], phases
    assert phases["throughput"]["trial"]["status"] == "ok" and phases["throughput"]["trial"]["tokens_per_second"]
    assert phases["overhead"]["trial"]["phases"]["setup"] >= 0
    assert phases["oom"]["trial"]["status"] == "oom"
    memory = phases["memory"]["trials"]
    assert len(memory) == gpu_trials.DRY.memory_configs and all(t["estimate_mb"] for t in memory)
    assert "aten::" in phases["profile"]["table"]
    assert phases["long-window"]["trial"]["config"]["WINDOW_PATTERN"] == "LLLL"
    log = (tmp_path / "gpu_trials.log").read_text()
    assert log.count("===== ") == 4 + len(memory)  # every trial's raw log: 4 phases of one trial, the memory ones
