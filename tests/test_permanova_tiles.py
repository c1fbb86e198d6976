"""PERMANOVA tile by tile (any metric, no N x N array) against the matrix and features routes,
the tile kernel's pieces, and the tests stage's tiles route through a launch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.stats import (
    TileSums,
    distance_block,
    distance_frame,
    pairwise_distances,
    permanova,
    permanova_features,
    permanova_groups,
    permanova_labels,
    permanova_null_chunk,
    permanova_tiles,
    r_squared,
    tile_pseudo_f,
    tile_within_sums,
    upper_tiles,
)


def _grouped(rng, sizes, dim, effect):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    X = rng.standard_normal((len(labels), dim)) * rng.uniform(0.5, 2.0, dim)
    X[:, 0] += effect * labels
    X[:, -1] += 1.0  # off the origin: cosine distances of a shifted cloud
    order = rng.permutation(len(labels))  # groups interleaved, not sorted
    return X[order].astype(np.float32), np.array([f"task-{g}" for g in labels[order]])


@given(metric=st.sampled_from(["euclidean", "cosine"]), n_groups=st.integers(2, 5),
       extra=st.lists(st.integers(0, 12), min_size=5, max_size=5),
       dim=st.sampled_from([1, 3, 8, 80]), effect=st.sampled_from([0.0, 0.5, 3.0]),
       tile=st.sampled_from([3, 7, 16, 1280]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_tiles_equal_permanova_on_the_distance_matrix(metric, n_groups, extra, dim, effect,
                                                      tile, seed):
    """Same pseudo-F (1e-9), same null permutation by permutation, same p: unbalanced groups,
    tiles that do not divide N, N smaller than one tile, both metrics.

    The reference matrix is computed in the same tiles (block=tile), so its float32 distances
    are the tiles' own, bit for bit. With another blocking the BLAS rounds some distances
    differently in their last float32 bit (differently shaped GEMMs, gemv for a one-column
    tile), which moves the pseudo-F of a 10-object test by ~1e-8; the matrix route's own
    result depends on its blocking in the same way."""
    rng = np.random.default_rng(seed)
    dim = 2 if metric == "cosine" and dim == 1 else dim  # 1-D unit vectors: distances 0 or 1
    X, labels = _grouped(rng, [2 + e for e in extra[:n_groups]], dim, effect)
    D = pairwise_distances(X, metric=metric, block=tile)
    ref = permanova(D, labels, permutations=60, seed=seed)
    got = permanova_tiles(X, labels, metric, permutations=60, seed=seed, tile=tile)
    # abs 1e-12: a pseudo-F near 0 is s_T - s_W, a cancellation (1e-15 errors, e.g. 1.7e-6 +- 2e-15)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.null, ref.null, rtol=1e-9, atol=1e-12)
    assert got.p_value == ref.p_value
    assert (got.n_samples, got.n_groups, got.permutations) == (ref.n_samples, ref.n_groups, 60)


@pytest.mark.parametrize(("sizes", "dim", "effect", "tile"),
                         [((30, 30, 30), 12, 0.3, 17), ((3, 40, 9, 21), 200, 0.0, 40),
                          ((50, 50), 5, 1.0, 1280)])
def test_tiles_equal_permanova_features_for_euclidean(sizes, dim, effect, tile):
    """The Euclidean route without D and the tile route on the same permutations. The tiles
    use pairwise_distances' float32 distances, permanova_features exact float64 geometry, so
    pseudo-F agrees to the float32 distances' precision, not to 1e-9; p is the same."""
    rng = np.random.default_rng(sum(sizes))
    X, labels = _grouped(rng, sizes, dim, effect)
    feat = permanova_features(X, labels, permutations=199, seed=4)
    got = permanova_tiles(X, labels, "euclidean", permutations=199, seed=4, tile=tile)
    assert got.statistic == pytest.approx(feat.statistic, rel=1e-5)
    np.testing.assert_allclose(got.null, feat.null, rtol=1e-5)
    assert got.p_value == feat.p_value


def test_labels_are_the_permutations_permanova_draws():
    rng = np.random.default_rng(3)
    X, labels = _grouped(rng, (4, 6, 5), 3, 0.0)
    D = pairwise_distances(X).astype(np.float64)
    lab = permanova_labels(labels, 1500, seed=(7, 2), observed=True)  # more than one _CHUNK
    assert lab.shape == (15, 1501) and lab.dtype == np.int32
    np.testing.assert_array_equal(lab[:, 0], np.unique(labels, return_inverse=True)[1])
    assert all(np.array_equal(np.bincount(c), [4, 6, 5]) for c in lab.T)  # relabellings
    sizes = np.bincount(lab[:, 0])
    within, total = tile_within_sums(D, lab, None, sizes)  # the whole matrix as one tile
    f = tile_pseudo_f(within, total, sizes)
    np.testing.assert_allclose(f[1:], permanova_null_chunk(D, labels, 1500, seed=(7, 2)),
                               rtol=1e-12)
    assert f[0] == pytest.approx(permanova(D, labels, permutations=0).statistic, rel=1e-12)


def test_tile_shares_add_up_over_any_tiling_and_in_any_order():
    rng = np.random.default_rng(5)
    X, labels = _grouped(rng, (7, 9, 10), 6, 0.5)
    D = pairwise_distances(X, metric="cosine")
    lab = permanova_labels(labels, 30, seed=1, observed=True)
    sizes = np.bincount(lab[:, 0])
    d2 = np.triu(D.astype(np.float64) ** 2, 1)
    whole, whole_t = tile_within_sums(D, lab, None, sizes)
    assert whole_t == pytest.approx(d2.sum(), rel=1e-12)
    parts = []
    for i0, i1, j0, j1 in upper_tiles(26, 6):
        diagonal = i0 == j0
        parts.append(tile_within_sums(D[i0:i1, j0:j1], lab[i0:i1],
                                      None if diagonal else lab[j0:j1], sizes))
    forward, backward = TileSums(31), TileSums(31)
    for w, t in parts:
        forward.add(w, t)
    for w, t in parts[::-1]:
        backward.add(w, t)
    assert forward.tiles == len(parts)
    np.testing.assert_allclose(forward.sums()[0], whole, rtol=1e-12)
    assert forward.sums()[1] == pytest.approx(whole_t, rel=1e-12)
    np.testing.assert_array_equal(forward.sums()[0], backward.sums()[0])  # order-free bits


def test_frame_blocks_are_the_blocks_of_pairwise_distances():
    rng = np.random.default_rng(6)
    X = (rng.standard_normal((90, 33)) + 3.0).astype(np.float32)
    X[4] = X[70] + 1e-4  # a close pair: refined, the same way in both
    for metric in ("euclidean", "cosine"):
        D = pairwise_distances(X, metric=metric, block=25)  # the same tiles: the same bits
        frame = distance_frame(X, metric)
        for i0, i1, j0, j1 in upper_tiles(90, 25):
            block = distance_block(X[i0:i1], None if i0 == j0 else X[j0:j1], metric, frame=frame)
            np.testing.assert_array_equal(block, D[i0:i1, j0:j1])
    with pytest.raises(ValueError, match="frame centre"):
        distance_block(X[:4], X[4:8], frame=(np.zeros(3), 1.0))
    with pytest.raises(ValueError, match="power of two"):
        distance_block(X[:4], X[4:8], frame=(np.zeros(33), 3.0))


def test_permanova_tiles_refuses_bad_input():
    X = np.random.default_rng(0).standard_normal((6, 3))
    labels = [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="metric must be one of"):
        permanova_tiles(X, labels, metric="manhattan")
    for tile in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="tile must be a positive integer"):
            permanova_tiles(X, labels, tile=tile)
    with pytest.raises(ValueError, match="one label per row of X"):
        permanova_tiles(X, labels[:5])
    with pytest.raises(ValueError, match="every group has a single member"):
        permanova_tiles(X, [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="at least 2 groups"):
        permanova_groups(["a"] * 6)
    with pytest.raises(ValueError, match=r"real \(N, D\) feature matrix"):
        permanova_tiles(X[:, 0], labels)
    with pytest.raises(ValueError, match=">= 0"):
        permanova_tiles(X, labels, permutations=-1)
    with pytest.raises(ValueError, match="group codes"):
        tile_within_sums(np.zeros((2, 2)), np.array([[0], [2]]), None, np.array([1, 1]))
    assert np.isnan(permanova_tiles(X, labels, permutations=0).p_value)


def test_single_member_groups_warn_and_keep_the_tiles_equal_to_the_matrix():
    """A group of one member (allowed, as in vegan and scikit-bio) warns in every entry point
    and changes nothing else: same pseudo-F, null, p and R^2 as the matrix route."""
    rng = np.random.default_rng(12)
    X, _ = _grouped(rng, (9,), 4, 0.0)
    labels = np.array(["a", 7, "a", 7, "b", "a", 7, "a", 7], dtype=object)
    with pytest.warns(UserWarning, match=r"single member.*\['b'\]"):
        codes, sizes = permanova_groups(labels)
    assert codes.tolist() == [1, 0, 1, 0, 2, 1, 0, 1, 0] and sizes.tolist() == [4, 4, 1]
    with pytest.warns(UserWarning, match="single member"):
        lab = permanova_labels(labels, 50, seed=2)
    assert all(np.array_equal(np.bincount(c), [4, 4, 1]) for c in lab.T)
    D = pairwise_distances(X, block=4)
    with pytest.warns(UserWarning, match="single member"):
        ref = permanova(D, labels, permutations=50, seed=2)
    with pytest.warns(UserWarning, match="single member"):
        got = permanova_tiles(X, labels, permutations=50, seed=2, tile=4)
    assert got.statistic == pytest.approx(ref.statistic, rel=1e-9)
    np.testing.assert_allclose(got.null, ref.null, rtol=1e-9)
    assert got.p_value == ref.p_value and got.r2 == pytest.approx(ref.r2, rel=1e-9)
    assert got.groups == ref.groups == (7, "a", "b")


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_tests_stage_tiles_route_for_cosine(ray_session, study_toml, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A cosine study's PERMANOVA runs over tiles (one task per tile, some failing once and
    retried) and equals the in-process permanova on the stored features' distance matrix,
    with the stage's chunk seeds."""
    from distsim.config import parse_study
    from distsim.pipeline import faults
    from distsim.pipeline.launch import run_study
    from distsim.stats import p_value
    from distsim.store import Store

    study = parse_study(study_toml(
        study={"name": "cosine", "store": str(tmp_path / "store")},
        train={"seeds_per_task": 5, "seeds_per_trial": 5, "epochs": 1},
        features={"methods": ["chain-gram"], "layers": "last"},
        tests={"protocols": [], "permanova_permutations": 9, "chunk_size": 4},
        pairs={"metric": "cosine", "block": 4, "top_k": 2},
    ))
    tiles = upper_tiles(10, 4)
    assert len(tiles) == 6 and any(t[1] - t[0] != 4 for t in tiles)  # unequal tiles
    unit = f"{study.matrices()[0]}-permanova".replace("/", "-")
    names = [f"{unit}-tile{t[0]}-{t[2]}" for t in tiles]
    seed = next(s for s in range(1000)
                if 0 < sum(faults.chosen("test", u, {"test": 0.3, "seed": s}) for u in names) < 6)
    monkeypatch.setenv(faults.ENV, f"test=0.3,seed={seed}")
    out = io.StringIO()
    run_study(study, stream=out)
    log = out.getvalue()
    assert "tests     tile " in log and "failed (retrying): InjectedFault" in log
    store = Store(study.store)
    row = store.scan("tests").collect().row(0, named=True)
    assert row["protocol"] == "permanova" and row["permutations"] == 9
    extra = json.loads(row["extra"])
    assert extra == {"n_groups": 2, "route": "tiles", "tiles": 6, "r2": extra["r2"]}
    assert extra["r2"] == pytest.approx(r_squared(row["observed"], row["n_models"], 2))
    m = study.matrices()[0]
    fm = store.feature_matrix(m.arch, m.method, m.layer)
    D = pairwise_distances(fm.X, metric="cosine", block=study.pairs.block)  # the same tiles
    first = permanova(D, fm.tasks, permutations=4, seed=0)
    null = np.concatenate([first.null, permanova_null_chunk(D, fm.tasks, 4, (0, 1)),
                           permanova_null_chunk(D, fm.tasks, 1, (0, 2))])
    assert row["observed"] == pytest.approx(first.statistic, rel=1e-9)
    assert row["p_value"] == p_value(first.statistic, null)
    assert row["null_mean"] == pytest.approx(null.mean(), rel=1e-9)
