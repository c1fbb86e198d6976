"""permanova_terms_tiles: the multi-term PERMANOVA of any metric, tile by tile, equals
permanova_terms on the same float32 distance matrix (F and null to 1e-8, the same p), for both
sums of squares, interactions and strata, at any tile size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.stats import (
    pairwise_distances,
    permanova_terms,
    permanova_terms_orders,
    permanova_terms_tiles,
)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(12, 40), tile=st.integers(3, 17),
       metric=st.sampled_from(["euclidean", "cosine"]),
       by=st.sampled_from(["terms", "margin"]), interaction=st.booleans(),
       strata=st.booleans())
def test_tiles_equal_the_matrix(seed: int, n: int, tile: int, metric: str, by: str,
                                interaction: bool, strata: bool) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)) + 0.5
    table = {"a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n)}
    X[table["a"] == 1] += 1.0  # an effect of a, none of b
    terms = ["a", "b", "a:b"] if interaction else ["a", "b"]
    within = rng.integers(0, 2, n) if strata else None
    D = pairwise_distances(X, metric=metric, block=tile).astype(np.float64)
    want = permanova_terms(D, table, terms, by=by, strata=within, permutations=49, seed=seed)
    got = permanova_terms_tiles(X, table, terms, metric=metric, by=by, strata=within,
                                permutations=49, seed=seed, tile=tile)
    assert [r.term for r in got.rows] == [r.term for r in want.rows]
    assert got.total_ss == pytest.approx(want.total_ss, rel=1e-9)
    for g, w in zip(got.rows, want.rows, strict=True):
        assert g.df == w.df
        assert g.ss == pytest.approx(w.ss, rel=1e-9, abs=1e-12 * want.total_ss)
        if np.isfinite(w.F):
            assert g.F == pytest.approx(w.F, rel=1e-8)
            assert g.p_value == w.p_value
            np.testing.assert_allclose(got.null[g.term], want.null[w.term], rtol=1e-8,
                                       atol=1e-12)
    assert got.residual.ss == pytest.approx(want.residual.ss, rel=1e-9)


def test_orders_start_with_the_identity_and_stay_within_strata() -> None:
    strata = np.repeat([0, 1, 2], 5)
    orders = permanova_terms_orders(strata, 15, permutations=40, seed=1)
    assert orders.shape == (41, 15) and (orders[0] == np.arange(15)).all()
    for o in orders:
        assert (strata[o] == strata).all()  # a permutation never moves a row out of its stratum
        assert sorted(o) == list(range(15))
