"""The pairs stage's units and layout: runs of tiles of one block row (segments) give exactly the
neighbours and sums of the tiles one by one; one pairs shard per block row, and a store of the
old layout (one shard per tile) is read, resumed and rewritten row by row."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.pipeline.pairs import (
    BlockMerges,
    compute_tile,
    neighbor_rows,
    row_segments,
    segment_parts,
    tile_plan,
)
from distsim.store import Store


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), block=st.integers(1, 9), cpus=st.integers(1, 64),
       drop=st.integers(0, 2**16))
def test_segments_cover_every_tile_once_in_short_runs_of_one_row(n: int, block: int, cpus: int,
                                                                 drop: int) -> None:
    rng = np.random.default_rng(drop)
    todo = {g: [t for t in tile_plan(n + g, block) if rng.random() < 0.8] for g in range(3)}
    segments = row_segments(todo, cpus)
    total = sum(len(t) for t in todo.values())
    size = max(1, math.ceil(total / (4 * cpus)))
    got = [(g, i, j) for g, i, js in segments for j in js]
    assert sorted(got) == sorted((g, i, j) for g, tiles in todo.items() for i, j in tiles)
    assert all(1 <= len(js) <= size and list(js) == sorted(js) for _, _, js in segments)
    assert [g for g, _, _ in segments] == sorted(g for g, _, _ in segments)  # matrix by matrix
    for g in todo:  # longest first within a matrix
        lengths = [len(js) for h, _, js in segments if h == g]
        assert lengths == sorted(lengths, reverse=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), block=st.integers(1, 12), k=st.integers(1, 6),
       cpus=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_segments_give_the_tiles_sums_and_the_exact_neighbours(n: int, block: int, k: int,
                                                               cpus: int, seed: int) -> None:
    from distsim.stats import distance_block

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    X[rng.integers(0, n, n // 3)] = X[0]  # exact ties: broken by the smaller index
    groups = np.sort(rng.integers(0, 3, n))
    tiles = tile_plan(n, block)
    merges = BlockMerges(n, block, k, set(range(math.ceil(n / block))))
    sums, done = {}, []
    for _, i, js in row_segments({0: tiles}, cpus):
        blocks = {b: X[b * block:(b + 1) * block] for b in {i, *js}}  # only those it needs
        parts = segment_parts(blocks, groups, i, js, block, k, "euclidean")
        assert set(parts.seconds) == {"distances", "sums", "topk", "merge"}
        for s in parts.summaries:
            sums[(i, s.pop("block_j"))] = s
        done += merges.add(*parts.rows_i, tiles=len(js))
        for _, r, idx, dist in parts.columns:
            done += merges.add(r, idx, dist)
    for i, j in tiles:  # each tile's summary, exactly as compute_tile gives it
        assert sums[(i, j)] == compute_tile(X, groups, i, j, block, k, "euclidean")[0]
    assert sorted(b for b, *_ in done) == list(range(math.ceil(n / block)))
    # the reference: every tile's block (the same numerics), mirrored, each row stably sorted
    D = np.full((n, n), np.inf, np.float32)
    for i, j in tiles:
        si, sj = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
        D[si, sj] = distance_block(X[si], None if i == j else X[sj])
        D[sj, si] = D[si, sj].T
    np.fill_diagonal(D, np.inf)  # a model is not its own neighbour
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    want_i = np.full((n, k), -1)
    want_d = np.full((n, k), np.inf, np.float32)
    want_i[:, : order.shape[1]] = order
    want_d[:, : order.shape[1]] = np.take_along_axis(D, order, 1)
    want_i[want_d == np.inf] = -1  # fewer than k others: padded
    for _, r, got_i, got_d in done:
        np.testing.assert_array_equal(got_i, want_i[r])
        np.testing.assert_array_equal(got_d, want_d[r])


def test_neighbor_rows_drop_the_padding_and_keep_the_rank_order() -> None:
    ids = ["a", "b", "c"]
    groups = np.array([0, 0, 1])
    idx = np.array([[1, 2], [0, -1]])
    dist = np.array([[1.0, 2.0], [1.0, np.inf]], np.float32)
    cols = neighbor_rows(ids, groups, "up", np.array([0, 1]), idx, dist)
    rows = pl.DataFrame({c: v.to_pylist() if hasattr(v, "to_pylist") else list(v)
                         for c, v in cols.items()}).to_dicts()
    assert rows == [
        {"model_id": "a", "task": 0, "rank": 1, "neighbor_id": "b", "neighbor_task": 0,
         "distance": 1.0, "same_task": True, "upstream": "up"},
        {"model_id": "a", "task": 0, "rank": 2, "neighbor_id": "c", "neighbor_task": 1,
         "distance": 2.0, "same_task": False, "upstream": "up"},
        {"model_id": "b", "task": 0, "rank": 1, "neighbor_id": "a", "neighbor_task": 0,
         "distance": 1.0, "same_task": True, "upstream": "up"},
    ]


# ----------------------------------------------------------------------------- on Ray


def _tables(store: Store) -> dict[str, pl.DataFrame]:
    keys = {"pairs": ["arch", "method", "layer", "block_i", "block_j"],
            "neighbors": ["arch", "method", "layer", "model_id", "rank"]}
    return {t: store.scan(t).collect().sort(k) for t, k in keys.items()}


@pytest.mark.ray
def test_a_store_of_one_shard_per_tile_is_read_resumed_and_rewritten_by_row(
    finished_study: Path, tmp_path: Path
) -> None:
    """The old layout (distsim < 0.7: a pairs shard per tile, named with block_j) still counts
    as done; a lost neighbours block recomputes its tiles, and a block row with a tile missing
    is rewritten as one shard, its old tile shards removed; the store stays sound and its tables
    equal the finished ones."""
    from distsim.config import load_study
    from distsim.pipeline.launch import run_study
    from distsim.store.verify import verify_store

    source = Store(finished_study.parent / "store")
    want = _tables(source)
    root = tmp_path / "store"
    shutil.copytree(source.root, root)
    store = Store(root)
    row_files = store.shard_files("pairs")
    assert [p.name for p in row_files[:3]] == ["block_i=0.parquet", "block_i=1.parquet",
                                               "block_i=2.parquet"]  # 12 models, block 4
    for path in row_files:  # rewrite every row shard as the old layout's one shard per tile
        table = pq.read_table(path)
        for t in range(table.num_rows):
            j = table["block_j"][t].as_py()
            pq.write_table(table.slice(t, 1), path.with_name(f"{path.stem}-block_j={j}.parquet"))
        path.unlink()
    assert verify_store(store) == []
    matrix = "pairs/arch=mlp/method=raw/layer=out"
    (root / matrix / "block_i=1-block_j=2.parquet").unlink()  # row 1 loses a tile
    (root / "neighbors/arch=cnn/method=raw/layer=out/block=2.parquet").unlink()
    kept = root / matrix / "block_i=0-block_j=0.parquet"
    stamp = kept.stat().st_mtime_ns
    text = finished_study.read_text().replace(str(source.root), str(root))
    (tmp_path / "study.toml").write_text(text)
    result = run_study(load_study(tmp_path / "study.toml"), stages=["pairs"],
                       stream=io.StringIO())
    info = result["stages"]["pairs"]
    # row 1 of mlp/raw/out (tiles (1, 1), (1, 2)); cnn/raw/out's block 2: (0, 2), (1, 2), (2, 2)
    assert (info["tiles"], info["failed"]) == (5, 0)
    assert verify_store(store) == []
    names = sorted(p.name for p in (root / matrix).iterdir())
    assert names == ["block_i=0-block_j=0.parquet", "block_i=0-block_j=1.parquet",
                     "block_i=0-block_j=2.parquet", "block_i=1.parquet",
                     "block_i=2-block_j=2.parquet"]
    assert kept.stat().st_mtime_ns == stamp  # a done tile's shard is not rewritten
    got = _tables(store)
    for table in want:
        assert got[table].equals(want[table]), table


def test_feature_rows_read_alone_are_the_matrix_rows_bit_for_bit(finished_study: Path) -> None:
    from distsim.errors import StoreError

    store = Store(finished_study.parent / "store")
    for arch, method in (("mlp", "raw"), ("cnn", "chain-gram")):
        fm = store.feature_matrix(arch, method, "out")
        index = store.feature_index(arch, method, "out")
        assert index["model_id"].to_list() == fm.model_ids
        assert index["task"].to_list() == fm.tasks.tolist()
        rows = np.random.default_rng(0).permutation(len(fm.model_ids))[:7]  # any rows, any order
        part = index[rows.tolist()]
        got = store.feature_rows(part["file"].to_list(), part["model_id"].to_list())
        assert got.dtype == np.float32 and np.array_equal(got, fm.X[rows])
        with pytest.raises(StoreError, match="2 rows asked for, 1 read"):
            store.feature_rows(part["file"].to_list()[:1], [part["model_id"][0], "nope"])
