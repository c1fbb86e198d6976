"""The groups the tests compare (`[tests] group_by`, `group_bins`), read from the models table
with each imported model's metadata as typed columns (distsim.store.query)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.errors import StoreError
from distsim.store import Store
from distsim.store.query import group_codes, models_with_meta

KEY = {"arch": "cnn", "task": 0, "pack": 0}


def _store(tmp_path, metas: list[dict | None]) -> tuple[Store, list[str]]:
    store = Store(tmp_path / "store")
    ids = [f"cnn-t0-m{i}" for i in range(len(metas))]
    store.write_shard("models", KEY, [
        {"model_id": m, "seed": i, "status": "ok", "epoch": (meta or {}).get("epoch"),
         "source_meta": None if meta is None else json.dumps(meta)}
        for i, (m, meta) in enumerate(zip(ids, metas, strict=True))])
    return store, ids


def test_metadata_keys_become_typed_columns_and_core_names_are_not_repeated(tmp_path) -> None:
    store, _ = _store(tmp_path, [{"optim::lr": 0.1, "seed": 3, "epoch": 2, "nlin": "tanh"},
                                 {"optim::lr": 1, "seed": 4, "epoch": 5}])
    df = models_with_meta(store).collect()
    assert set(df.columns[-2:]) == {"nlin", "optim::lr"}
    assert df.schema["optim::lr"].is_float() and df["optim::lr"].to_list() == [0.1, 1.0]
    assert df["nlin"].to_list() == ["tanh", None]
    assert df.columns.count("seed") == 1 and df.columns.count("epoch") == 1


def test_a_trained_store_reads_as_it_is(tmp_path) -> None:
    store, _ = _store(tmp_path, [None, None])
    assert models_with_meta(store).collect().columns == store.scan("models").collect().columns


def test_groups_are_the_sorted_distinct_values_in_model_order(tmp_path) -> None:
    store, ids = _store(tmp_path, [{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.1}, {"lr": 0.001}])
    codes, names = group_codes(store, ids[::-1], "lr")
    assert names == ["0.001", "0.01", "0.1"] and codes.tolist() == [0, 2, 1, 2]
    with pytest.raises(StoreError, match="'epoch' is null for 4 of 4 models"):
        group_codes(store, ids, "epoch")  # a models column, null in these rows

@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=4, max_size=30),
       bins=st.integers(2, 5))
def test_equal_count_bins_agree_with_numpy_quantiles(tmp_path_factory, values, bins) -> None:
    """group_bins = k cuts at the inner k-quantiles (numpy's): v goes to the bin i with
    edge[i-1] <= v < edge[i]; codes are dense 0..G-1 in bin order."""
    store, ids = _store(tmp_path_factory.mktemp("b"), [{"x": v} for v in values])
    codes, names = group_codes(store, ids, "x", bins)
    x = np.array(values)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    raw = np.searchsorted(edges, x, side="right")
    assert codes.tolist() == np.unique(raw, return_inverse=True)[1].tolist()
    assert len(names) == len(np.unique(raw))
    assert (np.diff(codes[np.argsort(x, kind="stable")]) >= 0).all()  # bins are intervals


def test_bins_at_given_edges(tmp_path) -> None:
    store, ids = _store(tmp_path, [{"lr": v} for v in (0.001, 0.01, 0.05, 0.1, 0.5)])
    codes, names = group_codes(store, ids, "lr", (0.01, 0.1))
    assert codes.tolist() == [0, 1, 1, 2, 2] and names == ["[-inf, 0.01)", "[0.01, 0.1)",
                                                           "[0.1, inf)"]


@pytest.mark.parametrize(("metas", "column", "bins", "message"), [
    ([{"lr": 0.1}, {"lr": 0.2}], "momentum", None, "'momentum' is not a column of models"),
    ([{"lr": 0.1}, {"nlin": "relu"}], "lr", None, "'lr' is null for 1 of 2 models"),
    ([{"nlin": "relu"}, {"nlin": "tanh"}], "nlin", 2, "holds String, not numbers"),
])
def test_bad_groupings_are_one_line_store_errors(tmp_path, metas, column, bins, message) -> None:
    store, ids = _store(tmp_path, metas)
    with pytest.raises(StoreError) as err:
        group_codes(store, ids, column, bins)
    assert message in str(err.value) and "\n" not in str(err.value)
