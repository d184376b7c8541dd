"""`hybrid reproduce arxiv-2603.24647`: the protocol's studies, the paper beside ours, and refusing --real without a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import hybrid.loop
import hybrid.reproduce
from hybrid.reproduce import agreement, published
from test_compare import FakeObjective
from util import cli


def test_real_without_a_gpu_refuses_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(hybrid.reproduce, "has_gpu", lambda: False)
    code, err = cli(capsys, "reproduce", "arxiv-2603.24647", "--real", "--out", str(tmp_path / "out"))
    assert code == 2 and "--real trains on GPUs" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_surrogate_protocol_writes_the_paper_beside_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """The whole command at a small budget, in this process, on an instant objective."""
    monkeypatch.setattr(hybrid.reproduce, "has_gpu", lambda: False)
    monkeypatch.setattr(hybrid.reproduce, "PROTOCOL_HOURS", 0.5)
    monkeypatch.setattr(hybrid.loop, "objective_for", lambda *a, **k: FakeObjective())
    out = tmp_path / "out"
    code, err = cli(capsys, "reproduce", "arxiv-2603.24647", "--seeds", "2", "--workers", "1", "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"random", "tpe", "cmaes"}
    assert set(summary["studies"]) == {f"{m}-s{s}" for m in ("random", "tpe", "cmaes") for s in (0, 1)}
    assert {s["gpu_hours"] >= 0.5 for s in summary["studies"].values()} == {True}
    markdown = (out / "report.md").read_text()
    assert "## The paper beside ours" in markdown and "| tpe (TPE) | 0.9768 ± 0.0019 |" in markdown
    assert markdown.index("## The paper beside ours") < markdown.index("## Pairwise tests")
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["mode"] == "surrogate" and {r["method"] for r in comparison["methods"]} == {"random", "tpe", "cmaes"}


def test_agreement_rules() -> None:
    paper = published()
    methods = pd.DataFrame([
        {"method": "tpe", "n_seeds": 3, "best_mean": 0.9770, "best_std": 0.0015, "fail_rate": 0.13},   # close
        {"method": "random", "n_seeds": 3, "best_mean": 0.9790, "best_std": 0.0010, "fail_rate": 0.20},  # far
    ]).set_index("method")
    rows = {r["method"]: r for r in agreement(methods, paper)}
    assert set(rows) == {"tpe", "random"}
    assert rows["tpe"]["best_agrees"] and rows["tpe"]["failed_agrees"]
    assert not rows["random"]["best_agrees"] and not rows["random"]["failed_agrees"]
    assert rows["random"]["paper_best_mean"] == 0.9873 and rows["random"]["paper_oom_pct"] == 56
    assert rows["tpe"]["best_diff"] == pytest.approx(0.0002)
