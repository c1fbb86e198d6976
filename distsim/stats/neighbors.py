"""Top-k neighbours streamed over distance blocks: partial lists per block, merged.

Each block of distances gives per-row partial top-k lists (`block_topk`; `tile_topk` gives the
rows' and the columns' lists of an off-diagonal tile in one pass) that `merge_topk` combines,
so no N x N matrix is held. Order: by distance, ties to the smaller index, so results are
deterministic and equal to a stable sort of each full row (-0.0 counts as 0.0). A row with
fewer than k candidates is padded with (index -1, distance inf).

The per-block selection is one pass of a numba kernel over the block: each entry is compared
with its row's (and column's) current k-th best and inserted into that sorted list of k when it
is nearer, so a block costs O(n_I n_J) comparisons and O(k) work per insertion, with no copy of
the block (the NumPy route it replaces built int64 sort keys of the whole block and ran two
`argpartition`s, one on the transposed block: slower than the distances themselves;
benchmarks/bench_pairs.py). `merge_topk` sorts the (n, k * parts) keys of the partial lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

_PAD_KEY = np.iinfo(np.int64).max  # top-k padding: index -1, distance inf


def _keys(indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """int64 sort keys (distance bits, index): order = by distance, then by smaller index.

    Non-negative float32 values keep their order when read as int32 bits; padding (-1) sorts last.
    """
    d = np.asarray(distances, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    idx = np.asarray(indices, dtype=np.int64)
    keys = (d.view(np.int32).astype(np.int64) << 32) | idx
    keys[idx < 0] = _PAD_KEY
    return keys


def _select(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest keys of each row, sorted -> (indices (n, k) int64, distances (n, k) f32)."""
    if keys.shape[1] > k:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys = np.sort(keys, axis=1)
    if keys.shape[1] < k:
        pad = np.full((keys.shape[0], k - keys.shape[1]), _PAD_KEY, dtype=np.int64)
        keys = np.concatenate([keys, pad], axis=1)
    pad = keys == _PAD_KEY
    indices = keys & 0xFFFFFFFF
    distances = (keys >> 32).astype(np.int32).view(np.float32)
    indices[pad] = -1
    distances[pad] = np.inf
    return indices, distances


@numba.njit(cache=True, inline="always")
def _insert(best_i: np.ndarray, best_d: np.ndarray, r: int, j: int, d: float) -> None:
    """Insert candidate (d, j) into row r of the sorted lists (best_d, best_i) if it is nearer
    than their last entry (by distance, then index; padding, index -1, after everything)."""
    k = best_i.shape[1]
    last = k - 1
    if best_i[r, last] >= 0 and (d > best_d[r, last]
                                 or (d == best_d[r, last] and j > best_i[r, last])):
        return
    p = last
    while p > 0:
        q = best_i[r, p - 1]
        if q >= 0 and (best_d[r, p - 1] < d or (best_d[r, p - 1] == d and q < j)):
            break
        best_i[r, p] = q
        best_d[r, p] = best_d[r, p - 1]
        p -= 1
    best_i[r, p] = j
    best_d[r, p] = d


@numba.njit(cache=True)
def _scan(block: np.ndarray, k: int, row_start: int, col_start: int, columns: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over block (n_I, n_J) float32: the rows' top-k lists of column indices and,
    with `columns`, the columns' top-k lists of row indices (global indices; a pair (i, i) is
    skipped). Returns (row idx (n_I, k), row dist, col idx (n_J or 0, k), col dist)."""
    n_i, n_j = block.shape
    ri = np.full((n_i, k), -1, np.int64)
    rd = np.full((n_i, k), np.inf, np.float32)
    m = n_j if columns else 0
    ci = np.full((m, k), -1, np.int64)
    cd = np.full((m, k), np.inf, np.float32)
    for r in range(n_i):
        gi = row_start + r
        for c in range(n_j):
            gj = col_start + c
            if gi == gj:
                continue
            d = block[r, c] + np.float32(0.0)  # -0.0 -> +0.0
            if ri[r, k - 1] < 0 or d <= rd[r, k - 1]:
                _insert(ri, rd, r, gj, d)
            if columns and (ci[c, k - 1] < 0 or d <= cd[c, k - 1]):
                _insert(ci, cd, c, gi, d)
    return ri, rd, ci, cd


def _check_block(block: np.ndarray, k: int) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=np.float32)
    if block.ndim != 2:
        raise ValueError(f"block must be 2-D, got shape {block.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (block >= 0).all():
        raise ValueError("block must hold non-negative distances (no NaN)")
    return block


def block_topk(
    block: np.ndarray, k: int, row_start: int, col_start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Partial top-k of a distance block (n_I, n_J) whose rows/columns start at global indices
    row_start/col_start -> (indices (n_I, k) int64 global, distances (n_I, k) float32).

    A row's own index is excluded; rows with fewer than k candidates are padded (-1, inf).

    >>> from distsim.stats.distances import pairwise_distances
    >>> D = pairwise_distances(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))
    >>> idx, dist = block_topk(D[:, 2:], 1, row_start=0, col_start=2)  # the block of column 2
    >>> idx.tolist(), dist.tolist()  # row 2 has no candidate but itself: padded
    ([[2], [2], [-1]], [[10.0], [5.0], [inf]])
    """
    ri, rd, _, _ = _scan(_check_block(block, k), int(k), int(row_start), int(col_start), False)
    return ri, rd


def tile_topk(
    block: np.ndarray, k: int, row_start: int, col_start: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Both partial top-k lists of an off-diagonal tile in one pass: the rows' (as
    ``block_topk(block, ...)``) and the columns' (as ``block_topk(block.T, k, col_start,
    row_start)``), without transposing the block.

    >>> from distsim.stats.distances import pairwise_distances
    >>> D = pairwise_distances(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))
    >>> (ri, rd), (ci, cd) = tile_topk(D[:2, 2:], 1, row_start=0, col_start=2)
    >>> ri.tolist(), ci.tolist(), cd.tolist()  # column 2's nearest among rows 0-1: row 1
    ([[2], [2]], [[1]], [[5.0]])
    """
    ri, rd, ci, cd = _scan(_check_block(block, k), int(k), int(row_start), int(col_start), True)
    return (ri, rd), (ci, cd)


def merge_topk(
    indices: Sequence[np.ndarray], distances: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Combine partial top-k lists of the same rows (each (n, k_p) from `block_topk` or an
    earlier merge) -> (indices (n, k) int64, distances (n, k) float32), nearest first.

    >>> from distsim.stats.distances import pairwise_distances
    >>> D = pairwise_distances(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))
    >>> left = block_topk(D[:, :2], 1, 0, 0)  # columns 0-1
    >>> right = block_topk(D[:, 2:], 1, 0, 2)  # column 2
    >>> idx, dist = merge_topk([left[0], right[0]], [left[1], right[1]], 1)
    >>> idx.tolist(), dist.tolist()  # row 1: rows 0 and 2 tie at 5, the smaller index wins
    ([[1], [0], [1]], [[5.0], [5.0], [5.0]])
    """
    if len(indices) != len(distances) or not indices:
        raise ValueError("merge_topk needs the same positive number of index and distance arrays")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = np.concatenate([_keys(i, d) for i, d in zip(indices, distances, strict=True)], axis=1)
    return _select(keys, k)
