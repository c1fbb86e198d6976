"""All-pairs distances between feature vectors: blocked float32 GEMM with exact close pairs.

Squared Euclidean distances come from d2 = |x|^2 + |y|^2 - 2 x.y computed by a float32 GEMM on
vectors centred by a shared mean (distances do not change under translation, and centring
removes the large common offset that weight features share). The GEMM formula loses precision
when x and y are close compared with their norms (at 1e-3 of the norm apart: 100% error), so a
pair whose d2 is below TAU32 * (|x|^2 + |y|^2) is recomputed: directly as sum((x - y)^2) in
float64 (numba kernel) when such pairs are sparse in the block, as with clustered features, or
by a float64 GEMM on the rows and columns that hold them when they are dense (then pairs still
below TAU64 * (...) in float64 are computed directly). Measured float32 GEMM error on close
pairs with OpenBLAS: |error(d2)| <= 9 u32 (|x|^2 + |y|^2) for D from 8 to 20000; the thresholds
assume 16 u, which keeps the relative error of d2 below 5e-5 (of d below 2.5e-5) for every pair;
measured errors are ~1e-7 (benchmarks/bench_core.py prints one).

Cosine distance is 1 - cos(x, y) = |x/|x| - y/|y||^2 / 2: the same computation on unit vectors.

Top-k neighbours (`topk_neighbors`) stream over blocks: each block gives per-row partial top-k
lists that merge (distsim.stats.neighbors), so no N x N matrix is held. Ties are broken by the
smaller index, so results are deterministic and equal to a stable sort of each full row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from distsim.config.choices import METRICS
from distsim.stats.neighbors import block_topk, merge_topk, tile_topk

DEFAULT_BLOCK = 1280  # rows per block: large GEMMs; diagonal blocks are split further
_MIN_TILE = 256

_U32 = float(np.finfo(np.float32).eps) / 2
_U64 = float(np.finfo(np.float64).eps) / 2
_GEMM_ERROR = 16.0  # assumed bound on |error(d2)| / (u (|x|^2 + |y|^2)); measured max ~9
_RTOL_D2 = 5e-5  # relative error of d2 we allow before recomputing a pair
TAU32 = _GEMM_ERROR * _U32 / _RTOL_D2  # ~0.095: float32 d2 below this fraction -> float64
TAU64 = _GEMM_ERROR * _U64 / _RTOL_D2  # ~1.8e-10: float64 d2 below this fraction -> direct

_DIRECT_COST = 4.0  # one direct pair ~ 4 float64-GEMM pairs (numba kernel vs dgemm, D=2048)


@dataclass(frozen=True)
class _Prepared:
    """Rows ready for the GEMM: the float32 input rows x (with 1/|x| scales for cosine), the
    centred float32 rows z, float64 squared norms of z, and the shared centre (float64, (D,))."""

    x: np.ndarray  # (n, D) float32 input
    scale: np.ndarray | None  # (n,) float64 1/|x| for cosine, None for euclidean
    z: np.ndarray  # (n, D) float32, (x * scale) - centre rounded to float32
    sq: np.ndarray  # (n,) float64, |z|^2
    centre: np.ndarray  # (D,) float64

    def exact(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float64 rows (unit rows for cosine), before centring."""
        out = self.x[rows].astype(np.float64)
        if self.scale is not None:
            out *= self.scale[rows, None]
        return out


def _validate(X: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(X)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _require_finite(values: np.ndarray, *named: tuple[np.ndarray | None, str]) -> None:
    """Raise naming the input with NaN/inf when derived `values` (norms, centre) are not finite."""
    if np.isfinite(values).all():
        return
    for arr, name in named:
        if arr is not None and not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values (in float32)")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _unit_scale(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.sqrt(_sq_norms(x))
    _require_finite(norms, (x, name))
    if np.any(norms == 0):
        raise ValueError(f"{name} has all-zero rows; cosine distance is undefined for them")
    return 1.0 / norms


def _sq_norms(z: np.ndarray) -> np.ndarray:
    """(n,) float64 squared norms of the rows of a float32 (n, D) matrix."""
    out = np.empty(len(z))
    step = max(1, (1 << 16) // z.shape[1])  # chunks of 64k values stay in cache
    for s in range(0, len(z), step):
        chunk = z[s : s + step].astype(np.float64)
        out[s : s + step] = np.einsum("ij,ij->i", chunk, chunk)
    return out


def _prepare(x: np.ndarray, scale: np.ndarray | None, centre: np.ndarray) -> _Prepared:
    """Centre (and for cosine, unit-scale) the rows in float32 chunks, with float64 norms.

    Subtracting the same float32 centre from every row is a translation: distances between the
    float32 rows z are those of x up to one rounding per coordinate.
    """
    c32 = centre.astype(np.float32)
    s32 = None if scale is None else scale.astype(np.float32)
    z = np.empty_like(x)
    sq = np.empty(len(x))
    step = max(1, (1 << 16) // x.shape[1])
    for s in range(0, len(x), step):
        rows = slice(s, s + step)
        if s32 is None:
            np.subtract(x[rows], c32, out=z[rows])
        else:
            np.multiply(x[rows], s32[rows, None], out=z[rows])
            z[rows] -= c32
        chunk = z[rows].astype(np.float64)
        sq[rows] = np.einsum("ij,ij->i", chunk, chunk)
    return _Prepared(x=x, scale=scale, z=z, sq=sq, centre=centre)


def _centre(pairs: list[tuple[np.ndarray, np.ndarray | None]], dim: int) -> np.ndarray:
    """(D,) float64 holding a float32 mean of all rows (unit rows for cosine).

    It is float32 so that refinement subtracts exactly what the GEMM rows subtracted.
    """
    count = max(1, sum(len(arr) for arr, _ in pairs))
    total: np.ndarray = np.zeros(dim, np.float32)
    for arr, s in pairs:
        total += s.astype(np.float32) @ arr if s is not None else arr.sum(axis=0)
    if not np.isfinite(total).all():  # float32 overflow (or NaN/inf input): sum in float64
        total = np.zeros(dim)
        for arr, s in pairs:
            total += s @ arr if s is not None else arr.sum(axis=0, dtype=np.float64)
    return (total / count).astype(np.float32).astype(np.float64)


Frame = tuple[np.ndarray, float]  # (centre (D,) float64, unit): see distance_frame


def _prepare_pair(
    X: np.ndarray, Y: np.ndarray | None, metric: str, frame: Frame | None = None
) -> tuple[_Prepared, _Prepared | None, float]:
    """Validate and prepare X (and Y) with one shared centre, the mean of all rows.

    Returns the prepared rows and `unit`, a power of two the euclidean rows were divided by
    (exactly) when their norms would overflow or underflow float32 squares; distances computed
    from the prepared rows are multiplied by it. A given `frame` (centre, unit) replaces both.
    """
    _check_metric(metric)
    x = _validate(X, "X")
    y = None if Y is None else _validate(Y, "Y")
    if y is not None and y.shape[1] != x.shape[1]:
        raise ValueError(
            f"X and Y must have the same number of features, got {x.shape[1]} and {y.shape[1]}"
        )
    sx = _unit_scale(x, "X") if metric == "cosine" else None
    sy = _unit_scale(y, "Y") if (metric == "cosine" and y is not None) else None
    if frame is not None:
        return _prepare_in(frame, x, sx, y, sy)
    unit = 1.0
    for _ in range(2):  # a second pass only after rescaling extreme magnitudes
        pairs = [(arr, s) for arr, s in ((x, sx), (y, sy)) if arr is not None and len(arr)]
        centre = _centre(pairs, x.shape[1])
        px = _prepare(x, sx, centre)
        py = None if y is None else _prepare(y, sy, centre)
        for p in (px, py):
            if p is not None:
                _require_finite(p.sq, (x, "X"), (y, "Y"))
        top = max(float(p.sq.max(initial=0.0)) for p in (px, py) if p is not None)
        if metric == "cosine" or top == 0.0 or 2.0**-60 < top < 2.0**60 or unit != 1.0:
            return px, py, unit
        unit = 2.0 ** np.floor(np.log2(top) / 2)  # rows / unit have norms near 1
        x = (x / unit).astype(np.float32)  # float64 division by a power of two: exact
        y = None if y is None else (y / unit).astype(np.float32)
    raise AssertionError("unreachable")


def _prepare_in(frame: Frame, x: np.ndarray, sx: np.ndarray | None, y: np.ndarray | None,
                sy: np.ndarray | None) -> tuple[_Prepared, _Prepared | None, float]:
    """Prepare x (and y) with a given frame (centre, unit), as _prepare_pair on all rows did."""
    centre = np.asarray(frame[0], dtype=np.float64)
    unit = float(frame[1])
    if centre.shape != (x.shape[1],) or not np.isfinite(centre).all():
        raise ValueError(f"frame centre must be a finite ({x.shape[1]},) vector, got shape "
                         f"{centre.shape}")
    if not (unit > 0 and np.isfinite(unit)) or np.frexp(unit)[0] != 0.5:
        raise ValueError(f"frame unit must be a positive power of two, got {unit!r}")
    if unit != 1.0:  # float64 division by a power of two: exact, as in _prepare_pair
        x = (x / unit).astype(np.float32)
        y = None if y is None else (y / unit).astype(np.float32)
    px = _prepare(x, sx, centre)
    py = None if y is None else _prepare(y, sy, centre)
    for p in (px, py):
        if p is not None:
            _require_finite(p.sq, (x, "X"), (y, "Y"))
    return px, py, unit


def distance_frame(X: np.ndarray, metric: str = "euclidean") -> Frame:
    """The frame `pairwise_distances(X, metric=metric)` computes every distance in: the shared
    centre (D,) float64 of all rows (unit rows for cosine) and the power-of-two `unit` extreme
    euclidean rows are divided by (1.0 otherwise). O(N D) time, one pass.

    ``distance_block(X[I], X[J], metric, frame=distance_frame(X, metric))`` then gives the
    block (I, J) of ``pairwise_distances(X, metric=metric)``, whatever the tiling (bitwise for
    the same tiles; the BLAS may round a differently shaped GEMM in another last bit).

    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    >>> centre, unit = distance_frame(X)
    >>> centre.tolist(), unit
    ([3.0, 4.0], 1.0)
    """
    a, _, unit = _prepare_pair(X, None, metric)
    return a.centre, unit


def _rows(p: _Prepared, sl: slice) -> _Prepared:
    scale = None if p.scale is None else p.scale[sl]
    return _Prepared(x=p.x[sl], scale=scale, z=p.z[sl], sq=p.sq[sl], centre=p.centre)


@numba.njit(parallel=True, fastmath={"reassoc"}, cache=True)  # no FMA: x - x == 0
def _direct_sq(
    xa: np.ndarray, sa: np.ndarray, xb: np.ndarray, sb: np.ndarray, ri: np.ndarray, ci: np.ndarray
) -> np.ndarray:
    """(P,) float64 |xa[i] sa[i] - xb[j] sb[j]|^2 for the pairs (i, j) = (ri[p], ci[p]).

    xa (n_a, D), xb (n_b, D) float32 rows; sa (n_a,), sb (n_b,) float64 row scales.
    """
    out = np.empty(ri.shape[0])
    for p in numba.prange(ri.shape[0]):
        i, j = ri[p], ci[p]
        s1, s2 = sa[i], sb[j]
        acc = 0.0
        for k in range(xa.shape[1]):
            d = xa[i, k] * s1 - xb[j, k] * s2
            acc += d * d
        out[p] = acc
    return out


def _direct(a: _Prepared, b: _Prepared, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
    """(P,) float64 squared distances of the pairs (a rows ri, b rows ci), computed directly."""
    sa = np.ones(len(a.x)) if a.scale is None else a.scale
    sb = np.ones(len(b.x)) if b.scale is None else b.scale
    return _direct_sq(a.x, sa, b.x, sb, ri.astype(np.int64), ci.astype(np.int64))


def _refined(ri: np.ndarray, ci: np.ndarray, a: _Prepared, b: _Prepared) -> np.ndarray:
    """(P,) float64 squared distances of the close pairs (a rows ri, b rows ci), recomputed.

    Few close pairs (clustered data): each directly as sum((x - y)^2). Many (a dense patch):
    a float64 GEMM on the rows and columns that hold them, and directly only the pairs still
    close in float64. A direct pair costs about _DIRECT_COST float64 GEMM pairs (measured).
    """
    rows, cols = np.unique(ri), np.unique(ci)
    if len(ri) * _DIRECT_COST < len(rows) * len(cols):
        return _direct(a, b, ri, ci)
    za = a.exact(rows) - a.centre
    zb = b.exact(cols) - b.centre
    sqa = np.einsum("ij,ij->i", za, za)
    sqb = np.einsum("ij,ij->i", zb, zb)
    li, lj = np.searchsorted(rows, ri), np.searchsorted(cols, ci)  # the pairs in the patch
    out = sqa[li] + sqb[lj] - 2.0 * (za @ zb.T)[li, lj]
    still = np.flatnonzero(out < TAU64 * (sqa[li] + sqb[lj]))
    out[still] = _direct(a, b, ri[still], ci[still])
    return out


def _gemm_sq(a: _Prepared, b: _Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The float32 GEMM part of a block: d2 = |z_a|^2 + |z_b|^2 - 2 z_a z_b^T (n_a, n_b) and
    the mask of its pairs below TAU32 of |z_a|^2 + |z_b|^2 (to recompute)."""
    d2 = a.z @ b.z.T
    d2 *= -2.0
    limit = np.add.outer(a.sq.astype(np.float32), b.sq.astype(np.float32))
    d2 += limit
    limit *= np.float32(TAU32)
    return d2, d2 < limit


def _sq_block(a: _Prepared, b: _Prepared, diagonal: bool, backend: str = "numpy") -> np.ndarray:
    """(n_a, n_b) float32 squared distances (halved for cosine: 1 - cos) of a block; backend
    "torch": the same steps on the torch device (distsim.stats.tiles_torch)."""
    if backend == "torch":
        from distsim.stats.tiles_torch import sq_block

        return sq_block(a, b, diagonal).cpu().numpy()
    d2, close = _gemm_sq(a, b)
    if diagonal:
        np.fill_diagonal(close, False)
    if close.any():
        ri, ci = np.nonzero(close)
        d2[ri, ci] = _refined(ri, ci, a, b)
    np.maximum(d2, 0.0, out=d2)
    if diagonal:  # symmetric: the refinement may round (i, j) and (j, i) apart, as may a GEMM
        lower = np.tril_indices(len(d2), -1)
        d2[lower] = d2.T[lower]
        np.fill_diagonal(d2, 0.0)
    return d2


def _finish(d2: np.ndarray, metric: str, unit: float = 1.0) -> np.ndarray:
    """Squared distances of prepared rows -> distances, in place."""
    if metric == "euclidean":
        np.sqrt(d2, out=d2)
        if unit != 1.0:
            d2 *= np.float32(unit)
        return d2
    d2 *= 0.5
    return d2


def _edges(n: int, block: int) -> list[int]:
    """Boundaries of ceil(n / block) balanced blocks of [0, n)."""
    size = -(-n // max(1, -(-n // block)))
    return [*range(0, n, size), n] if n else [0]


def upper_tiles(n: int, block: int = DEFAULT_BLOCK) -> list[tuple[int, int, int, int]]:
    """Tiles (i0, i1, j0, j1), i0 <= j0, covering the upper triangle of an (n, n) matrix once.

    Off-diagonal tiles are balanced blocks of at most `block` rows; a diagonal tile is split in
    halves (one off-diagonal tile and two smaller diagonal tiles) down to _MIN_TILE rows, so
    that little below the diagonal is computed twice. A tile with i0 == j0 is a diagonal block.

    >>> upper_tiles(3, block=2)
    [(0, 2, 0, 2), (0, 2, 2, 3), (2, 3, 2, 3)]
    """
    block = _check_block(block)
    edges = _edges(n, block)
    tiles: list[tuple[int, int, int, int]] = []

    def diagonal(lo: int, hi: int) -> None:
        if hi - lo <= _MIN_TILE:
            tiles.append((lo, hi, lo, hi))
            return
        mid = (lo + hi) // 2
        tiles.append((lo, mid, mid, hi))
        diagonal(lo, mid)
        diagonal(mid, hi)

    for bi in range(len(edges) - 1):
        diagonal(edges[bi], edges[bi + 1])
        for bj in range(bi + 1, len(edges) - 1):
            tiles.append((edges[bi], edges[bi + 1], edges[bj], edges[bj + 1]))
    return [t for t in tiles if t[1] > t[0]]


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    return int(block)


def distance_block(
    X_I: np.ndarray, X_J: np.ndarray | None = None, metric: str = "euclidean",
    frame: Frame | None = None, backend: str = "numpy",
) -> np.ndarray:
    """Distances of one block: (n_I, D) rows vs (n_J, D) rows -> (n_I, n_J) float32.

    X_J=None means a diagonal block (X_I against itself): symmetric with an exact zero diagonal.
    The pipeline runs blocks (I, J), I <= J, and mirrors the off-diagonal ones. The rows are
    centred on their own mean unless `frame` (`distance_frame` of the whole matrix) is given:
    then the block equals that of `pairwise_distances` of the whole matrix. ``backend``
    ("numpy", "torch" or "auto", distsim.stats.backend): where the GEMM runs; the close pairs
    are recomputed in float64 on the CPU either way, so the backends agree to the float32
    GEMM's rounding (d within 2.5e-5 relative, the bound above; measured ~1e-7).

    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    >>> distance_block(X[:1], X[1:], frame=distance_frame(X)).tolist()  # row 0 vs rows 1, 2
    [[5.0, 10.0]]
    >>> distance_block(X[:2]).tolist()  # a diagonal block
    [[0.0, 5.0], [5.0, 0.0]]
    """
    from distsim.stats.backend import resolve

    backend = resolve(backend)
    a, b, unit = _prepare_pair(X_I, X_J, metric, frame)
    if b is None:  # a diagonal block
        return _finish(_sq_block(a, a, True, backend), metric, unit)
    return _finish(_sq_block(a, b, False, backend), metric, unit)


def pairwise_distances(
    X: np.ndarray,
    Y: np.ndarray | None = None,
    metric: str = "euclidean",
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """All-pairs distances, (N, D) x (M, D) -> (N, M) float32 (Y=None: X vs X, (N, N)).

    Matches scipy.spatial.distance.cdist on the float32 values within 1e-5 relative, near-
    duplicates included. X vs X computes only the upper-triangle blocks and mirrors them.

    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    >>> pairwise_distances(X).tolist()
    [[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]]
    >>> pairwise_distances(X, X[:1]).tolist()  # (3, 1): every row against row 0
    [[0.0], [5.0], [10.0]]
    >>> U = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> pairwise_distances(U, metric="cosine").astype(float).round(3).tolist()  # 1 - cos
    [[0.0, 1.0, 0.293], [1.0, 0.0, 0.293], [0.293, 0.293, 0.0]]
    """
    block = _check_block(block)
    a, b, unit = _prepare_pair(X, Y, metric)
    n = len(a.x)
    if b is None:
        out = np.empty((n, n), dtype=np.float32)
        for i0, i1, j0, j1 in upper_tiles(n, block):
            d2 = _sq_block(_rows(a, slice(i0, i1)), _rows(a, slice(j0, j1)), i0 == j0)
            out[i0:i1, j0:j1] = d2
            if i0 != j0:
                out[j0:j1, i0:i1] = d2.T
        return _finish(out, metric, unit)
    out = np.empty((n, len(b.x)), dtype=np.float32)
    rows, cols = _edges(n, block), _edges(len(b.x), block)
    for i0, i1 in zip(rows[:-1], rows[1:], strict=True):
        for j0, j1 in zip(cols[:-1], cols[1:], strict=True):
            out[i0:i1, j0:j1] = _sq_block(_rows(a, slice(i0, i1)), _rows(b, slice(j0, j1)), False)
    return _finish(out, metric, unit)


# ---------------------------------------------------------------------------------------------
# top-k neighbours


def topk_neighbors(
    X: np.ndarray, k: int, metric: str = "euclidean", block: int = DEFAULT_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest other rows of every row of X (N, D) -> (indices (N, k) int64, distances (N, k)
    float32), nearest first, ties to the smaller index; streams over upper-triangle blocks.

    >>> idx, dist = topk_neighbors(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]), k=2)
    >>> idx.tolist()
    [[1, 2], [0, 2], [1, 0]]
    >>> dist.tolist()
    [[5.0, 10.0], [5.0, 5.0], [5.0, 10.0]]
    """
    block = _check_block(block)
    a, _, unit = _prepare_pair(X, None, metric)
    n = len(a.x)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an integer in [1, N-1] = [1, {n - 1}], got {k!r}")
    best_i = np.full((n, k), -1, dtype=np.int64)
    best_d = np.full((n, k), np.inf, dtype=np.float32)
    for i0, i1, j0, j1 in upper_tiles(n, block):
        bi, bj = slice(i0, i1), slice(j0, j1)
        d = _finish(_sq_block(_rows(a, bi), _rows(a, bj), diagonal=(i0 == j0)), metric, unit)
        if i0 == j0:
            pi, pd = block_topk(d, k, i0, j0)
        else:  # the rows' and the columns' lists in one pass
            (pi, pd), (qi, qd) = tile_topk(d, k, i0, j0)
            best_i[bj], best_d[bj] = merge_topk([best_i[bj], qi], [best_d[bj], qd], k)
        best_i[bi], best_d[bi] = merge_topk([best_i[bi], pi], [best_d[bi], pd], k)
    return best_i, best_d
