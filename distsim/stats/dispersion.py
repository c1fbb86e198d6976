"""PERMDISP (Anderson 2006; vegan `betadisper` + `permutest`): do the groups' dispersions differ?

PERMANOVA rejects when the groups differ in location *or* in spread; PERMDISP tests spread
alone, so the two together say which. Each object i of group g gets its distance z_i to its
group's centre (centroid, or spatial median) in the principal coordinates of D, and the
statistic is the one-way ANOVA F of z over the groups:
    F = (SS_B / (a - 1)) / (SS_W / (N - a)),   SS_B = sum_g n_g (zbar_g - zbar)^2,
    SS_W = sum_i e_i^2,   e_i = z_i - zbar_{g(i)}   (scikit-bio's `permdisp`, vegan's F).

Negative eigenvalues (D not Euclidean) are handled as vegan does: the squared distance to the
centre is the sum over the positive axes minus the sum over the negative ones, clipped at 0
(scikit-bio instead drops the negative axes; the two agree when D is Euclidean). For the
centroid no eigendecomposition is needed: in that (pseudo-)Euclidean embedding
    z_i^2 = (1 / n_g) sum_{k in g} d_ik^2 - (1 / (2 n_g^2)) sum_{k, l in g} d_kl^2,
an identity of any symmetric bilinear form. The spatial median (test="median") needs the
coordinates: principal coordinates by `scipy.linalg.eigh`, the median by the modified Weiszfeld
iteration of scikit-bio / hdmedians (absolute tolerance 1e-7), separately on the positive and
the negative axes, as vegan does.

Permutation scheme: vegan's `permutest.betadisper` (and Anderson's PERMDISP2), not
scikit-bio's. The distances z are computed once; the residuals e = z - zbar_g are permuted over
all objects and the F of the permuted residuals on the fixed grouping forms the null (ter Braak
1992). Location differences between the groups therefore never enter the null (scikit-bio
permutes the grouping and recomputes the centres, which mixes groups of different location).
A permutation costs O(N), after the O(N^2) (matrix) or O(N D) (features) distances. Both routes
shuffle 0..N-1 by the Fisher-Yates kernel `_shuffled` shared with `permanova`, from uniforms of
default_rng(seed), so the same seed gives the same permutations in both routes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import scipy.linalg
import scipy.sparse

from distsim.stats.backend import resolve
from distsim.stats.permutation import SeedLike, p_value
from distsim.stats.permutational_anova import (
    PermanovaResult,
    _check_permutations,
    _distance_matrix,
    _feature_matrix,
    _grouping,
    _shuffled,
    r_squared,
)

TESTS = ("centroid", "median")
_UNIFORMS = 1 << 23  # uniforms drawn at a time (64 MiB), whatever N: rows of (b, N - 1)
_NEGLIGIBLE = 1e-10  # residuals all below this times max z: none (as when every n_g is 2)
_ROWS = 4096  # feature rows converted to float64 at a time
_SLICE_D = 32  # permutations per parallel slice of the null: (N, 32) int32 shuffled indices
_EIG_TOL = 1e-12  # principal axes with |eigenvalue| below this times the largest are dropped


# ------------------------------------------------------------------ distances to the centres


def _centroid_distances(d: np.ndarray, codes: np.ndarray, a: int) -> np.ndarray:
    """(N,) distance of each object to its group centroid, from the distances d (N, N) alone:
    z_i^2 = mean_{k in g} d_ik^2 - sum_{k, l in g} d_kl^2 / (2 n_g^2), clipped at 0."""
    z2 = np.empty(len(d))
    for g in range(a):
        members = np.flatnonzero(codes == g)
        block = d[np.ix_(members, members)] ** 2  # (n_g, n_g)
        rows = block.sum(axis=1)
        z2[members] = rows / len(members) - rows.sum() / (2.0 * len(members) ** 2)
    return np.sqrt(np.maximum(z2, 0.0))


def _principal_coordinates(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal coordinates of d (N, N): (positive-axes (N, p), negative-axes (N, q)), with
    d_ij^2 = ||pos_i - pos_j||^2 - ||neg_i - neg_j||^2 (Gower centring, then eigh)."""
    d2 = d * d
    gower = -0.5 * (d2 - d2.mean(axis=0) - d2.mean(axis=1)[:, None] + d2.mean())
    lam, vec = scipy.linalg.eigh(gower)
    keep = np.abs(lam) > _EIG_TOL * np.abs(lam).max(initial=0.0)
    coords = vec[:, keep] * np.sqrt(np.abs(lam[keep]))
    positive = lam[keep] > 0
    return coords[:, positive], coords[:, ~positive]


def geometric_median(X: np.ndarray, eps: float = 1e-7, maxiters: int = 500) -> np.ndarray:
    """Spatial (geometric) median (p,) of the rows of X (n, p): the modified Weiszfeld iteration
    (Vardi & Zhang 2000) of hdmedians / scikit-bio's `geomedian_axis_one`, started at the mean,
    with its absolute tolerance eps, so that PERMDISP's median test matches scikit-bio.

    >>> X = np.array([[0.0, 0], [1, 0], [0, 1], [10, 10]])
    >>> geometric_median(X).round(3).tolist()  # where the diagonals cross; the mean: 2.75, 2.75
    [0.5, 0.5]
    """
    X = np.asarray(X, dtype=np.float64)
    y = X.mean(axis=0)
    if len(X) == 1:
        return y
    for _ in range(maxiters):
        dist = np.sqrt(((X - y) ** 2).sum(axis=1))  # (n,)
        far = np.abs(dist) > eps
        n_zero = int(len(X) - far.sum())
        if n_zero == len(X):  # every point on the estimate: it is the median
            break
        inv = np.where(far, 1.0 / np.where(far, dist, 1.0), 0.0)
        inv_sum = inv.sum()
        T = (inv / inv_sum) @ X  # (p,) Weiszfeld step over the points off the estimate
        if n_zero == 0:
            y1 = T
        else:  # Vardi-Zhang: the estimate sits on data points; step only if they do not pin it
            r = float(np.sqrt((((T - y) * inv_sum) ** 2).sum()))
            r_inv = n_zero / r if r > eps else 0.0
            y1 = max(0.0, 1.0 - r_inv) * T + min(1.0, r_inv) * y
        if np.sqrt(((y - y1) ** 2).sum()) < eps:
            break
        y = y1
    return y


def _median_distances(parts: Sequence[np.ndarray], codes: np.ndarray, a: int) -> np.ndarray:
    """(N,) distance to the group's spatial median, computed on each coordinate block of parts
    (blocks (N, p_k) with signs +1, -1, +1...: positive axes, then negative axes) separately:
    z_i^2 = ||pos_i - med_pos||^2 - ||neg_i - med_neg||^2, clipped at 0."""
    z2 = np.zeros(len(codes))
    for k, Y in enumerate(parts):
        if Y.shape[1] == 0:
            continue
        for g in range(a):
            members = np.flatnonzero(codes == g)
            diff = Y[members] - geometric_median(Y[members])
            z2[members] += (1 if k % 2 == 0 else -1) * (diff * diff).sum(axis=1)
    return np.sqrt(np.maximum(z2, 0.0))


def _feature_centroid_distances(X: np.ndarray, codes: np.ndarray, a: int) -> np.ndarray:
    """(N,) ||x_i - mean_g(i)|| of features X (N, D), in float64, _ROWS rows at a time (no
    float64 copy of X): group sums by a sparse one-hot (a, rows) product, then the distances."""
    n = len(X)
    sizes = np.bincount(codes, minlength=a)
    centres = np.zeros((a, X.shape[1]))
    for i0 in range(0, n, _ROWS):
        rows = slice(i0, min(n, i0 + _ROWS))
        m = rows.stop - i0
        onehot = scipy.sparse.csr_array((np.ones(m), (codes[rows], np.arange(m))), shape=(a, m))
        centres += onehot @ np.asarray(X[rows], dtype=np.float64)
    centres /= sizes[:, None]  # (a, D) the group centroids
    z = np.empty(n)
    for i0 in range(0, n, _ROWS):
        rows = slice(i0, min(n, i0 + _ROWS))
        diff = np.asarray(X[rows], dtype=np.float64) - centres[codes[rows]]
        z[rows] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return z


# ------------------------------------------------------------------ ANOVA and its null


@numba.njit(parallel=True, cache=True)
def _null_between(e: np.ndarray, codes: np.ndarray, sizes: np.ndarray, u: np.ndarray,
                  out: np.ndarray) -> None:
    """out[b] = SS_B = sum_g (sum_{i in g} e[pi_b(i)])^2 / n_g for residuals e (N,) (mean 0)
    permuted by pi_b = 0..N-1 shuffled by `_shuffled` with uniforms u[b] (N-1,); codes (N,)
    int32 fixed. Slices of _SLICE_D permutations run in parallel, O(N) each."""
    n = e.shape[0]
    a = sizes.shape[0]
    n_perm = u.shape[0]
    order = np.arange(n).astype(np.int32)
    n_slices = (n_perm + _SLICE_D - 1) // _SLICE_D
    for t in numba.prange(n_slices):
        b0 = t * _SLICE_D
        m = min(n_perm, b0 + _SLICE_D) - b0
        perm = _shuffled(order, u[b0 : b0 + m])  # (N, m)
        sums = np.zeros((m, a))
        for i in range(n):
            g = codes[i]
            for b in range(m):
                sums[b, g] += e[perm[i, b]]
        for b in range(m):
            total = 0.0
            for g in range(a):
                total += sums[b, g] * sums[b, g] / sizes[g]
            out[b0 + b] = total


def _anova_test(z: np.ndarray, codes: np.ndarray, groups: list[Any], permutations: int,
                seed: SeedLike, test: str, backend: str = "numpy") -> PermanovaResult:
    """PERMDISP's F of the distances z (N,) on the grouping codes (N,), and its null by
    permuting the residuals z - zbar_g (module docstring); the null's sums on numba or, for
    backend "torch", on the torch device (the same permutations)."""
    n, a = len(z), len(groups)
    sizes = np.bincount(codes, minlength=a)
    means = np.bincount(codes, weights=z, minlength=a) / sizes  # (a,) mean distance per group
    e = z - means[codes]  # (N,) residuals, mean 0 in every group
    ss_b = float((sizes * (means - z.mean()) ** 2).sum())
    ss_w = float((e * e).sum())
    tiny = n * (_NEGLIGIBLE * float(np.abs(z).max(initial=0.0))) ** 2
    if ss_w <= tiny:  # rounding only: e.g. both members of a pair are d/2 from their centroid
        e, ss_w = np.zeros(n), 0.0
    if ss_w == 0.0:
        statistic = float("nan") if ss_b <= tiny else float("inf")
    else:
        statistic = (ss_b / (a - 1)) / (ss_w / (n - a))
    if backend == "torch" and permutations:
        from distsim.stats.anova_torch import dispersion_between

        kernel = dispersion_between(e, codes, sizes)
    else:
        kernel = functools.partial(_null_between, e, codes.astype(np.int32),
                                   sizes.astype(np.int64))
    between = np.empty(permutations)
    rng = np.random.default_rng(seed)
    chunk = max(1, _UNIFORMS // max(n - 1, 1))
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        kernel(rng.random((b, n - 1)), between[start : start + b])
    with np.errstate(divide="ignore", invalid="ignore"):
        null = (between / (a - 1)) / ((ss_w - between) / (n - a))
    if ss_w == 0.0:  # permuting all-zero residuals gives no null: no test
        null[:] = np.nan
    p = p_value(statistic, null) if permutations and ss_w > 0.0 else float("nan")
    return PermanovaResult(
        statistic=float(statistic), p_value=p, permutations=permutations, null=null,
        n_samples=n, n_groups=a, method="permdisp", r2=r_squared(statistic, n, a),
        groups=tuple(groups),
        extra={"test": test, "distances": z,
               "dispersion": {g: float(m) for g, m in zip(groups, means, strict=True)}},
    )


def _check_test(test: str) -> str:
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    return test


def permdisp(D: np.ndarray, labels: Sequence | np.ndarray, permutations: int = 999,
             seed: SeedLike = 0, test: str = "centroid") -> PermanovaResult:
    """PERMDISP of a grouping (N,) on a distance matrix (N, N): the ANOVA F of the distances to
    the group centroids (test="centroid") or spatial medians ("median"), p by permuting the
    ANOVA's residuals (vegan's scheme; module docstring).

    statistic equals scikit-bio's `permdisp(..., test=test)` F on Euclidean D (on D with
    negative eigenvalues it follows vegan instead). r2 = SS_B / SS_T of that ANOVA; extra:
    "test", "dispersion" (group label -> mean distance to its centre) and "distances" (N,).
    p_value is NaN when permutations is 0 or the distances have no within-group variation.

    A unit square with its centre, and the same 4 times as wide:

    >>> from distsim.stats.distances import pairwise_distances
    >>> square = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    >>> X = np.vstack([square, 4 * square + 10])
    >>> res = permdisp(pairwise_distances(X), list("aaaaabbbbb"), permutations=999, seed=0)
    >>> round(res.statistic, 3), round(res.r2, 3), res.p_value
    (8.471, 0.514, 0.001)
    >>> {g: round(v, 3) for g, v in res.extra["dispersion"].items()}
    {'a': 0.566, 'b': 2.263}
    """
    permutations = _check_permutations(permutations)
    test = _check_test(test)
    d = _distance_matrix(D)
    groups, codes = _grouping(labels, len(d), "D", "PERMDISP")
    if test == "centroid":
        z = _centroid_distances(d, codes, len(groups))
    else:
        z = _median_distances(_principal_coordinates(d), codes, len(groups))
    return _anova_test(z, codes, groups, permutations, seed, test)


def permdisp_features(X: np.ndarray, labels: Sequence | np.ndarray, permutations: int = 999,
                      seed: SeedLike = 0, test: str = "centroid", backend: str = "numpy"
                      ) -> PermanovaResult:
    """PERMDISP on the Euclidean distances of features X (N, D) without the N x N matrix:
    z_i = ||x_i - centre_g|| (the principal coordinates of Euclidean distances are the centred
    X up to rotation, and centroid and Weiszfeld median commute with rotations). O(N D) memory,
    O(N D) time for the distances (centroid) and O(N) per permutation.

    Equals ``permdisp(pairwise Euclidean distances of X, labels, permutations, seed, test)``:
    the same permutations (same seed, same shuffle), F to float rounding (1e-9 relative; for
    "median" unless the Weiszfeld iteration's 1e-7 stopping test falls on another step).
    ``backend`` (distsim.stats.backend): "torch" computes the centroid distances and the
    null's group sums on the torch device (distsim.stats.anova_torch), in float64; the
    spatial medians (test="median") stay numpy.

    >>> square = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    >>> X = np.vstack([square, 4 * square + 10])  # as permdisp's example
    >>> res = permdisp_features(X, list("aaaaabbbbb"), permutations=999, seed=0)
    >>> round(res.statistic, 3), round(res.r2, 3), res.p_value
    (8.471, 0.514, 0.001)
    >>> res = permdisp_features(X, list("aaaaabbbbb"), permutations=999, test="median")
    >>> round(res.statistic, 3), res.extra["test"]
    (8.471, 'median')
    """
    permutations = _check_permutations(permutations)
    test = _check_test(test)
    arr = _feature_matrix(X)
    if not np.isfinite(arr).all():
        raise ValueError("X contains NaN or infinite values")
    groups, codes = _grouping(labels, len(arr), "X", "PERMDISP")
    a = len(groups)
    backend = resolve(backend)
    if test == "centroid" and backend == "torch":
        from distsim.stats.anova_torch import centroid_distances

        z = centroid_distances(arr, codes, a)
    elif test == "centroid":
        z = _feature_centroid_distances(arr, codes, a)
    else:
        Y = np.asarray(arr, dtype=np.float64)
        z = _median_distances([Y - Y.mean(axis=0)], codes, a)
    return _anova_test(z, codes, groups, permutations, seed, test, backend)
