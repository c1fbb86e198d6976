"""PERMANOVA (Anderson 2001): pseudo-F of a grouping on a distance matrix, p by label permutation.

Definitions are scikit-bio's `permanova`: with N objects in a groups of sizes n_g,
    s_T = sum_{i<j} d_ij^2 / N,   s_W = sum_g sum_{i<j in g} d_ij^2 / n_g,   s_A = s_T - s_W,
    F = (s_A / (a - 1)) / (s_W / (N - a)),   p = (1 + #{F_b >= F}) / (1 + B),
and the effect size R^2 = s_A / s_T (vegan adonis2's R2). Labels of any types are grouped by
value (`factorize`); a group of one member is allowed (with a warning) and adds 0 to s_W.

Only s_W changes under relabelling. It is the sum over groups of their n_g (n_g - 1) / 2 within-
group squared distances: sum_g n_g^2 / 2 reads per permutation instead of a pass over all N^2 / 2
pairs (one-hot GEMMs cost N^2 a). A numba kernel gathers them row by row for a slice of
permutations at once, so one distance row in L1 cache serves every permutation of the slice;
slices run in parallel. Permutations are Fisher-Yates shuffles of the label codes driven by
uniforms drawn in bulk from one numpy Generator (reproducible for any thread count).
numba is used because this gather is several times faster than vectorized numpy, whose fancy
indexing materialises every gathered block (see benchmarks/bench_core.py).

Three routes give the same test (same seed: the same permutations, by the one shuffle
`_shuffled`):

* `permanova(D, ...)`: on a distance matrix (N, N).
* `permanova_features(X, ...)`: Euclidean distances of features X, without D (O(N r)).
* `permanova_tiles(X, ..., metric=...)` (`distsim.stats.permanova_tiled`): any metric, summed
  over the upper tiles of D, one tile of distances at a time.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numba
import numpy as np
import scipy.linalg

from distsim.stats.backend import resolve
from distsim.stats.permutation import SeedLike, p_value

_CHUNK = 1024  # permutations drawn at a time: (1024, N - 1) float64 uniforms
_SLICE = 128  # permutations per parallel slice; one distance row serves all of them
_SLICE_F = 16  # permutations per slice of the features route: (16, a, r) group sums


@dataclass(frozen=True)
class PermanovaResult:
    """Outcome of `permanova` (and of `permdisp`): the F statistic, its permutation p-value, the
    (B,) null F, and r2 = SS_between / SS_total of the observed grouping (adonis2's R^2)."""

    statistic: float
    p_value: float
    permutations: int
    null: np.ndarray = field(repr=False)
    n_samples: int
    n_groups: int
    method: str = "permanova"
    r2: float = float("nan")
    groups: tuple[Any, ...] = ()  # the group labels in code order (code g is groups[g])
    extra: dict[str, Any] = field(default_factory=dict)


def r_squared(statistic: float, n: int, a: int) -> float:
    """R^2 = SS_A / SS_T of a one-way (pseudo-)F on n objects in a groups, from F alone:
    F = (R^2 / (a - 1)) / ((1 - R^2) / (n - a))  <=>  R^2 = F (a - 1) / (F (a - 1) + n - a).

    >>> round(r_squared(300.0, n=8, a=2), 4)  # 200 of a total 204 between the groups
    0.9804
    """
    f = float(statistic)
    if np.isnan(f):
        return float("nan")
    if np.isinf(f):
        return 1.0 if f > 0 else float("nan")
    return f * (a - 1) / (f * (a - 1) + (n - a))


def _validate(D: np.ndarray, labels: Sequence | np.ndarray
              ) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """Check D (N, N) and labels (N,) -> (float64 D, groups, integer codes (N,) in 0..a-1)."""
    arr = _distance_matrix(D)
    return (arr, *_grouping(labels, len(arr), "D"))


def _distance_matrix(D: np.ndarray) -> np.ndarray:
    """D (N, N) checked (real, finite, symmetric, zero diagonal) as a float64 array."""
    arr = np.asarray(D)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"D must be a real numeric distance matrix, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"D must be a square (N, N) distance matrix, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("D contains NaN or infinite values")
    tol = 1e-8 * float(np.abs(arr).max(initial=0.0))
    if np.abs(np.diagonal(arr)).max(initial=0.0) > tol:
        raise ValueError("D must have a zero diagonal (the distance of an object to itself)")
    if np.abs(arr - arr.T).max(initial=0.0) > tol:
        raise ValueError("D must be symmetric (D[i, j] == D[j, i])")
    return arr


def _sort_groups(groups: list[Any]) -> list[Any]:
    """Distinct labels in a deterministic order: sorted when they compare (the order np.unique
    gives), else by type name, then sorted within a type (by repr when even that fails)."""
    try:
        return sorted(groups)
    except TypeError:
        by_type: dict[str, list[Any]] = {}
        for g in groups:
            by_type.setdefault(type(g).__name__, []).append(g)
        out = []
        for name in sorted(by_type):
            try:
                out += sorted(by_type[name])
            except TypeError:
                out += sorted(by_type[name], key=repr)
        return out


def factorize(labels: Sequence | np.ndarray, n: int, what: str = "labels"
              ) -> tuple[list[Any], np.ndarray]:
    """(groups, codes): the distinct labels in a deterministic order and the integer group code
    (N,) int64 in 0..a-1 of each of labels (N,), grouped by equality of value (as dict keys: 42
    and 42.0 are one label, 42 and '42' two; labels of mixed types work). Every route numbers
    the groups this way, so they shuffle the same codes and draw the same permutations.

    >>> groups, codes = factorize(["b", "a", "b", 42, 42.0], 5)
    >>> groups, codes.tolist()
    ([42, 'a', 'b'], [2, 1, 2, 0, 0])
    """
    lab = labels if isinstance(labels, np.ndarray) else np.asarray(labels, dtype=object)
    if lab.ndim != 1 or len(lab) != n:
        raise ValueError(
            f"labels must be 1-D with one label per row of {what} ({n}), got shape {lab.shape}"
        )
    values = lab.tolist()  # Python objects: np.asarray(['z', 42]) would make 42 into '42'
    first: dict[Any, int] = {}
    for v in values:
        if v != v:  # NaN (a float or numpy NaN): equal to nothing, not even itself
            raise ValueError(f"labels must not contain NaN, got {v!r}")
        first.setdefault(v, len(first))
    groups = _sort_groups(list(first))
    rank = {g: i for i, g in enumerate(groups)}
    codes = np.fromiter((rank[v] for v in values), dtype=np.int64, count=len(values))
    return groups, codes


def _grouping(labels: Sequence | np.ndarray, n: int, what: str, test: str = "PERMANOVA"
              ) -> tuple[list[Any], np.ndarray]:
    """(groups, integer codes (N,) in 0..a-1) of labels (N,) (`factorize`): at least 2 groups and
    at least one group of 2 or more members (some within-group variation). Groups of one member
    are allowed, as in vegan and scikit-bio, with a UserWarning naming them: in PERMANOVA they
    add nothing to the within-group sum."""
    groups, codes = factorize(labels, n, what)
    if len(groups) < 2:
        raise ValueError(f"{test} needs at least 2 groups, got {len(groups)}: {groups}")
    sizes = np.bincount(codes, minlength=len(groups))
    if sizes.max() < 2:
        raise ValueError(f"every group has a single member ({len(groups)} groups of 1 among "
                         f"{n} objects): no within-group variation to test against")
    if sizes.min() < 2:
        small = [groups[g] for g in np.flatnonzero(sizes < 2)]
        warnings.warn(f"{test}: groups of a single member (no within-group variation of their "
                      f"own): {small}", UserWarning, stacklevel=_caller_level())
    return groups, codes


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside distsim.stats, as seen from the
    function that calls this one: warnings point at the user's call, whatever the route."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


def _check_permutations(permutations: int) -> int:
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)):
        raise TypeError(f"permutations must be an integer, got {permutations!r}")
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    return int(permutations)


@numba.njit(cache=True)
def _within_ss(d2: np.ndarray, labels: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """out[b] = s_W of grouping labels[:, b], for d2 (N, N) squared distances, labels (N, m)
    int32 sample-major, offsets (a+1,) group starts (sizes n_g = offsets[g+1] - offsets[g]).

    Rows go from last to first; each (permutation, group) keeps the members seen so far (all of
    larger index) in its slot buf[b, offsets[g]:...], so row i adds sum_{j > i in its group}
    d2[i, j] as a gather from one row, which stays in L1 cache for all m permutations.
    """
    n, m = labels.shape
    a = offsets.shape[0] - 1
    count = np.zeros((m, a), np.int64)
    buf = np.empty((m, n), np.int32)
    acc = np.zeros((m, a))
    for i in range(n - 1, -1, -1):
        row = d2[i]
        for b in range(m):
            g = labels[i, b]
            start = offsets[g]
            c = count[b, g]
            s = 0.0
            for k in range(start, start + c):
                s += row[buf[b, k]]
            acc[b, g] += s
            buf[b, start + c] = i
            count[b, g] = c + 1
    for b in range(m):
        total = 0.0
        for g in range(a):
            total += acc[b, g] / (offsets[g + 1] - offsets[g])
        out[b] = total


@numba.njit(cache=True)
def _shuffled(codes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(N, m) int32: codes (N,) shuffled by Fisher-Yates with each row of uniforms u (m, N-1),
    swapping k <-> floor(u[b, k-1] (k+1)) for k = N-1..1. Every route's kernels use it, so they
    draw the same permutations from the same uniforms."""
    n, m = codes.shape[0], u.shape[0]
    labels = np.empty((n, m), np.int32)
    for b in range(m):
        perm = codes.copy()
        for k in range(n - 1, 0, -1):
            j = int(u[b, k - 1] * (k + 1))
            perm[k], perm[j] = perm[j], perm[k]
        labels[:, b] = perm
    return labels


@numba.njit(parallel=True, cache=True)
def _null_within_ss(
    d2: np.ndarray, codes: np.ndarray, offsets: np.ndarray, u: np.ndarray, out: np.ndarray
) -> None:
    """out[b] = s_W of codes (N,) int32 shuffled by Fisher-Yates with uniforms u[b] (N-1,).

    Swap k <-> floor(u[b, k-1] (k+1)) for k = N-1..1: uniform permutations up to the 2^-53
    granularity of u. Slices of _SLICE permutations run in parallel.
    """
    n_perm = u.shape[0]
    n_slices = (n_perm + _SLICE - 1) // _SLICE
    for t in numba.prange(n_slices):
        b0 = t * _SLICE
        m = min(n_perm, b0 + _SLICE) - b0
        labels = _shuffled(codes, u[b0 : b0 + m])
        _within_ss(d2, labels, offsets, out[b0 : b0 + m])


class _Design:
    """What stays fixed over permutations: squared distances, s_T, group codes and offsets."""

    def __init__(self, D: np.ndarray, labels: Sequence | np.ndarray) -> None:
        d, self.groups, codes = _validate(D, labels)
        self.n = len(d)
        self.d2 = d * d
        np.fill_diagonal(self.d2, 0.0)
        self.s_t = float(np.triu(self.d2, 1).sum()) / self.n
        sizes = np.bincount(codes, minlength=len(self.groups))
        self.n_groups = len(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.codes = codes.astype(np.int32)

    def pseudo_f(self, s_w: np.ndarray) -> np.ndarray:
        """(B,) pseudo-F from (B,) within-group sums s_W."""
        s_a = self.s_t - s_w
        return (s_a / (self.n_groups - 1)) / (s_w / (self.n - self.n_groups))

    def observed(self) -> float:
        s_w = np.empty(1)
        _within_ss(self.d2, self.codes[:, None].copy(), self.offsets, s_w)
        return float(self.pseudo_f(s_w)[0])

    def null(self, permutations: int, seed: SeedLike) -> np.ndarray:
        """(permutations,) pseudo-F under uniformly random relabellings, seeded."""
        rng = np.random.default_rng(seed)
        s_w = np.empty(permutations)
        for start in range(0, permutations, _CHUNK):
            b = min(_CHUNK, permutations - start)
            u = rng.random((b, self.n - 1))
            _null_within_ss(self.d2, self.codes, self.offsets, u, s_w[start : start + b])
        return self.pseudo_f(s_w)


def permanova_null_chunk(
    D: np.ndarray, labels: Sequence | np.ndarray, permutations: int, seed: SeedLike
) -> np.ndarray:
    """Null pseudo-F of `permutations` random relabellings -> (permutations,) float64.

    For spreading one test over tasks: chunks with different seeds (e.g. seed=(study_seed, i))
    concatenate into one null; pass it with the observed F (`permanova(D, labels,
    permutations=0).statistic`) to `p_value`.

    >>> from distsim.stats.distances import pairwise_distances
    >>> from distsim.stats.permutation import p_value
    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]])
    >>> D, labels = pairwise_distances(X), list("aaaabbbb")
    >>> null = np.concatenate([permanova_null_chunk(D, labels, 500, seed=(0, i))
    ...                        for i in range(2)])  # two chunks: one null of 1000
    >>> f = permanova(D, labels, permutations=0).statistic
    >>> round(f, 3), null.shape, p_value(f, null) < 0.05
    (300.0, (1000,), True)
    """
    return _Design(D, labels).null(_check_permutations(permutations), seed)


def permanova(
    D: np.ndarray, labels: Sequence | np.ndarray, permutations: int = 999, seed: SeedLike = 0
) -> PermanovaResult:
    """PERMANOVA of a grouping (N,) on a distance matrix (N, N), scikit-bio's definitions.

    r2 = SS_A / SS_T (vegan adonis2's R^2). p_value is NaN when permutations is 0.

    Two unit squares 10 apart: the tasks explain 200 of the 204 of total spread; 2 of the
    70 splits of 8 objects into two groups of 4 are as extreme, so p is near 2/70:

    >>> from distsim.stats.distances import pairwise_distances
    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]])
    >>> res = permanova(pairwise_distances(X), list("aaaabbbb"), permutations=999, seed=0)
    >>> round(res.statistic, 3), round(res.r2, 4), res.p_value, res.groups
    (300.0, 0.9804, 0.028, ('a', 'b'))
    """
    permutations = _check_permutations(permutations)
    design = _Design(D, labels)
    statistic = design.observed()
    null = design.null(permutations, seed)
    p = p_value(statistic, null) if permutations else float("nan")
    return PermanovaResult(
        statistic=statistic,
        p_value=p,
        permutations=permutations,
        null=null,
        n_samples=design.n,
        n_groups=design.n_groups,
        r2=r_squared(statistic, design.n, design.n_groups),
        groups=tuple(design.groups),
    )


# ------------------------------------------------------------------ Euclidean, without D
# For Euclidean distances PERMANOVA needs no distance matrix. With Y the centred features,
#     s_T = sum_i ||y_i||^2,   s_W = s_T - sum_g ||S_g||^2 / n_g   (S_g = sum of group g's rows),
# the textbook identity sum_{i<j in g} ||y_i - y_j||^2 / n_g = sum_{i in g} ||y_i - mean_g||^2.
# A relabelling only moves rows between the S_g: O(N r) per permutation (r = columns of Y,
# at most N - 1 in the pivoted Cholesky basis), and O(N r) memory.


@numba.njit(parallel=True, cache=True)
def _null_between(
    Y: np.ndarray, codes: np.ndarray, sizes: np.ndarray, u: np.ndarray, out: np.ndarray
) -> None:
    """out[b] = sum_g ||S_g||^2 / n_g for codes (N,) shuffled by Fisher-Yates with u[b] (N-1,),
    the same shuffle as _null_within_ss; Y (N, r) float64. Slices of _SLICE_F permutations run
    in parallel; within a slice each row of Y is read once and added to every permutation's
    group sum (the row stays in L1 cache)."""
    n, r = Y.shape
    a = sizes.shape[0]
    n_perm = u.shape[0]
    n_slices = (n_perm + _SLICE_F - 1) // _SLICE_F
    for t in numba.prange(n_slices):
        b0 = t * _SLICE_F
        m = min(n_perm, b0 + _SLICE_F) - b0
        labels = _shuffled(codes, u[b0 : b0 + m])
        sums = np.zeros((m, a, r))
        for i in range(n):
            row = Y[i]
            for b in range(m):
                acc = sums[b, labels[i, b]]
                for c in range(r):
                    acc[c] += row[c]
        for b in range(m):
            total = 0.0
            for g in range(a):
                sq = 0.0
                for c in range(r):
                    sq += sums[b, g, c] * sums[b, g, c]
                total += sq / sizes[g]
            out[b0 + b] = total


def _feature_matrix(X: np.ndarray) -> np.ndarray:
    """X as an array, checked to be a real (N, D) feature matrix (the features routes' input)."""
    arr = np.asarray(X)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating)
                             or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"X must be a real (N, D) feature matrix, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    return arr


def euclidean_basis(X: np.ndarray) -> np.ndarray:
    """Centred X (N, D) float64 in at most min(N, D) columns with the same pairwise Euclidean
    distances (N, r): the centred X itself when D <= N, else the pivoted Cholesky factor of its
    Gram (Y Y^T = L L^T: rows of L have Y's inner products, hence its distances), N^3 / 3 flops
    where a thin SVD costs several N^2 D. Computing it once lets chunks of one test share it.

    >>> Y = euclidean_basis(np.array([[0.0, 0, 0], [2, 0, 0]]))  # D = 3 > N = 2: rank 1
    >>> Y.round(6).tolist()  # the two rows are still 2 apart
    [[1.0], [-1.0]]
    """
    Y = X - X.mean(axis=0)
    n, d = Y.shape
    if d <= n:
        return np.ascontiguousarray(Y)
    # LAPACK's pstrf (complete pivoting) stops at the numerical rank: the centred Gram is singular
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(Y @ Y.T, lower=1)
    if info < 0:
        raise RuntimeError(f"pivoted Cholesky failed (LAPACK dpstrf info={info})")
    basis = np.empty((n, rank))
    basis[piv - 1] = np.tril(c)[:, :rank]
    return basis


def permanova_features(
    X: np.ndarray, labels: Sequence | np.ndarray, permutations: int = 999, seed: SeedLike = 0,
    backend: str = "numpy",
) -> PermanovaResult:
    """PERMANOVA of a grouping (N,) on the Euclidean distances of features X (N, D), without
    the distance matrix: O(N r) time per permutation and O(N r) memory, r <= min(N - 1, D).

    Equals ``permanova(pairwise_distances(X), labels, permutations, seed)``: the same
    permutations (same seed, same shuffle), pseudo-F to float rounding (1e-9 relative).
    ``backend`` (distsim.stats.backend): "torch" sums the permuted groups on the torch device
    (distsim.stats.anova_torch), the same permutations, in float64.

    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]])
    >>> res = permanova_features(X, list("aaaabbbb"), permutations=999, seed=0)
    >>> round(res.statistic, 3), round(res.r2, 4), res.p_value  # as permanova's example
    (300.0, 0.9804, 0.028)
    """
    permutations = _check_permutations(permutations)
    arr = _feature_matrix(X)
    Y = euclidean_basis(np.asarray(arr, dtype=np.float64))
    if not np.isfinite(Y).all():
        raise ValueError("X contains NaN or infinite values")
    groups, codes64 = _grouping(labels, len(Y), "X")
    codes = codes64.astype(np.int32)
    n, sizes = len(Y), np.bincount(codes, minlength=len(groups)).astype(np.int64)
    a = len(sizes)
    s_t = float((Y * Y).sum())

    def pseudo_f(between: np.ndarray) -> np.ndarray:
        s_w = s_t - between
        return ((s_t - s_w) / (a - 1)) / (s_w / (n - a))

    S = np.zeros((a, Y.shape[1]))
    np.add.at(S, codes, Y)  # (a, r) the groups' row sums
    statistic = float(pseudo_f(np.array([((S * S).sum(axis=1) / sizes).sum()]))[0])
    if resolve(backend) == "torch" and permutations:
        from distsim.stats.anova_torch import permanova_between

        kernel = permanova_between(Y, codes, sizes)
    else:
        kernel = functools.partial(_null_between, Y, codes, sizes)
    rng = np.random.default_rng(seed)
    between = np.empty(permutations)
    for start in range(0, permutations, _CHUNK):
        b = min(_CHUNK, permutations - start)
        kernel(rng.random((b, n - 1)), between[start : start + b])
    null = pseudo_f(between)
    p = p_value(statistic, null) if permutations else float("nan")
    return PermanovaResult(statistic=statistic, p_value=p, permutations=permutations, null=null,
                           n_samples=n, n_groups=a, r2=r_squared(statistic, n, a),
                           groups=tuple(groups))
