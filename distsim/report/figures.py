"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: a figure here is a plain ``Figure`` printed by ``FigureCanvasAgg`` inside an
``rc_context``, so writing a report sets no backend, leaves rcParams as they were and
registers no figure in pyplot (which matplotlib may still import to resolve its default
backend when rcParams are read). Panels are combined (one figure per arch x method,
a row per layer) because a figure's fixed cost dominates at this size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator

from distsim.report.effects import along_training

DPI = 100
_TRAIN, _TEST, _OBSERVED = "#1f77b4", "#ff7f0e", "#d62728"


@contextmanager
def style() -> Iterator[None]:
    """The report's matplotlib style, for the figures drawn and saved inside the block only."""
    with matplotlib.rc_context({
            "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7,
            "ytick.labelsize": 7, "legend.fontsize": 7, "figure.facecolor": "white",
            "axes.spines.top": False, "axes.spines.right": False}):
        yield


def save_png(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Print `fig` as a PNG at `path` on an Agg canvas (no pyplot, no open-figure registry)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png", pil_kwargs={"compress_level": 1})  # fast, not small
    return path


def task_cmap(n_tasks: int) -> Colormap:
    """Colours of `n_tasks` tasks: the qualitative tab10 / tab20, a continuous map beyond."""
    if n_tasks <= 10:
        return ListedColormap(matplotlib.colormaps["tab10"](np.arange(max(n_tasks, 1))))
    if n_tasks <= 20:
        return ListedColormap(matplotlib.colormaps["tab20"](np.arange(n_tasks)))
    return matplotlib.colormaps["turbo"]


def _task_index(tasks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of each task label in the sorted `labels` (the colour index)."""
    return np.searchsorted(labels, tasks)


# ---------------------------------------------------------------------------------------------
# per arch x method: distance heatmap and PCA, a row per layer


@dataclass(frozen=True)
class MatrixPanel:
    """One layer's row: distances of the heatmap's models (n, n) ordered by task with their
    tasks (n,), and the PCA coordinates (m, 2) of the scatter's models with their tasks (m,)
    and the variance share of each axis (2,)."""

    layer: str
    distances: np.ndarray
    heat_tasks: np.ndarray
    coords: np.ndarray
    point_tasks: np.ndarray
    share: np.ndarray


def matrix_figure(panels: Sequence[MatrixPanel], labels: np.ndarray, metric: str,
                  title: str) -> Figure:
    """Heatmap (left) and PCA scatter (right) per layer; `labels` (T,): every task of the
    study, sorted (the colours are the same in every figure)."""
    cmap = task_cmap(len(labels))
    height = 0.9 + 3.1 * len(panels)
    fig = Figure(figsize=(9.0, height))
    axes = fig.subplots(len(panels), 2, squeeze=False, width_ratios=[1.15, 1.0])
    fig.subplots_adjust(left=0.06, right=0.9, bottom=0.45 / height, top=1 - 0.75 / height,
                        wspace=0.28, hspace=0.32)
    for (heat, scatter), p in zip(axes, panels, strict=True):
        _heatmap(heat, p, metric, fig)
        idx = _task_index(p.point_tasks, labels)
        size = 14 if len(idx) <= 300 else 6 if len(idx) <= 1500 else 3
        scatter.scatter(p.coords[:, 0], p.coords[:, 1], c=idx, cmap=cmap, s=size,
                        vmin=-0.5, vmax=len(labels) - 0.5, linewidths=0, alpha=0.85)
        scatter.set_xlabel(f"PC1 ({100 * p.share[0]:.0f}% of variance)")
        scatter.set_ylabel(f"PC2 ({100 * p.share[1]:.0f}%)")
        scatter.set_title(f"{p.layer}: PCA of {len(idx)} models")
        scatter.set_xticks([]), scatter.set_yticks([])
    if 0 < len(labels) <= 20:
        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(i), markersize=5)
                   for i in range(len(labels))]
        fig.legend(handles, [str(t) for t in labels], title="task", loc="upper right",
                   bbox_to_anchor=(0.995, 1 - 0.5 / height), frameon=False)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    return fig


def _heatmap(ax: Axes, p: MatrixPanel, metric: str, fig: Figure) -> None:
    n = len(p.heat_tasks)
    off = p.distances[~np.eye(n, dtype=bool)]
    vmin, vmax = (np.percentile(off, [2, 98]) if len(off) else (0.0, 1.0))
    image = ax.imshow(p.distances, cmap="viridis", interpolation="nearest", vmin=vmin,
                      vmax=max(vmax, vmin + 1e-12))
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, extend="both",
                       label=f"{metric} distance (2nd-98th pct)")
    bar.locator = MaxNLocator(4)
    change = np.flatnonzero(np.diff(p.heat_tasks)) + 1
    edges = np.concatenate([[0], change, [n]])
    if len(edges) - 1 <= 60:  # task boundaries
        ax.hlines(change - 0.5, -0.5, n - 0.5, color="white", linewidth=0.6)
        ax.vlines(change - 0.5, -0.5, n - 0.5, color="white", linewidth=0.6)
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5
    if len(centres) <= 20:
        names = [str(int(p.heat_tasks[e])) for e in edges[:-1]]
        ax.set_xticks(centres, names)
        ax.tick_params(length=0)
    else:
        ax.set_xticks([])
    ax.set_yticks([])  # the matrix is symmetric: the x labels say which task is where
    ax.set_xlabel("models, ordered by task (lines: task boundaries)")
    ax.set_title(f"{p.layer}: distances of {n} models")


# ---------------------------------------------------------------------------------------------
# per arch x method: the null distribution of every test, a panel per protocol, a row per layer


@dataclass(frozen=True)
class NullPanel:
    """One test: its protocol, statistic name, observed value, chance (nan: none), p-value and
    permutation statistics (B,), or None where the store holds no null."""

    protocol: str
    statistic: str
    observed: float
    chance: float
    p_value: float
    null: np.ndarray | None


def null_figure(layers: Sequence[str], columns: Sequence[Sequence[NullPanel | None]],
                title: str) -> Figure:
    """A panel per protocol (`columns`: one list per protocol, a NullPanel or None per layer):
    each layer's null histogram as a row (scaled to the row's height), the observed statistic
    (red), chance (dashed) and p at its right. F statistics spanning decades: log x axis."""
    width, height = 0.9 + 3.0 * len(columns), 1.0 + 0.55 * len(layers)
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.65 / width, bottom=0.42 / height,
                        top=1 - 0.62 / height, wspace=0.3)
    for c, (ax, panels) in enumerate(zip(axes, columns, strict=True)):
        _ridges(ax, panels)
        ax.set_ylim(-0.15, len(layers) - 0.05)
        ax.set_yticks(np.arange(len(layers)) + 0.35, list(layers) if c == 0 else [])
        ax.tick_params(axis="y", length=0)
        ax.spines["left"].set_visible(False)
        ax.invert_yaxis()  # first layer on top, as in the grid
    fig.suptitle(title, fontsize=10, fontweight="bold")
    return fig


def _ridges(ax: Axes, panels: Sequence[NullPanel | None]) -> None:
    shown = [p for p in panels if p is not None]
    if not shown:
        ax.set_axis_off()
        return
    ax.set_title(f"{shown[0].protocol} ({shown[0].statistic})")
    values = [v for p in shown for v in (
        [p.observed] + ([] if p.null is None else list(p.null[np.isfinite(p.null)])))
        if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    log = lo > 0 and hi > 1 and hi / lo > 30  # a pseudo-F of 250 against a null near 1
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # a log axis's minor ticks cost, say little
        lo, hi = lo / 1.3, hi * 1.3
    else:
        pad = 0.06 * max(hi - lo, 1e-9)
        lo, hi = lo - pad, hi + pad
        ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.set_xlim(lo, hi)
    right = ax.get_yaxis_transform()  # x in axes fractions, y in rows: the text beside the panel
    for row, p in enumerate(panels):
        top = row + 0.8
        if p is None:
            ax.text(0.5, row + 0.4, "not tested", color="grey", fontsize=7, va="center",
                    ha="center", transform=right)
            continue
        null = None if p.null is None else p.null[np.isfinite(p.null)]
        if null is not None and len(null):
            bins = (np.geomspace(max(null.min(), lo), null.max() * 1.0001, 25) if log and
                    null.min() > 0 and null.max() > null.min() else 25)
            counts, edges = np.histogram(null, bins=bins)
            ax.stairs(top - 0.8 * counts / max(counts.max(), 1), edges, baseline=top, fill=True,
                      color="#9aa5b1")
        else:
            ax.text(0.5, row + 0.4, "null not stored", color="grey", fontsize=7, va="center",
                    ha="center", transform=right)
        if math.isfinite(p.chance):
            ax.vlines(p.chance, row, top, color="black", linestyles="--", linewidth=0.8)
        if math.isfinite(p.observed):
            ax.vlines(p.observed, row - 0.05, top, color=_OBSERVED, linewidth=1.8)
        ax.text(1.02, row + 0.4, f"p={p.p_value:.2g}", fontsize=7, va="center",
                transform=right)


# ---------------------------------------------------------------------------------------------
# the zoo: accuracy per task, training curves


def accuracy_figure(models: pl.DataFrame, archs: Sequence[str]) -> Figure | None:
    """Test accuracy of each arch's ok models per task (box per task; a median line with a
    min-max band beyond 40 tasks); None without any ok model."""
    ok = models.filter((pl.col("status") == "ok") & pl.col("test_acc").is_not_null())
    shown = [a for a in archs if ok.filter(pl.col("arch") == a).height]
    if not shown:
        return None
    fig = Figure(figsize=(min(2.0 + 3.2 * len(shown), 13.0), 2.6), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False, sharey=True)[0]
    for ax, arch in zip(axes, shown, strict=True):
        mine = ok.filter(pl.col("arch") == arch)
        per = mine.group_by("task").agg(pl.col("test_acc")).sort("task")
        tasks, values = per["task"].to_list(), [np.asarray(v) for v in per["test_acc"]]
        if len(tasks) <= 40:
            ax.boxplot(values, positions=range(len(tasks)), widths=0.6, showfliers=True,
                       flierprops={"markersize": 2})
            step = max(1, len(tasks) // 12)
            ax.set_xticks(range(0, len(tasks), step), [str(t) for t in tasks[::step]])
        else:
            med = [float(np.median(v)) for v in values]
            ax.fill_between(range(len(tasks)), [float(v.min()) for v in values],
                            [float(v.max()) for v in values], color=_TEST, alpha=0.25,
                            linewidth=0)
            ax.plot(range(len(tasks)), med, color=_TEST, linewidth=1)
        ax.set_xlabel("task")
        ax.set_title(f"{arch}: {mine.height} ok models")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("Test accuracy per task (ok models)", fontsize=10, fontweight="bold")
    return fig


def history_figure(history: pl.DataFrame, archs: Sequence[str]) -> Figure | None:
    """Per arch (a row): loss and accuracy per epoch, train and test, the mean over the arch's
    models and the band of their 10th-90th percentiles; None for an empty history."""
    shown = [a for a in archs if history.filter(pl.col("arch") == a).height]
    if not shown:
        return None
    fig = Figure(figsize=(8.0, 0.5 + 2.3 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), 2, squeeze=False)
    for (loss, acc), arch in zip(axes, shown, strict=True):
        mine = history.filter(pl.col("arch") == arch)
        n_models = mine["model_id"].n_unique()
        for ax, what in ((loss, "loss"), (acc, "acc")):
            for split, colour in (("train", _TRAIN), ("test", _TEST)):
                _curve(ax, mine, f"{split}_{what}", colour, split)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("loss" if what == "loss" else "accuracy")
        loss.set_title(f"{arch}: loss ({n_models} models)")
        acc.set_title(f"{arch}: accuracy")
        loss.legend(frameon=False)
    fig.suptitle("Training curves: mean over models, band = 10th-90th percentile",
                 fontsize=10, fontweight="bold")
    return fig


def _curve(ax: Axes, df: pl.DataFrame, column: str, colour: str, label: str) -> None:
    col = pl.col(column)
    per = (df.filter(col.is_not_null() & col.is_finite()).group_by("epoch")
           .agg(col.mean().alias("mean"), col.quantile(0.1).alias("lo"),
                col.quantile(0.9).alias("hi")).sort("epoch"))
    if per.height == 0:
        return
    epochs = per["epoch"].to_numpy()
    if per.height == 1 and df["epoch"].n_unique() > 1:  # the test split without test_history
        label = f"{label} (last epoch; every epoch: [train] test_history)"
    ax.fill_between(epochs, per["lo"].to_numpy(), per["hi"].to_numpy(), color=colour,
                    alpha=0.2, linewidth=0)
    ax.plot(epochs, per["mean"].to_numpy(), color=colour, linewidth=1.3, label=label,
            marker="o" if len(epochs) <= 20 else None, markersize=2.5)


# ---------------------------------------------------------------------------------------------
# per arch: the tests' effect sizes along training (checkpoints of [train] save_epochs)

_STYLES: tuple[Literal["-", "--", ":", "-."], ...] = ("-", "--", ":", "-.")  # one per factor


def epoch_figure(tests: pl.DataFrame, arch: str, layers: Sequence[str] = (),
                 methods: Sequence[str] = (), factors: Sequence[str] = ()) -> Figure | None:
    """The effect size of `arch`'s tests against the epoch of the checkpoints they tested
    (rows of the tests table; distsim.report.effects): a panel per layer (row) x protocol
    (column), a line per method (colour; in `methods` order, then the others) and factor
    (line style, in `factors` order, then the others), y = accuracy or mAP - chance (HTT) or
    R^2 (PERMANOVA, PERMDISP). Layers in `layers` order, then the others; None when no row of
    `arch` has an epoch."""
    rows = along_training(tests).filter(pl.col("arch") == arch,
                                        pl.col("effect").is_not_null())
    if rows.height == 0:
        return None
    here = rows["layer"].unique(maintain_order=True).to_list()
    shown = [x for x in layers if x in here] + [x for x in here if x not in layers]
    protocols = rows["protocol"].unique(maintain_order=True).to_list()
    found = rows["method"].unique(maintain_order=True).to_list()
    order = list(methods) + [m for m in found if m not in methods]  # colours fixed by methods
    present = rows["factor"].unique(maintain_order=True).to_list()
    factors = [f for f in factors if f in present] + [f for f in present if f not in factors]
    colours = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(1.0 + 2.7 * len(protocols), 0.9 + 2.0 * len(shown)),
                 layout="constrained")
    axes = fig.subplots(len(shown), len(protocols), squeeze=False, sharex=True)
    for r, layer in enumerate(shown):
        for c, protocol in enumerate(protocols):
            ax, mine = axes[r][c], rows.filter(pl.col("layer") == layer,
                                               pl.col("protocol") == protocol)
            if mine.height == 0:
                ax.set_axis_off()
                continue
            for (method, factor), line in mine.group_by("method", "factor", maintain_order=True):
                ax.plot(line["epoch"].to_numpy(), line["effect"].to_numpy(),
                        color=colours(order.index(method) % 10),
                        linestyle=_STYLES[factors.index(factor) % len(_STYLES)],
                        marker="o", markersize=2.5, linewidth=1.2)
            if mine["effect_name"][0] != "R^2":
                ax.axhline(0, color="grey", linewidth=0.6, linestyle=":")  # chance
            ax.set_title(f"{layer}: {protocol}")
            ax.set_ylabel(str(mine["effect_name"][0]))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            if r == len(shown) - 1:
                ax.set_xlabel("epoch")
    handles = [Line2D([], [], color=colours(i % 10), marker="o", markersize=3, label=m)
               for i, m in enumerate(order) if m in found]
    if len(factors) > 1:
        handles += [Line2D([], [], color="black", linestyle=_STYLES[i % len(_STYLES)],
                           label=f"factor {f}" if f else "the study's grouping")
                    for i, f in enumerate(factors)]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)
    fig.suptitle(f"{arch}: effect size along training", fontsize=10, fontweight="bold")
    return fig
