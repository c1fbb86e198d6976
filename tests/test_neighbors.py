"""distsim.stats.neighbors: the one-pass top-k kernel against a stable sort of every row
(ties to the smaller index, -0.0 as 0.0, a row's own index skipped, padding), for the rows of
a block and for its columns (tile_topk), on blocks with many ties; and the old NumPy route
(int64 keys, partition), kept as merge_topk's, agrees entry for entry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.stats import block_topk, merge_topk, tile_topk
from distsim.stats.neighbors import _keys, _select


def _reference(block: np.ndarray, k: int, row_start: int, col_start: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest columns by a stable sort of (distance, global index)."""
    n_i, n_j = block.shape
    d = block.astype(np.float32) + np.float32(0.0)
    idx = np.full((n_i, k), -1, np.int64)
    dist = np.full((n_i, k), np.inf, np.float32)
    cols = np.arange(col_start, col_start + n_j)
    for r in range(n_i):
        keep = cols != row_start + r
        c, v = cols[keep], d[r, keep]
        order = np.lexsort((c, v))[:k]  # by distance, then by index
        idx[r, : len(order)], dist[r, : len(order)] = c[order], v[order]
    return idx, dist


@st.composite
def blocks(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    n_i, n_j = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    levels = draw(st.sampled_from([3, 50]))  # few levels: many ties
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    block = rng.integers(0, levels, (n_i, n_j)).astype(np.float32) / 7
    block[rng.random((n_i, n_j)) < 0.1] = -0.0
    block[rng.random((n_i, n_j)) < 0.05] = np.inf
    k = draw(st.integers(1, 14))
    row_start = draw(st.integers(0, 20))
    col_start = draw(st.sampled_from([row_start, row_start + 3, row_start + n_i, 40]))
    return block, k, row_start, col_start


@settings(max_examples=300, deadline=None)
@given(blocks())
def test_rows_and_columns_equal_a_stable_sort(case: tuple[np.ndarray, int, int, int]) -> None:
    block, k, r0, c0 = case
    want_i, want_d = _reference(block, k, r0, c0)
    got_i, got_d = block_topk(block, k, r0, c0)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    (ri, rd), (ci, cd) = tile_topk(block, k, r0, c0)
    np.testing.assert_array_equal(ri, want_i)
    np.testing.assert_array_equal(rd, want_d)
    col_i, col_d = _reference(block.T, k, c0, r0)
    np.testing.assert_array_equal(ci, col_i)
    np.testing.assert_array_equal(cd, col_d)
    # the NumPy route the kernel replaced: int64 keys of the block, partition, sort
    rows, cols = np.arange(r0, r0 + block.shape[0]), np.arange(c0, c0 + block.shape[1])
    keys = _keys(np.broadcast_to(cols, block.shape), block)
    keys[rows[:, None] == cols[None, :]] = np.iinfo(np.int64).max
    old_i, old_d = _select(keys, k)
    np.testing.assert_array_equal(got_i, old_i)
    np.testing.assert_array_equal(got_d, old_d)


def test_a_merge_of_column_blocks_is_the_whole_rows_top_k() -> None:
    rng = np.random.default_rng(0)
    block = rng.integers(0, 9, (30, 200)).astype(np.float32)
    parts = [block_topk(block[:, j : j + 37], 5, 0, j) for j in range(0, 200, 37)]
    idx, dist = merge_topk([p[0] for p in parts], [p[1] for p in parts], 5)
    want_i, want_d = _reference(block, 5, 0, 0)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(dist, want_d)


@pytest.mark.parametrize(("block", "k", "match"), [
    (np.zeros(4, np.float32), 1, "2-D"),
    (np.zeros((2, 2), np.float32), 0, "k must be"),
    (np.array([[np.nan]], np.float32), 1, "non-negative"),
    (np.array([[-1.0]], np.float32), 1, "non-negative"),
])
def test_bad_blocks_and_k_are_clear_errors(block: np.ndarray, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block_topk(block, k, 0, 0)
