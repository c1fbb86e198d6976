"""CountSketch output projection: a seeded map of (coordinate, dim, seed) only, whatever the
batching or streaming; unbiased norms with the CountSketch variance (never above the Gaussian's);
exact feature invariances with dim set; config keys and the study hash."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from _nets import CNN, MLP, RNN, seeded_model
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_features import (
    _change,
    _permute_and_rescale,
    _permute_gru,
    _rel,
)

import distsim.weights.features as features_module
import distsim.weights.projection as projection_module
from distsim.config import ConfigError, parse_study
from distsim.config.sections import FEATURE_PARAMS
from distsim.errors import StoreError
from distsim.store import Store
from distsim.weights.features import (
    PROJECTIONS,
    count_sketch,
    feature_layers,
    project,
    sketch_hashes,
    weight_features,
    weight_features_batch,
)
from distsim.weights.projection import HASH_BLOCK, gaussian_project

torch.set_num_threads(1)


def _dense(n: int, dim: int, seed: int) -> np.ndarray:
    """The CountSketch as an explicit (n, dim) matrix: row j = sign(j) e_bucket(j)."""
    bucket, sign = sketch_hashes(n, dim, seed)
    c = np.zeros((n, dim))
    c[np.arange(n), bucket] = sign
    return c


# ---------------------------------------------------------------- the map


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3 * 4096 + 7),
    dim=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 5),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_countsketch_is_one_map_whatever_the_batch_or_streaming(n, dim, seed, k, dtype) -> None:
    x = np.random.default_rng(seed % 1000).standard_normal((k, n)).astype(dtype)
    y = count_sketch(x, dim, seed)
    assert y.shape == (k, dim) and y.dtype == np.float32
    # each row alone, and any sub-batch: bitwise the same (float64 sums in coordinate order)
    for i in range(k):
        np.testing.assert_array_equal(count_sketch(x[i : i + 1], dim, seed), y[i : i + 1])
    np.testing.assert_array_equal(count_sketch(x[::-1], dim, seed), y[::-1])
    # the explicit linear map: y = x C
    want = x.astype(np.float64) @ _dense(n, dim, seed)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0))
    # a coordinate's hash depends on (coordinate, dim, seed) only: a prefix has the prefix's
    bucket, sign = sketch_hashes(n, dim, seed)
    b2, s2 = sketch_hashes(n + 1000, dim, seed)
    np.testing.assert_array_equal(b2[:n], bucket)
    np.testing.assert_array_equal(s2[:n], sign)
    assert bucket.dtype == np.int32 and sign.dtype == np.int8
    assert bucket.min() >= 0 and bucket.max() < dim and set(np.unique(sign)) <= {-1, 1}


def test_streamed_hashes_give_the_cached_result_bitwise(monkeypatch) -> None:
    n = 2 * HASH_BLOCK + 123  # across hash blocks, the last one truncated
    x = np.random.default_rng(0).standard_normal((3, n))
    cached = count_sketch(x, 97, seed=5)
    monkeypatch.setattr(projection_module, "CACHE_BYTES", 0)  # stream block by block
    np.testing.assert_array_equal(count_sketch(x, 97, seed=5), cached)
    np.testing.assert_array_equal(count_sketch(x[1:], 97, seed=5), cached[1:])


def test_countsketch_depends_on_seed_and_dim_and_is_linear() -> None:
    rng = np.random.default_rng(1)
    x, z = rng.standard_normal((2, 5000)), rng.standard_normal((2, 5000))
    a = count_sketch(x, 64, seed=1)
    assert not np.allclose(a, count_sketch(x, 64, seed=2))
    b1, _ = sketch_hashes(5000, 64, 1)
    b2, _ = sketch_hashes(5000, 65, 1)
    assert (b1 != b2).mean() > 0.9  # dim is part of the stream, not a rescaled bucket
    lin = count_sketch(2 * x - z, 64, seed=1).astype(np.float64)
    want = 2 * a.astype(np.float64) - count_sketch(z, 64, seed=1)
    np.testing.assert_allclose(lin, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(project(x, 64, 1), a)  # the default projection
    np.testing.assert_array_equal(project(x, 64, 1, "gaussian"), gaussian_project(x, 64, 1))


# ---------------------------------------------------------------- statistics (fixed seeds)


def _norm_ratios(x: np.ndarray, dim: int, seeds: range, gaussian: bool = False) -> np.ndarray:
    """|Px|^2 / |x|^2 over sketch seeds."""
    f = gaussian_project if gaussian else count_sketch
    y = np.stack([f(x[None], dim, s)[0].astype(np.float64) for s in seeds])
    return (y**2).sum(1) / (x**2).sum()


@pytest.mark.parametrize("kind", ["gaussian", "spiky", "gram-like"])
def test_norm_estimate_is_unbiased_with_the_countsketch_variance(kind: str) -> None:
    """E|Cx|^2 = |x|^2 and Var = (2/m)(|x|_2^4 - |x|_4^4); both checked over 400 fixed sketch
    seeds with 6-sigma room (deterministic: the seeds are fixed, so it cannot flake)."""
    rng, n, m, seeds = np.random.default_rng(7), 3000, 64, range(400)
    x = rng.standard_normal(n)
    if kind == "spiky":  # a few heavy coordinates: |x|_4 close to |x|_2
        x = x * 0.01
        x[:5] = [10, -7, 5, 3, -2]
    elif kind == "gram-like":  # a large common offset, as a Gram's positive entries
        x = 1.0 + 0.1 * x
    r = _norm_ratios(x, m, seeds)
    n2, n4 = (x**2).sum(), (x**4).sum()
    var = 2 / m * (1 - n4 / n2**2)
    assert abs(r.mean() - 1) < 6 * np.sqrt(var / len(seeds))
    # sample variance of 400 draws: relative sd about sqrt(2/399) (+ kurtosis), so 40% room
    assert 0.6 * var < r.var(ddof=1) < 1.4 * var


def test_countsketch_beats_the_gaussian_on_heavy_coordinates() -> None:
    """|x|_4^4 / |x|_2^4 = 0.79: the CountSketch's variance is 0.21 of the Gaussian's."""
    x = np.zeros(2000)
    x[:2] = [3.0, -1.0]
    x[2:] = 0.01 * np.random.default_rng(3).standard_normal(1998)
    seeds = range(300)
    sparse, dense = _norm_ratios(x, 32, seeds), _norm_ratios(x, 32, seeds, gaussian=True)
    assert sparse.var() < 0.5 * dense.var()


def test_pairwise_distances_are_kept_jl() -> None:
    """20 points in D = 20000 sketched to 1024: every pairwise distance within 20% (relative sd
    of a distance about 1/sqrt(2 * 1024) = 2%)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20, 20000)) + 3 * rng.standard_normal(20000)  # a shared offset
    y = count_sketch(x, 1024, seed=0).astype(np.float64)
    i, j = np.triu_indices(20, 1)
    ratio = np.linalg.norm(y[i] - y[j], axis=1) / np.linalg.norm(x[i] - x[j], axis=1)
    assert np.abs(ratio - 1).max() < 0.2
    assert np.corrcoef(np.linalg.norm(y[i] - y[j], axis=1),
                       np.linalg.norm(x[i] - x[j], axis=1))[0, 1] > 0  # well defined


# ---------------------------------------------------------------- features with dim


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, CNN]))
def test_sketched_features_stay_invariant(seed: int, cfg) -> None:
    model = seeded_model(cfg, seed)
    moved = _permute_and_rescale(model, seed + 1)
    for layer in feature_layers(cfg):
        for dim in (7, 64):
            assert _change(moved, model, "chain-gram", layer, dim=dim, seed=seed) < 1e-4


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_sketched_gru_features_stay_invariant(seed: int) -> None:
    model = seeded_model(RNN, seed)
    moved = _permute_gru(model, seed + 1)
    for layer in feature_layers(RNN):
        assert _change(moved, model, "chain-gram", layer, dim=40, seed=seed) < 1e-4


@pytest.mark.parametrize("cfg", [MLP, CNN, RNN], ids=["mlp", "cnn", "rnn"])
def test_sketched_feature_is_the_countsketch_of_the_full_one(cfg) -> None:
    model, dim, seed = seeded_model(cfg, 2), 50, 3
    for method in ("chain-gram", "raw"):
        for layer in feature_layers(cfg):
            full = weight_features(model, method, layer).astype(np.float64)
            got = weight_features(model, method, layer, dim=dim, seed=seed)
            want = full @ _dense(full.size, dim, seed)
            assert got.shape == (dim,) and _rel(got, want) < 1e-5
            legacy = weight_features(model, method, layer, dim=dim, seed=seed,
                                     projection="gaussian")
            assert _rel(legacy, gaussian_project(full[None], dim, seed)[0]) < 1e-4
    # raw with sketch="input" keeps the output projection, whichever map it is
    np.testing.assert_array_equal(
        weight_features(model, "raw", dim=dim, seed=seed, sketch="input"),
        weight_features(model, "raw", dim=dim, seed=seed))


def test_sketched_batches_match_across_chunks(monkeypatch) -> None:
    states = [seeded_model(CNN, s).state_dict() for s in range(4)]
    whole = weight_features_batch(states, CNN, layer="conv2", dim=40, seed=1)
    monkeypatch.setattr(features_module, "CHAIN_BYTES", 1)  # one model per chunk
    again = weight_features_batch(states, CNN, layer="conv2", dim=40, seed=1)
    np.testing.assert_allclose(again, whole, rtol=1e-5, atol=1e-6)


def test_projection_errors() -> None:
    model = seeded_model(MLP, 0)
    with pytest.raises(ValueError, match="projection must be one of"):
        weight_features(model, dim=8, projection="dense")
    with pytest.raises(ValueError, match="projection must be one of"):
        project(np.ones((1, 4)), 2, projection="sparse")
    with pytest.raises(ValueError, match="dim must be"):
        count_sketch(np.ones((1, 4)), 0)
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        count_sketch(np.ones(4), 2)
    with pytest.raises(ValueError, match="n_features"):
        sketch_hashes(0, 2)


# ---------------------------------------------------------------- config and study hash

BASE = {
    "study": {"name": "sk", "seed": 0, "store": "stores/sk"},
    "data": {"dataset": "synthetic", "num_tasks": 2},
    "arch": [{"kind": "mlp", "widths": [4]}],
    "train": {"seeds_per_task": 3, "seeds_per_trial": 3, "epochs": 1},
    "features": {"methods": ["chain-gram"], "layers": "last"},
}


def _study(**features):
    return parse_study(study_toml(BASE, features=features))


def _legacy_hash(study) -> str:
    """The hash as computed before features.projection existed."""
    d = study.resolved()
    d["study"].pop("store")
    d.pop("resources")
    d["features"].pop("projection")
    for key in ("probe_size", "template_models", "template_iterations"):  # later keys,
        d["features"].pop(key)  # hashed only with their methods (cka, aligned)
    d["tests"].pop("backend"), d["pairs"].pop("backend")  # later keys, never hashed
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_projection_key_is_checked_in_one_line() -> None:
    assert FEATURE_PARAMS["projection"].values is PROJECTIONS
    assert _study().features.projection == "countsketch"
    with pytest.raises(ConfigError) as info:
        _study(dim=16, projection="sparse")
    msg = str(info.value)
    assert info.value.key == "features.projection" and "\n" not in msg
    assert msg.startswith("features.projection:") and "countsketch, gaussian" in msg


def test_hash_sees_projection_only_where_it_changes_the_features() -> None:
    # no dim: the projection is unused, the hash is the one from before the key existed
    for p in PROJECTIONS:
        assert _study(projection=p).hash == _legacy_hash(_study())
    # the input sketch of chain-gram without raw: no output projection either
    a = _study(dim=16, sketch="input")
    assert a.hash == _study(dim=16, sketch="input", projection="gaussian").hash
    assert a.hash == _legacy_hash(a)
    # with dim: the Gaussian keeps the legacy hash, the CountSketch changes it
    g, c = _study(dim=16, projection="gaussian"), _study(dim=16)
    assert g.hash == _legacy_hash(g) and c.hash != g.hash
    raw = _study(dim=16, sketch="input", methods=["chain-gram", "raw"])  # raw: output side
    assert raw.hash != _study(dim=16, sketch="input", methods=["chain-gram", "raw"],
                              projection="gaussian").hash


def test_legacy_gaussian_store_resumes_only_as_gaussian(tmp_path) -> None:
    """A store written before features.projection (Gaussian, with dim) refuses the countsketch
    default, naming the key, and resumes with projection = "gaussian"."""
    g = _study(dim=16, projection="gaussian")
    config = g.resolved()
    config["features"].pop("projection")
    (tmp_path / "study.json").write_text(json.dumps(
        {"hash": _legacy_hash(g), "name": g.name, "source": "", "created": "", "config": config}))
    store = Store(tmp_path)
    assert store.binding(g) == "resumed"
    with pytest.raises(StoreError, match=r"features\.projection \('<unset>' -> 'countsketch'\)"):
        store.binding(_study(dim=16))
