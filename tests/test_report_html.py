"""`distsim.report.write_report`: the page parses, its images are real PNGs, its grid says what
the tests table holds, large matrices are sampled (and the page says so), a browser renders it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from _study import study_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from distsim.config import study_from_dict
from distsim.errors import DistsimError, StoreError
from distsim.report import write_report
from distsim.report.sampling import pca_2d, stratified_sample
from distsim.store import Store, model_id
from distsim.summary import summary_table

METHODS = ["raw", "chain-gram"]
PROTOCOLS = ["closed-set", "open-set", "permanova", "permdisp"]
NO_NULL = ("raw", "out", "permdisp")  # (method, layer, protocol) stored as before distsim 0.2


def synthetic_store(root: Path, tasks: int = 3, seeds: int = 4, dim: int = 6,
                    history: bool = True, tests: bool = True, seed: int = 0) -> Store:
    """A store bound to a one-mlp study (layers fc1, out), written directly (no training):
    models, features (task means + noise), tests with nulls (one without) and history."""
    rng = np.random.default_rng(seed)
    raw = study_dict(study={"name": "report-test", "store": str(root)},
                     data={"num_tasks": tasks},
                     train={"seeds_per_task": seeds, "seeds_per_trial": min(seeds, 16),
                            "epochs": 3},
                     features={"methods": METHODS},
                     tests={"protocols": ["closed-set", "open-set"]})
    study = study_from_dict(raw)
    store = Store(root)
    store.bind(study, "created")
    layers = study.feature_layers("mlp")
    means = {(m, layer): rng.normal(size=(tasks, dim)) * 3 for m in METHODS for layer in layers}
    for pack in study.packs("mlp"):
        ids = [model_id("mlp", pack.task, s) for s in pack.seeds]
        trial = pack.trial_id
        store.write_shard("models", pack.key, [
            {"model_id": mid, "task": pack.task, "task_name": f"pair{pack.task}",
             "seed": s, "trial_id": trial, "status": "ok", "test_acc": float(rng.uniform(.8, 1)),
             "train_acc": 1.0, "epochs": 3}
            for mid, s in zip(ids, pack.seeds, strict=True)])
        for (method, layer), mu in means.items():
            key = {**pack.key, "method": method, "layer": layer}
            vectors = mu[pack.task] + rng.normal(size=(len(ids), dim))
            store.write_shard("features", key, {
                "model_id": ids, "task": [pack.task] * len(ids), "seed": list(pack.seeds),
                "dim": [dim] * len(ids), "vector": vectors.astype(np.float32).tolist(),
                "trial_id": [trial] * len(ids)})
        if history:
            store.write_shard("history", pack.key, [
                {"model_id": mid, "seed": s, "epoch": e, "train_loss": 1 / e,
                 "train_acc": 1 - .3 / e, "test_loss": 1.2 / e, "test_acc": 1 - .4 / e}
                for mid, s in zip(ids, pack.seeds, strict=True) for e in (1, 2, 3)])
    if tests:
        for method in METHODS:
            for layer in layers:
                for protocol in PROTOCOLS:
                    htt = protocol in ("closed-set", "open-set")
                    null = rng.uniform(0, 1, 30) if htt else rng.gamma(4, .25, 40)
                    observed = float(rng.uniform(0.2, 1) if htt else rng.uniform(0.5, 60))
                    row = {"statistic": "accuracy" if htt else "F", "observed": observed,
                           "chance": 1 / tasks if htt else float("nan"),
                           "null_mean": float(null.mean()),
                           "p_value": float(rng.choice([0.01, 0.2, 0.5])),
                           "permutations": len(null), "n_models": tasks * seeds,
                           "n_tasks": tasks, "extra": json.dumps({} if htt else {"r2": 0.3}),
                           "null": None if (method, layer, protocol) == NO_NULL
                           else null.tolist()}
                    store.write_shard("tests", {"arch": "mlp", "method": method, "layer": layer,
                                                "protocol": protocol}, [row])
    store.mark_stage("zoo", seconds=1.5, trials=tasks)
    store.mark_stage("tests", seconds=2.25, tests=len(METHODS) * len(layers) * 4)
    return store


class Page(HTMLParser):
    """What the tests read from a page: img sources, the grid's rows, the text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self.text: list[str] = []
        self._row: tuple[dict[str, str], list[str]] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "tr" and "data-protocol" in a:
            self._row = (a, [])
        elif tag == "td" and self._row is not None:
            self._row[1].append("")

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._row is not None and self._row[1]:
            self._row[1][-1] += data

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG", path
        return np.asarray(im.convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The synthetic store, and its report written to the default folder."""
    root = tmp_path_factory.mktemp("report") / "study"
    store = synthetic_store(root)
    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    index = write_report(store)
    assert matplotlib.get_backend() == backend and dict(matplotlib.rcParams) == rc
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []  # no figure left open
    return store, index


def test_the_report_goes_beside_the_store_and_never_into_it(written):
    store, index = written
    assert index == store.root.parent / "study-report" / "index.html"
    assert not any(p.name.endswith(".html") for p in store.root.rglob("*"))
    with pytest.raises(StoreError, match="inside the store"):
        write_report(store, store.root / "report")


def test_every_image_is_a_png_beside_the_page_and_not_blank(written):
    _, index = written
    page = Page(index.read_text())
    assert len(page.images) >= 6  # accuracy, history, and per method features + nulls
    for src in page.images:
        assert "/" not in src and not src.startswith(("http", "data:")), src
        path = index.parent / src
        assert path.is_file(), src
        assert png_pixels(path).var() > 0, src


def test_the_grid_shows_every_test_of_the_tests_table(written):
    store, index = written
    held = store.read_study()
    assert held is not None
    study = study_from_dict({**held["config"], "study": {**held["config"]["study"],
                                                         "store": str(store.root)}})
    table = summary_table(store, study)
    rows = {(a["data-arch"], a["data-layer"], a["data-method"], a["data-protocol"]): (a, cells)
            for a, cells in Page(index.read_text()).rows}
    assert len(rows) == table.height == 2 * 2 * 4

    def same(text: str, value: float) -> bool:
        return math.isnan(value) if text == "nan" else float(text) == value

    for r in table.iter_rows(named=True):
        attrs, cells = rows[(r["arch"], r["layer"], r["method"], r["protocol"])]
        assert same(attrs["data-observed"], r["observed"])
        assert same(attrs["data-chance"], r["chance"])
        assert same(attrs["data-p"], r["p_value"]) and same(attrs["data-q"], r["q_value"])
        chance = "-" if math.isnan(r["chance"]) else f"{r['chance']:.3f}"
        assert [c.strip() for c in cells] == [
            r["protocol"], f"{r['observed']:.3f}", chance, f"{r['p_value']:.4f}",
            f"{r['q_value']:.4f}"]


def test_the_page_says_what_it_could_not_show_and_what_it_holds(written):
    store, index = written
    text = Page(index.read_text()).all_text
    assert "null not stored" in text  # the NO_NULL test
    assert "Downsampled" not in text  # 12 models: every model is drawn
    assert "report-test" in text and str(store.root) in text
    assert "[[arch]]" in text and "seeds_per_task = 4" in text  # the config
    assert (index.parent / "fig-history.png").is_file()
    assert "no training history" not in text


def test_a_matrix_larger_than_the_limits_is_sampled_and_the_page_says_so(written, tmp_path):
    store, _ = written
    index = write_report(store, tmp_path / "small", max_heatmap=5, max_points=8)
    text = Page(index.read_text()).all_text
    assert "the heatmaps show 5 of 12 models" in text
    assert "the PCA plots show 8 of 12 models" in text
    with pytest.raises(DistsimError, match="max_heatmap"):
        write_report(store, tmp_path / "bad", max_heatmap=1)


def test_a_store_without_results_still_gets_a_page(tmp_path):
    store = synthetic_store(tmp_path / "bare", history=False, tests=False)
    for table in ("models", "features"):
        store.clear_table(table)
    index = write_report(store, tmp_path / "out")
    page = Page(index.read_text())
    assert page.images == [] and page.rows == []
    for line in ("no training history in this store", "no ok models in this store",
                 "no tests of this architecture in the store yet"):
        assert line in page.all_text


def test_a_folder_without_study_json_is_refused(tmp_path):
    with pytest.raises(StoreError, match="study.json"):
        write_report(Store(tmp_path / "empty"), tmp_path / "out")


def test_headless_chromium_renders_the_page(written, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (chromium / chromium-browser)")
    _, index = written
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1400,3000", index.as_uri()],
                   check=True, capture_output=True, timeout=180)
    assert png_pixels(shot).var() > 0


# ----------------------------------------------------------------------------- sampling, PCA


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=200), st.integers(1, 250),
       st.integers(0, 3))
def test_a_stratified_sample_keeps_each_tasks_share(tasks, limit, seed):
    tasks = np.sort(np.asarray(tasks))
    keep = stratified_sample(tasks, limit, seed)
    assert len(keep) == min(limit, len(tasks))
    assert (np.diff(keep) > 0).all() and keep.min() >= 0 and keep.max() < len(tasks)
    labels, counts = np.unique(tasks, return_counts=True)
    kept = {t: int((tasks[keep] == t).sum()) for t in labels}
    for t, n in zip(labels, counts, strict=True):
        share = n * min(limit, len(tasks)) / len(tasks)
        assert abs(kept[t] - share) < 1


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(1, 40), st.integers(0, 100))
def test_pca_coordinates_carry_the_top_singular_values(n, d, seed):
    X = np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(3, 1, d)
    coords, share = pca_2d(X)
    Xc = X - X.mean(axis=0)
    s = np.linalg.svd(Xc, compute_uv=False)
    k = min(2, n, d)
    total = (s**2).sum()
    np.testing.assert_allclose(share[:k], s[:k] ** 2 / total, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose((coords**2).sum(axis=0)[:k], s[:k] ** 2, rtol=1e-3, atol=1e-4)
    if k == 2:
        assert abs(coords[:, 0] @ coords[:, 1]) <= 1e-3 * s[0] * s[1] + 1e-6


def test_the_randomized_pca_of_a_large_matrix_finds_the_same_axes():
    rng = np.random.default_rng(0)
    n, d = 700, 900  # min(N, D) > 512: the randomized path
    X = (rng.normal(size=(n, 2)) * [8, 4]) @ rng.normal(size=(2, d)) + rng.normal(size=(n, d))
    coords, share = pca_2d(X)
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(share, s[:2] ** 2 / (s**2).sum(), rtol=1e-3)
    np.testing.assert_allclose(np.sqrt((coords**2).sum(axis=0)), s[:2], rtol=1e-3)
