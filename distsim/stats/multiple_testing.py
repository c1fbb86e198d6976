"""Benjamini-Hochberg q-values: the false discovery rate over a family of permutation tests
(controlled for independent or positively dependent tests; a screening rule under the arbitrary
dependence of one store's tests, see q_values)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def q_values(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of p (any shape, one family): with the m
    non-NaN p sorted, q_(i) = min_{j >= i} min(1, m p_(j) / j); monotone in p, at most 1.

    Benjamini-Hochberg's condition: reporting q <= alpha controls the false discovery rate at
    alpha over the family when the tests are independent or positively dependent (PRDS). The
    rows of one distsim store are dependent (the same models and features across methods,
    layers and protocols), so there q <= 0.05 is a screening rule, not a guaranteed FDR bound;
    Benjamini-Yekutieli (``scipy.stats.false_discovery_control(p, method="by")``) would hold
    under any dependence, at a cost in power. NaN entries (tests not run) stay NaN and do not
    count in m. Computed as `scipy.stats.false_discovery_control(method="bh")` computes it, in
    numpy: importing scipy.stats loads scipy.optimize, which the summary, ``distsim query
    tests`` and the report (every reader of q) do not load.

    >>> q_values([0.01, 0.04, 0.03, 0.005]).round(3).tolist()
    [0.02, 0.04, 0.04, 0.02]
    >>> q_values([0.01, float("nan"), 0.5]).round(3).tolist()
    [0.02, nan, 0.5]
    """
    arr = np.asarray(p, dtype=np.float64)
    present = ~np.isnan(arr)
    if np.any((arr[present] < 0) | (arr[present] > 1)):
        bad = arr[present][(arr[present] < 0) | (arr[present] > 1)]
        raise ValueError(f"p-values must lie in [0, 1] (or be NaN), got {bad[:5].tolist()}")
    q = np.full(arr.shape, np.nan)
    if present.any():
        q[present] = _bh(arr[present])
    return q


def _bh(p: np.ndarray) -> np.ndarray:
    """BH q of a 1-D float64 p in [0, 1] (no NaN), as scipy.stats.false_discovery_control:
    p_(i) m / i over the sorted p, the running minimum from the largest down, clipped to 1."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    q = p[order] * (m / np.arange(1, m + 1))
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(q, 0.0, 1.0)
    return out
