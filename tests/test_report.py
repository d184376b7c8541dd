"""`hybrid report`: studies built by hand with known trials; every number recomputed from results.parquet."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from scipy import stats as sps

from hybrid.reports import plots

from hybrid.study import generations, store
from hybrid.study.generations import Generation
from hybrid.config import RunConfig
from hybrid.promotion import Verdict
from hybrid.reports.stats import compare_pair, pairwise
from util import cli

DISTRIBUTIONS = {"LR": FloatDistribution(1e-3, 1.0, log=True), "DEPTH": IntDistribution(1, 8),
                 "PATTERN": CategoricalDistribution(["SL", "LL"])}
SPACE = {"LR": {"type": "float", "low": 1e-3, "high": 1.0, "log": True, "default": 0.1},
         "DEPTH": {"type": "int", "low": 1, "high": 8, "default": 4},
         "PATTERN": {"type": "categorical", "choices": ["SL", "LL"], "default": "SL"}}
# (status, val_bpb, total_seconds) per trial; one study per (method, seed).
TRIALS = {
    ("tpe", 0): [("ok", 0.990, 300), ("ok", 0.980, 300), ("oom", None, 20), ("ok", 0.975, 300)],
    ("tpe", 1): [("ok", 0.991, 300), ("ok", 0.978, 300), ("ok", 0.979, 300)],
    ("tpe", 2): [("ok", 0.992, 300), ("oom", None, 30), ("ok", 0.976, 300)],
    ("random", 0): [("ok", 0.990, 300), ("oom", None, 25), ("oom", None, 35), ("ok", 0.985, 300)],
    ("random", 1): [("ok", 0.991, 300), ("crash", None, 10), ("ok", 0.986, 300)],
    ("random", 2): [("ok", 0.992, 300), ("ok", 0.984, 300), ("oom", None, 40)],
}


def add_study(storage: optuna.storages.BaseStorage, url: str, name: str, method: str, seed: int,
              trials: list[tuple[str, float | None, float]], *, llm_tokens: int = 0, **run: Any) -> optuna.Study:
    """A study as `hybrid run` leaves it: run config, space, generation 0, finished trials with our attributes.
    `run`: RunConfig fields other than the surrogate objective on the gpu profile."""
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    config = {"objective": "surrogate", "profile": "gpu", "budget_hours": 1.0, **run}
    study.set_user_attr(store.RUN_KEY, RunConfig(method=method, study=name, storage=url, seed=seed, **config).to_dict())
    study.set_user_attr(store.SPACE_KEY, SPACE)
    generations.save(study, Generation(0, None, "the baseline train.py", "LR = 0.1\n", SPACE, status="base"))
    for i, (status, value, seconds) in enumerate(trials):
        params = {"LR": 0.1 * (1 + i % 10), "DEPTH": 1 + i % 8, "PATTERN": "SL" if i % 2 else "LL"}
        attrs = {"source": "baseline" if i == 0 else method, "generation": 0, "code_sha": "x", "seed": seed,
                 "method": method, "status": status, "total_seconds": float(seconds),
                 "peak_memory_mb": 1000.0 * (i + 1), "num_params": 10 ** 6 * (i + 1), "config_ran": params}
        if status == "ok":
            attrs["val_bpb"] = value
        if llm_tokens:
            attrs.update(llm_input_tokens=llm_tokens, llm_output_tokens=1, llm_cost_usd=0.01)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=DISTRIBUTIONS,
                                                  value=value if status == "ok" else 100.0, user_attrs=attrs))
    return study


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'hybrid.db'}"
    storage = store.open_storage(url)
    for (method, seed), trials in TRIALS.items():
        add_study(storage, url, f"{method}-s{seed}", method, seed, trials, llm_tokens=100 if method == "random" else 0)
    # an interrupted trial: listed, never counted
    optuna.load_study(study_name="tpe-s0", storage=storage).add_trial(
        optuna.trial.create_trial(params={"LR": 0.5, "DEPTH": 2, "PATTERN": "SL"}, distributions=DISTRIBUTIONS,
                                  state=TrialState.FAIL))
    return url


def table_row(markdown: str, section: str, first_cell: str) -> list[str]:
    """The cells of the row starting with first_cell in the table under `## section`."""
    part = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {section!r}")


def test_every_number_is_recomputed_from_the_parquet(storage_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    code, err = cli(capsys, "report", "--storage", storage_url, "--out", str(out))
    assert code == 0, err
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == sum(map(len, TRIALS.values())) + 1
    assert {"params_LR", "params_DEPTH", "params_PATTERN", "status", "val_bpb", "peak_memory_mb", "source"} <= set(frame)
    assert pd.read_csv(out / "results.csv").shape == frame.shape
    summary = json.loads((out / "summary.json").read_text())
    markdown = (out / "report.md").read_text()

    done = frame[frame["finished"]]
    assert len(done) == len(frame) - 1
    per_seed = {}
    for method in ("tpe", "random"):
        mine = done[done["method"] == method]
        best = mine[mine["status"] == "ok"].groupby("seed")["val_bpb"].min()
        per_seed[method] = best.to_dict()
        failed = mine["status"] != "ok"
        oom = mine["status"].isin(["oom", "oom-predicted"])
        tokens = mine.filter(regex=r"^llm_.*tokens").sum().sum()
        got = summary["methods"][method]
        assert got["best_mean"] == pytest.approx(best.mean())
        assert got["best_std"] == pytest.approx(best.std(ddof=1))
        assert got["oom_rate"] == pytest.approx(oom.mean())
        assert got["fail_rate"] == pytest.approx(failed.mean())
        assert got["n_seeds"] == 3 and got["trials"] == len(mine)
        assert got["per_seed_best"] == {str(s): pytest.approx(v) for s, v in best.items()}
        hours = mine["total_seconds"].sum() / 3600
        assert got["gpu_hours"] == pytest.approx(hours)
        assert got["llm_tokens"] == tokens
        row = table_row(markdown, "Per method", method)
        assert row[1:10] == ["3", f"{best.mean():.4f} ± {best.std(ddof=1):.4f}", str(len(mine)),
                             f"{100 * failed.mean():.1f} %", f"{100 * oom.mean():.1f} %", f"{hours:.2f}",
                             f"{mine.loc[failed, 'total_seconds'].sum() / 3600:.2f}", f"{tokens:.0f}",
                             f"{mine.filter(regex=r'^llm_.*cost').sum().sum():.2f}"]
    # the known answers, by hand
    assert per_seed["tpe"] == {0: 0.975, 1: 0.978, 2: 0.976}
    assert summary["methods"]["random"]["oom_rate"] == pytest.approx(3 / 10)
    assert summary["methods"]["random"]["fail_rate"] == pytest.approx(4 / 10)

    test = summary["pairwise"][0]
    a, b = test["a"], test["b"]
    assert (a, b, test["test"]) == ("tpe", "random", "wilcoxon")
    diffs = [per_seed[a][s] - per_seed[b][s] for s in (0, 1, 2)]
    assert test["p_value"] == pytest.approx(sps.wilcoxon(diffs).pvalue)
    assert test["diff"] == pytest.approx(np.mean(diffs))
    assert test["ci_low"] <= test["diff"] <= test["ci_high"]
    assert table_row(markdown, "Pairwise tests on best val_bpb", "tpe vs random")[3] == f"{np.mean(diffs):+.4f}"

    for study, group in done.groupby("study"):
        ok = group[group["status"] == "ok"]
        row = table_row(markdown, "Studies", study)
        assert row[5] == f"{ok['val_bpb'].min():.4f}" and row[3] == str(len(group))
        assert group["incumbent"].iloc[-1] == ok["val_bpb"].min()
        assert group["gpu_hours"].iloc[-1] == pytest.approx(group["total_seconds"].sum() / 3600)


def test_plots_are_written_and_skipped_ones_say_why(storage_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert cli(capsys, "report", "--storage", storage_url, "--study", "tpe-s0", "--study", "random-s0",
               "--out", str(out))[0] == 0
    for name in ("incumbent", "trials", "pareto"):
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert "plotly" in (out / f"{name}.html").read_text()
    assert (out / "plotly.min.js").exists()  # the HTML pages work offline
    markdown = (out / "report.md").read_text()
    assert "![Incumbent val_bpb against GPU-hours](incumbent.png)" in markdown
    assert "Parameter importances: skipped, every study has fewer than" in markdown
    assert "One method" not in markdown and "| tpe vs random | none | 1 / 1 |" in markdown


def test_lineage_of_a_study_with_generations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    storage = store.open_storage(url)
    study = add_study(storage, url, "hybrid-s0", "hybrid", 0, [("ok", 0.99, 300), ("ok", 0.98, 300)])
    base = generations.load_all(study)[0]
    kept = generations.create(study, base, "LR = 0.1\nGATE = 1\n", base.search_space(), "gate the MLP",
                              mutation="mlp-gate", new_knobs={"GATE": {}})
    generations.set_status(study, kept, "promoted", reason="beats its parent",
                           verdict=Verdict(True, "beats its parent", 0.004, 0.002, 0.97, 0.976, 0.006))
    dropped = generations.create(study, kept, "LR = 0.1\nGATE = 2\n", base.search_space(), "wider gate",
                                 mutation="wide-gate")
    generations.set_status(study, dropped, "rejected", reason="no better than its parent",
                           verdict=Verdict(False, "no better than its parent", 0.004, 0.002, 0.975, 0.97, -0.005))
    for number, value in ((1, 0.97), (1, 0.972), (2, 0.975)):
        study.add_trial(optuna.trial.create_trial(
            params={"LR": 0.2, "DEPTH": 3, "PATTERN": "SL"}, distributions=DISTRIBUTIONS, value=value,
            user_attrs={"source": "tpe", "generation": number, "status": "ok", "val_bpb": value, "total_seconds": 300.0}))
    out = tmp_path / "report"
    assert cli(capsys, "report", "--storage", url, "--out", str(out))[0] == 0
    markdown = (out / "report.md").read_text()
    assert table_row(markdown, "Lineage of code generations", "1")[1:8] == [
        "0", "promoted", "mlp-gate", "gate the MLP", "GATE", "2", "0.9700"]
    assert table_row(markdown, "Lineage of code generations", "2")[2] == "rejected"
    assert (out / "lineage-hybrid-s0.png").stat().st_size > 10_000
    lineage = json.loads((out / "summary.json").read_text())["lineage"]["hybrid-s0"]
    assert [r["status"] for r in lineage] == ["base", "promoted", "rejected"]


@pytest.mark.parametrize("argv, message", [
    (["--study", "nope"], "no study 'nope'"),
    (["--storage", "sqlite:///{tmp}/missing.db"], "no database at"),
    (["--study", "foreign"], "was not created by hybrid"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, storage_url: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    optuna.create_study(storage=storage_url, study_name="foreign")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--storage" not in argv:
        argv = ["--storage", storage_url, *argv]
    code, err = cli(capsys, "report", *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "out").exists()


def test_pairing_and_intervals() -> None:
    paired = compare_pair("a", {0: 1.0, 1: 2.0, 2: 3.0}, "b", {0: 1.5, 1: 2.4, 2: 3.6})
    assert paired.test == "wilcoxon" and paired.p_value == pytest.approx(0.25)
    assert paired.diff == pytest.approx(-0.5) and paired.ci_high < 0
    unpaired = compare_pair("a", {0: 1.0, 1: 1.1}, "b", {5: 2.0, 6: 2.1, 7: 2.2})
    assert unpaired.test == "mann-whitney" and unpaired.p_value == pytest.approx(0.2)
    assert unpaired.ci_low <= unpaired.diff <= unpaired.ci_high < 0
    alone = compare_pair("a", {0: 1.0}, "b", {0: 2.0})
    assert alone.test == "none" and alone.p_value is None and alone.diff == -1.0
    assert compare_pair("a", {0: 1.0, 1: math.nan, 2: 1.2}, "b", {0: 1.0, 1: 1.0, 2: 1.2}).test == "mann-whitney"
    assert [(t.a, t.b) for t in pairwise({"x": {}, "y": {}, "z": {}})] == [("x", "y"), ("x", "z"), ("y", "z")]


# -- studies as they really end: no success, one trial, a flat incumbent, CPU trials -----------------------

def html_figure(path: Path) -> str:
    """The figure data and layout of a plotly page (its JSON, as text)."""
    return path.read_text().split("Plotly.newPlot(", 1)[1]


def y_range(path: Path) -> tuple[float, float]:
    """The value axis of a plotly page: its layout's yaxis range."""
    decoder = json.JSONDecoder()
    text = html_figure(path).lstrip()
    for _ in range(2):  # the div's id, then the data
        text = text[decoder.raw_decode(text)[1]:].lstrip(", \n")
    low, high = decoder.raw_decode(text)[0]["yaxis"]["range"]
    return low, high


def one_study_report(tmp_path: Path, capsys: pytest.CaptureFixture, trials: list[tuple[str, float | None, float]],
                     **run: Any) -> tuple[Path, str]:
    """The report of a single study with these trials: its folder and report.md."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    add_study(store.open_storage(url), url, "only", "tpe", 0, trials, **run)
    out = tmp_path / "report"
    code, err = cli(capsys, "report", "--storage", url, "--out", str(out))
    assert code == 0, err
    return out, (out / "report.md").read_text()


def test_a_study_without_a_success_is_reported_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, markdown = one_study_report(tmp_path, capsys, [("oom", None, 20), ("crash", None, 10)])
    assert "2 finished trials: 0 successful, 2 failed (oom 1, crash 1)" in markdown
    assert "- **only**: no successful trial (2 finished, all failed: oom 1, crash 1)." in markdown
    assert "Incumbent, every trial and Pareto fronts: skipped, no trial succeeded" in markdown
    assert not list(out.glob("*.png"))


def test_a_single_trial_gets_its_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, markdown = one_study_report(tmp_path, capsys, [("ok", 0.99, 300)])
    assert "1 finished trial: 1 successful, 0 failed" in markdown
    assert "- **only**: trial 0, val_bpb 0.9900 (generation 0, source baseline) with `LR=0.1 DEPTH=1 PATTERN=LL`" in markdown
    for name in ("incumbent", "trials", "pareto"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    low, high = y_range(out / "incumbent.html")
    assert high - low >= plots.MIN_SPAN and low < 0.99 < high  # a flat range, padded
    assert "Parameter importances: skipped, every study has fewer than 10 successful trials" in markdown


def test_plot_details(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Baseline line, VRAM cap, failures in a band of their own, rounded hovers, axis titles, responsive pages."""
    trials = [("ok", 0.99, 300)] + [("ok", 0.98, 300)] * 5 + [("oom", None, 20)] * 2
    out, markdown = one_study_report(tmp_path, capsys, trials)
    incumbent, trials_page, pareto = (html_figure(out / f"{n}.html") for n in ("incumbent", "trials", "pareto"))
    assert "baseline 0.9900" in incumbent and "baseline 0.9900" in trials_page
    assert "VRAM cap 76 GB" in pareto and "Dashed: the VRAM cap (76 GB)." in markdown
    assert '"name":"failed"' in trials_page and '"y":["seed 0","seed 0"]' in trials_page  # not on the value axis
    assert '"tickformat":".4f"' in incumbent and "%{y:.4f}" in incumbent and "%{y:.4f}" in pareto
    for page in (incumbent, trials_page, pareto):
        assert BPB_LABEL_JSON in page and re.search(r'"responsive": ?true', page)
    assert "height:max(95vh, 520px)" in (out / "incumbent.html").read_text()
    assert '"ticktext":["1","2","5","10","20","50"]' in pareto  # 1-2-5 ticks on the log axis
    assert matplotlib.rcParams["axes.formatter.useoffset"] is False  # plain values, no offset notation
    low, high = y_range(out / "incumbent.html")
    assert high - low >= plots.MIN_SPAN  # the flat incumbent (0.98 for five trials) padded


BPB_LABEL_JSON = '"text":"val_bpb (bits per byte, lower is better)"'


def test_cpu_studies_count_hours_of_trial_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, markdown = one_study_report(tmp_path, capsys, [("ok", 0.99, 30), ("ok", 0.98, 30)], profile="cpu",
                                     objective="train")
    assert "| hours of trial time | hours of trial time on failures |" in markdown and "GPU-hours" not in markdown
    assert "hours of trial time spent (trial wall time)" in html_figure(out / "incumbent.html")
    assert "### Incumbent val_bpb against hours of trial time" in markdown


def test_importance_on_successes_and_labelled_with_failures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trials = [("ok", 0.99 - 0.001 * i, 300) for i in range(12)] + [("oom", None, 20)] * 3
    out, markdown = one_study_report(tmp_path, capsys, trials)
    assert (out / "importance.png").exists() and (out / "importance-with-failures.png").exists()
    assert "### Parameter importances\n" in markdown and "each study's successful trials" in markdown
    assert "### Parameter importances, failures included" in markdown
    assert "failures included at val_bpb = 100 as the samplers saw them" in markdown
    study = optuna.load_study(study_name="only", storage=f"sqlite:///{tmp_path / 'h.db'}")
    assert plots.study_importances(study) != plots.study_importances(study, with_failures=True)


def test_report_out_that_is_not_a_folder_is_one_line(storage_url: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "report"):
        code, err = cli(capsys, "report", "--storage", storage_url, "--out", str(out))
        assert code == 2 and f"cannot write the report to {out}" in err and err.count("\n") == 1, err

