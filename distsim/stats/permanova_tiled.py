"""PERMANOVA for any metric without the N x N matrix: sums of squares added up tile by tile.

s_T and s_W (`distsim.stats.permutational_anova`) are sums over pairs, so they split over the
upper tiles of the distance matrix: a tile (I, J) adds sum_{i in I, j in J} d_ij^2 to N s_T
and, for each labelling b,
    w_b = sum_g (1 / n_g) sum_{i in I, j in J, both in group g under b} d_ij^2
to s_W (group sizes n_g do not change under relabelling). A diagonal tile (I == J) counts each
pair once (i < j). So PERMANOVA on any metric needs one tile of distances at a time and the
(N, m) permuted labels, never the N x N matrix. The labellings are those `permanova` draws
(`permanova_labels`: the same uniforms, the same `_shuffled`), so the tile route gives the
same pseudo-F (to float rounding) and the same p as `permanova` on the matrix.

`tile_within_sums` is the per-tile kernel, `permanova_tile` one tile computed from the
features, `TileSums` the order-free reduction and `permanova_tiles` the single-process loop;
the tests stage (`distsim.pipeline.significance`) runs `permanova_tile` as one Ray task per
tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from distsim.stats.distances import (
    DEFAULT_BLOCK,
    METRICS,
    Frame,
    distance_block,
    distance_frame,
    upper_tiles,
)
from distsim.stats.permutation import SeedLike, p_value
from distsim.stats.permutational_anova import (
    _CHUNK,
    _SLICE,
    PermanovaResult,
    _check_permutations,
    _grouping,
    _shuffled,
    r_squared,
)

_SLICE_T = 128  # permutations per parallel slice of a tile; one tile row serves all of them


@numba.njit(parallel=True, cache=True)
def _tile_within_ss(d: np.ndarray, li: np.ndarray, lj: np.ndarray, sizes: np.ndarray,
                    diagonal: bool, out: np.ndarray) -> None:
    """out[b] = the tile's share of s_W under labelling b, for distances d (ti, tj) float32,
    labels li (ti, m) of its rows and lj (tj, m) of its columns (int32, sample-major) and
    group sizes (a,). A diagonal tile (li is lj, ti == tj) uses only d[i, j] for i < j.

    Per slice of permutations the columns are put in buckets by group (a counting sort, per
    permutation); row i then gathers d[i, bucket of its group], as _within_ss does: about
    ti tj / a reads per permutation instead of ti tj. A diagonal tile fills the buckets while
    its rows run from last to first, so a bucket holds the larger indices only.
    """
    tj = d.shape[1]
    ti = d.shape[0]
    n_perm = li.shape[1]
    a = sizes.shape[0]
    n_slices = (n_perm + _SLICE_T - 1) // _SLICE_T
    for t in numba.prange(n_slices):
        b0 = t * _SLICE_T
        m = min(n_perm, b0 + _SLICE_T) - b0
        start = np.zeros((m, a + 1), np.int64)  # bucket starts of each permutation
        for j in range(tj):
            for b in range(m):
                start[b, lj[j, b0 + b] + 1] += 1
        for b in range(m):
            for g in range(a):
                start[b, g + 1] += start[b, g]
        fill = np.zeros((m, a), np.int64)
        buf = np.empty((m, tj), np.int32)
        acc = np.zeros((m, a))
        if not diagonal:
            for j in range(tj):
                for b in range(m):
                    g = lj[j, b0 + b]
                    buf[b, start[b, g] + fill[b, g]] = j
                    fill[b, g] += 1
        for r in range(ti):
            i = ti - 1 - r if diagonal else r
            row = d[i]
            for b in range(m):
                g = li[i, b0 + b]
                s0 = start[b, g]
                c = fill[b, g]
                s = 0.0
                for k in range(s0, s0 + c):
                    v = np.float64(row[buf[b, k]])
                    s += v * v
                acc[b, g] += s
                if diagonal:
                    buf[b, s0 + c] = i
                    fill[b, g] = c + 1
        for b in range(m):
            total = 0.0
            for g in range(a):
                total += acc[b, g] / sizes[g]
            out[b0 + b] = total


@numba.njit(parallel=True, cache=True)
def _shuffle_into(codes: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out (N, m) int32 = _shuffled(codes, u), slices of _SLICE permutations in parallel."""
    n_perm = u.shape[0]
    n_slices = (n_perm + _SLICE - 1) // _SLICE
    for t in numba.prange(n_slices):
        b0 = t * _SLICE
        m = min(n_perm, b0 + _SLICE) - b0
        out[:, b0 : b0 + m] = _shuffled(codes, u[b0 : b0 + m])


def permanova_groups(labels: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group codes (N,) int32 in 0..a-1 (`factorize`'s order, as `permanova` numbers them) and
    group sizes (a,) int64 of labels (N,); at least 2 groups, not all of a single member
    (single-member groups warn).

    >>> codes, sizes = permanova_groups(["b", "a", "b", "b", "a"])
    >>> codes.tolist(), sizes.tolist()
    ([1, 0, 1, 1, 0], [2, 3])
    """
    groups, codes = _grouping(labels, len(labels), "labels")
    return codes.astype(np.int32), np.bincount(codes, minlength=len(groups)).astype(np.int64)


def permanova_labels(labels: Sequence | np.ndarray, permutations: int, seed: SeedLike,
                     observed: bool = False) -> np.ndarray:
    """The labellings `permanova(D, labels, permutations, seed)` draws, as group codes
    (N, permutations) int32 (sample-major: column b is permutation b); with observed=True a
    first extra column holds the labels' own codes. Uniforms come from default_rng(seed) in
    chunks of _CHUNK and are shuffled by `_shuffled`, as in `permanova` and
    `permanova_null_chunk`: the same seed gives the same permutations.

    >>> lab = permanova_labels(list("aabb"), 5, seed=0, observed=True)
    >>> lab.shape, lab[:, 0].tolist()  # column 0: the observed codes
    ((4, 6), [0, 0, 1, 1])
    >>> bool((np.sort(lab, axis=0) == [[0], [0], [1], [1]]).all())  # each column a relabelling
    True
    """
    permutations = _check_permutations(permutations)
    codes, _ = permanova_groups(labels)
    return _labellings(codes, permutations, seed, observed)


def _labellings(codes: np.ndarray, permutations: int, seed: SeedLike,
                observed: bool) -> np.ndarray:
    """`permanova_labels` of checked group codes (N,) int32."""
    n, first = len(codes), int(observed)
    out = np.empty((n, first + permutations), np.int32)
    if observed:
        out[:, 0] = codes
    rng = np.random.default_rng(seed)
    for start in range(0, permutations, _CHUNK):
        b = min(_CHUNK, permutations - start)
        block = np.empty((n, b), np.int32)
        _shuffle_into(codes, rng.random((b, n - 1)), block)
        out[:, first + start : first + start + b] = block
    return out


def tile_within_sums(d: np.ndarray, labels_i: np.ndarray, labels_j: np.ndarray | None,
                     sizes: np.ndarray) -> tuple[np.ndarray, float]:
    """One distance tile's shares of PERMANOVA's sums, for m labellings at once.

    d (ti, tj): distances between rows I and columns J; labels_i (ti, m) and labels_j (tj, m)
    int32: the group code of each row / column under each labelling (rows of
    `permanova_labels`); labels_j=None: a diagonal tile (I == J, d symmetric), each pair
    counted once (i < j). sizes (a,): the group sizes. Returns (w (m,), t): w[b] =
    sum_g (1 / n_g) sum of d_ij^2 over the tile's pairs in one group g under labelling b, and
    t = the sum of d_ij^2 over the tile's pairs. Summed over the upper tiles they give s_W of
    each labelling and N s_T (`tile_pseudo_f`). Memory O(ti tj + m (tj + a)).

    Three points at 0, 1 and 4 on a line, the first two in group 0: one tile holds them all.

    >>> d = np.array([[0, 1, 4], [1, 0, 3], [4, 3, 0]], dtype=np.float32)
    >>> codes = np.array([[0], [0], [1]], dtype=np.int32)  # one labelling (m = 1)
    >>> w, t = tile_within_sums(d, codes, None, np.array([2, 1]))
    >>> w.tolist(), t  # w: 1^2 / 2; t: 1 + 16 + 9
    ([0.5], 26.0)
    """
    dist = np.ascontiguousarray(d, dtype=np.float32)
    diagonal = labels_j is None
    li = np.ascontiguousarray(labels_i, dtype=np.int32)
    lj = li if labels_j is None else np.ascontiguousarray(labels_j, dtype=np.int32)
    size = np.ascontiguousarray(sizes, dtype=np.int64)
    if (dist.ndim != 2 or li.ndim != 2 or lj.ndim != 2 or li.shape[1] != lj.shape[1]
            or dist.shape != (len(li), len(lj))):
        raise ValueError(f"tile_within_sums needs d (ti, tj), labels_i (ti, m) and labels_j "
                         f"(tj, m), got {dist.shape}, {li.shape}, {lj.shape}")
    if li.size and (min(li.min(), lj.min()) < 0 or max(li.max(), lj.max()) >= len(size)):
        raise ValueError(f"labels must be group codes in 0..{len(size) - 1}")
    w = np.empty(li.shape[1])
    _tile_within_ss(dist, li, lj, size, diagonal, w)
    d2 = dist.astype(np.float64)
    d2 *= d2  # exact: float32 values squared fit a float64
    t = float(np.triu(d2, 1).sum()) if diagonal else float(d2.sum())
    return w, t


def tile_pseudo_f(within: np.ndarray, total: float, sizes: np.ndarray) -> np.ndarray:
    """(m,) pseudo-F from the tiles' summed shares: within (m,) s_W of each labelling, total
    the sum of d_ij^2 over all pairs i < j (N s_T), sizes (a,) the group sizes.

    >>> tile_pseudo_f(np.array([0.5]), 26.0, np.array([2, 1])).round(3).tolist()
    [16.333]
    """
    n, a = int(np.sum(sizes)), len(sizes)
    s_w = np.asarray(within, dtype=np.float64)
    s_t = float(total) / n
    return ((s_t - s_w) / (a - 1)) / (s_w / (n - a))


class TileSums:
    """Running sums of the tiles' shares (`tile_within_sums`) of m labellings.

    Compensated (double-double) addition: the sums do not depend on the order in which tiles
    arrive (to ~1e-32 relative, far below float64 rounding), so a tiled run on Ray gives the
    same result every time.

    >>> sums = TileSums(2)  # two labellings
    >>> sums.add(np.array([1.0, 2.0]), 10.0)
    >>> sums.add(np.array([0.5, 0.25]), 6.0)
    >>> within, total = sums.sums()
    >>> within.tolist(), total, sums.tiles
    ([1.5, 2.25], 16.0, 2)
    """

    def __init__(self, m: int) -> None:
        self.hi, self.lo = np.zeros(m + 1), np.zeros(m + 1)  # last entry: the pairs' total
        self.tiles = 0

    def add(self, within: np.ndarray, total: float) -> None:
        x = np.append(np.asarray(within, dtype=np.float64), float(total))
        if x.shape != self.hi.shape:
            raise ValueError(f"expected {len(self.hi) - 1} labellings, got {len(x) - 1}")
        s = self.hi + x  # TwoSum: s + err == hi + x exactly
        bp = s - self.hi
        self.lo += (self.hi - (s - bp)) + (x - bp)
        self.hi = s
        self.tiles += 1

    def sums(self) -> tuple[np.ndarray, float]:
        """(within (m,), total): the sums of the tiles added so far."""
        out = self.hi + self.lo
        return out[:-1], float(out[-1])


def permanova_tile(X: np.ndarray, frame: Frame, tile: tuple[int, ...],
                   metric: str, sizes: np.ndarray, *labels: np.ndarray, backend: str = "numpy"
                   ) -> tuple[np.ndarray, float]:
    """One tile (i0, i1, j0, j1) of `upper_tiles` for PERMANOVA on features X (N, D): its
    distances by `distance_block` in the shared `frame` (`distance_frame(X, metric)`), then
    `tile_within_sums` of the labellings of one or more (N, m_c) labels arrays, side by side
    -> (w (sum m_c,), t). Holds one tile of distances and the tile's rows of the labels; the
    tests stage runs it as a Ray task per tile. ``backend``: where the distances' GEMM runs
    (distsim.stats.backend).

    The observed pseudo-F of `permanova`'s example, added up over three tiles:

    >>> from distsim.stats.distances import distance_frame, upper_tiles
    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]])
    >>> codes, sizes = permanova_groups(list("aaaabbbb"))
    >>> lab = codes[:, None]  # the observed labelling only (m = 1)
    >>> frame, sums = distance_frame(X), TileSums(1)
    >>> for tile in upper_tiles(len(X), block=4):
    ...     sums.add(*permanova_tile(X, frame, tile, "euclidean", sizes, lab))
    >>> sums.tiles, tile_pseudo_f(*sums.sums(), sizes).round(3).tolist()
    (3, [300.0])
    """
    i0, i1, j0, j1 = (int(v) for v in tile)
    diagonal = i0 == j0
    if not labels or (diagonal and i1 != j1) or not (0 <= i0 < i1 and j0 < j1 <= len(X)):
        raise ValueError(f"permanova_tile needs a tile of rows within X ({len(X)}; diagonal "
                         f"tiles square) and at least one labels array, got {tile}")
    d = distance_block(X[i0:i1], None if diagonal else X[j0:j1], metric, frame=frame,
                       backend=backend)
    li = np.concatenate([lab[i0:i1] for lab in labels], axis=1)
    lj = None if diagonal else np.concatenate([lab[j0:j1] for lab in labels], axis=1)
    return tile_within_sums(d, li, lj, sizes)


def permanova_tiles(X: np.ndarray, labels: Sequence | np.ndarray, metric: str = "euclidean",
                    permutations: int = 999, seed: SeedLike = 0,
                    tile: int = DEFAULT_BLOCK
                    ) -> PermanovaResult:
    """PERMANOVA of a grouping (N,) on the `metric` distances of features X (N, D), tile by
    tile (`upper_tiles(N, tile)`): one tile of at most tile x tile distances at a time and the
    (N, permutations + 1) int32 labellings; never an N x N array.

    Equals ``permanova(pairwise_distances(X, metric=metric, block=tile), labels,
    permutations, seed)``: the same permutations (same seed, same shuffle) and the same float32
    distances (same frame, same tiles), so the same pseudo-F and null to float rounding
    (1e-9 relative) and the same p. Against another blocking of the matrix, the BLAS may round
    some distances differently in their last float32 bit.

    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]])
    >>> res = permanova_tiles(X, list("aaaabbbb"), permutations=999, seed=0, tile=4)
    >>> round(res.statistic, 3), round(res.r2, 4), res.p_value  # as permanova's example
    (300.0, 0.9804, 0.028)
    >>> res = permanova_tiles(X + 1, list("aaaabbbb"), metric="cosine", permutations=99, seed=0)
    >>> res.null.shape, round(res.r2, 3), res.p_value  # any metric: here 1 - cos
    ((99,), 0.916, 0.08)
    """
    arr = tile_args(X, metric, tile)
    permutations = _check_permutations(permutations)
    groups, codes64 = _grouping(labels, len(arr), "X")
    codes = codes64.astype(np.int32)
    sizes = np.bincount(codes, minlength=len(groups)).astype(np.int64)
    frame = distance_frame(arr, metric)
    lab = _labellings(codes, permutations, seed, observed=True)
    sums = TileSums(permutations + 1)
    for t in upper_tiles(len(arr), int(tile)):
        sums.add(*permanova_tile(arr, frame, t, metric, sizes, lab))
    f = tile_pseudo_f(*sums.sums(), sizes)
    statistic, null = float(f[0]), f[1:]
    p = p_value(statistic, null) if permutations else float("nan")
    return PermanovaResult(statistic=statistic, p_value=p, permutations=permutations, null=null,
                           n_samples=len(arr), n_groups=len(sizes),
                           r2=r_squared(statistic, len(arr), len(sizes)), groups=tuple(groups))


def tile_args(X: np.ndarray, metric: str, tile: int) -> np.ndarray:
    """X as an (N, D) array, after checking the metric and the tile size of a tiles route
    (ValueError naming the bad value)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X must be a real (N, D) feature matrix, got shape {arr.shape}")
    return arr
