"""Multi-term PERMANOVA (vegan's adonis2) for any metric without the N x N matrix: each design
column's quadratic form added up tile by tile.

``permanova_terms`` gets every SS from the columns q (N,) of an orthonormal design basis
orthogonal to the intercept (``TermsDesign``): under a row order o, a column's SS is
q_o' G q_o with q_o = q[o] and G = C A C, A = -D*D/2 (Gower). As q_o is orthogonal to the
intercept, q_o' G q_o = q_o' A q_o = sum_{i,j} q[o_i] A_ij q[o_j]: a sum over pairs, so it
splits over the upper tiles (I, J) of the distance matrix, an off-diagonal tile counted twice
(A is symmetric). SS_total = trace(G) = sum_{i<j} d_ij^2 / N splits the same way. One tile
then needs its distances, the basis (N, k) and the row orders (B + 1, N) int32 (the identity
first, then the permutations ``permanova_terms`` draws for the seed), and returns a
(B + 1, k + 1) array of shares (the last column: its share of N SS_total), summed in any order.

Cost per tile of t x t distances: one distance GEMM and (B + 1) t^2 k multiply-adds (a batched
GEMM per chunk of orders), for k design columns (for "terms" the model's degrees of freedom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distsim.stats.distances import (
    DEFAULT_BLOCK,
    Frame,
    distance_block,
    distance_frame,
    upper_tiles,
)
from distsim.stats.permanova_multiterm import (
    TermsDesign,
    TermsResult,
    terms_design,
    terms_orders,
    terms_result,
)
from distsim.stats.permanova_tiled import tile_args
from distsim.stats.permutation import SeedLike
from distsim.stats.permutational_anova import _check_permutations

_ORDERS = 32  # row orders per batched GEMM of a tile


def permanova_terms_orders(strata: Sequence[Any] | np.ndarray | None, n: int,
                           permutations: int, seed: SeedLike) -> np.ndarray:
    """(permutations + 1, N) int32 row orders: the identity, then the null's permutations as
    ``permanova_terms(..., strata, permutations, seed)`` draws them.

    >>> orders = permanova_terms_orders(["a", "a", "b", "b"], 4, permutations=3, seed=0)
    >>> orders.shape, orders[0].tolist()
    ((4, 4), [0, 1, 2, 3])
    >>> all(set(o[:2]) == {0, 1} for o in orders)  # within strata
    True
    """
    permutations = _check_permutations(permutations)
    out = np.empty((permutations + 1, n), np.int32)
    out[0] = np.arange(n)
    at = 1
    for rows in terms_orders(strata, n, permutations, seed):
        out[at:at + len(rows)] = rows
        at += len(rows)
    return out


def permanova_terms_tile(X: np.ndarray, frame: Frame, tile: tuple[int, ...], metric: str,
                         columns: np.ndarray, orders: np.ndarray, backend: str = "numpy"
                         ) -> np.ndarray:
    """One upper tile (i0, i1, j0, j1) of the distances of features X (N, D) by `metric` (in
    the shared `frame`): its shares (B + 1, k + 1) of every design column's SS under every row
    order (`columns` (N, k), `orders` (B + 1, N)) and, in the last column, of N SS_total.

    >>> from distsim.stats.permanova_multiterm import terms_design
    >>> X = np.array([[0.0], [1], [5], [6]])
    >>> design = terms_design({"g": list("aabb")}, ["g"], "terms", 4)
    >>> orders = permanova_terms_orders(None, 4, permutations=0, seed=0)
    >>> share = permanova_terms_tile(X, distance_frame(X), (0, 4, 0, 4), "euclidean",
    ...                              design.columns, orders)
    >>> share.round(6).tolist()  # SS of g, and N SS_total = the sum of d^2 over pairs
    [[25.0, 104.0]]
    """
    i0, i1, j0, j1 = (int(v) for v in tile)
    diagonal = i0 == j0
    if (diagonal and i1 != j1) or not (0 <= i0 < i1 and j0 < j1 <= len(X)):
        raise ValueError(f"permanova_terms_tile needs a tile of rows within X ({len(X)}; "
                         f"diagonal tiles square), got {tile}")
    d = distance_block(X[i0:i1], None if diagonal else X[j0:j1], metric, frame=frame,
                       backend=backend)  # backend: where the GEMM runs (stats.backend)
    A = -0.5 * np.square(d, dtype=np.float64)  # (ti, tj)
    weight = 1.0 if diagonal else 2.0  # an off-diagonal tile stands for (I, J) and (J, I)
    b, k = len(orders), columns.shape[1]
    out = np.empty((b, k + 1))
    out[:, k] = -weight * A.sum()  # sum of d^2 over the tile's pairs i < j: -2 A / 2 on I = J
    for s in range(0, b, _ORDERS):
        rows = orders[s:s + _ORDERS]
        qi = columns[rows[:, i0:i1]]  # (m, ti, k): the basis rows under each order
        qj = qi if diagonal else columns[rows[:, j0:j1]]  # (m, tj, k)
        out[s:s + len(rows), :k] = weight * np.einsum("mik,mik->mk", qi, A @ qj)
    return out


def permanova_terms_finish(design: TermsDesign, sums: np.ndarray, n: int) -> TermsResult:
    """The TermsResult from the tiles' summed shares (B + 1, k + 1) of N objects."""
    blocks = design.block_sums(sums[:, :-1])
    return terms_result(design, float(sums[0, -1]) / n, blocks[0], blocks[1:], n)


def permanova_terms_tiles(X: np.ndarray, table: Mapping[str, Sequence[Any] | np.ndarray],
                          terms: Sequence[str], metric: str = "euclidean", by: str = "terms",
                          strata: Sequence[Any] | np.ndarray | None = None,
                          permutations: int = 999, seed: SeedLike = 0,
                          tile: int = DEFAULT_BLOCK) -> TermsResult:
    """:func:`permanova_terms` of the `metric` distances of features X (N, D), tile by tile
    (``upper_tiles(N, tile)``): one tile of distances at a time, never an N x N array. The same
    permutations and, on the same float32 distances, the same F to float rounding.

    >>> X = np.array([[0.0, 0], [1, 0], [5, 0], [6, 0], [0, 1], [1, 1], [5, 1], [6, 1]])
    >>> table = {"g": list("aabbaabb"), "h": list("xxxxyyyy")}
    >>> res = permanova_terms_tiles(X, table, ["g", "h"], permutations=99, tile=3)
    >>> [(r.term, r.df, round(r.r2, 4)) for r in res.rows]
    [('g', 1, 0.9259), ('h', 1, 0.037)]
    """
    arr = tile_args(X, metric, tile)
    n = len(arr)
    design = terms_design(table, terms, by, n)
    orders = permanova_terms_orders(strata, n, permutations, seed)
    frame = distance_frame(arr, metric)
    sums = np.zeros((len(orders), design.columns.shape[1] + 1))
    for t in upper_tiles(n, int(tile)):
        sums += permanova_terms_tile(arr, frame, t, metric, design.columns, orders)
    return permanova_terms_finish(design, sums, n)
