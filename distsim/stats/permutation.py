"""Permutation p-value shared by PERMANOVA and hypothesis-training-testing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SeedLike = int | Sequence[int]  # what numpy.random.default_rng takes as entropy

# Relative tolerance for "null >= observed": a permuted statistic that equals the observed one up
# to float rounding (e.g. the identity permutation, or a permutation that only swaps two members
# of the same group) must count as a tie, as it would in exact arithmetic.
_RTOL = 1e-9


def p_value(observed: float, null: np.ndarray) -> float:
    """Permutation p-value (1 + #{null >= observed}) / (1 + B) for a (B,) null; never 0.

    A null value counts when null >= observed - 1e-9 * max(|observed|, 1): equal statistics
    that differ only by float rounding are ties. NaN null values never count; a NaN observed
    value gives NaN.

    >>> p_value(3.0, np.array([1.0, 2.0, 3.0, 4.0]))  # (1 + 2) / (1 + 4): 3 and 4 count
    0.6
    >>> p_value(10.0, np.zeros(99))  # none as extreme: the floor 1 / (1 + 99)
    0.01
    """
    null = np.asarray(null, dtype=np.float64).ravel()
    observed = float(observed)
    if np.isnan(observed):
        return float("nan")
    b = null.size
    if b == 0:
        raise ValueError("p_value needs at least one null value, got an empty null")
    tol = _RTOL * max(abs(observed), 1.0) if np.isfinite(observed) else 0.0
    exceed = int(np.count_nonzero(null >= observed - tol))
    return (1.0 + exceed) / (1.0 + b)
