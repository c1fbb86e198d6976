"""The torch backend of PERMANOVA's and PERMDISP's features routes (distsim.stats.backend): the
per-permutation group sums on a torch device, in float64.

The permutations are the numpy routes' own: numba's Fisher-Yates kernel ``_shuffled`` turns
the same uniforms of the same seed into the same labellings on the CPU (O(N) per permutation),
and only the sums move to the device. Both statistics subtract a between-groups sum of squares
from a total (s_W = s_T - s_A), which float32 would not keep to 1e-6 when R^2 is near 1, so
every sum here is float64; they differ from the numba kernels' only in summation order
(tests/test_backend.py: the nulls equal to 1e-9 relative, the p-values exactly).

* PERMANOVA (``permanova_features``): for each labelling b of the (N, r) basis Y, the group
  sums S_b = onehot(labels_b)^T Y (a, r) by an ``index_add_`` of Y's rows (O(N r); when N r is
  small, k labellings in one call on k copies of Y, row b a + g of a (k a, r) sum), then
  sum_g ||S_b[g]||^2 / n_g. A one-hot GEMM would cost a times as much.
* PERMDISP (``permdisp_features``): the centroid distances z (N,) (group means by
  ``index_add_``, then row norms), and the null of the residuals e permuted over all objects:
  the (m, N) gathered e[pi_b] summed into (m, a) group sums by one ``index_add_``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distsim.stats.backend import device
from distsim.stats.permutational_anova import _CHUNK, _shuffled

# feature rows moved to the device at a time by centroid_distances: on a CPU, 1,024 rows of
# D = 2,145 took a quarter of the time of 4,096 (N = 100,000: 0.33 s against 1.22 s; larger
# temporaries cost fresh pages each time)
_ROWS = 1024

_BATCH = 1 << 22  # float64 values of Y's copies: labellings share an index_add_ when N r is small
Kernel = Callable[[np.ndarray, np.ndarray], None]  # (uniforms (m, N - 1), out (m,))


def _to_device(labels: np.ndarray, dev: torch.device) -> torch.Tensor:
    """(N, m) int32 labellings -> (m, N) int64 on the device (int32 crosses; index_add_ took
    1.4 times as long with int32 indices on a CPU)."""
    return torch.from_numpy(np.ascontiguousarray(labels.T)).to(dev).to(torch.int64)


def permanova_between(Y: np.ndarray, codes: np.ndarray, sizes: np.ndarray) -> Kernel:
    """A kernel ``(u, out)`` with permutational_anova._null_between's contract: out[b] =
    sum_g ||S_g||^2 / n_g for codes (N,) shuffled with the uniforms u[b] (N - 1,); Y (N, r)
    float64 is moved to the device once, here.

    >>> Y = np.array([[1.0], [-1.0], [2.0], [-2.0]])
    >>> kernel = permanova_between(Y, np.array([0, 0, 1, 1], np.int32), np.array([2, 2]))
    >>> out = np.empty(1)
    >>> kernel(np.array([[0.99, 0.99, 0.99]]), out)  # Fisher-Yates swaps k <-> k: no change
    >>> out.tolist()  # (1 - 1)^2 / 2 + (2 - 2)^2 / 2
    [0.0]
    """
    dev = device()
    n, r = Y.shape
    a = len(sizes)
    k = max(1, min(_CHUNK, _BATCH // max(n * r, 1)))  # labellings per index_add_: Y k times
    Yk = torch.from_numpy(np.ascontiguousarray(Y, dtype=np.float64)).to(dev).repeat(k, 1)
    inverse = torch.from_numpy(1.0 / np.asarray(sizes, np.float64)).to(dev)  # (a,)
    shift = torch.arange(k, device=dev)[:, None] * a  # (k, 1): labelling b's rows from b a
    S = torch.empty(k * a, r, dtype=torch.float64, device=dev)  # (k a, r): k labellings' sums

    def kernel(u: np.ndarray, out: np.ndarray) -> None:
        labels = _to_device(_shuffled(codes, u), dev)  # (m, N)
        between = torch.empty(len(u), dtype=torch.float64, device=dev)  # (m,)
        for b0 in range(0, len(u), k):
            j = min(k, len(u) - b0)  # labellings b0 .. b0 + j - 1: row b a + g of S
            sums = S[: j * a].zero_().index_add_(
                0, (labels[b0 : b0 + j] + shift[:j]).ravel(), Yk[: j * n])
            between[b0 : b0 + j] = (sums.square().sum(dim=1).view(j, a) * inverse).sum(dim=1)
        out[:] = between.cpu().numpy()

    return kernel


def dispersion_between(e: np.ndarray, codes: np.ndarray, sizes: np.ndarray) -> Kernel:
    """A kernel ``(u, out)`` with dispersion._null_between's contract: out[b] = SS_B = sum_g
    (sum_{i in g} e[pi_b(i)])^2 / n_g for the residuals e (N,) permuted by 0..N-1 shuffled with
    the uniforms u[b] (N - 1,); codes (N,) fixed.

    >>> kernel = dispersion_between(np.array([1.0, -1.0, 0.5, -0.5]),
    ...                             np.array([0, 1, 0, 1]), np.array([2, 2]))
    >>> out = np.empty(1)
    >>> kernel(np.array([[0.99, 0.99, 0.99]]), out)  # the identity: (1 + 0.5)^2 / 2 * 2
    >>> out.tolist()
    [2.25]
    """
    dev = device()
    et = torch.from_numpy(np.asarray(e, np.float64)).to(dev)  # (N,)
    group = torch.from_numpy(np.asarray(codes, np.int64)).to(dev)  # (N,)
    inverse = torch.from_numpy(1.0 / np.asarray(sizes, np.float64)).to(dev)  # (a,)
    order = np.arange(len(e), dtype=np.int32)

    def kernel(u: np.ndarray, out: np.ndarray) -> None:
        perm = _to_device(_shuffled(order, u), dev)  # (m, N)
        sums = torch.zeros(len(u), len(inverse), dtype=torch.float64, device=dev)  # (m, a)
        sums.index_add_(1, group, et[perm])
        out[:] = (sums.square() * inverse).sum(dim=1).cpu().numpy()

    return kernel


def centroid_distances(X: np.ndarray, codes: np.ndarray, a: int) -> np.ndarray:
    """(N,) ||x_i - mean_g(i)|| of features X (N, D) in float64 on the device, as
    dispersion._feature_centroid_distances: _ROWS rows at a time go to the device, twice (the
    group sums, then the distances).

    >>> X = np.array([[0.0, 0], [2, 0], [5, 5], [5, 9]])
    >>> centroid_distances(X, np.array([0, 0, 1, 1]), 2).tolist()
    [1.0, 1.0, 2.0, 2.0]
    """
    dev = device()
    n = len(X)
    group = torch.from_numpy(np.asarray(codes, np.int64)).to(dev)  # (N,)

    def rows(i0: int) -> torch.Tensor:  # (<= _ROWS, D) float64 on the device
        return torch.from_numpy(np.asarray(X[i0 : i0 + _ROWS], np.float64)).to(dev)

    centres = torch.zeros(a, X.shape[1], dtype=torch.float64, device=dev)  # (a, D)
    for i0 in range(0, n, _ROWS):
        centres.index_add_(0, group[i0 : i0 + _ROWS], rows(i0))
    centres /= torch.bincount(group, minlength=a).unsqueeze(1)
    z = torch.empty(n, dtype=torch.float64, device=dev)
    for i0 in range(0, n, _ROWS):
        z[i0 : i0 + _ROWS] = torch.linalg.vector_norm(
            rows(i0) - centres[group[i0 : i0 + _ROWS]], dim=1)
    return z.cpu().numpy()
