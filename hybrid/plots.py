"""The report's figures, each as a PNG (matplotlib, Agg) and an interactive HTML page (plotly).

The HTML pages load plotly.js from `plotly.min.js` written once beside them (include_plotlyjs="directory"):
they work offline and stay small; keep the three together when moving them.
Failed trials (val_bpb = 100 for the samplers) never set an axis: they are drawn at the top edge.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

MIN_IMPORTANCE_TRIALS = 10   # fewer finished trials in every study of a method: no importances for it
GRID_POINTS = 400
BPB_LABEL = "val_bpb (bits per byte, lower is better)"
HOURS_LABEL = "GPU-hours spent (trial wall time)"
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


def _save(fig: plt.Figure, pfig: go.Figure, out: Path, name: str) -> None:
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    pfig.update_layout(template="plotly_white")
    pfig.write_html(out / f"{name}.html", include_plotlyjs="directory")


def bpb_range(frame: pd.DataFrame) -> tuple[float, float]:
    """The val_bpb axis of the trial plots: from the best trial up to the baseline or, if higher, the 80th
    percentile of the successful trials of the most focused method, so that the bad configurations of a
    scattered method (random) do not squash the region where the others converge."""
    ok = frame[frame["ok"]]
    values = ok["val_bpb"].astype(float)
    baseline = values[ok["source"] == "baseline"]
    focused = values.groupby(ok["method"]).quantile(0.8).min()
    low, high = values.min(), max(focused, baseline.median() if len(baseline) else -math.inf)
    pad = max(high - low, 1e-4) * 0.06
    return low - pad, high + pad


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
    grid = np.linspace(0, frame["gpu_hours"].max(), GRID_POINTS)
    curves = incumbent_curves(frame, grid)
    by_method = frame.drop_duplicates("study").groupby("method")["study"].apply(list)
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
                                  legendgroup=method, hovertemplate="%{x:.2f} h: %{y:.4f}"))
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
    low, high = (min(bottoms), max(tops)) if tops else bpb_range(frame)
    pad = max(high - low, 1e-4) * 0.05
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(0, grid[-1])
    several = frame.groupby("method")["study"].nunique().max() > 1
    band = "; band: ± 1 std over seeds" if several else ""
    title = "Best val_bpb found against budget " + ("(mean over seeds; band: ± 1 std)" if several else "(one seed per method)")
    ax.set(title=title, xlabel=HOURS_LABEL, ylabel=BPB_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    pfig.update_layout(title=title, xaxis_title=HOURS_LABEL,
                       yaxis_title=BPB_LABEL, yaxis_range=[low - pad, high + pad])
    _save(fig, pfig, out, "incumbent")
    note = ("The incumbent (best successful val_bpb so far) of each study, against the GPU-hours its trials used; "
            "the line is the mean over seeds, drawn where every seed has a success" + band + ".")
    if references:
        note += " Dashed: the paper's published mean best after 24 h."
    return Figure("incumbent", "Incumbent val_bpb against GPU-hours", note)


# -- every trial ------------------------------------------------------------------------------------------

def plot_trials(frame: pd.DataFrame, palette: dict[str, str], out: Path) -> Figure:
    methods = list(palette)
    cols = 2 if len(methods) == 4 else min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    low, high = bpb_range(frame)
    fail_y, top = high + (high - low) * 0.04, high + (high - low) * 0.07  # failures in a row above the ▲ row
    done = frame[frame["finished"]]
    seeds = sorted(done["seed"].unique())
    seed_colors = {s: matplotlib.colors.to_hex(plt.get_cmap("tab10").colors[i % 10]) for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), sharey=True, squeeze=False)
    pfig = make_subplots(rows=rows, cols=cols, subplot_titles=methods, shared_yaxes=True)
    shown: set[str] = set()
    for i, method in enumerate(methods):
        ax, r, c = axes[i // cols][i % cols], i // cols + 1, i % cols + 1
        for seed, trials in done[done["method"] == method].groupby("seed"):
            color = seed_colors[seed]
            ok = trials[trials["ok"]]
            inside = ok[ok["val_bpb"].astype(float) <= high]
            above = ok[ok["val_bpb"].astype(float) > high]
            failed = trials[trials["failed"]]
            ax.scatter(inside["gpu_hours"], inside["val_bpb"], s=10, color=color, alpha=0.55, label=f"seed {seed}")
            ax.scatter(above["gpu_hours"], np.full(len(above), high), s=14, marker="^", color=color, alpha=0.55)
            ax.scatter(failed["gpu_hours"], np.full(len(failed), fail_y), s=14, marker="x", color="#d62728", alpha=0.5)
            ax.plot(trials["gpu_hours"], trials["incumbent"], color=color, lw=1.6, drawstyle="steps-post")
            for kind, part, y, marker in (("ok", inside, inside["val_bpb"], "circle"),
                                          ("above", above, np.full(len(above), high), "triangle-up"),
                                          ("failed", failed, np.full(len(failed), fail_y), "x")):
                name = {"ok": f"seed {seed}", "above": f"seed {seed}: above the axis",
                        "failed": "failed (val_bpb = 100)"}[kind]
                pfig.add_trace(go.Scatter(
                    x=part["gpu_hours"], y=y, mode="markers", name=name, legendgroup=name,
                    showlegend=name not in shown, marker={"symbol": marker, "size": 5, "opacity": 0.6,
                                                          "color": "#d62728" if kind == "failed" else color},
                    text=[f"trial {n} ({s}): {v if k == 'ok' else st}" for n, s, v, st, k in
                          zip(part["number"], part["source"], part["val_bpb"], part["status"], [kind] * len(part))],
                    hoverinfo="text"), row=r, col=c)
                shown.add(name)
            pfig.add_trace(go.Scatter(x=trials["gpu_hours"], y=trials["incumbent"], mode="lines", showlegend=False,
                                      line={"color": color, "shape": "hv"}, hoverinfo="skip"), row=r, col=c)
        ax.set_title(method)
        ax.set_ylim(low, top)
        ax.set_xlim(left=0)
        ax.set_xlabel(HOURS_LABEL)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel(BPB_LABEL)
    for j in range(len(methods), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], ls="", marker="x", color="#d62728"), plt.Line2D([], [], ls="", marker="^", color="gray"),
                plt.Line2D([], [], color="gray")]
    labels += ["failed (val_bpb = 100), top row", f"successful but above {high:.4f}, second row",
               "incumbent (best so far)"]
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Every trial and the incumbent staircase, per method and seed")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    pfig.update_yaxes(range=[low, top])
    pfig.update_layout(title="Every trial and the incumbent staircase, per method and seed", height=380 * rows)
    _save(fig, pfig, out, "trials")
    return Figure("trials", "Every trial per method",
                  f"Successful trials as dots, the incumbent as a staircase, one colour per seed. The val_bpb axis stops at "
                  f"{high:.4f} (the baseline or, if higher, the 80th percentile of the successful trials of the most "
                  "focused method): failed trials "
                  "(val_bpb = 100) are drawn as × in the top row, worse successes as ▲ just below it.")


# -- Pareto fronts ----------------------------------------------------------------------------------------

def pareto_front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats on both x and y (both minimized), sorted by x."""
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    keep = ys < np.minimum.accumulate(np.r_[np.inf, ys[:-1]])
    return xs[keep], ys[keep]


def plot_pareto(frame: pd.DataFrame, palette: dict[str, str], out: Path) -> Figure | str:
    axes_spec = [(c, label, scale) for c, label, scale in
                 (("peak_memory_mb", "peak memory (GB)", 1 / 1024), ("num_params", "parameters (millions)", 1e-6))
                 if c in frame and pd.to_numeric(frame.loc[frame["ok"], c], errors="coerce").notna().any()]
    if not axes_spec:
        return "Pareto fronts: skipped, no trial recorded peak_memory_mb or num_params (the surrogate objective does not)."
    low, high = bpb_range(frame)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.5 * len(axes_spec), 5.2), sharey=True, squeeze=False)
    pfig = make_subplots(rows=1, cols=len(axes_spec), shared_yaxes=True, subplot_titles=[s[1] for s in axes_spec])
    ok = frame[frame["ok"]]
    for k, (column, label, scale) in enumerate(axes_spec):
        ax = axes[0][k]
        for method, color in palette.items():
            mine = ok[ok["method"] == method]
            x = pd.to_numeric(mine[column], errors="coerce").to_numpy(float) * scale
            y = mine["val_bpb"].to_numpy(float)
            keep = np.isfinite(x) & (x > 0)
            x, y = x[keep], y[keep]
            if not len(x):
                continue
            fx, fy = pareto_front(x, y)
            above = y > high
            ax.scatter(x[~above], y[~above], s=9, color=color, alpha=0.3)
            ax.scatter(x[above], np.full(above.sum(), high), s=12, marker="^", color=color, alpha=0.3)
            ax.plot(fx, fy, color=color, lw=2, marker="o", ms=4, drawstyle="steps-post", label=method)
            pfig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker={"color": color, "size": 4, "opacity": 0.35},
                                      legendgroup=method, showlegend=False, name=method), row=1, col=k + 1)
            pfig.add_trace(go.Scatter(x=fx, y=fy, mode="lines+markers", line={"color": color, "shape": "hv"},
                                      name=method, legendgroup=method, showlegend=k == 0), row=1, col=k + 1)
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        subs = (1.0, 2.0, 5.0) if hi / lo > 30 else tuple(range(1, 10))  # labelled ticks also within a decade
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=f"{label}, log scale", title=f"val_bpb against {label.split(' (')[0]}")
        ax.set_ylim(low, high + (high - low) * 0.03)
        ax.grid(alpha=0.3, which="both")
        if k == 0:
            ax.set_ylabel(BPB_LABEL)
        pfig.update_xaxes(type="log", title_text=f"{label}, log scale", row=1, col=k + 1)
    axes[0][0].legend(title="Pareto front per method", fontsize=9)
    fig.suptitle("Pareto fronts: lower val_bpb for less memory and fewer parameters (successful trials)")
    fig.tight_layout()
    pfig.update_yaxes(range=[low, high + (high - low) * 0.03], title_text=BPB_LABEL, row=1, col=1)
    pfig.update_layout(title="Pareto fronts of val_bpb against peak memory and parameter count")
    _save(fig, pfig, out, "pareto")
    return Figure("pareto", "Pareto fronts", f"Successful trials only (failed ones have no measurement). Trials above "
                  f"{high:.4f} are drawn as ▲ at the top edge; the fronts use their true values.")


# -- importances ------------------------------------------------------------------------------------------

def study_importances(study: optuna.Study) -> dict[str, float] | None:
    """PED-ANOVA importances over the study's completed trials (failures at val_bpb 100 included, as the
    sampler saw them); None below MIN_IMPORTANCE_TRIALS."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return None
    copy = optuna.create_study(direction="minimize")
    copy.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(
            copy, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), normalize=True)


def plot_importances(studies: list[optuna.Study], frame: pd.DataFrame, palette: dict[str, str],
                     out: Path) -> Figure | str:
    method_of = frame.drop_duplicates("study").set_index("study")["method"]
    found: dict[str, list[dict[str, float]]] = {}
    for study in studies:
        values = study_importances(study)
        if values is not None:
            found.setdefault(method_of[study.study_name], []).append(values)
    if not found:
        return (f"Parameter importances: skipped, every study has fewer than {MIN_IMPORTANCE_TRIALS} completed trials.")
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
        pfig.add_trace(go.Bar(y=knobs, x=table[method], orientation="h", name=method, marker_color=palette[method]))
    ax.set_yticks(np.arange(len(knobs)), knobs)
    ax.set(xlabel="importance (PED-ANOVA, normalized to sum 1 per study; mean over seeds)",
           title="Which knobs mattered, per method")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize=9)
    pfig.update_layout(barmode="group", title="Parameter importances per method (PED-ANOVA)", height=40 * len(knobs) * len(methods) + 200,
                       xaxis_title="importance (normalized, mean over seeds)")
    _save(fig, pfig, out, "importance")
    missing = [m for m in palette if m not in found]
    note = ("optuna's PED-ANOVA evaluator on each study's completed trials (failures count at val_bpb = 100, as the "
            "samplers saw them), averaged over the method's seeds.")
    if missing:
        note += f" Left out, fewer than {MIN_IMPORTANCE_TRIALS} completed trials: {', '.join(missing)}."
    return Figure("importance", "Parameter importances", note)


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
    figures: list[Figure | str] = [plot_incumbent(frame, palette, out, references), plot_trials(frame, palette, out),
                                   plot_pareto(frame, palette, out), plot_importances(studies, frame, palette, out)]
    figures += [plot_lineage(name, rows, out) for name, rows in lineages.items()]
    return figures
