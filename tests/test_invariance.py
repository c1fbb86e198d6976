"""The invariance table of distsim.weights.features, method by method, on MLPs and CNNs.

Each transform is applied to a model; the test checks first what it does to the function
(preserved or changed) and then what every feature method does at every layer it reaches.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.weights.alignment import make_template
from distsim.weights.features import METHODS, feature_layers, weight_features
from distsim.zoo.models import build

torch.set_num_threads(1)

MLP = ArchConfig(kind="mlp", widths=(12, 9), num_classes=3)
LEAKY = ArchConfig(kind="mlp", widths=(10, 7), activation="leaky_relu", negative_slope=0.05)
CNN = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), num_classes=3)

# invariant? (at hidden layers, at 'out') for each transform, as in the features module docstring
T, F = True, False
TABLE = {
    #              permutation  rescaling   sign flip   dead unit's outgoing weights
    "chain-gram": ((T, T), (T, T), (T, T), (F, F)),
    "gram": ((T, T), (F, T), (T, T), (F, F)),
    "raw": ((F, F), (F, F), (F, F), (F, F)),
    "aligned": ((T, T), (T, T), (F, F), (F, F)),
    "cka": ((T, T), (F, T), (F, F), (T, T)),
}
TRANSFORMS = ("permutation", "rescaling", "sign flip", "dead unit")


def _model(cfg: ArchConfig, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build(cfg)
    assert isinstance(model, nn.Sequential)
    return model


@functools.cache
def _template(cfg: ArchConfig) -> dict[str, torch.Tensor]:
    return make_template([_model(cfg, 1000 + s).state_dict() for s in range(4)], cfg, 2)


@functools.cache
def _probe(cfg: ArchConfig) -> torch.Tensor:
    return torch.randn(40, *cfg.input_shape, generator=torch.Generator().manual_seed(7))


def _parametric(model: nn.Sequential) -> list[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def _reparametrize(model: nn.Sequential, layer: int, perm: torch.Tensor, a: torch.Tensor) -> None:
    """Units of hidden layer ``layer``: incoming weights/bias permuted and scaled by a, the next
    layer's reading slice (column / in-channel / flattened block) permuted and divided by a."""
    cur, nxt = _parametric(model)[layer : layer + 2]
    n = cur.weight.shape[0]
    with torch.no_grad():
        cur.weight.copy_(cur.weight[perm] * a.reshape(n, *[1] * (cur.weight.dim() - 1)))
        cur.bias.copy_(cur.bias[perm] * a)
        w = nxt.weight
        block = w.reshape(w.shape[0], n, -1)  # (out, units, positions)
        w.copy_((block[:, perm] / a[None, :, None]).reshape(w.shape))


def _transform(model: nn.Sequential, name: str, seed: int) -> tuple[nn.Sequential, int]:
    """(moved model, index of the first feature layer the transform reaches)."""
    gen = torch.Generator().manual_seed(seed)
    moved = copy.deepcopy(model)
    hidden = len(_parametric(model)) - 1
    if name in ("permutation", "rescaling"):
        for layer in range(hidden):
            n = _parametric(model)[layer].weight.shape[0]
            perm = torch.randperm(n, generator=gen) if name == "permutation" else torch.arange(n)
            if name == "permutation" and torch.equal(perm, torch.arange(n)):
                perm = perm.roll(1)
            a = torch.rand(n, generator=gen) * 9.9 + 0.1 if name == "rescaling" else torch.ones(n)
            _reparametrize(moved, layer, perm, a)
        return moved, 0
    if name == "sign flip":  # one unit (channel) of the last hidden layer: a = -1
        n = _parametric(model)[hidden - 1].weight.shape[0]
        a = torch.ones(n)
        a[int(torch.randint(n, (1,), generator=gen))] = -1.0
        _reparametrize(moved, hidden - 1, torch.arange(n), a)
        return moved, hidden - 1
    # dead unit: the model's first hidden unit never fires (zero weights, bias -1), so what the
    # next layer reads from it is free
    with torch.no_grad():
        nxt = _parametric(moved)[1].weight
        n = _parametric(moved)[0].weight.shape[0]
        block = nxt.reshape(nxt.shape[0], n, -1)
        block[:, 0] = torch.randn(block[:, 0].shape, generator=gen)
    return moved, 1


def _kill_first_unit(model: nn.Sequential) -> nn.Sequential:
    out = copy.deepcopy(model)
    first = _parametric(out)[0]
    with torch.no_grad():
        first.weight[0] = 0.0
        first.bias[0] = -1.0
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _features(model: nn.Module, cfg: ArchConfig, method: str, layer: str) -> np.ndarray:
    return weight_features(model, method, layer, template=_template(cfg), probe=_probe(cfg))


def _check(cfg: ArchConfig, transform: str, seed: int) -> None:
    model = _model(cfg, seed)
    if transform == "dead unit":
        model = _kill_first_unit(model)
    moved, first = _transform(model, transform, seed + 1)
    x = torch.cat([_probe(cfg), torch.randn(20, *cfg.input_shape)])
    with torch.no_grad():
        change = _rel(moved(x).numpy(), model(x).numpy())
    if transform == "sign flip":
        assert change > 1e-3, "a sign flip changes a ReLU network's function"
    else:
        assert change < 1e-5, f"{transform} preserves the function"
    layers = feature_layers(cfg)
    column = TRANSFORMS.index(transform)
    for method in METHODS:
        for index in range(first, len(layers)):
            invariant = TABLE[method][column][index == len(layers) - 1]
            moved_f = _features(moved, cfg, method, layers[index])
            base_f = _features(model, cfg, method, layers[index])
            what = f"{method} at {layers[index]} under {transform}"
            if invariant:
                assert _rel(moved_f, base_f) < 1e-4, what
            else:
                assert _rel(moved_f, base_f) > 1e-3, what


def test_table_covers_every_method() -> None:
    assert set(TABLE) == set(METHODS)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, LEAKY, CNN]))
def test_permutation(seed: int, cfg: ArchConfig) -> None:
    _check(cfg, "permutation", seed)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, LEAKY, CNN]))
def test_positive_rescaling(seed: int, cfg: ArchConfig) -> None:
    _check(cfg, "rescaling", seed)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, LEAKY, CNN]))
def test_sign_flip(seed: int, cfg: ArchConfig) -> None:
    _check(cfg, "sign flip", seed)


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_dead_unit_outgoing_weights(cfg: ArchConfig) -> None:
    """A function-preserving change that is no permutation or rescaling: only cka is blind."""
    _check(cfg, "dead unit", 3)
