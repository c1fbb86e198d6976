"""All-pairs distances and top-k neighbours against scipy's cdist and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from distsim.stats import (
    block_topk,
    distance_block,
    merge_topk,
    pairwise_distances,
    topk_neighbors,
)


def _near_duplicates(rng, n_base, dim, rel_sep, offset, spread=1.0):
    """float32 rows: n_base base vectors and one partner each at relative distance rel_sep."""
    base = offset + spread * rng.standard_normal((n_base, dim))
    norms = np.linalg.norm(base, axis=1, keepdims=True)
    step = rng.standard_normal((n_base, dim))
    step *= rel_sep * norms / np.linalg.norm(step, axis=1, keepdims=True)
    return np.vstack([base, base + step]).astype(np.float32)


def _cosine_reference(X, Y):
    """Cosine distance |x/|x| - y/|y||^2 / 2 in long double: scipy's 1 - cos loses digits."""

    def unit(A):
        A = A.astype(np.longdouble)
        return A / np.sqrt((A * A).sum(axis=1, keepdims=True))

    U, V = unit(X), unit(Y)
    diff = U[:, None, :] - V[None, :, :]
    return (0.5 * (diff * diff).sum(axis=2)).astype(np.float64)


def _max_rel(got, ref):
    err = np.abs(got.astype(np.float64) - ref)
    scale = np.where(ref > 0, ref, 1.0)
    return float((err / scale).max())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("block", [7, 64, 1024])
def test_matches_cdist_x_vs_x_and_x_vs_y(metric, block):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((90, 33)) + 2.0).astype(np.float32)
    Y = rng.standard_normal((41, 33)).astype(np.float32)
    ref_xx = cdist(X.astype(np.float64), X.astype(np.float64), metric)
    np.fill_diagonal(ref_xx, 0.0)
    got_xx = pairwise_distances(X, metric=metric, block=block)
    assert got_xx.dtype == np.float32 and got_xx.shape == (90, 90)
    assert _max_rel(got_xx, ref_xx) < 1e-5
    got_xy = pairwise_distances(X, Y, metric=metric, block=block)
    assert got_xy.shape == (90, 41)
    assert _max_rel(got_xy, cdist(X.astype(np.float64), Y.astype(np.float64), metric)) < 1e-5


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_symmetric_zero_diagonal_nonnegative(metric):
    rng = np.random.default_rng(1)
    X = _near_duplicates(rng, 40, 20, 1e-4, offset=3.0)
    X = np.vstack([X, X[:5]])  # exact duplicates too
    got = pairwise_distances(X, metric=metric, block=16)
    assert np.array_equal(got, got.T)
    assert np.all(np.diag(got) == 0.0)
    assert np.all(got >= 0.0)
    n = 80
    assert np.all(got[np.arange(5), n + np.arange(5)] == 0.0)  # duplicates are exactly 0


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 300),
    log_sep=st.floats(-6.0, -0.5),
    offset=st.sampled_from([0.0, 1.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_near_duplicates_match_cdist(dim, log_sep, offset, seed):
    # A float32 GEMM formula loses every digit here (two rows 1e-3 of their norm apart or closer).
    rng = np.random.default_rng(seed)
    X = _near_duplicates(rng, 12, dim, 10.0**log_sep, offset)
    X64 = X.astype(np.float64)
    ref = cdist(X64, X64)
    assert _max_rel(pairwise_distances(X, block=8), ref) < 1e-4
    assert _max_rel(pairwise_distances(X[:12], X[12:]), ref[:12, 12:]) < 1e-4
    cos_ref = _cosine_reference(X, X)
    np.fill_diagonal(cos_ref, 0.0)
    assert _max_rel(pairwise_distances(X, metric="cosine", block=8), cos_ref) < 1e-4


def test_near_duplicates_in_high_dimension_with_common_offset():
    rng = np.random.default_rng(2)
    X = _near_duplicates(rng, 30, 2048, 1e-3, offset=5.0, spread=0.1)
    ref = cdist(X.astype(np.float64), X.astype(np.float64))
    assert _max_rel(pairwise_distances(X, block=16), ref) < 1e-5


def test_distance_block_matches_full_matrix():
    rng = np.random.default_rng(3)
    X = _near_duplicates(rng, 25, 16, 1e-3, offset=1.0)
    full = pairwise_distances(X)
    diag = distance_block(X[:20])
    assert np.all(np.diag(diag) == 0.0) and np.array_equal(diag, diag.T)
    np.testing.assert_allclose(diag, full[:20, :20], rtol=1e-5, atol=0)
    np.testing.assert_allclose(distance_block(X[:20], X[20:]), full[:20, 20:], rtol=1e-5)
    cos = distance_block(X[:20], X[20:], metric="cosine")
    np.testing.assert_allclose(cos, pairwise_distances(X, metric="cosine")[:20, 20:], rtol=1e-5)


def _brute_topk(X, k, metric):
    ref = pairwise_distances(X, metric=metric)
    np.fill_diagonal(ref, np.inf)
    idx = np.argsort(ref, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(ref, idx, axis=1)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("block", [5, 32, 1024])
def test_topk_matches_brute_force_with_ties(metric, block):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((70, 6)).astype(np.float32)
    X[50:60] = X[:10]  # duplicates: ties at distance 0 resolved to the smaller index
    idx, dist = topk_neighbors(X, 6, metric=metric, block=block)
    ref_idx, ref_dist = _brute_topk(X, 6, metric)
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)
    assert not np.any(idx == np.arange(70)[:, None])  # never itself


def test_pipeline_style_blocks_merge_to_topk():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((53, 4)).astype(np.float32)
    k, b = 4, 20
    starts = range(0, 53, b)
    parts: dict[int, list] = {i: [] for i in starts}
    for i in starts:
        for j in starts:
            if j < i:
                continue
            blk = (
                distance_block(X[i : i + b])
                if i == j
                else distance_block(X[i : i + b], X[j : j + b])
            )
            parts[i].append(block_topk(blk, k, i, j))
            if i != j:
                parts[j].append(block_topk(blk.T, k, j, i))
    merged = [merge_topk([p[0] for p in parts[i]], [p[1] for p in parts[i]], k) for i in starts]
    idx = np.vstack([m[0] for m in merged])
    dist = np.vstack([m[1] for m in merged])
    ref_idx, ref_dist = topk_neighbors(X, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)


def test_block_topk_pads_short_rows():
    idx, dist = block_topk(np.zeros((2, 2), np.float32), 3, row_start=0, col_start=0)
    np.testing.assert_array_equal(idx, [[1, -1, -1], [0, -1, -1]])
    assert np.all(np.isinf(dist[:, 1:]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"X": np.zeros(5)}, ValueError, "2-D"),
        ({"X": np.zeros((3, 0))}, ValueError, "at least one feature"),
        ({"X": np.array([[1.0, np.nan]])}, ValueError, "NaN"),
        ({"X": np.ones((3, 2)), "Y": np.ones((3, 4))}, ValueError, "same number of features"),
        ({"X": np.ones((3, 2)), "metric": "manhattan"}, ValueError, "metric"),
        ({"X": np.zeros((3, 2)), "metric": "cosine"}, ValueError, "all-zero rows"),
        ({"X": np.ones((3, 2)), "block": 0}, ValueError, "block"),
        ({"X": np.ones((3, 2), dtype=complex)}, TypeError, "real numeric"),
    ],
)
def test_pairwise_distances_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pairwise_distances(**kwargs)


@pytest.mark.parametrize("k", [0, 5, 2.5])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        topk_neighbors(np.ones((5, 2), np.float32), k)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e15, 1e30])
def test_extreme_magnitudes_are_rescaled_exactly(scale):
    rng = np.random.default_rng(6)
    X = (_near_duplicates(rng, 10, 50, 1e-3, offset=1.0).astype(np.float64) * scale).astype(
        np.float32
    )
    ref = cdist(X.astype(np.float64), X.astype(np.float64))
    assert _max_rel(pairwise_distances(X, block=8), ref) < 1e-5
    idx, dist = topk_neighbors(X, 2)
    np.testing.assert_allclose(
        dist, np.sort(ref + np.diag(np.full(20, np.inf)), axis=1)[:, :2], rtol=1e-5
    )


@pytest.mark.parametrize("n_clusters", [2, 12])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_tight_clusters_match_reference(n_clusters, metric):
    # 2 clusters: close pairs are dense in a block (float64 GEMM path); 12: sparse (direct path)
    rng = np.random.default_rng(12)
    labels = rng.integers(0, n_clusters, 96)
    centres = rng.standard_normal((n_clusters, 64)) + 2.0
    X = (centres[labels] + 1e-3 * rng.standard_normal((96, 64))).astype(np.float32)
    if metric == "euclidean":
        ref = cdist(X.astype(np.float64), X.astype(np.float64))
    else:
        ref = _cosine_reference(X, X)
        np.fill_diagonal(ref, 0.0)
    assert _max_rel(pairwise_distances(X, metric=metric, block=32), ref) < 1e-5
