"""The torch backend (distsim.stats.backend) gives the numpy backend's results: distance tiles
and HTT nulls (properties), the embeddings, PERMANOVA's tile route, and a launch's pairs and
tests tables; the switch is not in the study hash; a GPU share the cluster cannot give is
refused in one line."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_preflight import make, node
from test_reliability import SECTIONS, _assert_same

from distsim.config import parse_study
from distsim.errors import ConfigError, LaunchError
from distsim.pipeline.preflight import check_cluster
from distsim.stats import (
    HTTOptions,
    distance_block,
    distance_frame,
    htt,
    permanova_features,
    permanova_groups,
    permdisp_features,
    upper_tiles,
)
from distsim.stats.backend import resolve
from distsim.stats.linear_embedding import embed, prepare_fit
from distsim.stats.permanova_tiled import TileSums, permanova_tile, tile_pseudo_f

# the float32 GEMM's rounding, as distance_block's docstring bounds it: d within 2.5e-5
RTOL = 2.5e-5


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), m=st.integers(1, 60), d=st.integers(1, 300),
       metric=st.sampled_from(["euclidean", "cosine"]), clusters=st.integers(1, 4),
       spread=st.sampled_from([1e-4, 1e-2, 1.0]), offset=st.sampled_from([0.0, 100.0]),
       seed=st.integers(0, 2**31 - 1))
def test_torch_distance_tiles_equal_numpy(n: int, m: int, d: int, metric: str, clusters: int,
                                          spread: float, offset: float, seed: int) -> None:
    """Off-diagonal and diagonal tiles of clustered rows (close pairs, recomputed in float64
    on both backends) with a large common offset, in one shared frame."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) + offset
    X = (centres[rng.integers(clusters, size=n + m)]
         + spread * rng.normal(size=(n + m, d))).astype(np.float32)
    frame = distance_frame(X, metric)
    for a, b in ((X[:n], X[n:]), (X[:n], None)):
        want = distance_block(a, b, metric, frame=frame)
        got = distance_block(a, b, metric, frame=frame, backend="torch")
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-30)
        if b is None:
            assert (np.diag(got) == 0).all() and np.array_equal(got, got.T)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), k=st.integers(1, 45),
       values=st.integers(1, 4), diagonal=st.booleans(), start=st.integers(0, 10**6),
       seed=st.integers(0, 2**31 - 1))
def test_torch_tile_lists_and_sums_equal_numpy(n: int, m: int, k: int, values: int,
                                               diagonal: bool, start: int, seed: int) -> None:
    """On the same tile, the torch top-k lists equal neighbors' exactly (many ties: a few
    distinct values; k beyond the candidates: padding; a diagonal tile: the own index out)
    and its group sums equal pairs.tile_summary's to float64 rounding."""
    import torch

    from distsim.pipeline.pairs import tile_summary
    from distsim.stats import block_topk, tile_topk
    from distsim.stats.tiles_torch import group_sums, topk

    rng = np.random.default_rng(seed)
    m = n if diagonal else m
    D = rng.integers(0, values, size=(n, m)).astype(np.float32) * np.float32(0.25)
    if diagonal:
        D = np.triu(D, 1) + np.triu(D, 1).T
    col_start = start if diagonal else start + n
    ri, rd, ci, cd = topk(torch.from_numpy(D), k, start, col_start, columns=not diagonal)
    if diagonal:
        want = [block_topk(D, k, start, col_start)]
        got = [(ri, rd)]
    else:
        want = list(tile_topk(D, k, start, col_start))
        got = [(ri, rd), (ci, cd)]
    for (wi, wd), (gi, gd) in zip(want, got, strict=True):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gd, wd)
    gi_, gj_ = rng.integers(3, size=n), rng.integers(3, size=m)
    gj_ = gi_ if diagonal else gj_
    sums = group_sums(torch.from_numpy(D), gi_, gj_, diagonal)
    want_sums = tile_summary(D, gi_, gj_, diagonal)
    assert sums.keys() == want_sums.keys()
    for key, value in want_sums.items():
        assert sums[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 50), m=st.integers(1, 50), d=st.integers(1, 100),
       metric=st.sampled_from(["euclidean", "cosine"]), diagonal=st.booleans(),
       spread=st.sampled_from([1e-4, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_a_torch_tile_equals_numpy(n: int, m: int, d: int, metric: str, diagonal: bool,
                                   spread: float, seed: int) -> None:
    """A tile whole on the device (tiles_torch.tile_parts: what pairs.block_tile runs on a
    GPU) against pairs.block_tile on numpy: the same rows, group counts, sums to the float32
    GEMM's rounding, and the lists' distances (their indices may swap where two distances
    tie to within that rounding)."""
    from distsim.pipeline.pairs import block_tile
    from distsim.stats.tiles_torch import tile_parts

    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(3, d))[rng.integers(3, size=n + m)]
         + spread * rng.normal(size=(n + m, d))).astype(np.float32)
    groups = rng.integers(3, size=n + m)
    args = ((X[:n], None, groups[:n], groups[:n], 7, 7) if diagonal
            else (X[:n], X[n:], groups[:n], groups[n:], 7, 7 + n))
    want = block_tile(*args, 5, metric)
    got = tile_parts(*args, 5, metric)
    np.testing.assert_array_equal(got[1], want[1])
    for key, value in want[0].items():
        assert got[0][key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
    np.testing.assert_allclose(got[3], want[3], rtol=RTOL, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(learner=st.sampled_from(["lda", "softmax"]),
       protocol=st.sampled_from(["closed-set", "open-set"]), tasks=st.integers(4, 7),
       per_task=st.integers(6, 14), d=st.sampled_from([3, 40, 400]),
       separation=st.sampled_from([0.0, 0.5, 2.0]), k=st.sampled_from([None, 1]),
       seed=st.integers(0, 2**31 - 1))
def test_torch_htt_nulls_equal_numpy(learner: str, protocol: str, tasks: int, per_task: int,
                                     d: int, separation: float, k: int | None,
                                     seed: int) -> None:
    """The statistics of a chunk of permutations, and the observed one, on both backends:
    lda and softmax (its three L-BFGS passes), closed- and open-set, primal and dual bases."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(tasks), per_task)
    X = rng.normal(size=(len(codes), d)) + separation * rng.normal(size=(tasks, d))[codes]
    runs = {be: htt(X, codes, protocol, permutations=12, seed=seed % 1000,
                    options=HTTOptions(learner=learner, k=k, backend=be))
            for be in ("numpy", "torch")}
    np.testing.assert_allclose(runs["torch"].null, runs["numpy"].null, rtol=1e-6, atol=1e-12)
    assert runs["torch"].statistic == pytest.approx(runs["numpy"].statistic, rel=1e-6)
    assert runs["torch"].p_value == runs["numpy"].p_value


@settings(max_examples=30, deadline=None)
@given(route=st.sampled_from(["permanova", "permdisp"]), groups=st.integers(2, 6),
       per_group=st.integers(1, 12), d=st.sampled_from([1, 5, 80]),
       separation=st.sampled_from([0.0, 0.5, 3.0]), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**31 - 1))
def test_torch_features_routes_equal_numpy(route: str, groups: int, per_group: int, d: int,
                                           separation: float, scale: float, seed: int) -> None:
    """PERMANOVA's and PERMDISP's features routes: the statistic, every null value and the
    p-value on both backends, for any group sizes (singletons included), widths below and above
    N, groups apart or not, any scale."""
    rng = np.random.default_rng(seed)
    codes = np.concatenate([np.full(rng.integers(1, per_group + 1), g) for g in range(groups)])
    if len(codes) <= groups:
        codes = np.append(codes, 0)  # N > a: a residual degree of freedom
    X = scale * (rng.normal(size=(len(codes), d))
                 + separation * rng.normal(size=(groups, d))[codes])
    test = permanova_features if route == "permanova" else permdisp_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singleton groups warn, alike on both backends
        runs = {be: test(X, codes, permutations=199, seed=seed % 1000, backend=be)
                for be in ("numpy", "torch")}
    want, got = runs["numpy"], runs["torch"]
    finite = want.null[np.isfinite(want.null)]
    np.testing.assert_allclose(got.null, want.null, rtol=1e-9,
                               atol=1e-12 * np.abs(finite).max(initial=1.0))
    np.testing.assert_allclose(got.statistic, want.statistic, rtol=1e-9)
    np.testing.assert_equal(got.p_value, want.p_value)


def test_torch_embeddings_equal_numpy() -> None:
    """The embeddings themselves: lda to float64 rounding, softmax to its fit's tolerance."""
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(6), 15)
    X = rng.normal(size=(90, 50)) + rng.normal(size=(6, 50))[codes]
    train, test = np.arange(0, 90, 2), np.arange(1, 90, 2)
    Y = np.eye(6)[rng.integers(6, size=(30, len(train)))]  # 30 labellings, one-hot
    for learner, rtol in (("lda", 1e-12), ("softmax", 1e-7)):
        fit = prepare_fit(X, train, test, learner, 1.0)
        want = embed(X, train, test, Y, learner, ridge=1.0, k=None, fit=fit)
        got = embed(X, train, test, Y, learner, ridge=1.0, k=None, fit=fit, backend="torch")
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=rtol * np.abs(w).max())


def test_permanova_tiles_equal_across_backends() -> None:
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(90, 40)) + np.repeat(rng.normal(size=(3, 40)), 30, axis=0))
    codes, sizes = permanova_groups(np.repeat([0, 1, 2], 30))
    labels = np.stack([codes, *(rng.permutation(codes) for _ in range(19))], axis=1)
    frame = distance_frame(X, "cosine")
    out = {}
    for backend in ("numpy", "torch"):
        sums = TileSums(labels.shape[1])
        for tile in upper_tiles(len(X), 32):
            sums.add(*permanova_tile(X, frame, tile, "cosine", sizes, labels, backend=backend))
        out[backend] = tile_pseudo_f(*sums.sums(), sizes)
    np.testing.assert_allclose(out["torch"], out["numpy"], rtol=1e-6)
    p = {b: (1 + (f[1:] >= f[0]).sum()) / len(f) for b, f in out.items()}
    assert p["torch"] == p["numpy"]


def test_the_switch_is_checked_resolved_and_not_hashed(tmp_path: Path) -> None:
    base = make(tmp_path)
    torch = make(tmp_path, pairs={"backend": "torch"},
                 tests={"protocols": ["closed-set"], "backend": "numpy"},
                 resources={"gpus_per_test": 0.5})
    assert (base.pairs.backend, base.tests.backend) == ("auto", "auto")
    assert torch.hash == base.hash  # where the GEMMs run is not what a study computes
    with pytest.raises(ConfigError, match=r"^pairs.backend: must be one of"):
        make(tmp_path, pairs={"backend": "cupy"})
    with pytest.raises(ConfigError, match=r"^resources.gpus_per_test: a share above 1 GPU "
                                          r"must be a whole number, got 1.5"):
        make(tmp_path, resources={"gpus_per_test": 1.5})
    assert resolve("numpy") == "numpy" and resolve("torch") == "torch"
    import torch as th

    assert resolve("auto") == ("torch" if th.cuda.is_available() else "numpy")


def test_a_gpu_share_for_tests_needs_a_gpu_node(tmp_path: Path) -> None:
    study = make(tmp_path, resources={"gpus_per_test": 1})
    with pytest.raises(LaunchError, match=r"^resources\.gpus_per_test = 1 but the Ray cluster "
                                          r"has no GPU \(0 of 2 nodes\); the pairs and tests "
                                          r"tasks would wait forever"):
        check_cluster(study, [node(8), node(8)])
    with pytest.raises(LaunchError, match=r"^resources\.gpus_per_test = 2 with 1 CPU fits on "
                                          r"no node .*\(largest: 8 CPUs, 1 GPU\)"):
        check_cluster(make(tmp_path, resources={"gpus_per_test": 2}), [node(8, gpus=1)])
    check_cluster(study, [node(8), node(8, gpus=1)])  # fits


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_launch_with_the_torch_backend_equals_numpy(ray_session, tmp_path: Path) -> None:
    """pairs and tests (HTT with the softmax learner; cosine: PERMANOVA by tiles) on torch's CPU
    device against numpy."""
    from distsim.pipeline.launch import run_study
    from distsim.store import Store

    stores = {}
    for backend in ("numpy", "torch"):
        sections = {**SECTIONS, "pairs": {**SECTIONS["pairs"], "metric": "cosine",
                                          "backend": backend},
                    "tests": {**SECTIONS["tests"], "backend": backend, "learner": "softmax"}}
        study = parse_study(study_toml(study={"name": "b", "store": str(tmp_path / backend)},
                                       **sections))
        run_study(study, stream=io.StringIO())
        stores[backend] = Store(study.store)
    _assert_same(stores["torch"], stores["numpy"])
