"""The paper's figures as matplotlib Figures, saved as PNG.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global state and no
GUI backend, so the same code works in a headless report (Agg) and in a notebook (display the
returned figure, or the saved PNG). Legends sit outside the axes and point labels are placed
by a small search that avoids other text, because labelled points are the whole point of the
success-vs-latency figure; `layout_problems` checks the result and the tests call it.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox

from analysis.runs import Run, _as_list
from analysis.stats import acceptance_by_layer, acceptance_stats, run_summary, success_table

DPI = 130
MODE_MARKERS = {"autoregressive": "s", "parallel": "D", "speculative": "o"}
BASELINE_MODE = "autoregressive"
TASK_LABEL_CHARS = 56


def run_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per run, stable across figures (order of first appearance)."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(dict.fromkeys(labels))}


def plot_success_by_task(runs: Run | Sequence[Run], confidence: float = 0.95) -> Figure:
    """Horizontal bars: success rate per task (and per suite, bold), one bar per run, with
    Wilson intervals as error bars."""
    runs = _as_list(runs)
    tasks = success_table(runs, level="task", confidence=confidence)
    suites = success_table(runs, level="suite", confidence=confidence)
    suites = suites.assign(task_id=-1, task_name="all tasks")
    table = pd.concat([suites, tasks], ignore_index=True)
    rows = table[["suite", "task_id", "task_name"]].drop_duplicates(["suite", "task_id"])
    rows = rows.sort_values(["suite", "task_id"]).reset_index(drop=True)
    labels = [r.label for r in runs]
    colors = run_colors(labels)
    num_runs = len(labels)
    bar_h = 0.8 / num_runs
    fig = _figure(9.0, 1.4 + len(rows) * (0.2 * num_runs + 0.3) + 0.25 * _legend_rows(num_runs))
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        part = rows.merge(table[table["run"] == label], on=["suite", "task_id"], how="left", suffixes=("", "_r"))
        y = np.arange(len(rows)) + (i - (num_runs - 1) / 2) * bar_h
        rate = part["success_rate"].to_numpy(dtype=float)
        err = np.vstack([rate - part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float) - rate])
        ax.barh(y, np.nan_to_num(rate), height=bar_h * 0.9, color=colors[label], label=_legend_label(runs[i]),
                xerr=np.nan_to_num(err), error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "0.25"})
    ticklabels = [_task_label(r.suite, r.task_id, r.task_name) for r in rows.itertuples()]
    ax.set_yticks(np.arange(len(rows)), ticklabels)
    for text, r in zip(ax.get_yticklabels(), rows.itertuples()):
        if r.task_id < 0:
            text.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)  # room for the cap of an interval ending at 1
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel(f"success rate (bars: {confidence:.0%} Wilson interval)")
    ax.set_title("Success per task")
    ax.grid(axis="x", alpha=0.3)
    _figure_legend(fig, ax)
    return fig


def plot_latency_over_episodes(runs: Run | Sequence[Run], metric: str = "policy_ms") -> Figure:
    """Per-episode median chunk latency in finish order (dots) with a rolling median (line)."""
    runs = _as_list(runs)
    colors = run_colors([r.label for r in runs])
    fig = _figure(8.5, 4.6 + 0.25 * _legend_rows(len(runs)))
    ax = fig.add_subplot()
    source = "chunk records"
    for run in runs:
        per_episode = _episode_median_latency(run, metric)
        if per_episode.empty:
            continue
        if not len(run.chunks):
            source = "episode records"
        x = per_episode.index.to_numpy()
        y = per_episode.to_numpy(dtype=float)
        color = colors[run.label]
        ax.scatter(x, y, s=9, alpha=0.45, color=color, linewidths=0)
        window = max(1, len(y) // 10)
        rolling = pd.Series(y).rolling(window, min_periods=1, center=True).median()
        ax.plot(x, rolling, color=color, lw=1.8, label=_legend_label(run))
    if not ax.lines:
        _no_data(ax, f"no per-chunk latency ({metric}) recorded in these runs")
    ax.set_xlabel("episode (order of completion within the run)")
    ax.set_ylabel(f"{metric.replace('_ms', '')} latency per chunk (ms)\nmedian over the episode's chunks")
    ax.set_title(f"Latency over episodes ({source}; line: rolling median)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        _figure_legend(fig, ax)
    return fig


def plot_acceptance_by_layer(runs: Run | Sequence[Run]) -> Figure:
    """Left: share of speculative chunks whose accepted prefix covers each draft RFSQ layer.
    Right: full / partial / none shares per variant."""
    runs = _as_list(runs)
    by_layer = acceptance_by_layer(runs, by=["run"])
    shares = acceptance_stats(runs, by=["run"])
    spec_runs = [r for r in runs if r.label in set(by_layer["run"])]
    fig = _figure(10.0, 4.8 + 0.25 * _legend_rows(max(1, len(spec_runs))))
    if by_layer.empty:
        ax = fig.add_subplot()
        _no_data(ax, "no speculative chunks in these runs\n(acceptance applies to decoding_mode='speculative' "
                     "with chunk records)")
        ax.set_title("Draft acceptance by RFSQ layer")
        return fig
    colors = run_colors([r.label for r in runs])
    ax_layer, ax_share = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    num = len(spec_runs)
    width = 0.8 / num
    for i, run in enumerate(spec_runs):
        part = by_layer[by_layer["run"] == run.label]
        x = part["rfsq_layer"].to_numpy() + (i - (num - 1) / 2) * width
        ax_layer.bar(x, part["accepted_share"], width=width * 0.92, color=colors[run.label], label=_legend_label(run))
    layers = sorted(by_layer["rfsq_layer"].unique())
    ax_layer.set_xticks(layers, [f"layer {int(l)}" for l in layers])
    ax_layer.set_ylim(0, 1.0)
    ax_layer.set_xlabel("draft RFSQ layer (coarse to fine)")
    ax_layer.set_ylabel("share of chunks with the layer accepted")
    ax_layer.set_title("Acceptance by RFSQ layer")
    ax_layer.grid(axis="y", alpha=0.3)

    shares = shares.set_index("run").loc[[r.label for r in spec_runs]]
    y = np.arange(len(shares))
    left = np.zeros(len(shares))
    for column, name, color in (("share_full", "full (all K)", "#2a9d55"), ("share_partial", "partial", "#e9b949"),
                                ("share_none", "none", "#c8553d")):
        values = shares[column].to_numpy(dtype=float)
        ax_share.barh(y, np.nan_to_num(values), left=left, color=color, label=name, height=0.7)
        for yi, l, v in zip(y, left, values):
            if v >= 0.12:  # narrower segments have no room for a readable number
                ax_share.text(l + v / 2, yi, f"{v:.0%}", ha="center", va="center", fontsize=8, color="white")
        left += np.nan_to_num(values)
    ax_share.set_yticks(y, [f"{run}\nmean {m:.2f} of K={_k_text(k)}" for run, m, k in
                            zip(shares.index, shares["mean_accepted_layers"],
                                [_single_k(r) for r in spec_runs])], fontsize=8)
    ax_share.invert_yaxis()
    ax_share.set_xlim(0, 1)
    ax_share.set_xlabel("share of speculative chunks")
    ax_share.set_title("Draft layers accepted per chunk")
    ax_share.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False, fontsize=8)
    _figure_legend(fig, ax_layer)
    return fig


def plot_success_vs_latency(runs: Run | Sequence[Run], confidence: float = 0.95) -> Figure:
    """Iso-latency view: success rate (Wilson interval) against median per-chunk latency, one
    labelled point per run; speculative runs with the same K are joined in threshold order, and
    dashed lines mark the autoregressive baseline, so points left of its latency line and above
    its success line beat it on both."""
    runs = _as_list(runs)
    summary = run_summary(runs, confidence=confidence)
    summary = summary[summary["median_ms"].notna()].reset_index(drop=True)
    fig = _figure(8.5, 5.6)
    ax = fig.add_subplot()
    if summary.empty:
        _no_data(ax, "no latency recorded in these runs")
        ax.set_title("Success vs latency")
        return fig
    colors = run_colors(list(summary["run"]))
    # Speculative sweeps: join points of one K and one acceptance family (thresholds) by latency.
    spec = summary[summary["decoding_mode"] == "speculative"].copy()
    if len(spec):
        spec["family"] = spec["acceptance"].astype(str).str.startswith("threshold:")
        for (k, family), group in spec.groupby(["draft_layers", "family"], dropna=False):
            if family and len(group) > 1:
                group = group.sort_values("median_ms")
                ax.plot(group["median_ms"], group["success_rate"], color="0.6", lw=1, ls="-", zorder=1,
                        label=f"threshold sweep, K={_k_text(k)}")
    for row in summary.itertuples():
        yerr = [[row.success_rate - row.ci_low], [row.ci_high - row.success_rate]]
        ax.errorbar(row.median_ms, row.success_rate, yerr=yerr, fmt=MODE_MARKERS.get(row.decoding_mode, "^"),
                    color=colors[row.run], ms=8, capsize=3, elinewidth=1, zorder=3)
    baseline = summary[summary["decoding_mode"] == BASELINE_MODE]
    if len(baseline):
        b = baseline.iloc[0]
        ax.axvline(b["median_ms"], color="0.45", ls="--", lw=1, zorder=0, label="autoregressive latency")
        ax.axhline(b["success_rate"], color="0.45", ls=":", lw=1, zorder=0, label="autoregressive success")
    for mode, marker in MODE_MARKERS.items():
        if (summary["decoding_mode"] == mode).any():
            ax.plot([], [], marker=marker, ls="", color="0.3", label=mode)
    x_max = float(summary["median_ms"].max())
    ax.set_xlim(0, x_max * 1.25)
    low = float(summary["ci_low"].min()) - 0.12
    # At 0 % success the points sit on the axis: leave room below them for their labels.
    ax.set_ylim(low if low > 0 else -0.15, 1.08)
    ax.set_xlabel("median policy latency per 8-step chunk (ms)")
    ax.set_ylabel(f"success rate ({confidence:.0%} Wilson interval)")
    ax.set_title("Success vs latency across decoding variants")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    labels = _point_labels(summary)
    # Label text and leader in the point's colour: neighbours' leaders can cross, colours tell them apart.
    place_point_labels(ax, summary["median_ms"].to_numpy(dtype=float), summary["success_rate"].to_numpy(dtype=float),
                       labels, colors=[colors[r] for r in summary["run"]])
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_figures(runs: Run | Sequence[Run], out_dir: str | Path) -> dict[str, Path]:
    """All four figures as PNG under out_dir; returns name -> path."""
    runs = _as_list(runs)
    makers = {
        "success_by_task": plot_success_by_task,
        "latency_over_episodes": plot_latency_over_episodes,
        "acceptance_by_layer": plot_acceptance_by_layer,
        "success_vs_latency": plot_success_vs_latency,
    }
    return {name: save_figure(make(runs), Path(out_dir) / f"{name}.png") for name, make in makers.items()}


# ---- text layout ------------------------------------------------------------------------------

def place_point_labels(ax, x: np.ndarray, y: np.ndarray, labels: Sequence[str],
                       colors: Sequence | None = None) -> list:
    """Annotate each point, trying offsets around it (nearest first) until the label overlaps no
    placed label, no point, no error bar, no other text and stays inside the axes.

    The layout is computed first and then frozen: a constrained layout re-run at save time would
    move the axes and with them the points under labels placed in offset points."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    axes_box = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.column_stack([x, y]))
    obstacles = [Bbox.from_bounds(px - 7, py - 7, 14, 14) for px, py in points]
    line_points = _line_samples(ax)  # error bars, sweep and reference lines, every ~3 px
    taken: list[Bbox] = [t.get_window_extent(renderer) for t in _drawn_texts(fig) if t.get_text()]
    angles = np.deg2rad([30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120])
    candidates = [(r * np.cos(a), r * np.sin(a)) for r in (12, 22, 34, 48, 64) for a in angles]
    placed = []
    colors = list(colors) if colors is not None else ["black"] * len(labels)
    for label, xi, yi, color in zip(labels, x, y, colors):
        best, best_cost = None, None
        for dx, dy in candidates:
            ha = "left" if dx > 3 else "right" if dx < -3 else "center"
            va = "bottom" if dy > 3 else "top" if dy < -3 else "center"
            text = ax.annotate(label, (xi, yi), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=8, color=_darker(color),
                               arrowprops={"arrowstyle": "-", "color": color, "lw": 0.8, "shrinkA": 0, "shrinkB": 5})
            box = text.get_window_extent(renderer).padded(2)
            area = box.width * box.height
            cost = 100 * sum(_overlap_area(box, other) for other in taken)
            cost += 100 * (area - _overlap_area(box, axes_box))  # outside the axes
            cost += sum(_overlap_area(box, other) for other in obstacles)
            if len(line_points):
                cost += float(np.count_nonzero((line_points[:, 0] > box.x0) & (line_points[:, 0] < box.x1)
                                               & (line_points[:, 1] > box.y0) & (line_points[:, 1] < box.y1)))
            cost += 0.2 * np.hypot(dx, dy)  # a label near its point, unless that hides a line
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best.remove()
                best, best_cost = text, cost
            else:
                text.remove()
        taken.append(best.get_window_extent(renderer).padded(2))
        placed.append(best)
    return placed


def layout_problems(fig: Figure, tolerance_px: float = 1.0) -> list[str]:
    """Drawn, non-empty texts that overlap one another (by more than tolerance_px each way) or
    stick out of the figure; an empty list means every label is readable."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    texts = [t for t in _drawn_texts(fig) if t.get_text().strip()]
    boxes = [t.get_window_extent(renderer).padded(-tolerance_px) for t in texts]
    page = fig.bbox.padded(tolerance_px)
    problems = [f"{t.get_text()!r} is cut off by the figure edge" for t, b in zip(texts, boxes)
                if b.width > 0 and (b.x0 < page.x0 or b.y0 < page.y0 or b.x1 > page.x1 or b.y1 > page.y1)]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if boxes[i].width > 0 and boxes[j].width > 0 and boxes[i].overlaps(boxes[j]):
                problems.append(f"{texts[i].get_text()!r} overlaps {texts[j].get_text()!r}")
    return problems


def _drawn_texts(fig: Figure) -> list[Text]:
    """Visible texts that are actually drawn: for axes ticks only the in-view ones (matplotlib
    keeps stale Text objects for ticks outside the view)."""
    tick_texts, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                tick_texts.update({id(tick.label1), id(tick.label2)})
            for tick in axis._update_ticks():  # the ticks matplotlib draws
                drawn.extend(t for t in (tick.label1, tick.label2) if t.get_visible())
    for text in fig.findobj(Text):
        if id(text) not in tick_texts and text.get_visible() and text.figure is not None:
            drawn.append(text)
    return drawn


def _darker(color, factor: float = 0.75) -> tuple:
    """The colour, darkened so light ones (pink, olive) stay readable as text on white."""
    from matplotlib.colors import to_rgb
    return tuple(factor * c for c in to_rgb(color))


def _line_samples(ax, spacing_px: float = 3.0) -> np.ndarray:
    """Points every spacing_px along the axes' lines and line collections, in display coords."""
    from matplotlib.collections import LineCollection
    segments = []
    for line in ax.lines:
        xy = line.get_xydata()
        if len(xy) >= 2:
            segments.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            segments.extend(coll.get_transform().transform(seg) for seg in coll.get_segments() if len(seg) >= 2)
    samples = []
    for path in segments:
        for a, b in zip(path[:-1], path[1:]):
            n = max(2, int(np.hypot(*(b - a)) / spacing_px))
            samples.append(a + np.linspace(0.0, 1.0, n)[:, None] * (b - a))
    return np.concatenate(samples) if samples else np.empty((0, 2))


def _overlap_area(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, w) * max(0.0, h)


# ---- helpers ----------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend_rows(num_entries: int, per_row: int = 3) -> int:
    return (num_entries + per_row - 1) // per_row


def _figure_legend(fig: Figure, ax) -> None:
    """Run legend under the whole figure: constrained layout makes room for it, so it can
    neither cover data nor be clipped however long the run labels are."""
    handles, labels = ax.get_legend_handles_labels()
    longest = max((len(l) for l in labels), default=0)
    per_row = 1 if longest > 60 else 2 if longest > 32 else 3
    fig.legend(handles, labels, loc="outside lower center", ncol=min(per_row, len(labels)), frameon=False,
               fontsize=8)


def _legend_label(run: Run) -> str:
    return run.label if run.decode_label in ("", run.label) else f"{run.label} ({run.decode_label})"


def _point_labels(summary: pd.DataFrame) -> list[str]:
    labels = summary["decode_label"].astype(str)
    duplicated = labels.duplicated(keep=False)
    return [f"{d} [{r}]" if dup else d for d, r, dup in zip(labels, summary["run"], duplicated)]


def _task_label(suite: str, task_id: int, task_name) -> str:
    short_suite = str(suite).replace("libero_", "")
    if short_suite.isdigit():  # '10 3: ...' would read as a number; keep 'libero_10 3: ...'
        short_suite = str(suite)
    if task_id < 0:
        return f"{short_suite}: all tasks"
    # LIBERO task names are snake_case: one 'word' that textwrap would shorten to nothing.
    name = "" if task_name is None or pd.isna(task_name) else str(task_name).replace("_", " ")
    if not name:
        return f"{short_suite} {task_id}"
    # Two short lines keep the bars, not the names, taking most of the width.
    name = textwrap.shorten(name, TASK_LABEL_CHARS, placeholder="...")
    return textwrap.fill(f"{short_suite} {task_id}: {name}", width=TASK_LABEL_CHARS // 2 + 8)


def _episode_median_latency(run: Run, metric: str) -> pd.Series:
    """Per-episode median latency indexed by episode_index (finish order)."""
    if len(run.chunks) and metric in run.chunks and run.chunks[metric].notna().any():
        return run.chunks.groupby("episode_index")[metric].median().astype(float).sort_index()
    column = {"policy_ms": "latency_ms_median", "round_trip_ms": "round_trip_ms_median"}.get(metric)
    if column is None:
        return pd.Series(dtype=float)
    return run.episodes.set_index("episode_index")[column].astype(float).dropna().sort_index()


def _single_k(run: Run):
    values = run.episodes["draft_layers"].dropna().unique()
    return int(values[0]) if len(values) == 1 else None


def _k_text(k) -> str:
    return "?" if k is None or pd.isna(k) else str(int(k))


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
