"""`distsim report`: one self-contained HTML page (and its PNGs) about a study's store.

It reads only the store (no training, no Ray): study.json, the models, history, features
and tests tables and the stage markers. Figures of large zoos are drawn from a sample
stratified by task (distsim.report.sampling), so the page stays quick at 10k models.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits  # scikit-learn's dependency

from distsim import __version__
from distsim.errors import DistsimError, StoreError
from distsim.layout import Layout, from_study, from_tables
from distsim.report import figures
from distsim.report.effects import effect_frame, last_epoch
from distsim.report.figures import MatrixPanel, NullPanel
from distsim.report.page import ArchSection, Image, MethodSection, Page, render
from distsim.report.sampling import pca_2d, read_sample, stratified_sample
from distsim.results import held_study
from distsim.store import Store
from distsim.store.query import tests_with_q
from distsim.summary import PROTOCOL_ORDER

__all__ = ["write_report"]

_FIGURE_GLOB = "fig-*.png"  # every PNG the report writes; stale ones are removed first


def write_report(store: Store, out: Path | None = None, *, max_heatmap: int = 400,
                 max_points: int = 3000) -> Path:
    """Write the report of `store` into the folder `out` (default: ``<store>-report`` beside
    the store, never inside it) and return the path of its index.html.

    max_heatmap: most models in a distance heatmap; max_points: most points in a PCA plot;
    larger matrices are sampled within each task in proportion to its size (the page says so).
    """
    for name, value in (("max_heatmap", max_heatmap), ("max_points", max_points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise DistsimError(f"{name}: must be an integer >= 2, got {value!r}")
    try:
        doc = store.read_study()
        if doc is None:
            raise StoreError(f"{str(store.root)!r} has no study.json: not a distsim store")
        study = from_study(held_study(store))
        unknown = ""
    except StoreError as exc:  # study.json unreadable: the tables are still read
        if not store.exists:
            raise
        doc, study, unknown = {}, from_tables(store), str(exc)
    folder = _out_folder(store, out)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(_FIGURE_GLOB):
        stale.unlink()

    every = _tests(store, study)  # every epoch's rows; the grid and nulls show the last's
    last = last_epoch(every)
    tests = last.drop("null").to_dicts()
    for r, null in zip(tests, last["null"], strict=True):  # each test's null (B,), or None
        r["null"] = None if null is None else null.to_numpy().astype(np.float64)
    models = store.scan("models").collect()
    history = store.scan("history").collect()
    labels = np.unique(np.concatenate([np.arange(study.n_tasks),
                                       models["task"].drop_nulls().to_numpy()])).astype(np.int64)
    # One BLAS thread: the products here are small, and BLAS threads fighting a busy 2-core
    # machine made the quickstart's 40 PCAs 7 times slower (measured: 0.7 s against 0.1 s).
    sections: dict[tuple[str, str], MethodSection] = {}
    with _drawing(folder) as draw, threadpool_limits(limits=1, user_api="blas"):
        for arch in study.archs:  # the data here, the figures drawn meanwhile in workers
            for method in study.methods:
                sections[arch, method], drawings = _method(
                    store, study, tests, labels, arch, method, max_heatmap, max_points)
                for drawing in drawings:
                    draw(drawing)
        with figures.style():
            zoo = _zoo(folder, models, history, study)
            training = {a: _training(folder, every, study, a) for a in study.archs}
    archs = [_arch(study, tests, a, [sections[a, m] for m in study.methods],
                   training[a]) for a in study.archs]
    names = models.filter(pl.col("task_name").is_not_null()).unique("task").sort("task")
    page = Page(
        title=f"distsim report: {study.name}",
        facts=[("study", study.name), ("store", str(store.root)),
               ("created", str(doc.get("created", "?"))),
               ("config hash", str(doc.get("hash", "?"))[:12]),
               ("source", str(doc.get("source", "?"))),
               ("distsim", __version__),
               ("report written", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
               *([("config", f"unknown ({unknown}); archs, layers and methods as the tables "
                             "hold them, sampling seed 0")] if unknown else [])],
        counts=store.summary().to_dicts(),
        tasks=list(zip(names["task"].to_list(), names["task_name"].to_list(), strict=True)),
        zoo=zoo, archs=archs, stages=store.stages(), config=doc.get("config", {}),
        n_tests=len(tests))
    index = folder / "index.html"
    index.write_text(render(page), encoding="utf-8")
    return index


def _out_folder(store: Store, out: Path | None) -> Path:
    folder = (store.root.parent / f"{store.root.name}-report" if out is None
              else Path(out).expanduser().resolve())
    if folder == store.root or store.root in folder.parents:
        raise StoreError(f"report folder {str(folder)!r} is inside the store (distsim verify "
                         "rejects unknown entries there); choose a folder outside it")
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"report folder {str(folder)!r} is a file")
    return folder


def _tests(store: Store, study: Layout) -> pl.DataFrame:
    """The tests table with q_value (distsim.store.query.tests_with_q, as the summary) and the
    effect sizes (distsim.report.effects), in study order: arch, layer, method, protocol, then
    factor and epoch."""
    df = effect_frame(tests_with_q(store).collect())

    def rank(col: str, names: list[str]) -> pl.Expr:  # position in `names`, unknown last
        return pl.col(col).replace_strict(names, list(range(len(names))), default=len(names),
                                          return_dtype=pl.Int64)

    layers = list(dict.fromkeys(x for a in study.archs for x in study.layers[a]))
    factors = list(study.factors)
    factor = pl.col("factor").fill_null("").replace_strict(
        factors, list(range(len(factors))), default=len(factors), return_dtype=pl.Int64)
    return df.sort(rank("arch", list(study.archs)), "arch", rank("layer", layers), "layer",
                   rank("method", list(study.methods)), "method",
                   rank("protocol", list(PROTOCOL_ORDER)), "protocol", factor, "factor",
                   "epoch", nulls_last=False, maintain_order=True)


def _zoo(folder: Path, models: pl.DataFrame, history: pl.DataFrame,
         study: Layout) -> list[Image | str]:
    out: list[Image | str] = []
    if study.trained:  # [train] save_epochs: the accuracy of the trained (last) models
        models = models.filter(pl.col("epoch").eq_missing(
            pl.col("arch").replace_strict(study.epoch, default=None, return_dtype=pl.Int32)))
    for fig, name, caption, none in (
        (figures.accuracy_figure(models, study.archs), "fig-accuracy.png",
         "test accuracy per task, per architecture", "no ok models in this store"),
        (figures.history_figure(history, study.archs), "fig-history.png",
         "training curves per architecture", "no training history in this store"),
    ):
        if fig is None:
            out.append(none)
        else:
            figures.save_png(fig, folder / name)
            out.append(Image(name, caption))
    return out


def _arch(study: Layout, tests: list[dict[str, Any]], arch: str,
          sections: list[MethodSection], training: list[Image | str]) -> ArchSection:
    layers, methods = list(study.layers[arch]), list(study.methods)
    mine = [t for t in tests if t["arch"] == arch]
    return ArchSection(arch, layers, methods, mine, sections, training)


def _training(folder: Path, tests: pl.DataFrame, study: Layout, arch: str) -> list[Image | str]:
    """The along-training figure of `arch` (its Image, or why none); nothing for a study
    whose tests have no epoch."""
    if tests.filter(pl.col("epoch").is_not_null()).height == 0:
        return []
    fig = figures.epoch_figure(tests, arch, list(study.layers[arch]), list(study.methods),
                               list(study.factors))
    if fig is None:
        return [f"no test of {arch} has an epoch's checkpoints yet"]
    name = f"fig-{arch}-training.png"
    figures.save_png(fig, folder / name)
    return [Image(name, f"{arch}: effect size of every test against the epoch, per method")]


def _method(store: Store, study: Layout, tests: list[dict[str, Any]], labels: np.ndarray,
            arch: str, method: str, max_heatmap: int, max_points: int
            ) -> tuple[MethodSection, list[Drawing]]:
    """The section of one (arch, method) and the figures it shows, still to be drawn: its
    features figure (a row per layer) and its null figure (a panel per protocol)."""
    layers = list(study.layers[arch])
    mine = [t for t in tests if t["arch"] == arch]
    protocols = [p for p in PROTOCOL_ORDER if any(t["protocol"] == p for t in mine)]
    protocols += sorted({t["protocol"] for t in mine} - set(protocols))
    # a panel per protocol, and per factor where the tests have several
    columns_of = [(p, f) for p in protocols
                  for f in dict.fromkeys(t.get("factor") for t in mine if t["protocol"] == p)]
    images: list[Image] = []
    notes: list[str] = []
    drawings: list[Drawing] = []
    panels, sampled = [], []
    for layer in layers:
        panel, note = _matrix_panel(store, study, arch, method, layer, max_heatmap, max_points)
        if panel is not None:
            panels.append(panel)
        sampled += [note] if note else []
    if panels:
        name = f"fig-{arch}-{method}-features.png"
        drawings.append((name, figures.matrix_figure, (
            panels, labels, study.metric, f"{arch} / {method}: feature distances and PCA")))
        images.append(Image(name, f"{arch} {method}: distance heatmaps and PCA per layer"))
    else:
        notes.append("no features of this method in the store")
    notes += list(dict.fromkeys(sampled))  # layers of one method share their models
    tested = {(t["layer"], t["protocol"], t.get("factor")): _null_panel(t) for t in mine
              if t["method"] == method}
    shown = [layer for layer in layers if any(k[0] == layer for k in tested)]
    if shown:
        name = f"fig-{arch}-{method}-null.png"
        columns = [[tested.get((layer, p, f)) for layer in shown] for p, f in columns_of]
        drawings.append((name, figures.null_figure, (
            shown, columns, f"{arch} / {method}: permutation nulls (grey), observed (red), "
                            "chance (dashed)")))
        images.append(Image(name, f"{arch} {method}: null distributions per layer and test"))
        if any(p.null is None for p in tested.values()):
            notes.append("null not stored for some tests (a store written before distsim 0.2 "
                         "keeps no permutation statistics): their rows show none")
    return MethodSection(method, images, notes), drawings


# (file name, figure function, its arguments): a figure to draw, plain data only
Drawing = tuple[str, Callable[..., Any], tuple[Any, ...]]


@contextlib.contextmanager
def _drawing(folder: Path) -> Iterator[Callable[[Drawing], None]]:
    """A function that draws and saves a figure: in forked worker processes (matplotlib draws
    on one core; the workers get plain numpy data and use neither polars nor torch) where fork
    exists and there is more than one CPU, else at once. Leaving waits for every figure."""
    workers = os.cpu_count() or 1
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        yield functools.partial(_draw_one, folder)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        futures: list[Future[None]] = []
        yield lambda drawing: futures.append(pool.submit(_draw_one, folder, drawing))
        for f in futures:
            f.result()  # a worker's error, here


def _draw_one(folder: Path, drawing: Drawing) -> None:
    name, make, args = drawing
    with figures.style():
        figures.save_png(make(*args), folder / name)


def _null_panel(t: dict[str, Any]) -> NullPanel:
    factor = t.get("factor")
    protocol = t["protocol"] if factor is None else f"{t['protocol']} of {factor}"
    return NullPanel(protocol, str(t.get("statistic") or ""), float(t["observed"]),
                     float("nan") if t["chance"] is None else float(t["chance"]),
                     float(t["p_value"]), t["null"])


def _matrix_panel(store: Store, study: Layout, arch: str, method: str, layer: str,
                  max_heatmap: int, max_points: int) -> tuple[MatrixPanel | None, str]:
    """One layer's heatmap and PCA (None with fewer than 2 models) and the sampling note
    ("" when every model is shown); with [train] save_epochs, of the last epoch's models."""
    sample = read_sample(store, arch, method, layer, max(max_heatmap, max_points), study.seed,
                         study.epoch[arch])
    fm = sample.features
    finite = np.isfinite(fm.X).all(axis=1)
    X, tasks = fm.X[finite], fm.tasks[finite]
    if len(X) < 2:
        return None, ""
    points = stratified_sample(tasks, max_points, study.seed)
    heat = stratified_sample(tasks, max_heatmap, study.seed + 1)
    coords, share = pca_2d(X[points], study.seed)
    from distsim.stats.distances import pairwise_distances  # numba: only when a layer is drawn

    distances = pairwise_distances(X[heat], metric=study.metric)
    panel = MatrixPanel(layer, distances, tasks[heat], coords, tasks[points], share)
    notes = []
    if len(heat) < sample.total:
        notes.append(f"the heatmaps show {len(heat)} of {sample.total} models")
    if len(points) < sample.total:
        notes.append(f"the PCA plots show {len(points)} of {sample.total} models")
    if (~finite).any():
        notes.append(f"{int((~finite).sum())} models with non-finite features left out")
    if not notes:
        return panel, ""
    return panel, (f"Downsampled: {'; '.join(notes)} ({len(sample.per_task)} tasks, each kept "
                   f"in proportion to its size, seed {study.seed}).")
