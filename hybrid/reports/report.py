"""`hybrid report`: every trial as a row (parquet, CSV), per-method figures (summary.json), report.md and plots.

Definitions used throughout (and recomputable from results.parquet):
  finished   the trial's outcome was recorded (`status` set); interrupted trials are listed but never counted
  best       the lowest val_bpb of a finished trial with status ok, per study (= per seed)
  failed     a finished trial whose status is not ok; OOM: status oom or oom-predicted
  GPU-hours  the total_seconds of finished trials / 3600 (the budget's currency); wasted: those of failed trials.
             Called "hours of trial time" where a study did not run on GPUs (cpu, test profiles)
  std        over seeds, with ddof = 1 (none for one seed)
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pandas as pd

from harness.profiles import PAPER_CAP_GB
from hybrid.reports import plots, results
from hybrid.study import records, store
from hybrid.errors import UserError
from hybrid.evolution import lineage_table
from hybrid.foreign import trust_note
from hybrid.reports.stats import PairTest, pairwise

OOM_STATUSES = ("oom", "oom-predicted")
TOKEN_COLUMN = re.compile(r"^llm_.*tokens")
COST_COLUMN = re.compile(r"^llm_.*cost")
RUN_COLUMNS = ("study", "method", "seed", "objective", "profile", "vram_cap_gb")


# -- loading ----------------------------------------------------------------------------------------------

def load_studies(url: str, names: list[str] | None) -> list[optuna.Study]:
    """The named studies (all of hybrid's when names is None); UserError for unknown or foreign ones."""
    storage = results.open_storage(url)
    present = optuna.get_all_study_names(storage)
    unknown = [n for n in names or [] if n not in present]
    if unknown:
        have = ", ".join(present) if present else "none"
        raise UserError(f"no study {unknown[0]!r} in {store.masked_url(url)} (studies there: {have})")
    studies = [optuna.load_study(study_name=n, storage=storage) for n in (names or present)]
    if names:
        for study in studies:
            store.run_info(study)  # a study not created by hybrid: UserError
        return studies
    studies = [s for s in studies if store.RUN_KEY in s.user_attrs]
    if not studies:
        raise UserError(f"no studies created by hybrid in {store.masked_url(url)}: run `hybrid run` or "
                        "`hybrid compare` first")
    return studies


def trials_frame(studies: list[optuna.Study]) -> pd.DataFrame:
    """One row per trial: run columns, number, state, value, params_<knob>, every user attribute, intermediate (its
    intermediate val_bpb by percent of the budget, JSON), and derived columns finished, ok, pruned, failed (neither
    ok nor pruned), oom, few_steps (a success of fewer than records.MIN_STEPS optimizer steps),
    gpu_hours (cumulative within the study, in completion order) and incumbent (best val_bpb so far within the study)."""
    rows = []
    for study in studies:
        info = store.run_info(study)
        run = {"study": study.study_name, "method": info["method"], "seed": int(info["seed"]),
               "objective": info.get("objective"), "profile": info.get("profile"), "vram_cap_gb": run_cap_gb(info)}
        for t in study.get_trials(deepcopy=False):
            row: dict[str, Any] = {**run, "number": t.number, "state": t.state.name, "value": t.value,
                                   "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
                                   "finished": store.is_finished(t),
                                   "intermediate": json.dumps(t.intermediate_values) if t.intermediate_values else None,
                                   "few_steps": records.few_steps(t, run["objective"])}
            row.update({f"params_{k}": v for k, v in t.params.items()})
            for key, value in t.user_attrs.items():
                if key not in RUN_COLUMNS:
                    row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in ("status", "val_bpb", "total_seconds", "source", "generation"):
        if column not in frame:
            frame[column] = None
    frame["ok"] = frame["finished"] & (frame["status"] == records.OK)
    frame["pruned"] = frame["finished"] & (frame["status"] == records.PRUNED)
    frame["failed"] = frame["finished"] & ~frame["ok"] & ~frame["pruned"]
    frame["oom"] = frame["finished"] & frame["status"].isin(OOM_STATUSES)
    frame = frame.sort_values(["study", "datetime_complete", "number"], na_position="last").reset_index(drop=True)
    cost = frame["total_seconds"].astype(float).fillna(0.0).where(frame["finished"], 0.0)
    frame["gpu_hours"] = cost.groupby(frame["study"]).cumsum() / 3600
    frame.loc[~frame["finished"], "gpu_hours"] = np.nan
    best = frame["val_bpb"].astype(float).where(frame["ok"])
    frame["incumbent"] = best.groupby(frame["study"]).cummin().groupby(frame["study"]).ffill()
    return _arrow_safe(frame)


def run_cap_gb(info: dict[str, Any]) -> float | None:
    """The VRAM cap a study's trials ran under: --vram-cap-gb, else the paper's on the gpu profile and the surrogate."""
    if info.get("vram_cap_gb"):
        return float(info["vram_cap_gb"])
    return PAPER_CAP_GB if info.get("objective") == "surrogate" or info.get("profile") == "gpu" else None


def _arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding mixed types (a knob that is int in one generation, str in another) become text."""
    for column in frame.columns[frame.dtypes == object]:
        kinds = {type(v) for v in frame[column].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            frame[column] = frame[column].map(lambda v: None if v is None or v is np.nan else str(v))
    return frame


# -- figures ----------------------------------------------------------------------------------------------

def per_seed_best(frame: pd.DataFrame) -> dict[str, dict[int, float]]:
    """{method: {seed: best val_bpb}}; NaN for a study without a successful trial."""
    out: dict[str, dict[int, float]] = {}
    for (method, seed), group in frame.groupby(["method", "seed"], sort=False):
        if group["study"].nunique() > 1:
            a, b = sorted(group["study"].unique())[:2]
            raise UserError(f"studies {a!r} and {b!r} both ran {method} with seed {seed}: report them separately (--study)")
        ok = group.loc[group["ok"], "val_bpb"].astype(float)
        out.setdefault(method, {})[int(seed)] = float(ok.min()) if len(ok) else math.nan
    return out


def method_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method, best first: seeds, best mean and std, trials, failure and OOM rates, GPU-hours, LLM use."""
    bests = per_seed_best(frame)
    done = frame[frame["finished"]]
    tokens = [c for c in frame.columns if TOKEN_COLUMN.match(c)]
    costs = [c for c in frame.columns if COST_COLUMN.match(c)]
    rows = []
    for method, seeds in bests.items():
        trials = done[done["method"] == method]
        values = pd.Series(list(seeds.values()), dtype=float).dropna()
        seconds = trials["total_seconds"].astype(float).fillna(0.0)
        baseline = trials.loc[trials["ok"] & (trials["source"] == "baseline"), "val_bpb"].astype(float)
        rows.append({
            "method": method, "n_seeds": len(values),
            "best_mean": values.mean() if len(values) else math.nan,
            "best_std": values.std(ddof=1) if len(values) > 1 else math.nan,
            "trials": len(trials), "failed": int(trials["failed"].sum()), "ooms": int(trials["oom"].sum()),
            "fail_rate": trials["failed"].mean() if len(trials) else math.nan,
            "oom_rate": trials["oom"].mean() if len(trials) else math.nan,
            "gpu_hours": seconds.sum() / 3600, "gpu_hours_failed": seconds[trials["failed"]].sum() / 3600,
            "pruned": int(trials["pruned"].sum()), "gpu_hours_pruned": seconds[trials["pruned"]].sum() / 3600,
            "llm_tokens": float(trials[tokens].apply(pd.to_numeric, errors="coerce").sum().sum()),
            "llm_cost_usd": float(trials[costs].apply(pd.to_numeric, errors="coerce").sum().sum()),
            "baseline": baseline.mean() if len(baseline) else math.nan,
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values("best_mean", na_position="last").set_index("method")


def study_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per study: method, seed, trials, failures, best val_bpb and its trial, GPU-hours."""
    rows = []
    for name, group in frame.groupby("study", sort=True):
        done = group[group["finished"]]
        ok = done[done["ok"]]
        best = ok.loc[ok["val_bpb"].astype(float).idxmin()] if len(ok) else None
        rows.append({"study": name, "method": group["method"].iloc[0], "seed": int(group["seed"].iloc[0]),
                     "trials": len(done), "failed": int(done["failed"].sum()),
                     "best": float(best["val_bpb"]) if best is not None else math.nan,
                     "best_trial": int(best["number"]) if best is not None else None,
                     "gpu_hours": done["total_seconds"].astype(float).fillna(0.0).sum() / 3600})
    return pd.DataFrame(rows).set_index("study")


# -- writing ----------------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 4) -> str:
    """A number as report.md shows it; a dash for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def best_text(mean: float, std: float) -> str:
    """`0.9768 ± 0.0019`, or the mean alone for one seed."""
    return fmt(mean) if math.isnan(std) else f"{fmt(mean)} ± {fmt(std)}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def methods_markdown(table: pd.DataFrame, unit: str = "GPU-hours") -> str:
    header = ["method", "seeds", "best val_bpb (mean ± std)", "trials", "failed", "OOM", unit,
              f"{unit} on failures", "LLM tokens", "LLM cost (USD)", "baseline val_bpb"]
    rows = [[r.Index, str(r.n_seeds), best_text(r.best_mean, r.best_std), str(r.trials), pct(r.fail_rate),
             pct(r.oom_rate), fmt(r.gpu_hours, 2), fmt(r.gpu_hours_failed, 2), f"{r.llm_tokens:.0f}",
             fmt(r.llm_cost_usd, 2), fmt(r.baseline)] for r in table.itertuples()]
    return _markdown_table(header, rows)


def pairwise_markdown(tests: list[PairTest]) -> str:
    if not tests:
        return "One method only: nothing to compare."
    rows = []
    for t in tests:
        ci = "–" if t.ci_low is None else f"[{t.ci_low:+.4f}, {t.ci_high:+.4f}]"
        rows.append([f"{t.a} vs {t.b}", t.test, f"{t.n_a} / {t.n_b}", f"{t.diff:+.4f}", ci,
                     "–" if t.p_value is None else f"{t.p_value:.3g}"])
    text = _markdown_table(["pair", "test", "seeds", "mean difference (a − b)", "95 % bootstrap CI", "p (two-sided)"], rows)
    return text + ("\n\nA negative difference means the first method found the lower val_bpb. Wilcoxon signed-rank "
                   "where both methods ran the same seeds, Mann-Whitney U otherwise; no test below two seeds a side. "
                   "With three seeds the smallest two-sided p a Wilcoxon test can give is 0.25, and 0.1 for Mann-Whitney: "
                   "read the intervals as much as the p-values.")


def studies_markdown(table: pd.DataFrame, unit: str = "GPU-hours") -> str:
    rows = [[r.Index, r.method, str(r.seed), str(r.trials), str(r.failed), fmt(r.best),
             "–" if pd.isna(r.best_trial) else str(int(r.best_trial)), fmt(r.gpu_hours, 2)]
            for r in table.itertuples()]
    return _markdown_table(["study", "method", "seed", "trials", "failed", "best val_bpb", "best trial", unit], rows)


def best_markdown(studies: list[optuna.Study], url: str) -> str:
    """Each study's best trial: number, val_bpb, generation, config and the command that exports its train.py."""
    lines = []
    for study in studies:
        best = results.ranked(study)
        if not best:
            lines.append(f"- **{study.study_name}**: no successful trial "
                         f"({results.failures_text(store.finished_trials(study))}).")
            continue
        t = best[0]
        lines.append(f"- **{study.study_name}**: trial {t.number}, val_bpb {t.user_attrs[records.VAL_BPB]:.4f} "
                     f"(generation {t.user_attrs.get(records.GENERATION, 0)}, "
                     f"source {t.user_attrs.get(records.SOURCE, '-')}) with "
                     f"`{results.config_text(results.trial_config(t))}`. "
                     f"Its train.py: `{results.export_command(url, study.study_name)}`.")
    return "\n".join(lines)


def what_there_is(frame: pd.DataFrame) -> str:
    """`12 finished trials: 9 successful, 3 failed (oom 2, crash 1); 1 interrupted or running, not counted`
    (`..., 2 pruned, ...` when the pruner stopped some)."""
    done = frame[frame["finished"]]
    ok, pruned = int(done["ok"].sum()), int(done["pruned"].sum())
    failed = done.loc[done["failed"], "status"].value_counts()
    text = (f"{len(done)} finished {'trial' if len(done) == 1 else 'trials'}: {ok} successful, "
            + (f"{pruned} pruned, " if pruned else "") + f"{len(done) - ok - pruned} failed")
    if len(failed):
        text += " (" + ", ".join(f"{s} {n}" for s, n in failed.items()) + ")"
    interrupted = int((~frame["finished"]).sum())
    return text + (f"; {interrupted} interrupted or running, not counted" if interrupted else "")


def few_steps_markdown(frame: pd.DataFrame) -> str:
    """The successful trials that ran fewer than records.MIN_STEPS optimizer steps ("" if none)."""
    few = frame[frame["few_steps"]]
    if few.empty:
        return ""
    rows = [[r.study, str(r.number), str(int(r.num_steps)), fmt(float(r.val_bpb))] for r in few.itertuples()]
    return (f"## Trials of fewer than {records.MIN_STEPS} optimizer steps\n\n"
            f"These succeeded, but their val_bpb says little: a model this briefly trained is mostly its "
            f"initialization (the step count includes warm-up steps).\n\n"
            + _markdown_table(["study", "trial", "steps", "val_bpb"], rows))


def lineage_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    """A study's generations (hybrid.evolution.lineage_table): fate, change, new knobs, best, margin."""
    def text(value: Any) -> str:
        return "–" if value in (None, "") else str(value).replace("|", "\\|").replace("\n", " ")

    body = [[str(r["generation"]), text(r["parent"]), r["status"], text(r["mutation"]), text(r["description"]),
             ", ".join(r["new_knobs"]) or "–", str(r["trials"]), fmt(r["best_val_bpb"]), fmt(r["delta"]),
             fmt(r["margin"]), text(r["reason"])] for r in rows]
    return f"### {name}\n\n" + _markdown_table(
        ["gen", "parent", "status", "mutation", "what it changed", "new knobs", "trials", "best val_bpb",
         "score − parent's", "margin", "verdict"], body)


def summary(table: pd.DataFrame, bests: dict[str, dict[int, float]], tests: list[PairTest],
            studies: pd.DataFrame, lineages: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """summary.json: per method best_mean, best_std, oom_rate, n_seeds, per_seed_best (and the rest of the
    method table), the pairwise tests, per study figures, and the lineage of studies with generations.
    Missing numbers are null."""
    def clean(v: Any) -> Any:
        if isinstance(v, (float, np.floating)):
            return None if math.isnan(v) else float(v)
        return int(v) if isinstance(v, np.integer) else v

    methods = {}
    for method, row in table.to_dict("index").items():
        methods[method] = {k: clean(v) for k, v in row.items()}
        methods[method]["per_seed_best"] = {str(s): clean(v) for s, v in sorted(bests[method].items())}
    return {"methods": methods,
            "pairwise": [{k: clean(v) for k, v in t.to_dict().items()} for t in tests],
            "studies": {n: {k: clean(v) for k, v in r.items()} for n, r in studies.to_dict("index").items()},
            "lineage": {n: [{k: clean(v) for k, v in r.items()} for r in rows] for n, rows in lineages.items()}}


@dataclass
class Report:
    """What a report computed, for callers that add to it (reproduce)."""
    frame: pd.DataFrame
    methods: pd.DataFrame
    bests: dict[str, dict[int, float]]
    tests: list[PairTest]
    path: Path


def build(url: str, names: list[str] | None, out: Path, *, title: str = "hybrid report",
          extra: Callable[[Report], str] | None = None, references: dict[str, float] | None = None) -> Report:
    """Write results.parquet, results.csv, summary.json, the plots and report.md into out. `extra` adds a
    section after the per-method table, from what was computed; `references` are drawn on the incumbent plot."""
    studies = load_studies(url, names)
    frame = trials_frame(studies)
    if frame.empty or not frame["finished"].any():
        raise UserError(f"no finished trials in {', '.join(s.study_name for s in studies)}: nothing to report yet")
    out = writable_folder(Path(out))
    frame.to_parquet(out / "results.parquet", index=False)
    frame.to_csv(out / "results.csv", index=False)
    table = method_table(frame)
    every = per_seed_best(frame)
    bests = {m: every[m] for m in table.index}
    tests = pairwise(bests)
    per_study = study_table(frame)
    lineages = {s.study_name: lineage_table(s) for s in studies if len(store.load_generations(s)) > 1}
    (out / "summary.json").write_text(json.dumps(summary(table, bests, tests, per_study, lineages), indent=1) + "\n")
    figures = plots.write_all(frame, studies, lineages, out, references=references)
    built = Report(frame, table, bests, tests, out / "report.md")

    runs = frame.drop_duplicates("study")
    setups = ", ".join(sorted({f"{r.objective} objective, {r.profile} profile" for r in runs.itertuples()}))
    unit = plots.hours_unit(frame)
    parts = [f"# {title}",
             f"Storage `{store.masked_url(url)}`, {len(studies)} {'study' if len(studies) == 1 else 'studies'} "
             f"({setups}), {what_there_is(frame)}; "
             f"written {datetime.datetime.now().isoformat(timespec='seconds')}. Every number below is recomputed from "
             "`results.parquet` (one row per trial) by `hybrid.reports.report`; `summary.json` holds them as data.",
             trust_note(studies),
             "## Best trial of each study", best_markdown(studies, url), few_steps_markdown(frame),
             "## Per method", methods_markdown(table, unit),
             "Best: the lowest val_bpb of a successful trial in each seed's study; mean ± std (ddof = 1) over seeds. "
             "Failed: share of finished trials with any failure status (OOM: `oom` or `oom-predicted`); failed trials "
             "count as val_bpb = 100 for the samplers and cost the wall time they used. "
             f"{unit}: total wall seconds of finished trials / 3600. LLM tokens and cost: sums of the trials' `llm_*tokens*` and `llm_*cost*` attributes.",
             extra(built) if extra else "",
             "## Pairwise tests on best val_bpb", pairwise_markdown(tests),
             "## Studies", studies_markdown(per_study, unit),
             "## Plots"]
    for fig in figures:
        if isinstance(fig, str):
            parts.append(fig)
        else:
            parts.append(f"### {fig.title}\n\n![{fig.title}]({fig.name}.png)\n\n{fig.note} "
                         f"Interactive: [{fig.name}.html]({fig.name}.html).")
    if lineages:
        parts.append("## Lineage of code generations")
        parts += [lineage_markdown(name, rows) for name, rows in lineages.items()]
    built.path.write_text("\n\n".join(p for p in parts if p) + "\n")
    return built


def writable_folder(out: Path) -> Path:
    """out, created if missing; UserError in one line if it is not a folder or cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror} (pass another --out)") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the report to {out}: permission denied (pass another --out)")
    return out


def write_report(storage: str, studies: list[str] | None, out: Path) -> Path:
    """`hybrid report`: the report of the named studies (all of hybrid's by default); returns report.md's path."""
    return build(storage, studies, out).path
