"""PERMANOVA against scikit-bio, exact permutation distributions, calibration and power."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from distsim.stats import (
    PermanovaResult,
    factorize,
    p_value,
    pairwise_distances,
    permanova,
    permanova_features,
    permanova_null_chunk,
    permanova_tiles,
    r_squared,
)


def _grouped_distances(rng, sizes, dim=5, effect=0.0):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = rng.standard_normal((len(labels), dim))
    X[:, 0] += effect * labels
    order = rng.permutation(len(labels))  # groups interleaved, not sorted
    return cdist(X[order], X[order]), labels[order]


def _pseudo_f(D, labels):
    """Direct textbook pseudo-F (Anderson 2001) for checking."""
    n = len(labels)
    groups = np.unique(labels)
    d2 = np.triu(D * D, 1)
    s_t = d2.sum() / n
    s_w = sum(d2[np.ix_(labels == g, labels == g)].sum() / np.sum(labels == g) for g in groups)
    return ((s_t - s_w) / (len(groups) - 1)) / (s_w / (n - len(groups)))


@pytest.mark.parametrize("sizes", [(15, 15, 15, 15), (2, 7, 30), (40, 3)])
def test_observed_pseudo_f_matches_scikit_bio(sizes):
    skbio = pytest.importorskip("skbio")
    from skbio.stats.distance import permanova as skbio_permanova

    rng = np.random.default_rng(sum(sizes))
    D, labels = _grouped_distances(rng, sizes, effect=0.3)
    names = np.array(["task-a", "task-b", "task-c", "task-d"])[labels]  # any label type works
    ours = permanova(D, names, permutations=99, seed=1)
    ref = skbio_permanova(skbio.DistanceMatrix(D), names, permutations=0)
    assert ours.statistic == pytest.approx(ref["test statistic"], rel=1e-9)
    assert ours.statistic == pytest.approx(_pseudo_f(D, labels), rel=1e-12)
    assert ours.n_samples == ref["sample size"] and ours.n_groups == ref["number of groups"]


def test_null_is_the_exact_permutation_distribution():
    # 6 objects in groups of 3: 20 labellings, 10 distinct partitions, each with probability 1/10.
    rng = np.random.default_rng(7)
    D, labels = _grouped_distances(rng, (3, 3))
    exact = {}
    for members in itertools.combinations(range(6), 3):
        lab = np.isin(np.arange(6), members).astype(int)
        exact.setdefault(round(_pseudo_f(D, lab), 9), 0)
        exact[round(_pseudo_f(D, lab), 9)] += 1
    null = permanova_null_chunk(D, labels, 4000, seed=3)
    assert null.shape == (4000,)
    values, counts = np.unique(np.round(null, 9), return_counts=True)
    assert set(values.tolist()) <= set(exact)
    expected = np.array([exact[v] for v in values.tolist()]) / 20 * 4000
    assert len(values) == len(exact)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_unequal_groups_null_values_are_relabellings():
    rng = np.random.default_rng(8)
    D, labels = _grouped_distances(rng, (2, 3, 2))
    labellings = set(itertools.permutations(labels.tolist()))  # 210 distinct
    possible = {round(_pseudo_f(D, np.array(lab)), 9) for lab in labellings}
    null = permanova_null_chunk(D, labels, 500, seed=0)
    assert set(np.round(null, 9).tolist()) <= possible


def test_result_fields_chunks_and_seeds():
    rng = np.random.default_rng(9)
    D, labels = _grouped_distances(rng, (10, 10, 10))
    res = permanova(D, labels, permutations=300, seed=5)
    assert isinstance(res, PermanovaResult) and res.method == "permanova"
    assert res.permutations == 300 and res.null.shape == (300,)
    assert res.p_value == p_value(res.statistic, res.null)
    np.testing.assert_array_equal(res.null, permanova_null_chunk(D, labels, 300, seed=5))
    np.testing.assert_array_equal(res.null, permanova(D, labels, 300, seed=5).null)
    other = permanova_null_chunk(D, labels, 300, seed=(5, 1))
    assert not np.array_equal(other, res.null)
    combined = np.concatenate([res.null, other])  # chunks with different seeds form one null
    assert 0 < p_value(res.statistic, combined) <= 1
    assert np.isnan(permanova(D, labels, permutations=0).p_value)


def test_calibrated_under_the_null():
    rng = np.random.default_rng(10)
    p_values = []
    for rep in range(120):
        D, labels = _grouped_distances(rng, (5, 5, 5, 5))
        p_values.append(permanova(D, labels, permutations=99, seed=rep).p_value)
    p_values = np.array(p_values)
    assert 0.01 <= np.mean(p_values <= 0.05) <= 0.10
    assert 0.35 <= np.mean(p_values) <= 0.65


def test_clear_effect_reaches_the_floor():
    rng = np.random.default_rng(11)
    D, labels = _grouped_distances(rng, (10, 10, 10), effect=5.0)
    res = permanova(D, labels, permutations=199, seed=0)
    assert res.p_value == 1 / 200
    assert res.statistic > res.null.max()


def test_p_value_counts_ties_and_is_never_zero():
    assert p_value(2.0, np.array([1.0, 2.0, 3.0])) == 3 / 4
    assert p_value(2.0, np.array([2.0 - 1e-13, 0.0])) == 2 / 3  # float tie counts
    assert p_value(5.0, np.zeros(9)) == 0.1
    assert np.isnan(p_value(float("nan"), np.zeros(3)))
    with pytest.raises(ValueError, match="empty"):
        p_value(1.0, np.array([]))


def _bad(kind):
    D = cdist(np.arange(8.0)[:, None], np.arange(8.0)[:, None])
    labels = np.repeat([0, 1], 4)
    if kind == "shape":
        return D[:, :7], labels
    if kind == "asym":
        D = D.copy()
        D[0, 1] += 1.0
    if kind == "diag":
        D = D + np.eye(8)
    if kind == "nan":
        D = D.copy()
        D[0, 1] = D[1, 0] = np.nan
    if kind == "len":
        labels = labels[:7]
    if kind == "one":
        labels = np.zeros(8)
    if kind == "single":
        labels = np.arange(8)
    return D, labels


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("shape", "square"),
        ("asym", "symmetric"),
        ("diag", "zero diagonal"),
        ("nan", "NaN"),
        ("len", "one label per row"),
        ("one", "at least 2 groups"),
        ("single", "every group has a single member"),
    ],
)
def test_invalid_inputs(kind, match):
    D, labels = _bad(kind)
    with pytest.raises(ValueError, match=match):
        permanova(D, labels)


def test_invalid_permutations():
    D, labels = _bad("ok")
    with pytest.raises(ValueError, match=">= 0"):
        permanova(D, labels, permutations=-1)
    with pytest.raises(TypeError, match="integer"):
        permanova_null_chunk(D, labels, 9.5, seed=0)


# ----------------------------------------------------------------------------- without D


@given(n_groups=st.integers(2, 6), extra=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       dim=st.sampled_from([1, 3, 8, 80]), effect=st.sampled_from([0.0, 0.5, 3.0]),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_permanova_features_equals_permanova_on_the_distance_matrix(n_groups, extra, dim, effect,
                                                                    seed):
    """The Euclidean identity route: same pseudo-F (1e-9), same null permutation by permutation,
    same p, for unbalanced groups and for D > N (the pivoted Cholesky basis)."""
    rng = np.random.default_rng(seed)
    sizes = [2 + e for e in extra[:n_groups]]
    labels = np.repeat(np.arange(n_groups), sizes)
    X = rng.standard_normal((len(labels), dim)) * rng.uniform(0.5, 2.0, dim)
    X[:, 0] += effect * labels
    order = rng.permutation(len(labels))
    X, labels = X[order], np.array([f"task-{g}" for g in labels[order]])
    ref = permanova(cdist(X, X), labels, permutations=60, seed=seed)
    got = permanova_features(X, labels, permutations=60, seed=seed)
    # abs 1e-12: a pseudo-F near 0 is s_T - s_W, a cancellation (1e-15 errors, e.g. 1.7e-6 +- 2e-15)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.null, ref.null, rtol=1e-9, atol=1e-12)
    assert got.p_value == ref.p_value
    assert (got.n_samples, got.n_groups, got.permutations) == (ref.n_samples, ref.n_groups, 60)


def test_permanova_features_refuses_what_permanova_refuses():
    X = np.zeros((5, 3))
    with pytest.raises(ValueError, match="one label per row of X"):
        permanova_features(X, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="every group has a single member"):
        permanova_features(X, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="at least 2 groups"):
        permanova_features(X, ["a"] * 5)
    with pytest.raises(ValueError, match=r"real \(N, D\) feature matrix"):
        permanova_features(np.zeros(5), [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        permanova_features(np.full((4, 2), np.nan), [0, 0, 1, 1])
    assert np.isnan(permanova_features(np.eye(4), [0, 0, 1, 1], permutations=0).p_value)


# ------------------------------------------------- groupings R and scikit-bio accept; R^2

# scikit-bio's PERMANOVA test case with a group of one member, verified there against R
# (vegan::adonis): pseudo-F 0.578848 for both groupings (the second with labels of mixed type).
_SKBIO_UNEQUAL = np.array([[0.0, 1.0, 0.1, 0.5678, 1.0, 1.0],
                           [1.0, 0.0, 0.002, 0.42, 0.998, 0.0],
                           [0.1, 0.002, 0.0, 1.0, 0.123, 1.0],
                           [0.5678, 0.42, 1.0, 0.0, 0.123, 0.43],
                           [1.0, 0.998, 0.123, 0.123, 0.0, 0.5],
                           [1.0, 0.0, 1.0, 0.43, 0.5, 0.0]])


def _r2(D, labels):
    """Direct SS_A / SS_T (adonis2's R^2) with the same sums as _pseudo_f."""
    n = len(labels)
    d2 = np.triu(D * D, 1)
    s_t = d2.sum() / n
    s_w = sum(d2[np.ix_(labels == g, labels == g)].sum() / np.sum(labels == g)
              for g in np.unique(labels))
    return (s_t - s_w) / s_t


@pytest.mark.parametrize(("grouping", "single"), [
    (["Control", "Treatment1", "Treatment2", "Treatment1", "Control", "Control"], "Treatment2"),
    (["z", 42, "abc", 42, "z", "z"], "abc"),
])
def test_single_member_groups_and_mixed_labels_match_r(grouping, single):
    skbio = pytest.importorskip("skbio")
    from skbio.stats.distance import permanova as skbio_permanova

    with pytest.warns(UserWarning, match=f"single member.*'{single}'"):
        res = permanova(_SKBIO_UNEQUAL, grouping, permutations=199, seed=3)
    assert res.statistic == pytest.approx(0.578848, abs=5e-7)  # R's value, 6 digits
    ref = skbio_permanova(skbio.DistanceMatrix(_SKBIO_UNEQUAL), grouping, permutations=0)
    assert res.statistic == pytest.approx(ref["test statistic"], rel=1e-12)
    assert res.n_groups == 3 and res.n_samples == 6
    codes = np.array([0, 1, 2, 1, 0, 0])  # the same partition with integer labels
    assert res.r2 == pytest.approx(_r2(_SKBIO_UNEQUAL, codes), rel=1e-12)
    with pytest.warns(UserWarning):
        same = permanova(_SKBIO_UNEQUAL, codes, permutations=199, seed=3)
    np.testing.assert_array_equal(res.null, same.null)  # the same permutations


def test_labels_are_grouped_by_value_whatever_their_type():
    groups, codes = factorize(["z", 42, "abc", 42, "z", "42", 42.0, np.int64(42)], 8)
    assert groups == [42, "42", "abc", "z"]  # ints before strs (by type name), then sorted
    np.testing.assert_array_equal(codes, [3, 0, 2, 0, 3, 1, 0, 0])  # 42 == 42.0 != '42'
    groups, codes = factorize(np.array(["b", "a", "b"]), 3)  # homogeneous: np.unique's order
    assert groups == ["a", "b"] and codes.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="NaN"):
        factorize([1.0, float("nan"), 1.0], 3)


@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5), dim=st.sampled_from([2, 9]),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_routes_agree_on_mixed_labels_and_single_members(sizes, dim, seed):
    """Matrix, features and tiles routes number mixed-type groups alike: the same pseudo-F, null
    (permutation by permutation), p and R^2, single-member groups included (with a warning)."""
    if max(sizes) < 2:
        sizes = [*sizes[:-1], 2]
    rng = np.random.default_rng(seed)
    names = np.array(["z", 42, "42", 7.5, b"bytes"], dtype=object)[: len(sizes)]
    labels = np.repeat(names, sizes)[rng.permutation(sum(sizes))]
    X = rng.standard_normal((len(labels), dim))
    X32 = X.astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = permanova(cdist(X, X), labels, permutations=40, seed=seed)
        feat = permanova_features(X, labels, permutations=40, seed=seed)
        ref32 = permanova(pairwise_distances(X32, block=4), labels, permutations=40, seed=seed)
        tiles = permanova_tiles(X32, labels, permutations=40, seed=seed, tile=4)
    assert len(caught) == (4 if min(sizes) == 1 else 0)
    assert all("single member" in str(w.message) for w in caught)
    for got, want in ((feat, ref), (tiles, ref32)):  # tiles: the same float32 distances
        assert got.statistic == pytest.approx(want.statistic, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(got.null, want.null, rtol=1e-9, atol=1e-12)
        assert got.r2 == pytest.approx(want.r2, rel=1e-9, abs=1e-12)
        assert got.p_value == want.p_value
        assert got.groups == want.groups and got.n_groups == want.n_groups == len(sizes)
    assert set(ref.groups) == set(names.tolist())  # 42 and "42" two groups when both are there


@given(sizes=st.lists(st.integers(2, 8), min_size=2, max_size=4),
       effect=st.sampled_from([0.0, 1.0, 10.0]), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_r2_is_ss_between_over_ss_total(sizes, effect, seed):
    rng = np.random.default_rng(seed)
    D, labels = _grouped_distances(rng, sizes, effect=effect)
    res = permanova(D, labels, permutations=0)
    assert res.r2 == pytest.approx(_r2(D, labels), rel=1e-9, abs=1e-12)
    assert 0.0 <= res.r2 <= 1.0
    assert permanova_features(np.eye(4), [0, 0, 1, 1], permutations=0).r2 == pytest.approx(
        _r2(cdist(np.eye(4), np.eye(4)), np.array([0, 0, 1, 1])))


def test_r_squared_edges():
    assert r_squared(float("inf"), 10, 2) == 1.0  # no within-group variation at all
    assert np.isnan(r_squared(float("nan"), 10, 2))
    assert r_squared(0.0, 10, 2) == 0.0
