"""distsim.open: the session's finished 3-arch store (mlp, cnn, rnn; tests/conftest.py
`finished_study`, launched once on the session's Ray) read back through Results: tables,
q-values, features, tasks, and trained models that give the stored accuracies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from _study import FINISHED_STUDY, study_toml
from hypothesis import given, settings
from hypothesis import strategies as st

import distsim
from distsim.config import load_study
from distsim.errors import StoreError
from distsim.results import Results
from distsim.store import TABLES, Store
from distsim.summary import summary_table
from distsim.zoo.tasks import make_tasks

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

ARCHS = ("mlp", "cnn", "rnn")


def three_arch_study(store: Path, **sections: object) -> str:
    """The shared study (`FINISHED_STUDY`: 4 synthetic tasks x 3 seeds of a tiny mlp, cnn and
    rnn, 4 epochs, raw + chain-gram features of the last layer, 9 permutations) stored at
    `store`, `sections` merged in."""
    return study_toml(FINISHED_STUDY, study={"store": str(store)}, **sections)


@pytest.fixture(scope="module")
def study_file(finished_study: Path) -> Path:
    return finished_study  # read only: never changed by these tests


@pytest.fixture(scope="module")
def res(study_file: Path) -> Results:
    return distsim.open(study_file)


def test_import_distsim_loads_neither_torch_polars_nor_ray() -> None:
    code = ("import sys, distsim; heavy = [m for m in ('torch', 'polars', 'ray') "
            "if m in sys.modules]; print(heavy); assert callable(distsim.open)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = distsim.nope  # type: ignore[attr-defined]


def test_open_a_store_folder_or_its_toml(res: Results, study_file: Path) -> None:
    by_folder = distsim.open(res.store.root)
    assert distsim.open(res.store).study.hash == res.study.hash
    assert by_folder.study.hash == res.study.hash == load_study(study_file).hash
    assert by_folder.store.root == res.store.root
    text = repr(res)
    assert "'three'" in text and "36 models" in text and "mlp, cnn, rnn" in text


def test_open_refuses_what_is_not_the_store(res: Results, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no distsim store"):
        distsim.open(tmp_path / "nothing")
    other = tmp_path / "other.toml"  # a changed study whose [study] store is this store
    other.write_text(three_arch_study(res.store.root, train={"epochs": 3}))
    with pytest.raises(StoreError, match="open the store folder"):
        distsim.open(other)


def test_tables_in_study_order_eager_or_lazy(res: Results) -> None:
    models = res.models()
    assert isinstance(models, pl.DataFrame) and models.height == 36
    assert models["arch"].unique(maintain_order=True).to_list() == list(ARCHS)
    assert models.equals(res.models(lazy=True).collect())  # type: ignore[union-attr]
    assert set(models["status"]) == {"ok"}
    history = res.history()
    assert history.columns == TABLES["history"].schema.names
    assert history.height == 36 * 4
    one = res.history("cnn-t1-s4")
    assert set(one["model_id"]) == {"cnn-t1-s4"} and one["epoch"].to_list() == [1, 2, 3, 4]


def test_tests_carry_the_summary_q_values(res: Results) -> None:
    tests = res.tests()
    assert isinstance(tests, pl.DataFrame)
    key = ["arch", "layer", "method", "protocol"]
    assert tests.height == 3 * 2 * 4 and tests.select(key).n_unique() == tests.height
    want = summary_table(res.store, res.study).select(*key, "q_value")
    got = tests.select(*key, "q_value").join(want, on=key, suffix="_summary")
    assert got.height == tests.height
    np.testing.assert_array_equal(got["q_value"], got["q_value_summary"])
    assert tests.columns == [*TABLES["tests"].schema.names, "r2", "q_value"]
    assert tests.equals(res.tests(lazy=True).collect())  # type: ignore[union-attr]


def test_neighbors_filtered_by_model_and_matrix(res: Results) -> None:
    every = res.neighbors()
    assert isinstance(every, pl.DataFrame) and every.height == 3 * 2 * 12 * 2  # top_k = 2
    mine = res.neighbors("rnn-t0-s1", method="raw")
    assert mine["model_id"].to_list() == ["rnn-t0-s1"] * 2 and mine["rank"].to_list() == [1, 2]
    out = res.neighbors(arch="cnn", layer="out", method="chain-gram", lazy=True)
    assert isinstance(out, pl.LazyFrame)
    got = out.collect()
    assert got.height == 24 and set(got["arch"]) == {"cnn"}
    assert set(got["method"]) == {"chain-gram"}


def test_unknown_keys_name_what_the_study_has(res: Results) -> None:
    with pytest.raises(StoreError, match="mlp, cnn, rnn"):
        res.neighbors(arch="gru")
    with pytest.raises(StoreError, match="feature layers of arch mlp are out"):
        res.features("mlp", "fc1", "raw")
    with pytest.raises(StoreError, match="methods are raw, chain-gram"):
        res.features("mlp", "out", "gram")
    with pytest.raises(StoreError, match=r"'mlp-t9-s0'.*it has cnn-t0-s0"):
        res.load_model("mlp-t9-s0")
    with pytest.raises(StoreError, match=r"tasks 0\.\.3"):
        res.task(4)


@settings(max_examples=25, deadline=None)
@given(name=st.text(min_size=1, max_size=8))
def test_any_unknown_name_is_a_store_error(res: Results, name: str) -> None:
    if name not in ARCHS:
        with pytest.raises(StoreError, match="the study has archs"):
            res.neighbors(arch=name)
    if name not in ("raw", "chain-gram"):
        with pytest.raises(StoreError, match="the study's methods"):
            res.neighbors(method=name)
    with pytest.raises(StoreError, match="no such model"):
        res.history(name)


def test_features_are_the_stored_matrix(res: Results) -> None:
    ids, tasks, X = res.features("rnn", "out", "chain-gram")
    fm = Store(res.store.root).feature_matrix("rnn", "chain-gram", "out")
    assert ids == fm.model_ids and len(ids) == 12
    assert tasks.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and X.dtype == np.float32
    np.testing.assert_array_equal(X, fm.X)


def test_task_is_the_split_the_zoo_trained_on(res: Results) -> None:
    want = make_tasks(res.study.data)[1]
    got = res.task(1)
    assert (got.task_id, got.name, got.classes) == (want.task_id, want.name, want.classes)
    for a in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(got, a), getattr(want, a))


def _accuracy(net: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(dim=-1).numpy()
    return int((pred == y).sum()) / len(y)


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_models_reproduce_the_stored_accuracies(res: Results, arch: str) -> None:
    rng = torch.get_rng_state()
    rows = res.models().filter(pl.col("arch") == arch)  # type: ignore[union-attr]
    assert rows.height == 12
    for row in rows.iter_rows(named=True):
        net = res.load_model(row["model_id"])
        assert not net.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
        task = res.task(row["task"])
        assert _accuracy(net, task.x_test, task.y_test) == row["test_acc"]
        assert _accuracy(net, task.x_train, task.y_train) == row["train_acc"]
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws no random numbers


@pytest.mark.parametrize("arch", ARCHS)
def test_normalized_models_compute_the_same_function(res: Results, arch: str) -> None:
    mid = f"{arch}-t1-s3"
    raw, normed = res.load_model(mid), res.load_model(mid, normalized=True)
    x = torch.from_numpy(res.task(1).x_test)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), raw(x), rtol=1e-4, atol=1e-5)
    state, normed_state = raw.state_dict(), normed.state_dict()
    if arch == "rnn":  # a GRU has no rescaling symmetry: the weights are left as they are
        assert all(torch.equal(state[k], normed_state[k]) for k in state)
        return
    first = "1" if arch == "mlp" else "0"  # mlp: Flatten, Linear; cnn: Conv2d first
    w, b = normed_state[f"{first}.weight"], normed_state[f"{first}.bias"]
    norms = torch.cat([w.flatten(1), b[:, None]], dim=1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert not torch.allclose(state[f"{first}.weight"], w)
