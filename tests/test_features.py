"""Invariant weight features: symmetry invariance, chain maths, batching, projection, sketch."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from _nets import CNN, MLP, RNN, seeded_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import distsim.weights.features as features_module
import distsim.weights.projection as projection_module
from distsim.config.arch import ArchConfig
from distsim.weights.alignment import make_template
from distsim.weights.features import (
    METHODS,
    chain_map,
    feature_layers,
    projection_matrix,
    sketch_matrix,
    sketch_width,
    weight_features,
    weight_features_batch,
)
from distsim.weights.normalize import normalize_stacked, plan_for, stack_state_dicts
from distsim.weights.projection import gaussian_project

torch.set_num_threads(1)

def _permute_and_rescale(model: nn.Sequential, seed: int) -> nn.Sequential:
    """Same function: permute every hidden layer's units and scale each by a in [0.1, 10], with the
    next layer's column / input-channel / flattened block compensating (1/a, same permutation)."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    layers = [m for m in out if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for cur, nxt in itertools.pairwise(layers):
            n = cur.weight.shape[0]
            perm, a = torch.randperm(n, generator=gen), torch.rand(n, generator=gen) * 9.9 + 0.1
            shape = (n,) + (1,) * (cur.weight.dim() - 1)
            cur.weight.copy_(cur.weight[perm] * a.reshape(shape))
            cur.bias.copy_(cur.bias[perm] * a)
            w = nxt.weight
            if isinstance(nxt, nn.Conv2d):
                w.copy_(w[:, perm] / a[None, :, None, None])
            else:
                # (out, channels, positions); positions=1 after a linear
                block = w.reshape(w.shape[0], n, -1)
                w.copy_((block[:, perm] / a[None, :, None]).reshape(w.shape))
    return out


def _permute_gru(model: nn.Module, seed: int) -> nn.Module:
    """Same function: permute each GRU layer's hidden units (the r, z, n blocks consistently)."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    gru, h = out.gru, out.gru.hidden_size
    with torch.no_grad():
        for k in range(gru.num_layers):
            perm = torch.randperm(h, generator=gen)
            if torch.equal(perm, torch.arange(h)):  # a true permutation, so that raw features move
                perm = perm.roll(1)
            rows = torch.cat([perm, perm + h, perm + 2 * h])
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(gru, f"{name}_l{k}")
                p.copy_(p[rows])
            w_hh = getattr(gru, f"weight_hh_l{k}")
            w_hh.copy_(w_hh[:, perm])
            last = k + 1 == gru.num_layers
            reader = out.head.weight if last else getattr(gru, f"weight_ih_l{k + 1}")
            reader.copy_(reader[:, perm])
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _change(moved: nn.Module, model: nn.Module, *args, **kwargs) -> float:
    """Relative change of weight_features(.., *args, **kwargs) from ``model`` to ``moved``."""
    return _rel(weight_features(moved, *args, **kwargs), weight_features(model, *args, **kwargs))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, CNN]))
def test_chain_gram_invariant_to_permutations_and_rescalings(seed: int, cfg: ArchConfig) -> None:
    model = seeded_model(cfg, seed)
    moved = _permute_and_rescale(model, seed + 1)
    x = torch.randn(4, *cfg.input_shape)
    with torch.no_grad():  # the transform is a true symmetry
        assert torch.allclose(moved(x), model(x), rtol=1e-4, atol=1e-5)
    for layer in feature_layers(cfg):
        assert _change(moved, model, "chain-gram", layer) < 1e-4
        assert _change(moved, model, "chain-gram", layer, dim=10, seed=seed, sketch="input") < 1e-4
    for layer in feature_layers(cfg)[:-1]:  # raw parameters of the moved hidden layers change
        assert _change(moved, model, "raw", layer) > 1e-2


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_gru_features_invariant_to_hidden_permutations(seed: int) -> None:
    model = seeded_model(RNN, seed)
    moved = _permute_gru(model, seed + 1)
    x = torch.randn(3, *RNN.input_shape)
    with torch.no_grad():
        assert torch.allclose(moved(x), model(x), atol=1e-5)
    for layer in feature_layers(RNN):
        assert _change(moved, model, "chain-gram", layer) < 1e-4
        assert _change(moved, model, "chain-gram", layer, dim=30, seed=seed, sketch="input") < 1e-4
        assert _change(moved, model, "raw", layer) > 1e-2


def _linearized(model: nn.Sequential) -> nn.Sequential:
    """Activations removed, max pooling replaced by its average: the map the chain describes."""
    layers = []
    for m in copy.deepcopy(model):
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            continue
        layers.append(nn.AvgPool2d(m.kernel_size, m.stride) if isinstance(m, nn.MaxPool2d) else m)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_last_layer_chain_is_the_affine_input_output_map(cfg: ArchConfig) -> None:
    """M_L = [linear part | offset] of the linearized network, in input-pixel coordinates."""
    model = seeded_model(cfg, 0)
    m = weight_features(model, "chain-gram").reshape(cfg.num_classes, -1)
    x = torch.randn(5, *cfg.input_shape, dtype=torch.float64)
    with torch.no_grad():
        ref = _linearized(model).double()(x).numpy()
    flat = x.reshape(5, -1).numpy()
    np.testing.assert_allclose(flat @ m[:, :-1].T + m[:, -1], ref, rtol=1e-4, atol=1e-5)


def test_hidden_layer_feature_is_the_gram_upper_triangle() -> None:
    model = seeded_model(MLP, 0)
    w1 = model[1]
    m1 = torch.cat([w1.weight, w1.bias[:, None]], 1).detach().double()
    m1 = m1 / m1.norm(dim=1, keepdim=True)
    g = (m1.T @ m1).numpy()
    i, j = np.triu_indices(g.shape[0])
    np.testing.assert_allclose(
        weight_features(model, "chain-gram", "fc1"), g[i, j], rtol=1e-5, atol=1e-6
    )
    assert weight_features(model, "chain-gram", 0).shape == (65 * 66 // 2,)


@pytest.mark.parametrize("cfg", [MLP, CNN, RNN], ids=["mlp", "cnn", "rnn"])
def test_batch_equals_single_and_stacked(cfg: ArchConfig) -> None:
    models = [seeded_model(cfg, s) for s in range(3)]
    states = [m.state_dict() for m in models]
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    extra = {"probe": torch.randn(6, *cfg.input_shape),
             "template": make_template(states, cfg, iterations=1)}
    for method in METHODS:
        for layer in feature_layers(cfg):
            for dim, sketch in ((None, "output"), (16, "output"), (16, "input")):
                if sketch == "input" and method in ("aligned", "cka"):
                    with pytest.raises(ValueError, match="is for chain-gram and gram"):
                        weight_features_batch(states, cfg, method, layer, dim, sketch=sketch,
                                              **extra)
                    continue
                kw = dict(dim=dim, seed=5, sketch=sketch, **extra)
                batch = weight_features_batch(states, cfg, method, layer, **kw)
                assert batch.dtype == np.float32 and batch.ndim == 2 and batch.shape[0] == 3
                again = weight_features_batch(stacked, cfg, method, layer, **kw)
                np.testing.assert_array_equal(again, batch)
                for i, m in enumerate(models):
                    single = weight_features(m, method, layer, **kw)
                    np.testing.assert_allclose(single, batch[i], rtol=1e-5, atol=1e-6)


def test_batch_chunking_matches_one_chunk(monkeypatch) -> None:
    states = [seeded_model(CNN, s).state_dict() for s in range(5)]
    whole = weight_features_batch(states, CNN, layer="conv2")
    sketched = weight_features_batch(states, CNN, layer="conv2", dim=15, sketch="input")
    monkeypatch.setattr(features_module, "CHAIN_BYTES", 1)  # one model per chunk
    np.testing.assert_allclose(weight_features_batch(states, CNN, layer="conv2"), whole, rtol=1e-6)
    again = weight_features_batch(states, CNN, layer="conv2", dim=15, sketch="input")
    np.testing.assert_allclose(again, sketched, rtol=1e-6)


def test_gaussian_projection_is_seeded_shared_and_streamable(monkeypatch) -> None:
    """The legacy projection="gaussian" (CountSketch: tests/test_sketch.py)."""
    project = gaussian_project
    x = np.random.default_rng(0).standard_normal((4, 9000)).astype(np.float32)
    a, b, c = project(x, 32, seed=1), project(x[:2], 32, seed=1), project(x, 32, seed=2)
    # the same matrix whatever the batch: exactly on one-hot rows (the rows of R, across its
    # 8192-row generation blocks); other rows up to float32 GEMM rounding, which BLAS may sum in
    # another order for another batch size
    r = projection_matrix(9000, 32, seed=1)
    picks = [0, 8191, 8192, 8999]
    onehot = np.eye(9000, dtype=np.float32)[picks]
    np.testing.assert_array_equal(project(onehot, 32, seed=1), r[picks])
    np.testing.assert_array_equal(project(onehot[1:3], 32, seed=1), r[picks[1:3]])
    np.testing.assert_allclose(a[:2], b, rtol=1e-4, atol=1e-4)
    assert not np.allclose(a, c)
    # distances are preserved in expectation (JL): a loose check at dim 32
    d_in, d_out = np.linalg.norm(x[0] - x[1]), np.linalg.norm(a[0] - a[1])
    assert 0.5 < d_out / d_in < 1.5
    monkeypatch.setattr(projection_module, "CACHE_BYTES", 0)  # stream the blocks instead
    np.testing.assert_allclose(project(x, 32, seed=1), a, rtol=1e-4, atol=1e-4)


def _from_upper(v: np.ndarray, n: int) -> np.ndarray:
    g = np.zeros((n, n))
    g[np.triu_indices(n)] = v
    return g + np.triu(g, 1).T


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])  # the GRU: test_recurrent.py
def test_input_sketch_is_s_transpose_g_s(cfg: ArchConfig) -> None:
    """Hidden layers: upper(S^T G S) of the full Gram G; 'out': M_L S."""
    model, dim, seed = seeded_model(cfg, 3), 21, 7
    m = sketch_width(dim)
    assert [sketch_width(d) for d in (21, 20, 1, 7)] == [6, 5, 1, 3]
    layers = feature_layers(cfg)
    for layer in layers[:-1]:
        full = weight_features(model, "chain-gram", layer).astype(np.float64)
        n = round((np.sqrt(8 * full.size + 1) - 1) / 2)
        s = sketch_matrix(n, m, seed)
        i, j = np.triu_indices(m)
        want = (s.T @ _from_upper(full, n) @ s)[i, j]
        got = weight_features(model, "chain-gram", layer, dim=dim, seed=seed, sketch="input")
        assert got.shape == (want.size,) and want.size <= dim and _rel(got, want) < 1e-5
    full = weight_features(model, "chain-gram", layers[-1]).astype(np.float64)
    c = cfg.num_classes
    want = (full.reshape(c, -1) @ sketch_matrix(full.size // c, m, seed)).ravel()
    got = weight_features(model, "chain-gram", layers[-1], dim=dim, seed=seed, sketch="input")
    assert got.shape == want.shape and _rel(got, want) < 1e-5
    # raw has no chain: the input sketch leaves it to the output projection
    np.testing.assert_array_equal(weight_features(model, "raw", dim=dim, seed=seed, sketch="input"),
                                  weight_features(model, "raw", dim=dim, seed=seed))


def test_sketch_matrix_is_seeded_and_shared() -> None:
    a = sketch_matrix(50, 8, seed=1)
    assert a.shape == (50, 8) and a.dtype == np.float64
    np.testing.assert_array_equal(sketch_matrix(50, 8, seed=1), a)
    assert not np.allclose(sketch_matrix(50, 8, seed=2), a)
    # entries N(0, 1/m): rows of unit norm on average
    assert abs(float((a**2).sum(axis=1).mean()) - 1.0) < 0.3


@pytest.mark.parametrize(
    "cfg",
    [
        ArchConfig(kind="mlp", widths=(16, 8)),
        ArchConfig(kind="cnn", channels=(2,), head_widths=(4,)),
    ],
    ids=["mlp", "cnn"],
)
def test_input_sketch_handles_cifar_size_inputs(cfg: ArchConfig) -> None:
    """(3, 32, 32) inputs: the full Gram would hold 4.7M values; the sketch pushes m + 1 = 91
    inputs."""
    cfg = cfg.with_task_shape((3, 32, 32), 2)
    states = [seeded_model(cfg, s).state_dict() for s in range(2)]
    layers = feature_layers(cfg)
    for layer in layers:
        x = weight_features_batch(states, cfg, "chain-gram", layer, dim=4096, seed=0,
                                  sketch="input")
        width = 2 * 90 if layer == layers[-1] else 90 * 91 // 2
        assert x.shape == (2, width) and np.isfinite(x).all()


def test_feature_layers_and_errors() -> None:
    assert feature_layers(MLP) == ["fc1", "fc2", "out"]
    assert feature_layers(CNN) == ["conv1", "conv2", "fc1", "out"]
    assert feature_layers(ArchConfig(kind="rnn")) == ["gru_ih", "out"]
    assert feature_layers(RNN) == ["gru_ih", "gru_ih_l1", "out"]
    model = seeded_model(MLP, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        weight_features(model, method="grams")
    assert METHODS == ("chain-gram", "raw", "gram", "aligned", "cka")
    with pytest.raises(ValueError, match="not one of"):
        weight_features(model, layer="conv1")
    with pytest.raises(ValueError, match="int in"):
        weight_features(model, layer=3)
    with pytest.raises(ValueError, match="dim must be"):
        weight_features(model, dim=0)
    with pytest.raises(ValueError, match="dim must be"):
        weight_features(model, dim=0, sketch="input")
    with pytest.raises(ValueError, match="sketch must be one of"):
        weight_features(model, dim=8, sketch="both")
    with pytest.raises(ValueError, match="needs dim"):
        weight_features(model, sketch="input")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        weight_features(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="ArchConfig"):
        weight_features_batch([model.state_dict()], {"kind": "mlp"})
    with pytest.raises(ValueError, match="expects 64 inputs"):
        weight_features_batch([model.state_dict()], MLP.with_task_shape((1, 4, 4), 2))


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_chain_forward_and_backward_agree(cfg: ArchConfig) -> None:
    """The chain map by pushing pixels forward equals the one by vector-Jacobian products."""
    plan = plan_for(cfg)
    stacked = stack_state_dicts([seeded_model(cfg, s).state_dict() for s in (0, 1)])
    p = normalize_stacked(plan, {k: v.double() for k, v in stacked.items()})
    for upto in range(len(plan.layers)):
        fwd = chain_map(plan, p, cfg.input_shape, upto, "forward")
        bwd = chain_map(plan, p, cfg.input_shape, upto, "backward")
        torch.testing.assert_close(bwd, fwd, rtol=1e-10, atol=1e-12)
        auto = chain_map(plan, p, cfg.input_shape, upto)
        torch.testing.assert_close(auto, fwd, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="direction must be one of"):
        chain_map(plan, p, cfg.input_shape, 0, "sideways")


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_gram_is_chain_gram_without_the_normalization(cfg: ArchConfig) -> None:
    """'out': the same affine input-output map as chain-gram (the normalization is a symmetry of
    the linearized network too), to rounding; hidden layers: the Grams of the unnormalized chain,
    which differ."""
    model = seeded_model(cfg, 2)
    layers = feature_layers(cfg)
    assert _rel(weight_features(model, "gram"), weight_features(model, "chain-gram")) < 1e-6
    for layer in layers[:-1]:
        assert _rel(weight_features(model, "gram", layer),
                    weight_features(model, "chain-gram", layer)) > 1e-2
    sketched = [weight_features(model, m, "out", dim=10, seed=1, sketch="input")
                for m in ("gram", "chain-gram")]
    assert _rel(*sketched) < 1e-6
    first = next(m for m in model if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Linear):  # fc1: upper triangle of M^T M, M = [W_1 | b_1] as it is
        m1 = torch.cat([first.weight, first.bias[:, None]], 1).detach().double()
        g = (m1.T @ m1).numpy()
        i, j = np.triu_indices(g.shape[0])
        np.testing.assert_allclose(weight_features(model, "gram", "fc1"), g[i, j], rtol=1e-5,
                                   atol=1e-6)
