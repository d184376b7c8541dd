"""The report's figures, each as a PNG (matplotlib, Agg) and an interactive HTML page (plotly).

The HTML pages load plotly.js from `plotly.min.js` written once beside them (include_plotlyjs="directory"):
they work offline and stay small; keep the three together when moving them. They fill the window's height.
Failed trials (val_bpb = 100 for the samplers) never set the value axis: they are drawn in a band of their own.
Values are shown plainly (no offset notation); a flat range is padded to MIN_SPAN.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
matplotlib.rcParams["axes.formatter.useoffset"] = False  # 0.9812, not 0.0012 + 9.8e-1
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from hybrid.study import records  # noqa: E402

MIN_IMPORTANCE_TRIALS = 10   # fewer trials in every study of a method: no importances for it
GRID_POINTS = 400
MIN_SPAN = 0.01              # val_bpb: the least height of a value axis (a flat incumbent gets a readable range)
MIN_HOURS = 1 / 60           # the least width of an hours axis (a study of trials that cost no time)
HTML_HEIGHT = 520            # px: the least height of an HTML page's figure; it fills the window when taller
BPB_LABEL = "val_bpb (bits per byte, lower is better)"
BPB_HOVER = "%{y:.4f}"
FAILED_COLOR = "#d62728"
BASELINE_STYLE = {"color": "#555555", "ls": ":", "lw": 1.3}
STATUS_COLORS = {"base": "#7f7f7f", "promoted": "#2ca02c", "kept": "#2ca02c", "rejected": "#d62728",
                 "reverted": "#d62728", "candidate": "#ff7f0e"}


@dataclass(frozen=True)
class Figure:
    name: str          # files NAME.png and NAME.html
    title: str
    note: str          # what the figure shows and what was left out


def colors(methods: list[str]) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {m: matplotlib.colors.to_hex(palette[i % 10]) for i, m in enumerate(methods)}


def _save(fig: plt.Figure, pfig: go.Figure, out: Path, name: str, min_height: int = HTML_HEIGHT) -> None:
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    pfig.update_layout(template="plotly_white", autosize=True)
    pfig.write_html(out / f"{name}.html", include_plotlyjs="directory", config={"responsive": True},
                    default_width="100%", default_height=f"max(95vh, {min_height}px)")


def on_gpu(frame: pd.DataFrame) -> bool:
    """Whether every study's trials ran on (or model) a GPU: the gpu profile, or the surrogate of GPU trials."""
    return bool((frame.drop_duplicates("study")["profile"] == "gpu").all())


def hours_unit(frame: pd.DataFrame) -> str:
    """`GPU-hours` where the trials ran on GPUs, else `hours of trial time`."""
    return "GPU-hours" if on_gpu(frame) else "hours of trial time"


def hours_label(frame: pd.DataFrame) -> str:
    return f"{hours_unit(frame)} spent (trial wall time)"


def padded(low: float, high: float, share: float) -> tuple[float, float]:
    """[low, high] widened by `share` of its span on each side, and to MIN_SPAN around its middle if flatter."""
    middle, half = (low + high) / 2, max(high - low, MIN_SPAN) / 2
    return middle - half * (1 + 2 * share), middle + half * (1 + 2 * share)


def baseline_value(frame: pd.DataFrame) -> float | None:
    """The median val_bpb of the successful baseline trials (the defaults), if any."""
    values = frame.loc[frame["ok"] & (frame["source"] == "baseline"), "val_bpb"].astype(float)
    return float(values.median()) if len(values) else None


def draw_baseline(ax: plt.Axes, pfig: go.Figure, baseline: float | None, **where: int) -> None:
    """The baseline's val_bpb as a dotted line, labelled (nothing without a successful baseline)."""
    if baseline is None:
        return
    ax.axhline(baseline, **BASELINE_STYLE, label=f"baseline (defaults): {baseline:.4f}")
    pfig.add_hline(y=baseline, line={"color": BASELINE_STYLE["color"], "dash": "dot", "width": 1.3},
                   annotation_text=f"baseline {baseline:.4f}", annotation_position="bottom left", **where)


def bpb_range(frame: pd.DataFrame) -> tuple[float, float]:
    """The val_bpb axis of the trial plots: from the best trial up to the baseline or, if higher, the 80th
    percentile of the successful trials of the most focused method, so that the bad configurations of a
    scattered method (random) do not squash the region where the others converge."""
    ok = frame[frame["ok"]]
    values = ok["val_bpb"].astype(float)
    focused = values.groupby(ok["method"]).quantile(0.8).min()
    baseline = baseline_value(frame)
    return padded(values.min(), max(focused, baseline if baseline is not None else -math.inf), 0.06)


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks covering [low, high] (every digit within a decade or less): labels people read on a log axis."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    steps = (1, 2, 5) if high / low > 30 else range(1, 10)
    ticks = [s * 10.0 ** d for d in decades for s in steps]
    inside = [t for t in ticks if low <= t <= high]
    return inside if len(inside) >= 2 else [low, high]


# -- incumbent against budget -----------------------------------------------------------------------------

def incumbent_curves(frame: pd.DataFrame, grid: np.ndarray) -> dict[str, np.ndarray]:
    """{study: best val_bpb found by each point of the grid of GPU-hours} (NaN before the first success)."""
    curves = {}
    for study, group in frame[frame["finished"]].groupby("study"):
        hours, best = group["gpu_hours"].to_numpy(float), group["incumbent"].to_numpy(float)
        index = np.searchsorted(hours, grid, side="right") - 1
        curves[study] = np.where(index >= 0, best[np.clip(index, 0, None)], np.nan)
    return curves


def plot_incumbent(frame: pd.DataFrame, palette: dict[str, str], out: Path,
                   references: dict[str, float] | None) -> Figure:
    grid = np.linspace(0, max(frame["gpu_hours"].max(), MIN_HOURS), GRID_POINTS)
    curves = incumbent_curves(frame, grid)
    by_method = frame.drop_duplicates("study").groupby("method")["study"].apply(list)
    hours = hours_label(frame)
    fig, ax = plt.subplots(figsize=(10, 6))
    pfig = go.Figure()
    tops, bottoms = [], []
    for method in palette:
        stack = np.array([curves[s] for s in by_method[method]])
        complete = np.all(np.isfinite(stack), axis=0)
        mean = np.where(complete, np.nanmean(np.where(complete, stack, 0), axis=0), np.nan)
        n = len(stack)
        std = np.where(complete, stack.std(axis=0, ddof=1), np.nan) if n > 1 else np.zeros_like(mean)
        label = f"{method} (n={n} seed{'s' if n > 1 else ''})"
        color = palette[method]
        ax.plot(grid, mean, color=color, lw=2, label=label, drawstyle="steps-post")
        pfig.add_trace(go.Scatter(x=grid, y=mean, name=label, line={"color": color, "shape": "hv", "width": 2},
                                  legendgroup=method, hovertemplate=f"%{{x:.3f}} h: {BPB_HOVER}"))
        if n > 1:
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.18, step="post", lw=0)
            pfig.add_trace(go.Scatter(x=np.r_[grid, grid[::-1]], y=np.r_[mean + std, (mean - std)[::-1]],
                                      fill="toself", fillcolor=color, opacity=0.18, line={"width": 0, "shape": "hv"},
                                      legendgroup=method, showlegend=False, hoverinfo="skip"))
        if references and method in references:
            ref = references[method]
            ax.axhline(ref, color=color, ls="--", lw=1.2, label=f"{method}, paper: {ref:.4f}")
            pfig.add_hline(y=ref, line={"color": color, "dash": "dash", "width": 1.2},
                           annotation_text=f"{method}, paper {ref:.4f}")
            bottoms.append(ref)
            tops.append(ref)
        if np.isfinite(mean).any():
            tops.append(np.nanmax(mean + std))
            bottoms.append(np.nanmin(mean - std))
    baseline = baseline_value(frame)
    draw_baseline(ax, pfig, baseline)
    if baseline is not None:
        tops.append(baseline)
    low, high = padded(min(bottoms), max(tops), 0.05) if tops else bpb_range(frame)
    ax.set_ylim(low, high)
    ax.set_xlim(0, grid[-1])
    several = frame.groupby("method")["study"].nunique().max() > 1
    band = "; band: ± 1 std over seeds" if several else ""
    title = "Best val_bpb found against budget " + ("(mean over seeds; band: ± 1 std)" if several else "(one seed per method)")
    ax.set(title=title, xlabel=hours, ylabel=BPB_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    pfig.update_layout(title=title, xaxis_title=hours, yaxis_title=BPB_LABEL, yaxis_range=[low, high],
                       yaxis_tickformat=".4f")
    _save(fig, pfig, out, "incumbent")
    note = (f"The incumbent (best successful val_bpb so far) of each study, against the {hours_unit(frame)} its trials "
            "used; the line is the mean over seeds, drawn where every seed has a success" + band + ".")
    if baseline is not None:
        note += " Dotted: the baseline (the defaults)."
    if references:
        note += " Dashed: the paper's published mean best after 24 h."
    return Figure("incumbent", f"Incumbent val_bpb against {hours_unit(frame)}", note)


# -- every trial ------------------------------------------------------------------------------------------

def _trial_hover(part: pd.DataFrame, hours: str) -> list[str]:
    """`trial 7 (tpe): 0.9812 at 1.234 h`, or the failure status in place of the value."""
    return [f"trial {n} ({s}): {f'{v:.4f}' if st == 'ok' else st} at {h:.3f} {hours}"
            for n, s, v, st, h in zip(part["number"], part["source"], part["val_bpb"].astype(float), part["status"],
                                      part["gpu_hours"])]


def plot_trials(frame: pd.DataFrame, palette: dict[str, str], out: Path) -> Figure:
    """Per method: successful trials and the incumbent on the value axis; failures in a band above it."""
    methods = list(palette)
    cols = 2 if len(methods) == 4 else min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    low, high = bpb_range(frame)
    hours, unit = hours_label(frame), "GPU-h" if on_gpu(frame) else "h"
    baseline = baseline_value(frame)
    done = frame[frame["finished"]]
    seeds = sorted(done["seed"].unique())
    seed_colors = {s: matplotlib.colors.to_hex(plt.get_cmap("tab10").colors[i % 10]) for i, s in enumerate(seeds)}
    fig, grid = plt.subplots(2 * rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [1, 6] * rows})
    pfig = make_subplots(rows=2 * rows, cols=cols, shared_xaxes=True, row_heights=[1, 6] * rows,
                         vertical_spacing=0.04 / rows, subplot_titles=[m if r % 2 == 0 else "" for r in range(2 * rows)
                                                                       for m in (methods + [""] * cols)[:cols]])
    for i, method in enumerate(methods):
        band, ax = grid[2 * (i // cols)][i % cols], grid[2 * (i // cols) + 1][i % cols]
        r, c = 2 * (i // cols) + 2, i % cols + 1
        for seed, trials in done[done["method"] == method].groupby("seed"):
            color = seed_colors[seed]
            ok = trials[trials["ok"]]
            inside, above = ok[ok["val_bpb"].astype(float) <= high], ok[ok["val_bpb"].astype(float) > high]
            failed = trials[trials["failed"]]
            ax.scatter(inside["gpu_hours"], inside["val_bpb"], s=10, color=color, alpha=0.55, label=f"seed {seed}")
            ax.scatter(above["gpu_hours"], np.full(len(above), high), s=14, marker="^", color=color, alpha=0.55)
            band.scatter(failed["gpu_hours"], np.full(len(failed), seed), s=14, marker="x", color=FAILED_COLOR, alpha=0.6)
            ax.plot(trials["gpu_hours"], trials["incumbent"], color=color, lw=1.6, drawstyle="steps-post")
            for part, y, marker, row, name in ((inside, inside["val_bpb"], "circle", r, f"seed {seed}"),
                                               (above, np.full(len(above), high), "triangle-up", r,
                                                f"seed {seed}: above the axis"),
                                               (failed, np.full(len(failed), f"seed {seed}"), "x", r - 1, "failed")):
                pfig.add_trace(go.Scatter(
                    x=part["gpu_hours"], y=y, mode="markers", name=name, legendgroup=name,
                    showlegend=i == 0 and len(part) > 0, hoverinfo="text", text=_trial_hover(part, unit),
                    marker={"symbol": marker, "size": 6, "opacity": 0.6,
                            "color": FAILED_COLOR if name == "failed" else color}), row=row, col=c)
            pfig.add_trace(go.Scatter(x=trials["gpu_hours"], y=trials["incumbent"], mode="lines", showlegend=False,
                                      line={"color": color, "shape": "hv"}, hoverinfo="skip"), row=r, col=c)
        draw_baseline(ax, pfig, baseline, row=r, col=c)
        band.set_title(method)
        band.set_yticks(seeds, [f"seed {s}" for s in seeds], fontsize=7)
        band.set_ylim(min(seeds) - 0.6, max(seeds) + 0.6)
        band.set_ylabel("failed", rotation=0, ha="right", va="center", color=FAILED_COLOR)
        band.tick_params(axis="x", labelbottom=False)
        ax.set_ylim(low, high + (high - low) * 0.03)
        ax.set_xlim(left=0)
        ax.set_xlabel(hours)
        ax.grid(alpha=0.3)
        ax.set_ylabel(BPB_LABEL if i % cols == 0 else "")
        pfig.update_yaxes(title_text="failed", row=r - 1, col=c)
        pfig.update_yaxes(range=[low, high + (high - low) * 0.03], tickformat=".4f",
                          title_text=BPB_LABEL if i % cols == 0 else None, row=r, col=c)
        pfig.update_xaxes(title_text=hours, row=r, col=c)
    for j in range(len(methods), rows * cols):
        grid[2 * (j // cols)][j % cols].axis("off")
        grid[2 * (j // cols) + 1][j % cols].axis("off")
    handles, labels = grid[1][0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], ls="", marker="x", color=FAILED_COLOR), plt.Line2D([], [], ls="", marker="^", color="gray"),
                plt.Line2D([], [], color="gray")]
    labels += ["failed (no val_bpb), in the band above", f"successful but above {high:.4f}, at the top edge",
               "incumbent (best so far)"]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    title = "Every trial and the incumbent staircase, per method and seed"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    pfig.update_layout(title=title)
    _save(fig, pfig, out, "trials", min_height=420 * rows)
    return Figure("trials", "Every trial per method",
                  f"Successful trials as dots, the incumbent as a staircase, one colour per seed; the dotted line is the "
                  f"baseline. The val_bpb axis stops at {high:.4f} (the baseline or, if higher, the 80th percentile of the "
                  "successful trials of the most focused method): worse successes are drawn as ▲ at its top edge. "
                  "Failed trials have no val_bpb (the samplers were told 100): they are drawn as × in the band above "
                  "each plot, one row per seed.")


# -- learning curves (pruning) ----------------------------------------------------------------------------

PRUNED_COLOR = "#7f7f7f"


def curve_points(row: pd.Series) -> tuple[list[float], list[float]]:
    """A trial's intermediate val_bpb by percent of the budget, then its final val_bpb at 100 if it has one."""
    points = sorted((float(k), v) for k, v in json.loads(row["intermediate"]).items())
    if row["ok"]:
        points.append((100.0, float(row["val_bpb"])))
    return [x for x, _ in points], [y for _, y in points]


def plot_curves(frame: pd.DataFrame, palette: dict[str, str], out: Path) -> Figure | str:
    """Per method: every trial's intermediate val_bpb at the checkpoints and its final one; pruned trials in grey."""
    curved = frame[frame["finished"] & frame["intermediate"].notna()] if "intermediate" in frame else frame[:0]
    if curved.empty:
        return "Learning curves: skipped, no trial reported intermediate val_bpb (no --pruner)."
    methods = [m for m in palette if m in set(curved["method"])]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.4), squeeze=False, sharey=True)
    pfig = make_subplots(rows=1, cols=len(methods), shared_yaxes=True, subplot_titles=methods)
    for i, method in enumerate(methods):
        ax = axes[0][i]
        for _, row in curved[curved["method"] == method].iterrows():
            x, y = curve_points(row)
            color = PRUNED_COLOR if row["pruned"] else palette[method]
            ax.plot(x, y, color=color, alpha=0.5, lw=1, ls="--" if row["pruned"] else "-", marker=".")
            pfig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", showlegend=False, opacity=0.6,
                                      line={"color": color, "dash": "dash" if row["pruned"] else "solid"},
                                      hovertemplate=f"trial {row['number']} ({row['status']}): {BPB_HOVER}"),
                           row=1, col=i + 1)
        ax.set_title(method)
        ax.set_xlabel("percent of the training budget")
        ax.grid(alpha=0.3)
        pfig.update_xaxes(title_text="percent of the training budget", row=1, col=i + 1)
    axes[0][0].set_ylabel(BPB_LABEL)
    title = "Learning curves: intermediate val_bpb on the validation slice, then the final val_bpb"
    fig.suptitle(title)
    fig.tight_layout()
    pfig.update_layout(title=title)
    pfig.update_yaxes(title_text=BPB_LABEL, tickformat=".4f", row=1, col=1)
    _save(fig, pfig, out, "curves")
    return Figure("curves", "Learning curves and pruning",
                  "Each trial's val_bpb on the small validation slice at the checkpoints of its budget, then its final "
                  "val_bpb (all validation tokens) at 100 %; pruned trials dashed in grey, ending where they were "
                  "stopped. Failed trials are left out after their last checkpoint.")


# -- Pareto fronts ----------------------------------------------------------------------------------------

def pareto_front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats on both x and y (both minimized), sorted by x."""
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    keep = ys < np.minimum.accumulate(np.r_[np.inf, ys[:-1]])
    return xs[keep], ys[keep]


def vram_cap(frame: pd.DataFrame) -> float | None:
    """The VRAM cap (GB) the studies ran under, if they share one."""
    caps = frame.drop_duplicates("study")["vram_cap_gb"].dropna().unique() if "vram_cap_gb" in frame else []
    return float(caps[0]) if len(caps) == 1 else None


def plot_pareto(frame: pd.DataFrame, palette: dict[str, str], out: Path) -> Figure | str:
    axes_spec = [(c, label, scale) for c, label, scale in
                 (("peak_memory_mb", "peak memory (GB)", 1 / 1024), ("num_params", "parameters (millions)", 1e-6))
                 if c in frame and pd.to_numeric(frame.loc[frame["ok"], c], errors="coerce").gt(0).any()]
    if not axes_spec:
        return "Pareto fronts: skipped, no trial recorded peak_memory_mb or num_params (the surrogate objective does not)."
    low, high = bpb_range(frame)
    cap = vram_cap(frame)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.5 * len(axes_spec), 5.2), sharey=True, squeeze=False)
    pfig = make_subplots(rows=1, cols=len(axes_spec), shared_yaxes=True, subplot_titles=[s[1] for s in axes_spec])
    ok = frame[frame["ok"]]
    for k, (column, label, scale) in enumerate(axes_spec):
        ax = axes[0][k]
        shown = []
        for method, color in palette.items():
            mine = ok[ok["method"] == method]
            x = pd.to_numeric(mine[column], errors="coerce").to_numpy(float) * scale
            y = mine["val_bpb"].to_numpy(float)
            keep = np.isfinite(x) & (x > 0)
            x, y = x[keep], y[keep]
            if not len(x):
                continue
            shown.append(x)
            fx, fy = pareto_front(x, y)
            above = y > high
            ax.scatter(x[~above], y[~above], s=9, color=color, alpha=0.3)
            ax.scatter(x[above], np.full(above.sum(), high), s=12, marker="^", color=color, alpha=0.3)
            ax.plot(fx, fy, color=color, lw=2, marker="o", ms=4, drawstyle="steps-post", label=method)
            hover = f"%{{x:.3g}}: {BPB_HOVER}<extra>{method}</extra>"
            pfig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker={"color": color, "size": 4, "opacity": 0.35},
                                      legendgroup=method, showlegend=False, name=method, hovertemplate=hover),
                           row=1, col=k + 1)
            pfig.add_trace(go.Scatter(x=fx, y=fy, mode="lines+markers", line={"color": color, "shape": "hv"},
                                      name=method, legendgroup=method, showlegend=k == 0, hovertemplate=hover),
                           row=1, col=k + 1)
        values = np.concatenate(shown)
        x_low, x_high = values.min() / 1.2, values.max() * 1.2
        if column == "peak_memory_mb" and cap is not None:
            ax.axvline(cap, color=FAILED_COLOR, ls="--", lw=1.2, label=f"VRAM cap {cap:g} GB")
            pfig.add_vline(x=cap, line={"color": FAILED_COLOR, "dash": "dash"}, annotation_text=f"VRAM cap {cap:g} GB",
                           row=1, col=k + 1)
            x_high = max(x_high, cap * 1.1)
        ticks = log_ticks(x_low, x_high)
        ax.set_xscale("log")
        ax.set_xlim(x_low, x_high)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=f"{label}, log scale", title=f"val_bpb against {label.split(' (')[0]}")
        ax.set_ylim(low, high + (high - low) * 0.03)
        ax.grid(alpha=0.3, which="both")
        if k == 0:
            ax.set_ylabel(BPB_LABEL)
        pfig.update_xaxes(type="log", title_text=f"{label}, log scale", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks],
                          range=[math.log10(x_low), math.log10(x_high)], row=1, col=k + 1)
    axes[0][0].legend(title="Pareto front per method", fontsize=9)
    fig.suptitle("Pareto fronts: lower val_bpb for less memory and fewer parameters (successful trials)")
    fig.tight_layout()
    pfig.update_yaxes(range=[low, high + (high - low) * 0.03], tickformat=".4f")
    pfig.update_yaxes(title_text=BPB_LABEL, row=1, col=1)
    pfig.update_layout(title="Pareto fronts of val_bpb against peak memory and parameter count")
    _save(fig, pfig, out, "pareto")
    capped = f" Dashed: the VRAM cap ({cap:g} GB)." if cap is not None else ""
    return Figure("pareto", "Pareto fronts", f"Successful trials only (failed ones have no measurement). Trials above "
                  f"{high:.4f} are drawn as ▲ at the top edge; the fronts use their true values.{capped}")


# -- importances ------------------------------------------------------------------------------------------

def study_importances(study: optuna.Study, *, with_failures: bool = False) -> dict[str, float] | None:
    """PED-ANOVA importances over the study's successful trials (with_failures: every completed trial, failures
    at val_bpb 100, as the sampler saw them); None below MIN_IMPORTANCE_TRIALS or without a spread of values."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if with_failures or t.user_attrs.get(records.STATUS) == records.OK]
    if len(trials) < MIN_IMPORTANCE_TRIALS or len({t.value for t in trials}) < 2:
        return None
    copy = optuna.create_study(direction="minimize")
    copy.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(
            copy, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), normalize=True)


IMPORTANCE_KINDS = {  # name: (with failures, title, what the trials were)
    "importance": (False, "Parameter importances", "successful trials"),
    "importance-with-failures": (True, "Parameter importances, failures included",
                                 "completed trials, failures included at val_bpb = 100 as the samplers saw them"),
}


def plot_importances(studies: list[optuna.Study], frame: pd.DataFrame, palette: dict[str, str], out: Path,
                     name: str = "importance") -> Figure | str:
    with_failures, title, which = IMPORTANCE_KINDS[name]
    method_of = frame.drop_duplicates("study").set_index("study")["method"]
    found: dict[str, list[dict[str, float]]] = {}
    for study in studies:
        values = study_importances(study, with_failures=with_failures)
        if values is not None:
            found.setdefault(method_of[study.study_name], []).append(values)
    if not found:
        return f"{title}: skipped, every study has fewer than {MIN_IMPORTANCE_TRIALS} {which} (or all alike)."
    table = pd.DataFrame({m: pd.DataFrame(v).fillna(0.0).mean() for m, v in found.items()}).fillna(0.0)
    table = table[[m for m in palette if m in table]]
    table = table.loc[table.mean(axis=1).sort_values().index]
    knobs, methods = list(table.index), list(table.columns)
    height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(knobs) * max(1, len(methods) / 2.5) + 1.5))
    pfig = go.Figure()
    for j, method in enumerate(methods):
        ys = np.arange(len(knobs)) - (j - (len(methods) - 1) / 2) * height  # first method on top
        n = len(found[method])
        ax.barh(ys, table[method], height=height, color=palette[method], label=f"{method} ({n} seed{'s' if n > 1 else ''})")
        pfig.add_trace(go.Bar(y=knobs, x=table[method], orientation="h", name=method, marker_color=palette[method],
                              hovertemplate=f"%{{y}}: %{{x:.3f}}<extra>{method}</extra>"))
    ax.set_yticks(np.arange(len(knobs)), knobs)
    xlabel = "importance (PED-ANOVA, normalized to sum 1 per study; mean over seeds)"
    ax.set(xlabel=xlabel, ylabel="knob", title=f"Which knobs mattered, per method ({which.split(',')[0]})")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=9)
    pfig.update_layout(barmode="group", title=f"{title} per method (PED-ANOVA on {which})", xaxis_title=xlabel,
                       yaxis_title="knob")
    _save(fig, pfig, out, name, min_height=40 * len(knobs) * len(methods) + 200)
    missing = [m for m in palette if m not in found]
    note = f"optuna's PED-ANOVA evaluator on each study's {which}, averaged over the method's seeds."
    if missing:
        note += f" Left out, fewer than {MIN_IMPORTANCE_TRIALS} such trials: {', '.join(missing)}."
    return Figure(name, title, note)


# -- lineage ----------------------------------------------------------------------------------------------

def tree_layout(rows: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """(x, depth) of each generation: leaves side by side, a parent above the middle of its children."""
    children: dict[Any, list[int]] = {}
    for r in rows:
        children.setdefault(r["parent"], []).append(r["generation"])
    place: dict[int, tuple[float, float]] = {}
    next_leaf = [0.0]

    def visit(node: int, depth: int) -> float:
        kids = children.get(node, [])
        x = float(np.mean([visit(k, depth + 1) for k in kids])) if kids else next_leaf[0]
        if not kids:
            next_leaf[0] += 1
        place[node] = (x, depth)
        return x

    for root in children.get(None, []):
        visit(root, 0)
    return place


def plot_lineage(study: str, rows: list[dict[str, Any]], out: Path) -> Figure:
    place = tree_layout(rows)
    width = max(place.values(), key=lambda p: p[0])[0] + 1
    depth = max(p[1] for p in place.values()) + 1
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * width), max(3.5, 1.7 * depth)))
    pfig = go.Figure()
    for r in rows:
        if r["parent"] in place:
            (x0, y0), (x1, y1) = place[r["parent"]], place[r["generation"]]
            ax.plot([x0, x1], [-y0, -y1], color="#999999", lw=1.2, zorder=1)
            pfig.add_trace(go.Scatter(x=[x0, x1], y=[-y0, -y1], mode="lines", line={"color": "#999999"},
                                      showlegend=False, hoverinfo="skip"))
    for r in rows:
        x, y = place[r["generation"]]
        color = STATUS_COLORS.get(r["status"], "#1f77b4")
        best = "–" if r["best_val_bpb"] is None else f"{r['best_val_bpb']:.4f}"
        text = (f"gen {r['generation']} ({r['status']})\n{_shorten(r['mutation'] or r['description'], 30)}\n"
                f"best {best}, {r['trials']} trials")
        ax.annotate(text, (x, -y), ha="center", va="center", fontsize=8, zorder=3,
                    bbox={"boxstyle": "round,pad=0.4", "fc": _light(color), "ec": color})
        knobs = "new knobs: " + (", ".join(r["new_knobs"]) or "none")
        pfig.add_trace(go.Scatter(x=[x], y=[-y], mode="markers+text", text=[f"gen {r['generation']}"],
                                  textposition="top center", marker={"size": 18, "color": color}, showlegend=False,
                                  hovertext=f"gen {r['generation']} ({r['status']}), parent {r['parent']}<br>"
                                            f"{r['description']}<br>{knobs}<br>best {best} in {r['trials']} trials, "
                                            f"margin {r['margin']}<br>{r['reason'] or ''}", hoverinfo="text"))
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.5, 0.5)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, fc=_light(c), ec=c) for c in ("#7f7f7f", "#2ca02c", "#d62728", "#ff7f0e")]
    ax.legend(handles, ["base", "promoted / kept", "rejected / reverted", "candidate"], loc="upper right", fontsize=8)
    ax.set_title(f"Code generations of {study} (parent above child)")
    pfig.update_layout(title=f"Code generations of {study}", xaxis_visible=False, yaxis_visible=False)
    name = f"lineage-{study}"
    _save(fig, pfig, out, name)
    return Figure(name, f"Lineage of {study}", "Each box a generation of train.py: its fate, best val_bpb and trials; "
                  "and its mutation. Hover the HTML nodes for the description, new knobs, margin "
                  "and verdict.")


def _light(color: str) -> str:
    """The color mixed with three parts of white: an opaque box fill that keeps text readable."""
    rgb = np.array(matplotlib.colors.to_rgb(color))
    return matplotlib.colors.to_hex(0.25 * rgb + 0.75)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def write_all(frame: pd.DataFrame, studies: list[optuna.Study], lineages: dict[str, list[dict[str, Any]]],
              out: Path, *, references: dict[str, float] | None = None) -> list[Figure | str]:
    """Every figure into out; a string in place of a figure that was skipped, saying why."""
    methods = frame.drop_duplicates("method")["method"].tolist()
    order = frame[frame["ok"]].groupby("method")["val_bpb"].min().reindex(methods).sort_values(na_position="last")
    palette = colors(list(order.index))
    figures: list[Figure | str]
    if frame["ok"].any():
        figures = [plot_incumbent(frame, palette, out, references), plot_trials(frame, palette, out),
                   plot_pareto(frame, palette, out)]
    else:
        figures = ["Incumbent, every trial and Pareto fronts: skipped, no trial succeeded (nothing has a val_bpb)."]
    figures.append(plot_curves(frame, palette, out))
    figures += [plot_importances(studies, frame, palette, out, name) for name in IMPORTANCE_KINDS]
    figures += [plot_lineage(name, rows, out) for name, rows in lineages.items()]
    return figures
