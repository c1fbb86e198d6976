"""Benjamini-Hochberg q-values against the definition, scipy, statsmodels and published examples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.stats import q_values


def _bh_by_definition(p):
    """q_i = min over the p_j >= p_i of min(1, m p_j / rank_j), ranks 1..m of the sorted non-NaN
    p (ties take the largest rank of their value), NaN kept."""
    p = np.asarray(p, dtype=float)
    flat = p.ravel()
    present = flat[~np.isnan(flat)]
    m = len(present)
    q = np.full(flat.shape, np.nan)
    for i, pi in enumerate(flat):
        if np.isnan(pi):
            continue
        q[i] = min(min(1.0, m * pj / np.sum(present <= pj)) for pj in present if pj >= pi)
    return q.reshape(p.shape)


_P = st.one_of(st.floats(0, 1), st.just(float("nan")), st.sampled_from([0.0, 0.01, 0.05, 1.0]))


@given(p=st.lists(_P, max_size=30))
@settings(max_examples=200, deadline=None)
def test_equals_the_definition(p):
    q = q_values(p)
    np.testing.assert_allclose(q, _bh_by_definition(p), rtol=1e-12, atol=0)
    ok = ~np.isnan(np.asarray(p, dtype=float))
    assert np.array_equal(np.isnan(q), ~ok)  # NaN stays NaN, nothing else becomes NaN
    pp, qq = np.asarray(p, dtype=float)[ok], q[ok]
    assert np.all((qq >= pp - 1e-15) & (qq <= 1.0))
    order = np.argsort(pp, kind="stable")
    assert np.all(np.diff(qq[order]) >= -1e-15)  # monotone in p


@given(p=st.lists(st.floats(0, 1, allow_subnormal=False), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_equals_statsmodels(p):  # subnormal p: the two libraries round 1e-323 apart
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    expected = multitest.multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(q_values(p), expected, rtol=1e-12)


@given(p=st.lists(st.floats(0, 1), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_equals_scipy_bit_for_bit(p):
    """distsim computes BH in numpy (scipy.stats would load scipy.optimize into the CLI) exactly
    as scipy.stats.false_discovery_control(method="bh") does."""
    import scipy.stats

    expected = scipy.stats.false_discovery_control(np.asarray(p), method="bh")
    assert np.array_equal(q_values(p), expected)


def test_known_values():
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 (m = 4) -> 0.02, 0.02, 0.04, 0.04, back in order
    np.testing.assert_allclose(q_values([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(q_values([0.01, 0.02, 0.03, 0.04, 0.05]), [0.05] * 5)
    # Benjamini & Hochberg (1995), section 4: 15 tests, the 4 smallest rejected at FDR 0.05
    bh1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240,
              0.4262, 0.5719, 0.6528, 0.7590, 1.0000]
    q = q_values(bh1995)
    assert np.sum(q <= 0.05) == 4
    assert q[3] == pytest.approx(15 * 0.0095 / 4) and q[4] == pytest.approx(15 * 0.0201 / 5)


def test_nan_is_not_counted_and_shape_is_kept():
    np.testing.assert_allclose(q_values([0.01, np.nan, 0.04, np.nan]),
                               [0.02, np.nan, 0.04, np.nan])
    q = q_values([[0.01, 0.2], [np.nan, 0.04]])
    assert q.shape == (2, 2)
    np.testing.assert_allclose(q, [[0.03, 0.2], [np.nan, 0.06]])
    assert q_values([]).shape == (0,) and np.isnan(q_values([np.nan])).all()


@pytest.mark.parametrize("bad", [[0.5, 1.5], [-0.1], [np.inf]])
def test_refuses_values_outside_the_unit_interval(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        q_values(bad)
