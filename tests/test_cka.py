"""Linear CKA features (distsim.weights.cka): dot product = CKA, layer representations, probe."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _nets import CNN, MLP, RNN, seeded_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.weights.cka import cka_vector, probe_inputs
from distsim.weights.features import feature_layers, weight_features, weight_features_batch
from distsim.zoo.tasks import digits

torch.set_num_threads(1)

def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k: np.ndarray, l_: np.ndarray) -> float:
        return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2

    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def _acts(model: nn.Module, cfg: ArchConfig, probe: torch.Tensor, layer: str) -> np.ndarray:
    """The layer's representation, computed by hand from the model's modules."""
    with torch.no_grad():
        if cfg.kind == "rnn":
            seq = probe.reshape(len(probe), 8, 8)  # (1, 8, 8) images: 8 rows of 8 values
            _, h_last = model.gru(seq)
            k = feature_layers(cfg).index(layer)
            out = model(probe) if layer == "out" else h_last[k]
        else:
            stop = {"fc1": 3, "fc2": 5, "out": 6} if cfg.kind == "mlp" else {
                "conv1": 2, "conv2": 5, "fc1": 9, "out": 10}
            out = model[: stop[layer]](probe)  # Sequential prefix up to the activation
    return out.reshape(len(probe), -1).double().numpy()


@pytest.mark.parametrize("cfg", [MLP, CNN, RNN], ids=["mlp", "cnn", "rnn"])
def test_dot_product_is_linear_cka(cfg: ArchConfig) -> None:
    """f_i . f_j = CKA of the layer's activations (reference formula) to 1e-6, ||f|| = 1 and
    ||f_i - f_j||^2 = 2 - 2 CKA."""
    models = [seeded_model(cfg, s) for s in range(3)]
    probe = torch.randn(50, *cfg.input_shape, generator=torch.Generator().manual_seed(0))
    for layer in feature_layers(cfg):
        f = weight_features_batch([m.state_dict() for m in models], cfg, "cka", layer,
                                  probe=probe).astype(np.float64)
        acts = [_acts(m, cfg, probe, layer) for m in models]
        assert f.shape == (3, 50 * 51 // 2)
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
        for i, j in itertools.combinations(range(3), 2):
            want = _reference_cka(acts[i], acts[j])
            assert abs(f[i] @ f[j] - want) < 1e-6, (layer, i, j)
            assert abs(np.sum((f[i] - f[j]) ** 2) - (2 - 2 * want)) < 1e-5
        single = weight_features(models[1], "cka", layer, probe=probe)
        np.testing.assert_allclose(single, f[1], rtol=0, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(3, 12), d=st.integers(1, 6))
def test_cka_vector_invariances_and_formula(seed: int, n: int, d: int) -> None:
    """Invariant to orthogonal maps and isotropic scaling of the units, and a shifted copy;
    upper triangle with sqrt(2) off the diagonal of K / ||K||_F."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    b = 3.7 * a @ q + rng.standard_normal(d)
    f = cka_vector(torch.tensor(np.stack([a, b]))).numpy()
    np.testing.assert_allclose(f[1], f[0], atol=1e-10)
    ac = a - a.mean(0)
    k = ac @ ac.T
    k /= np.linalg.norm(k)
    i, j = np.triu_indices(n)
    np.testing.assert_allclose(f[0], k[i, j] * np.where(i == j, 1, np.sqrt(2)), atol=1e-12)


def test_constant_layer_gives_the_zero_vector() -> None:
    f = cka_vector(torch.ones(1, 5, 3)).numpy()
    assert f.shape == (1, 15) and not f.any()


def test_probe_inputs_are_seeded_and_class_balanced() -> None:
    x, y = digits()
    p = probe_inputs(x, y, 256, seed=0)
    assert p.shape == (256, 1, 8, 8) and p.dtype == np.float32
    np.testing.assert_array_equal(probe_inputs(x, y, 256, seed=0), p)
    assert not np.array_equal(probe_inputs(x, y, 256, seed=1), p)
    rows = {row.tobytes(): label for row, label in zip(x, y, strict=True)}
    counts = np.bincount([rows[row.tobytes()] for row in p], minlength=10)
    assert sorted(counts.tolist()) == [25] * 4 + [26] * 6  # 256 = 10 * 25 + 6
    assert len({row.tobytes() for row in p}) == 256  # without replacement
    with pytest.raises(ValueError, match="probe size must be"):
        probe_inputs(x, y, 2, seed=0)
    with pytest.raises(ValueError, match="has only"):
        probe_inputs(x[:20], y[:20], 21, seed=0)  # 2 samples per class


def test_errors() -> None:
    model = seeded_model(MLP, 0)
    with pytest.raises(ValueError, match="needs probe="):
        weight_features(model, "cka")
    with pytest.raises(ValueError, match="probe must be"):
        weight_features(model, "cka", probe=torch.zeros(5, 1, 7, 7))
    with pytest.raises(ValueError, match="sketch='input' is for chain-gram and gram"):
        weight_features(model, "cka", probe=torch.zeros(5, 1, 8, 8), dim=8, sketch="input")


def test_gru_cka_invariant_to_hidden_permutations() -> None:
    """Permuting a GRU layer's hidden units (r, z, n blocks together, and what reads them) keeps
    the function and permutes the last hidden state's units: cka does not move."""
    model = seeded_model(RNN, 4)
    moved = seeded_model(RNN, 4)
    gru, h = moved.gru, RNN.hidden
    with torch.no_grad():
        for k in range(RNN.num_layers):
            perm = torch.arange(h).roll(k + 1)
            rows = torch.cat([perm, perm + h, perm + 2 * h])
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(gru, f"{name}_l{k}")
                p.copy_(p[rows])
            w_hh = getattr(gru, f"weight_hh_l{k}")
            w_hh.copy_(w_hh[:, perm])
            reader = moved.head.weight if k + 1 == RNN.num_layers else getattr(
                gru, f"weight_ih_l{k + 1}")
            reader.copy_(reader[:, perm])
    probe = torch.randn(30, *RNN.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moved(probe), model(probe), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(moved.gru(probe[:, 0])[1], model.gru(probe[:, 0])[1])
    for layer in feature_layers(RNN):
        a, b = (weight_features(m, "cka", layer, probe=probe) for m in (model, moved))
        np.testing.assert_allclose(a, b, atol=1e-5)
