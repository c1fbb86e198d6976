"""Benjamini-Hochberg q-values: the false discovery rate over a family of permutation tests."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def q_values(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of p (any shape, one family): with the m
    non-NaN p sorted, q_(i) = min_{j >= i} min(1, m p_(j) / j); monotone in p, at most 1.

    Reporting q <= alpha controls the false discovery rate at alpha over the family (for
    independent or positively dependent tests). NaN entries (tests not run) stay NaN and do
    not count in m. By `scipy.stats.false_discovery_control(method="bh")`.
    """
    import scipy.stats  # here: the summary and the CLI import this module, scipy.stats is slow

    arr = np.asarray(p, dtype=np.float64)
    present = ~np.isnan(arr)
    if np.any((arr[present] < 0) | (arr[present] > 1)):
        bad = arr[present][(arr[present] < 0) | (arr[present] > 1)]
        raise ValueError(f"p-values must lie in [0, 1] (or be NaN), got {bad[:5].tolist()}")
    q = np.full(arr.shape, np.nan)
    if present.any():
        q[present] = scipy.stats.false_discovery_control(arr[present], method="bh")
    return q
