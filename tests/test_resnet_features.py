"""The weight features of the residual CNN (distsim.weights.residual): the invariance table, both
ways ("invariant": the feature moves by < 1e-4 of its size, "not invariant": by > 1e-3), for
every method at every layer of a 1-D and a 2-D net; the blind spot of the linearized methods;
chain normalization; cka's unit norm; the input sketch."""

from __future__ import annotations

import doctest
import functools

import numpy as np
import pytest
import torch
from _nets import random_batchnorms
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distsim.symmetries import random_resnet_transform
from distsim.weights import residual
from distsim.weights.residual import (
    RESNET_METHODS,
    make_resnet_template,
    resnet_chain_normalize,
    resnet_features,
    resnet_layers,
)
from distsim.zoo.resnet import (
    ResNet,
    ResNetConfig,
    conv_of,
    fold_batchnorm,
    folded_forward,
    folded_layers,
    stream_layout,
)

torch.set_num_threads(1)

ONE_D = ResNetConfig(channels=(3, 4), blocks=2, input_shape=(1, 10), num_classes=3)
TWO_D = ResNetConfig(channels=(3, 4), blocks=1, input_shape=(2, 6, 6), num_classes=2)
CONFIGS = [ONE_D, TWO_D]
IDS = ["1d-2blocks", "2d-1block"]

# invariant? at (stem, blockI.conv1, blockI, out), as in distsim.weights.residual's docstring
T, F = True, False
TRANSFORMS = ("perm", "stream a", "inner a", "group")
EVERYWHERE = {t: (T, T, T, T) for t in TRANSFORMS}
OWN_SCALE = {"perm": (T, T, T, T), "stream a": (F, T, F, T), "inner a": (T, F, T, T),
             "group": (F, F, F, T)}
TABLE = {
    "chain-gram": EVERYWHERE,
    "aligned": EVERYWHERE,
    "gram": OWN_SCALE,
    "cka": OWN_SCALE,
    # inner a does not touch the stem's weights
    "raw": {"perm": (F, F, F, F), "stream a": (F, F, F, F), "inner a": (T, F, F, F),
            "group": (F, F, F, F)},
}


def _kind(layer: str) -> int:
    if layer == "stem":
        return 0
    if layer.endswith(".conv1"):
        return 1
    return 3 if layer == "out" else 2


def _net(cfg: ResNetConfig, seed: int) -> ResNet:
    """A float64 eval-mode ResNet with random BatchNorm affine maps and running statistics
    (beta >= 0 and small means, so that few channels are dead on the probe: a scale of a layer
    with one live channel would be a global scale, which cka cannot see)."""
    torch.manual_seed(seed)
    return random_batchnorms(ResNet(cfg).double(), beta=(0.0, 1.0), mean_std=0.3).eval()


def _sd(cfg: ResNetConfig, seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _net(cfg, seed).state_dict().items()}


def _element(cfg: ResNetConfig, sd: dict[str, torch.Tensor], seed: int, perm: bool,
             stream_scale: bool, inner_scale: bool) -> dict[str, torch.Tensor]:
    """Like random_resnet_transform, with each part switchable: permutations (never the
    identity), positive scales of the streams, positive scales of the inner channels."""
    p = {k: v.clone() for k, v in sd.items()}
    gen = torch.Generator().manual_seed(seed)

    def draw(width: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.arange(width)
        if perm:
            q = torch.randperm(width, generator=gen)
            q = q.roll(1) if torch.equal(q, torch.arange(width)) else q
        a = torch.ones(width, dtype=torch.float64)
        if scale:
            a = torch.exp((torch.rand(width, generator=gen, dtype=torch.float64) * 2 - 1)
                          * np.log(4.0))
        return q, a

    def write(bn: str, q: torch.Tensor, a: torch.Tensor) -> None:
        conv = conv_of(bn)
        p[f"{conv}.weight"] = p[f"{conv}.weight"][q]
        for stat in ("running_mean", "running_var"):
            p[f"{bn}.{stat}"] = p[f"{bn}.{stat}"][q]
        for affine in ("weight", "bias"):
            p[f"{bn}.{affine}"] = p[f"{bn}.{affine}"][q] * a

    def read(key: str, q: torch.Tensor, a: torch.Tensor) -> None:
        w = p[key]
        p[key] = w[:, q] / a.reshape(1, -1, *[1] * (w.dim() - 2))

    for stream in stream_layout(cfg):
        q, a = draw(stream.width, stream_scale)
        for bn in stream.writers:
            write(bn, q, a)
        for key in stream.readers:
            read(key, q, a)
    for i in range(cfg.blocks * len(cfg.channels)):
        q, a = draw(p[f"blocks.{i}.conv1.weight"].shape[0], inner_scale)
        write(f"blocks.{i}.bn1", q, a)
        read(f"blocks.{i}.conv2.weight", q, a)
    return p


def _live(cfg: ResNetConfig, sd: dict[str, torch.Tensor]) -> int:
    """The fewest channels of a hidden layer whose activations vary over the probe (centred
    sum of squares >= 5% of the layer's largest channel's). A layer with one such channel sees a
    per-channel scale nearly as a global one, which cka cannot see: the tables assume >= 2."""
    x, p = _probe(cfg).double(), fold_batchnorm(sd, cfg)
    acts = folded_layers(p, cfg, x, torch.relu, len(resnet_layers(cfg)) - 2)  # hidden layers
    live = []
    for a, layer in zip(acts, resnet_layers(cfg), strict=False):
        a = a.reshape(x.shape[0], _width(cfg, layer), -1)  # (n, C, positions)
        ss = ((a - a.mean(dim=0)) ** 2).sum(dim=(0, 2))  # (C,)
        live.append(int((ss >= 0.05 * ss.max()).sum()) if ss.max() > 0 else 0)
    return min(live)


def _width(cfg: ResNetConfig, layer: str) -> int:
    if layer == "stem":
        return cfg.channels[0]
    block = int(layer.split(".")[0].removeprefix("block")) - 1
    return cfg.channels[block // cfg.blocks]


def _transform(cfg: ResNetConfig, sd: dict[str, torch.Tensor], name: str,
               seed: int) -> dict[str, torch.Tensor]:
    if name == "group":
        return random_resnet_transform(cfg, sd, seed)
    return _element(cfg, sd, seed, perm=name == "perm", stream_scale=name == "stream a",
                    inner_scale=name == "inner a")


def _stack(*sds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}


@functools.cache
def _template(cfg: ResNetConfig) -> dict[str, torch.Tensor]:
    return make_resnet_template(cfg, _stack(*[_sd(cfg, 500 + i) for i in range(3)]), 2)


@functools.cache
def _probe(cfg: ResNetConfig) -> torch.Tensor:
    return torch.randn(24, *cfg.input_shape, generator=torch.Generator().manual_seed(7))


def _features(cfg: ResNetConfig, sd: dict[str, torch.Tensor], method: str,
              upto: int) -> np.ndarray:
    f = resnet_features(cfg, _stack(sd), method, upto, template=_template(cfg),
                        probe=_probe(cfg))
    assert f.dtype == torch.float64 and f.shape[0] == 1
    return f[0].numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _logits(cfg: ResNetConfig, sd: dict[str, torch.Tensor]) -> np.ndarray:
    x = torch.cat([_probe(cfg).double(), torch.randn(16, *cfg.input_shape,
                                                     generator=torch.Generator().manual_seed(3),
                                                     dtype=torch.float64)])
    return folded_forward(fold_batchnorm(sd, cfg), cfg, x).numpy()


def _assert(change: float, invariant: bool, what: str) -> None:
    if invariant:
        assert change < 1e-4, f"{what}: moved by {change:.2e}"
    else:
        assert change > 1e-3, f"{what}: moved by only {change:.2e}"


def test_table_covers_every_method() -> None:
    assert set(TABLE) == set(RESNET_METHODS)
    assert all(set(row) == set(TRANSFORMS) for row in TABLE.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("name", TRANSFORMS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_invariance_table(cfg: ResNetConfig, name: str, seed: int) -> None:
    sd = _sd(cfg, seed)
    assume(_live(cfg, sd) >= 2)
    moved = _transform(cfg, sd, name, seed + 1)
    assert _rel(_logits(cfg, moved), _logits(cfg, sd)) < 1e-8, f"{name} keeps the function"
    for method in RESNET_METHODS:
        for upto, layer in enumerate(resnet_layers(cfg)):
            change = _rel(_features(cfg, moved, method, upto), _features(cfg, sd, method, upto))
            _assert(change, TABLE[method][name][_kind(layer)], f"{method} at {layer} ({name})")


def _conv_layer(cfg: ResNetConfig) -> list[tuple[str, int]]:
    """(unfolded weight key, index of the feature layer it belongs to) of every layer."""
    out = [("stem.0.weight", 0)]
    for i in range(cfg.blocks * len(cfg.channels)):
        out += [(f"blocks.{i}.conv1.weight", 2 * i + 1), (f"blocks.{i}.conv2.weight", 2 * i + 2)]
        if i >= cfg.blocks and i % cfg.blocks == 0:
            out.append((f"blocks.{i}.shortcut.0.weight", 2 * i + 2))
    return [*out, ("head.weight", len(resnet_layers(cfg)) - 1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), pick=st.integers(0, 99))
def test_noise_in_one_layer_moves_every_method_from_that_layer_on(cfg: ResNetConfig, seed: int,
                                                                  pick: int) -> None:
    key, index = _conv_layer(cfg)[pick % len(_conv_layer(cfg))]
    sd = _sd(cfg, seed)
    assume(_live(cfg, sd) >= 2)
    moved = dict(sd)
    gen = torch.Generator().manual_seed(seed)
    w = sd[key]
    moved[key] = w + 2 * w.std() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    assert _rel(_logits(cfg, moved), _logits(cfg, sd)) > 1e-3
    for method in RESNET_METHODS:
        for upto, layer in enumerate(resnet_layers(cfg)):
            if upto < index and method == "aligned":
                continue  # its matching reads conv2 and the head: not claimed either way
            change = _rel(_features(cfg, moved, method, upto), _features(cfg, sd, method, upto))
            _assert(change, upto < index, f"{method} at {layer}, noise in {key}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_blind_spot_negated_inner_channel(cfg: ResNetConfig) -> None:
    """Negating an inner channel (conv1's folded row and bias, conv2's reading slice) keeps the
    linearized network and changes the function: chain-gram and gram do not move."""
    sd = _sd(cfg, 11)
    moved = dict(sd)
    block, c = cfg.blocks, 1  # the first block of stage 1
    for key in (f"blocks.{block}.bn1.weight", f"blocks.{block}.bn1.bias"):
        moved[key] = sd[key].clone()
        moved[key][c] *= -1  # folded: W' and b' of channel c negated
    w = sd[f"blocks.{block}.conv2.weight"].clone()
    w[:, c] *= -1
    moved[f"blocks.{block}.conv2.weight"] = w
    assert _rel(_logits(cfg, moved), _logits(cfg, sd)) > 1e-3
    first = 2 * block + 1
    for upto, layer in enumerate(resnet_layers(cfg)):
        for method in ("chain-gram", "gram"):
            change = _rel(_features(cfg, moved, method, upto), _features(cfg, sd, method, upto))
            _assert(change, True, f"{method} at {layer}, negated inner channel")
        if upto >= first:
            for method in ("raw", "aligned", "cka"):
                change = _rel(_features(cfg, moved, method, upto),
                              _features(cfg, sd, method, upto))
                _assert(change, False, f"{method} at {layer}, negated inner channel")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_chain_normalization_keeps_the_function(cfg: ResNetConfig) -> None:
    p = fold_batchnorm(_sd(cfg, 3), cfg)
    q = resnet_chain_normalize(cfg, p)
    x = torch.randn(7, *cfg.input_shape, dtype=torch.float64)
    torch.testing.assert_close(folded_forward(q, cfg, x), folded_forward(p, cfg, x),
                               rtol=1e-10, atol=1e-10)
    for stream in stream_layout(cfg):  # the first writer's rows and every conv1's: unit norm
        first = conv_of(stream.writers[0])
        torch.testing.assert_close(residual._rows(q, first).norm(dim=1),
                                   torch.ones(stream.width, dtype=torch.float64))
    for i in range(cfg.blocks * len(cfg.channels)):
        norms = residual._rows(q, f"blocks.{i}.conv1").norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # normalizing twice changes nothing: a canonical form
    again = resnet_chain_normalize(cfg, q)
    assert all(torch.allclose(again[k], q[k], rtol=1e-12, atol=1e-12) for k in q)


def test_chain_normalization_keeps_a_zero_channel() -> None:
    cfg = ONE_D
    sd = _sd(cfg, 4)
    sd["stem.1.weight"][0], sd["stem.1.bias"][0] = 0.0, 0.0  # folded stem row 0 is all zeros
    p = fold_batchnorm(sd, cfg)
    q = resnet_chain_normalize(cfg, p)
    assert all(bool(torch.isfinite(v).all()) for v in q.values())
    x = torch.randn(5, *cfg.input_shape, dtype=torch.float64)
    torch.testing.assert_close(folded_forward(q, cfg, x), folded_forward(p, cfg, x),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_gram_equals_chain_gram_at_out(cfg: ResNetConfig) -> None:
    stacked = _stack(_sd(cfg, 5), _sd(cfg, 6))
    out = len(resnet_layers(cfg)) - 1
    gram = resnet_features(cfg, stacked, "gram", out)
    chain = resnet_features(cfg, stacked, "chain-gram", out)
    assert gram.shape == (2, cfg.num_classes * (int(np.prod(cfg.input_shape)) + 1))
    torch.testing.assert_close(gram, chain, rtol=1e-10, atol=1e-10)
    hidden = resnet_features(cfg, stacked, "gram", 1)
    assert _rel(hidden.numpy(), resnet_features(cfg, stacked, "chain-gram", 1).numpy()) > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_gram_out_is_the_linearized_map(cfg: ResNetConfig) -> None:
    """'out' of gram: M [:, j] = f(e_j) - f(0), M[:, P] = f(0) of the ReLU-free folded net;
    checked against M x + f(0) on random inputs."""
    sd = _sd(cfg, 8)
    p = fold_batchnorm(sd, cfg)
    out = len(resnet_layers(cfg)) - 1
    n = int(np.prod(cfg.input_shape))
    m = resnet_features(cfg, _stack(sd), "gram", out)[0].reshape(cfg.num_classes, n + 1)
    x = torch.randn(4, *cfg.input_shape, dtype=torch.float64)
    linear = folded_layers(p, cfg, x, residual._identity, out)[-1]  # (4, classes)
    torch.testing.assert_close(x.reshape(4, n) @ m[:, :n].T + m[:, n], linear)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_sketch_is_the_full_map_times_s(cfg: ResNetConfig) -> None:
    sd = _sd(cfg, 9)
    n = int(np.prod(cfg.input_shape))
    s = torch.randn(n + 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for upto in (0, 1, len(resnet_layers(cfg)) - 1):
        p = fold_batchnorm(sd, cfg)
        full = residual._chain_map(cfg, p, upto, None)  # (P+1, units) = M^T
        torch.testing.assert_close(residual._chain_map(cfg, p, upto, s), s.T @ full)
        f = resnet_features(cfg, _stack(sd), "gram", upto, s=s)
        ms = s.T @ full  # (m, units)
        want = (ms.T.reshape(1, -1) if upto == len(resnet_layers(cfg)) - 1
                else residual.upper_triangle((ms @ ms.T)[None]))
        torch.testing.assert_close(f, want)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cka_of_a_model_with_itself_is_one(cfg: ResNetConfig) -> None:
    stacked = _stack(_sd(cfg, 1), _sd(cfg, 2))
    for upto in range(len(resnet_layers(cfg))):
        f = resnet_features(cfg, stacked, "cka", upto, probe=_probe(cfg))
        n = _probe(cfg).shape[0]
        assert f.shape == (2, n * (n + 1) // 2)
        torch.testing.assert_close(f.norm(dim=1), torch.ones(2, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", RESNET_METHODS)
def test_a_stack_is_its_models_and_float32_works(method: str) -> None:
    cfg = ONE_D
    a, b = _sd(cfg, 1), _sd(cfg, 2)
    feat = functools.partial(resnet_features, cfg, method=method, upto=3,
                             template=_template(cfg), probe=_probe(cfg))
    both = feat(_stack(a, b))
    torch.testing.assert_close(both[1], feat(_stack(b))[0])
    f32 = {k: v.float() for k, v in _stack(a).items()}
    f32["stem.1.num_batches_tracked"] = torch.zeros(1, dtype=torch.long)  # ignored
    torch.testing.assert_close(feat(f32)[0], both[0], rtol=1e-4, atol=1e-4)


def test_layers_and_template_keys() -> None:
    assert resnet_layers(ONE_D) == ("stem", "block1.conv1", "block1", "block2.conv1", "block2",
                                    "block3.conv1", "block3", "block4.conv1", "block4", "out")
    assert set(_template(ONE_D)) == set(fold_batchnorm(_sd(ONE_D, 0), ONE_D))


def test_clear_errors() -> None:
    cfg, stacked = TWO_D, _stack(_sd(TWO_D, 0))
    with pytest.raises(ValueError, match="method must be one of"):
        resnet_features(cfg, stacked, "svd", 0)
    with pytest.raises(ValueError, match="needs a template"):
        resnet_features(cfg, stacked, "aligned", 0)
    with pytest.raises(ValueError, match="needs probe"):
        resnet_features(cfg, stacked, "cka", 0)
    with pytest.raises(ValueError, match="upto must be"):
        resnet_features(cfg, stacked, "gram", len(resnet_layers(cfg)))
    with pytest.raises(ValueError, match="template lacks"):
        resnet_features(cfg, stacked, "aligned", 0, template={"head.bias": torch.zeros(2)})
    bad = dict(_template(cfg), **{"head.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="has shape"):
        resnet_features(cfg, stacked, "aligned", 0, template=bad)


def test_docstring_examples() -> None:
    assert doctest.testmod(residual).failed == 0
