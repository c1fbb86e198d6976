"""The transformer's weight features (distsim.weights.attention), both ways: invariant (the feature
moves by < 1e-4 of its size, max-abs) under the symmetry group and the other changes the module
docstring names, moved (> 1e-3) by function-changing noise on a parameter at every layer from the
one it enters on, with the blind spots stated there shown."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsim.symmetries import random_transformer_transform
from distsim.weights.attention import (
    METHODS,
    _activations,
    _centre,
    _keys,
    _normalize,
    _walk,
    make_transformer_template,
    transformer_features,
    transformer_layers,
)
from distsim.weights.chain import upper_triangle
from distsim.zoo.transformer import Transformer, TransformerConfig

torch.set_num_threads(1)

CONFIGS = [
    TransformerConfig(d_model=16, heads=2, depth=2, hidden=12, activation="relu",
                      pooling="cls", input_shape=(1, 20), patch=4),
    TransformerConfig(d_model=16, heads=2, depth=2, hidden=12, activation="gelu",
                      pooling="mean", input_shape=(1, 6, 6), num_classes=3),
    TransformerConfig(d_model=16, heads=2, depth=2, hidden=10, activation="relu",
                      pooling="mean", input_shape=(2, 12), patch=3),
    TransformerConfig(d_model=16, heads=2, depth=2, hidden=10, activation="gelu",
                      pooling="cls", input_shape=(1, 6, 6), num_classes=3),
]
IDS = [f"{c.activation}-{c.pooling}-{len(c.input_shape) - 1}d" for c in CONFIGS]
StateDict = dict[str, torch.Tensor]


def _net(cfg: TransformerConfig, seed: int) -> Transformer:
    """A float64 transformer with every parameter random: biases, class token, LayerNorm gains
    and shifts too (their defaults would hide a mistake in moving them)."""
    torch.manual_seed(seed)
    net = Transformer(cfg).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if ".ln" in f".{name}" and last == "weight":
                param.normal_(1.0, 0.3)
            elif last in ("bias", "b_q", "b_k", "b_v", "b_o", "cls"):
                param.normal_(0.0, 0.3)
    return net


def _state(cfg: TransformerConfig, seed: int) -> StateDict:
    return dict(_net(cfg, seed).state_dict())


@functools.cache
def _template(cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    sds = [_state(cfg, 1000 + i) for i in range(4)]
    return make_transformer_template(cfg, {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]},
                                     iterations=2)


@functools.cache
def _probe(cfg: TransformerConfig) -> torch.Tensor:
    return torch.randn(30, *cfg.input_shape, generator=torch.Generator().manual_seed(7))


def _feature(cfg: TransformerConfig, sd: StateDict, method: str, upto: int) -> torch.Tensor:
    stacked = {k: v[None] for k, v in sd.items()}
    return transformer_features(cfg, stacked, method, upto, template=_template(cfg),
                                probe=_probe(cfg))[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


def _logits(cfg: TransformerConfig, sd: StateDict) -> torch.Tensor:
    net = Transformer(cfg).double()
    net.load_state_dict(sd)
    with torch.no_grad():
        return net(_probe(cfg).double())


def _function_change(cfg: TransformerConfig, a: StateDict, b: StateDict) -> float:
    return _rel(_logits(cfg, a), _logits(cfg, b))


def _check(cfg: TransformerConfig, a: StateDict, b: StateDict, method: str, upto: int,
           invariant: bool, what: str) -> None:
    change = _rel(_feature(cfg, a, method, upto), _feature(cfg, b, method, upto))
    layer = transformer_layers(cfg)[upto]
    if invariant:
        assert change < 1e-4, f"{method} at {layer} under {what}: moved by {change:.2e}"
    else:
        assert change > 1e-3, f"{method} at {layer} under {what}: moved by only {change:.2e}"


# ---------------------------------------------------------------- the symmetry group


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_the_group_moves_raw_only(cfg: TransformerConfig, seed: int) -> None:
    """random_transformer_transform (stream and head permutations, the per-head A and B, the
    MLP's permutation and ReLU rescaling, the LayerNorm and bias parts) keeps chain-gram, gram,
    aligned and cka at every layer; raw moves at every layer."""
    sd = _state(cfg, seed % 997)
    moved = random_transformer_transform(cfg, sd, seed)
    assert _function_change(cfg, sd, moved) < 1e-8
    for upto in range(len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, method != "raw", "the group")


def _fold(cfg: TransformerConfig, p: StateDict, gen: torch.Generator) -> None:
    """Every LayerNorm's gamma times c (per coordinate, either sign) and beta moved, its readers'
    rows divided by c and biases moved to match: only diag(gamma) W and beta W + b enter."""
    def ln(name: str, readers: list[tuple[str, str, bool]]) -> None:
        c = torch.exp(torch.randn(cfg.d_model, generator=gen, dtype=torch.float64) * 0.5)
        c = c * torch.where(torch.rand(cfg.d_model, generator=gen) < 0.3, -1.0, 1.0)
        g, beta = p[f"{name}.weight"], p[f"{name}.bias"]
        g2 = g * c
        beta2 = beta + torch.randn(cfg.d_model, generator=gen, dtype=torch.float64) * 0.3
        for w, bias, per_head in readers:
            old = p[w] if per_head else p[w].T  # (.., d, out)
            new = (g / g2)[:, None] * old
            p[bias] = p[bias] + beta @ old - beta2 @ new
            p[w] = new if per_head else new.T
        p[f"{name}.weight"], p[f"{name}.bias"] = g2, beta2

    for i in range(cfg.depth):
        b = f"blocks.{i}."
        ln(b + "ln1", [(b + f"w_{x}", b + f"b_{x}", True) for x in "qkv"])
        ln(b + "ln2", [(b + "fc1.weight", b + "fc1.bias", False)])
    ln("ln", [("head.weight", "head.bias", False)])


def _reader_shift(cfg: TransformerConfig, p: StateDict, gen: torch.Generator) -> None:
    """Every reader of a LayerNorm output z = gamma n + beta (sum(n) = 0, so u . z = u . beta for
    u = 1 / gamma) gains u v^T, its bias -(u . beta) v."""
    def shift(w: str, bias: str, ln: str, per_head: bool) -> None:
        u = 1.0 / p[f"{ln}.weight"]  # (d,)
        v = torch.randn(p[bias].shape, generator=gen, dtype=torch.float64) * 0.3
        if per_head:  # (heads, d, d_k): z W
            p[w] = p[w] + u[None, :, None] * v[:, None, :]
        else:  # (out, d): W z
            p[w] = p[w] + v[:, None] * u[None, :]
        p[bias] = p[bias] - (u @ p[f"{ln}.bias"]) * v

    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for x in "qkv":
            shift(b + f"w_{x}", b + f"b_{x}", b + "ln1", per_head=True)
        shift(b + "fc1.weight", b + "fc1.bias", b + "ln2", per_head=False)
    shift("head.weight", "head.bias", "ln", per_head=False)


def _key_bias(cfg: TransformerConfig, p: StateDict, gen: torch.Generator) -> None:
    """Any b_K: it adds q_t . b_K to all of query t's scores alike, which the softmax ignores."""
    for i in range(cfg.depth):
        key = f"blocks.{i}.b_k"
        p[key] = p[key] + torch.randn(p[key].shape, generator=gen, dtype=torch.float64)


def _value_bias(cfg: TransformerConfig, p: StateDict, gen: torch.Generator) -> None:
    """b_V[h] + e_h and b_O - sum_h e_h W_O[h]: attention weights sum to 1, so only
    b_O + sum_h b_V[h] W_O[h] enters."""
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        e = torch.randn(p[b + "b_v"].shape, generator=gen, dtype=torch.float64)
        p[b + "b_v"] = p[b + "b_v"] + e
        p[b + "b_o"] = p[b + "b_o"] - torch.einsum("hk,hkd->d", e, p[b + "w_o"])


def _stream_mean(cfg: TransformerConfig, p: StateDict, gen: torch.Generator) -> None:
    """Every writer of the stream gains a multiple of the all-ones direction (per token, per
    input): every reader of the stream is a LayerNorm, which removes each token's mean."""
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    d, ones = cfg.d_model, torch.ones(cfg.d_model, dtype=torch.float64)
    p["embed.weight"] = p["embed.weight"] + ones[:, None] * rnd(cfg.token_width)[None]
    p["embed.bias"] = p["embed.bias"] + rnd(1)
    p["pos"] = p["pos"] + rnd(cfg.tokens, 1)
    if cfg.pooling == "cls":
        p["cls"] = p["cls"] + rnd(1)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        p[b + "w_o"] = p[b + "w_o"] + rnd(cfg.heads, cfg.d_k, 1) * ones
        p[b + "b_o"] = p[b + "b_o"] + rnd(1)
        p[b + "fc2.weight"] = p[b + "fc2.weight"] + ones[:, None] * rnd(cfg.hidden)[None]
        p[b + "fc2.bias"] = p[b + "fc2.bias"] + rnd(d)[:1]


# the five LayerNorm and bias parts of the group (random_transformer_transform draws them
# with the rest), each applied alone here: (transform, first layer it touches)
PARTS = {"layernorm fold": (_fold, 1), "reader shift": (_reader_shift, 1),
          "key bias": (_key_bias, 1), "value bias": (_value_bias, 1),
          "stream mean": (_stream_mean, 0)}


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("name", list(PARTS))
def test_each_layernorm_and_bias_part_alone_moves_raw_only(cfg: TransformerConfig,
                                                          name: str) -> None:
    """Each of the group's five LayerNorm and bias parts alone (PARTS): chain-gram, gram,
    aligned and cka stay at every layer, raw moves from the first layer it touches."""
    sd = _state(cfg, 3)
    moved = dict(sd)
    transform, first = PARTS[name]
    transform(cfg, moved, torch.Generator().manual_seed(5))
    assert _function_change(cfg, sd, moved) < 1e-8
    for upto in range(first, len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, method != "raw", name)


# ---------------------------------------------------------------- function-changing noise

# (parameter, index in transformer_layers of the first layer it enters) for depth 2
NOISE = [("embed.weight", 0), ("embed.bias", 0), ("pos", 0), ("blocks.0.ln1.weight", 1),
         ("blocks.0.ln1.bias", 1), ("blocks.0.w_q", 1), ("blocks.0.b_q", 1), ("blocks.0.w_k", 1),
         ("blocks.0.w_v", 1), ("blocks.0.b_v", 1), ("blocks.0.w_o", 1), ("blocks.0.b_o", 1),
         ("blocks.0.ln2.bias", 2), ("blocks.0.fc1.weight", 2), ("blocks.0.fc2.weight", 2),
         ("blocks.0.fc2.bias", 2), ("blocks.1.w_k", 3), ("blocks.1.fc1.bias", 4),
         ("ln.weight", 5), ("ln.bias", 5), ("head.weight", 5), ("head.bias", 5)]
# a shift alike for every sample of the layer it enters (cka, centred over the probe, is blind)
SHIFTS = ("embed.bias", "pos", "cls", "b_v", "b_o", "fc2.bias", "ln.bias", "head.bias")
QUERY_KEY = ("w_q", "w_k", "b_q", "b_k")


def _blind(method: str, key: str, first: int, upto: int) -> bool:
    """Where noise on ``key`` leaves a method's feature at layer ``upto`` (>= first) unmoved:
    gram reads W_Q, W_K and their biases in the query-key form of their own attn layer only;
    cka is centred over the probe, so a shift alike for every sample is invisible to it."""
    if method in ("gram", "chain-gram"):
        return key.rsplit(".", 1)[-1] in QUERY_KEY and upto > first
    if method == "cka":
        return upto == first and re.sub(r"^blocks\.\d+\.", "", key) in SHIFTS
    return False


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=IDS[:2])
@pytest.mark.parametrize(("key", "first"), NOISE, ids=[k for k, _ in NOISE])
def test_noise_on_a_parameter_moves_every_method_from_its_layer_on(
        cfg: TransformerConfig, key: str, first: int) -> None:
    """Noise on one parameter changes the function and moves every method at every layer from
    the first it enters on, except the blind spots of _blind (tested to stay < 1e-4)."""
    sd = _state(cfg, 11)
    moved = dict(sd)
    gen = torch.Generator().manual_seed(2)
    moved[key] = sd[key] + torch.randn(sd[key].shape, generator=gen, dtype=torch.float64)
    assert _function_change(cfg, sd, moved) > 1e-3
    for upto in range(first, len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, _blind(method, key, first, upto), f"{key} noise")


def test_noise_on_the_class_token_moves_all_but_cka_at_embed() -> None:
    cfg = CONFIGS[0]
    sd = _state(cfg, 11)
    gen = torch.Generator().manual_seed(2)
    moved = {**sd, "cls": sd["cls"] + torch.randn(cfg.d_model, generator=gen, dtype=torch.float64)}
    for upto in range(len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, method == "cka" and upto == 0, "cls noise")


# ---------------------------------------------------------------- blind spots of gram


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_gram_misses_a_query_change_that_keeps_the_head_sum(cfg: TransformerConfig) -> None:
    """Two heads with one key map: a query change D moved from one head to the other keeps
    sum_h Q_h K_h^T (and leaves the value path), so gram and chain-gram stay at every layer while
    the function, raw, aligned and cka move."""
    sd = _state(cfg, 4)
    for w in ("w_k", "b_k"):
        sd[f"blocks.0.{w}"] = sd[f"blocks.0.{w}"][[0, 0]].clone()  # head 1 keys like head 0
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(cfg.d_model, cfg.d_k, generator=gen, dtype=torch.float64) * 0.5
    moved = dict(sd)
    moved["blocks.0.w_q"] = sd["blocks.0.w_q"] + torch.stack([d, -d])
    assert _function_change(cfg, sd, moved) > 1e-3
    for upto in range(1, len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, method in ("gram", "chain-gram"),
                   "a head-sum preserving query change")


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_gram_misses_the_sign_flip_of_an_mlp_unit(cfg: TransformerConfig) -> None:
    """fc1's row and bias and fc2's column of one hidden unit negated: the linearized MLP is the
    same (gram, chain-gram at every layer), the ReLU / GELU network is not."""
    sd = _state(cfg, 6)
    moved = dict(sd)
    for key, col in (("fc1.weight", False), ("fc1.bias", False), ("fc2.weight", True)):
        w = sd[f"blocks.0.{key}"].clone()
        if col:
            w[:, 3] = -w[:, 3]
        else:
            w[3] = -w[3]
        moved[f"blocks.0.{key}"] = w
    assert _function_change(cfg, sd, moved) > 1e-3
    for upto in range(2, len(transformer_layers(cfg))):
        for method in METHODS:
            _check(cfg, sd, moved, method, upto, method in ("gram", "chain-gram"),
                   "an MLP sign flip")


# ---------------------------------------------------------------- chain-gram and the linearization


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_chain_gram_equals_gram(cfg: TransformerConfig) -> None:
    """The only positive scales of the group are ReLU units', and they cancel in every product
    gram uses: chain-gram = gram to rounding (GELU: not normalized, exactly)."""
    sd = _state(cfg, 8)
    for upto in range(len(transformer_layers(cfg))):
        c, g = _feature(cfg, sd, "chain-gram", upto), _feature(cfg, sd, "gram", upto)
        if cfg.activation == "gelu":
            assert torch.equal(c, g)
        else:
            torch.testing.assert_close(c, g, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_the_chain_normalization_keeps_the_function(cfg: TransformerConfig) -> None:
    """ReLU: fc1's rows (with biases) get unit norm and the logits stay; GELU: left as is."""
    sd = _state(cfg, 9)
    normed = _normalize(cfg, sd)
    assert _function_change(cfg, sd, normed) < 1e-10
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        norms = (normed[b + "fc1.weight"].square().sum(1) + normed[b + "fc1.bias"].square()).sqrt()
        if cfg.activation == "relu":
            torch.testing.assert_close(norms, torch.ones_like(norms))
        else:
            assert torch.equal(normed[b + "fc1.weight"], sd[b + "fc1.weight"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_the_linearized_network_is_the_network_with_its_nonlinearities_replaced(
        cfg: TransformerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """With zero query maps (uniform attention), LayerNorm's division and the activation patched
    out, the real network's stream and logits are M [x; 1] at every layer."""
    sd = _state(cfg, 10)
    for i in range(cfg.depth):
        sd[f"blocks.{i}.w_q"] = torch.zeros_like(sd[f"blocks.{i}.w_q"])
        sd[f"blocks.{i}.b_q"] = torch.zeros_like(sd[f"blocks.{i}.b_q"])

    def centred(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias

    monkeypatch.setattr(nn.LayerNorm, "forward", centred)
    monkeypatch.setattr(torch, "relu", lambda x: x)
    monkeypatch.setattr(nn.functional, "gelu", lambda x: x)
    x = _probe(cfg)[:5].double()
    n = math.prod(cfg.input_shape)
    for upto in range(len(transformer_layers(cfg))):
        real = _activations(cfg, [sd], x, upto)[0]  # (5, units)
        basis = torch.eye(n + 1, n, dtype=torch.float64).reshape(-1, *cfg.input_shape)
        t = torch.zeros(n + 1, dtype=torch.float64)
        t[n] = 1.0
        m_t = _walk(cfg, sd, basis, t, upto)[0]  # (P+1, units) = M^T
        want = x.reshape(5, n) @ m_t[:n] + m_t[n]
        if upto < len(transformer_layers(cfg)) - 1:  # cka's stream: centred per token
            want = _centre(want, cfg.d_model)
        torch.testing.assert_close(want, real)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_the_input_sketch_gives_the_sketched_forms(cfg: TransformerConfig) -> None:
    """With S: the Gram of M S is S^T G S, the query-key form S^T (sum_h Q_h K_h^T) S, and
    'out' M_L S."""
    sd = {k: v[None] for k, v in _state(cfg, 12).items()}
    n1 = math.prod(cfg.input_shape) + 1
    s = torch.randn(n1, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tri = n1 * (n1 + 1) // 2
    i, j = torch.triu_indices(n1, n1)
    for upto, layer in enumerate(transformer_layers(cfg)):
        full = transformer_features(cfg, sd, "gram", upto)[0]
        sketched = transformer_features(cfg, sd, "gram", upto, s=s)[0]
        if layer == "out":
            want = (full.reshape(-1, n1) @ s).reshape(-1)
        else:
            g = torch.zeros(n1, n1, dtype=torch.float64)
            g[i, j] = full[:tri]
            g = g + g.T - torch.diag(g.diagonal())
            want = upper_triangle((s.T @ g @ s)[None])[0]
            if layer.startswith("attn"):
                qk = full[tri:].reshape(n1, n1)
                want = torch.cat([want, (s.T @ qk @ s).reshape(-1)])
        torch.testing.assert_close(sketched, want)


# ---------------------------------------------------------------- API


def test_aligned_and_the_template() -> None:
    """The template holds the aligned keys; aligning the template's first model to a template of
    itself alone gives that model's quantities; K models give K rows."""
    cfg = CONFIGS[0]
    sds = [_state(cfg, 20 + i) for i in range(3)]
    stacked = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    own = make_transformer_template(cfg, {k: v[:1] for k, v in stacked.items()}, iterations=0)
    assert {"blocks.0.qk", "blocks.1.ov", "cls"} <= set(own) and "blocks.0.w_q" not in own
    last = len(transformer_layers(cfg)) - 1
    f = transformer_features(cfg, stacked, "aligned", last, template=own)
    assert f.shape == (3, sum(v.numel() for v in own.values()))
    flat = torch.cat([own[k].reshape(-1) for k in _keys(cfg, last, aligned=True)])
    torch.testing.assert_close(f[0], flat)


def test_the_key_bias_gets_no_gradient() -> None:
    """Symmetry 3 seen by training: the loss does not depend on b_K, so its gradient is 0."""
    cfg = CONFIGS[0]
    net = _net(cfg, 1)
    net(_probe(cfg).double()).square().sum().backward()
    for i in range(cfg.depth):
        grad = net.get_parameter(f"blocks.{i}.b_k").grad
        assert grad is not None and float(grad.abs().max()) < 1e-10
        assert float(net.get_parameter(f"blocks.{i}.b_q").grad.abs().max()) > 1e-6


def test_bad_arguments_say_what_is_wrong() -> None:
    cfg = CONFIGS[0]
    stacked = {k: v[None] for k, v in _state(cfg, 0).items()}
    with pytest.raises(ValueError, match="method must be one of"):
        transformer_features(cfg, stacked, "cca", 0)
    with pytest.raises(ValueError, match="needs template="):
        transformer_features(cfg, stacked, "aligned", 0)
    with pytest.raises(ValueError, match="needs probe="):
        transformer_features(cfg, stacked, "cka", 0)
    with pytest.raises(ValueError, match="upto must be"):
        transformer_features(cfg, stacked, "gram", 6)
