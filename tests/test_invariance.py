"""The invariance tables of distsim.weights.features, method by method, on MLPs and CNNs, one per
activation (docs/explanation/activations.md states the same).

Each transform is applied to a model; the test checks first what it does to the function
(preserved or changed, FUNCTION) and then what every feature method does at every layer it
reaches (TABLE for ReLU / LeakyReLU, TABLES for tanh, GELU and sigmoid), both ways: "invariant"
(the feature moves by < 1e-4 of its size) and "not invariant" (> 1e-3).
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
from distsim.weights.cka import layer_activations
from distsim.weights.features import METHODS, feature_layers, weight_features
from distsim.weights.normalize import chain_normalize, layer_plan, symmetries
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

# Tanh, GELU, sigmoid. The transforms act on the last hidden layer's units for the two flips (a
# CNN's: its linear head fc1) and on every hidden layer for permutation and rescaling. "sign flip +
# bias shift": the sign flip, then the unit's outgoing column (before the flip) added to the next
# layer's bias, which makes sigmoid's flip exact (σ(-x) = 1 - σ(x)).
FLIPS = ("permutation", "rescaling", "sign flip", "sign flip + bias shift", "dead unit")
ACTS = ("tanh", "gelu", "sigmoid")

# function preserved? (per activation and transform; relu and leaky_relu: TRANSFORMS)
FUNCTION = {
    #             permutation  rescaling  sign flip  flip + shift  dead unit
    "relu": dict(zip(TRANSFORMS, (T, T, F, T), strict=True)),
    "leaky_relu": dict(zip(TRANSFORMS, (T, T, F, T), strict=True)),
    "tanh": dict(zip(FLIPS, (T, F, T, F, T), strict=True)),
    "gelu": dict(zip(FLIPS, (T, F, F, F, T), strict=True)),
    "sigmoid": dict(zip(FLIPS, (T, F, F, T, T), strict=True)),
}

# invariant? (at hidden layers, at 'out') per activation, columns FLIPS. The four weight methods
# never look at the activation, so their rows agree across activations but for the dead unit
# (tanh's only dead unit has all-zero incoming weights and bias, which the chain maps as zero
# rows; GELU's and sigmoid's are dead by a saturating bias, like ReLU's); what the activation
# decides is whether an invariance removes a symmetry (the function is kept) or is a blind spot
# (the function changes), and which symmetries a method misses (aligned: tanh's sign flip;
# chain-gram, gram: sigmoid's flip at 'out'). cka follows the activations: a flip that negates a
# unit's centred activations is an orthogonal map (invariant), and 'out' is centred over the
# probe, so it cannot see a constant shift of the logits (sigmoid's plain flip, tanh's flip +
# shift of the last hidden layer).
TABLES = {
    "tanh": {
        #              permutation  rescaling  sign flip  flip + shift  dead unit
        "chain-gram": ((T, T), (T, T), (T, T), (T, F), (F, T)),
        "gram": ((T, T), (F, T), (T, T), (T, F), (T, T)),
        "raw": ((F, F), (F, F), (F, F), (F, F), (F, F)),
        "aligned": ((T, T), (T, T), (F, F), (F, F), (F, F)),
        "cka": ((T, T), (F, F), (T, T), (T, T), (T, T)),
    },
    "gelu": {
        #              permutation  rescaling  sign flip  flip + shift  dead unit
        "chain-gram": ((T, T), (T, T), (T, T), (T, F), (F, F)),
        "gram": ((T, T), (F, T), (T, T), (T, F), (F, F)),
        "raw": ((F, F), (F, F), (F, F), (F, F), (F, F)),
        "aligned": ((T, T), (T, T), (F, F), (F, F), (F, F)),
        "cka": ((T, T), (F, F), (F, F), (F, F), (T, T)),
    },
    "sigmoid": {
        #              permutation  rescaling  sign flip  flip + shift  dead unit
        "chain-gram": ((T, T), (T, T), (T, T), (T, F), (F, F)),
        "gram": ((T, T), (F, T), (T, T), (T, F), (F, F)),
        "raw": ((F, F), (F, F), (F, F), (F, F), (F, F)),
        "aligned": ((T, T), (T, T), (F, F), (F, F), (F, F)),
        "cka": ((T, T), (F, F), (T, T), (T, T), (T, T)),
    },
}

# dead unit: zero incoming weights and a bias at which the activation is 0 (tanh: only 0, so the
# unit is all zeros; GELU(-10) = -7.6e-23 and σ(-100) = 3.7e-44: below float32's resolution of
# any sum they enter)
DEAD_BIAS = {"relu": -1.0, "tanh": 0.0, "gelu": -10.0, "sigmoid": -100.0}


def _arch(activation: str, kind: str) -> ArchConfig:
    if kind == "mlp":
        return ArchConfig(kind="mlp", widths=(12, 9), activation=activation, num_classes=3)
    return ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), activation=activation,
                      num_classes=3)


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
    if name in ("sign flip", "sign flip + bias shift"):  # one unit of the last hidden layer
        _flip(moved, hidden - 1, int(torch.randint(1 << 16, (1,), generator=gen)),
              shift=name == "sign flip + bias shift")
        return moved, hidden - 1
    # dead unit: the model's first hidden unit never fires (zero weights, bias -1), so what the
    # next layer reads from it is free
    with torch.no_grad():
        nxt = _parametric(moved)[1].weight
        n = _parametric(moved)[0].weight.shape[0]
        block = nxt.reshape(nxt.shape[0], n, -1)
        block[:, 0] = torch.randn(block[:, 0].shape, generator=gen)
    return moved, 1


def _flip(model: nn.Sequential, layer: int, pick: int, shift: bool) -> None:
    """Unit (channel) pick % n of hidden layer ``layer``: a = -1; ``shift``: the next layer's bias
    gains what it read from the unit per unit of activation (its block of the outgoing weights
    before the flip, summed over positions)."""
    cur, nxt = _parametric(model)[layer : layer + 2]
    n = cur.weight.shape[0]
    unit = pick % n
    read = nxt.weight.detach().reshape(nxt.weight.shape[0], n, -1)[:, unit].sum(-1).clone()
    a = torch.ones(n)
    a[unit] = -1.0
    _reparametrize(model, layer, torch.arange(n), a)
    if shift:
        with torch.no_grad():
            nxt.bias.add_(read)


def _kill_first_unit(model: nn.Sequential, bias: float = -1.0) -> nn.Sequential:
    out = copy.deepcopy(model)
    first = _parametric(out)[0]
    with torch.no_grad():
        first.weight[0] = 0.0
        first.bias[0] = bias
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _features(model: nn.Module, cfg: ArchConfig, method: str, layer: str) -> np.ndarray:
    return weight_features(model, method, layer, template=_template(cfg), probe=_probe(cfg))


def _function_change(cfg: ArchConfig, model: nn.Module, moved: nn.Module) -> float:
    x = torch.cat([_probe(cfg), torch.randn(20, *cfg.input_shape)])
    with torch.no_grad():
        return _rel(moved(x).numpy(), model(x).numpy())


def _assert_feature(cfg: ArchConfig, model: nn.Module, moved: nn.Module, method: str,
                    layer: str, invariant: bool, what: str) -> None:
    change = _rel(_features(moved, cfg, method, layer), _features(model, cfg, method, layer))
    if invariant:
        assert change < 1e-4, f"{method} at {layer} under {what}: moved by {change:.2e}"
    else:
        assert change > 1e-3, f"{method} at {layer} under {what}: moved by only {change:.2e}"


def _check(cfg: ArchConfig, transform: str, seed: int) -> None:
    relu = cfg.activation in ("relu", "leaky_relu")
    table, columns = (TABLE, TRANSFORMS) if relu else (TABLES[cfg.activation], FLIPS)
    model = _model(cfg, seed)
    if transform == "dead unit":
        model = _kill_first_unit(model, DEAD_BIAS[cfg.activation])
    moved, first = _transform(model, transform, seed + 1)
    change = _function_change(cfg, model, moved)
    if FUNCTION[cfg.activation][transform]:
        assert change < 1e-5, f"{transform} preserves a {cfg.activation} network's function"
    else:
        assert change > 1e-3, f"{transform} changes a {cfg.activation} network's function"
    layers = feature_layers(cfg)
    column = columns.index(transform)
    for method in METHODS:
        for index in range(first, len(layers)):
            invariant = table[method][column][index == len(layers) - 1]
            _assert_feature(cfg, model, moved, method, layers[index], invariant, transform)


def test_table_covers_every_method() -> None:
    assert set(TABLE) == set(METHODS)
    for act in ACTS:
        assert set(TABLES[act]) == set(METHODS)
        assert set(FUNCTION[act]) == set(FLIPS)


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


# ---------------------------------------------------------------- tanh, GELU, sigmoid


@pytest.mark.parametrize("transform", FLIPS)
@pytest.mark.parametrize("activation", ACTS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["mlp", "cnn"]))
def test_other_activations(activation: str, transform: str, seed: int, kind: str) -> None:
    _check(_arch(activation, kind), transform, seed)


@pytest.mark.parametrize("activation", ("relu", "leaky_relu", *ACTS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_symmetries_match_the_function_table(activation: str, kind: str) -> None:
    """distsim.weights.normalize.symmetries names exactly the transforms that keep the function
    (FUNCTION) for the units the tests move: every hidden layer (permutation, rescaling), the
    last hidden layer (the flips; a CNN's linear head)."""
    cfg = _arch(activation, kind)
    last_hidden = feature_layers(cfg)[-2]
    for transform, preserved in FUNCTION[activation].items():
        if transform == "dead unit":  # a property of the weights, not a transform of any unit
            continue
        where = last_hidden if "flip" in transform else None
        assert (transform in symmetries(cfg, where)) == preserved, (transform, where)
    assert symmetries(cfg, "out") == ()


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_flip_of_a_conv_channel_changes_the_function(activation: str) -> None:
    """Max pooling does not commute with a negation, so the flips that keep a tanh (sigmoid) MLP's
    function change a CNN's when applied to a conv channel; the weight Grams stay blind to it."""
    cfg = _arch(activation, "cnn")
    model = _model(cfg, 5)
    moved = copy.deepcopy(model)
    _flip(moved, 1, 2, shift=activation == "sigmoid")  # channel 2 of conv2
    assert "flip" not in " ".join(symmetries(cfg, "conv2"))
    assert _function_change(cfg, model, moved) > 1e-3
    # conv2: the channel's rows negated; fc1: also the shifted fc1 bias (sigmoid)
    for layer in ("conv2", "fc1"):
        invariant = layer == "conv2" or activation == "tanh"
        _assert_feature(cfg, model, moved, "chain-gram", layer, invariant, "a conv channel's flip")


def test_sigmoid_flip_at_an_earlier_layer_moves_later_grams() -> None:
    """Sigmoid's flip of an fc1 unit keeps the function; the weight Grams see it at fc1 (rows
    negated) but not past it: the shifted fc2 bias enters fc2's Gram (and its normalization)."""
    cfg = _arch("sigmoid", "mlp")
    model = _model(cfg, 11)
    moved = copy.deepcopy(model)
    _flip(moved, 0, 4, shift=True)
    assert _function_change(cfg, model, moved) < 1e-5
    for method in ("chain-gram", "gram"):
        _assert_feature(cfg, model, moved, method, "fc1", True, "fc1 flip + shift")
        _assert_feature(cfg, model, moved, method, "fc2", False, "fc1 flip + shift")
    for layer in ("fc1", "fc2", "out"):
        _assert_feature(cfg, model, moved, "cka", layer, True, "fc1 flip + shift")


@pytest.mark.parametrize("activation", ("relu", "leaky_relu", *ACTS))
def test_chain_normalization_keeps_the_function_iff_rescaling_is_a_symmetry(
    activation: str,
) -> None:
    """The rule runs on every activation; its flag function_preserving is true, and the
    normalized net computes the same logits, exactly where rescaling is a symmetry."""
    for kind in ("mlp", "cnn"):
        cfg = _arch(activation, kind)
        model = _model(cfg, 2)
        normed = chain_normalize(model)
        homogeneous = "rescaling" in symmetries(cfg)
        assert normed.function_preserving is homogeneous
        change = _function_change(cfg, model, normed)
        assert change < 1e-5 if homogeneous else change > 1e-3, (kind, change)


@pytest.mark.parametrize("activation", ACTS)
def test_cka_reads_the_activation_after_the_layer(activation: str) -> None:
    """cka's hidden-layer representation is the new activation's output (a conv's before its
    pooling), not the layer's pre-activation."""
    kinds = {"tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    for kind in ("mlp", "cnn"):  # layer 1: fc2 (Flatten fc1 act fc2 act), conv2 (conv1 act pool..)
        cfg = _arch(activation, kind)
        model = _model(cfg, 4)
        assert isinstance(model[4], kinds[activation])
        got = layer_activations(model, layer_plan(model), None, _probe(cfg), 1)
        with torch.no_grad():
            want = model[:5](_probe(cfg)).reshape(len(got), -1)
        torch.testing.assert_close(got, want)
