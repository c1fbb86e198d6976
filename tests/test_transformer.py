"""The transformer of distsim.zoo.transformer and its symmetry group: random_transformer_transform
(the residual stream's permutation, head permutations, an invertible map per head between W_Q and
W_K and between W_V and W_O, the MLP's permutations and ReLU rescalings) keeps the logits; a map
on one side of a pair alone does not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.symmetries import random_transformer_transform
from distsim.zoo.transformer import Transformer, TransformerConfig

CONFIGS = [
    TransformerConfig(d_model=8, heads=2, depth=1, hidden=12, input_shape=(1, 20), patch=4),
    TransformerConfig(d_model=12, heads=3, depth=2, hidden=10, activation="gelu",
                      pooling="mean", input_shape=(2, 12), patch=3),
    TransformerConfig(d_model=8, heads=1, depth=2, hidden=6, input_shape=(1, 6, 6),
                      num_classes=3),
    TransformerConfig(d_model=16, heads=4, depth=1, hidden=8, pooling="mean",
                      input_shape=(1, 8, 8), num_classes=4),
]


def _net(cfg: TransformerConfig, seed: int) -> Transformer:
    """A float64 transformer with every parameter random (zero biases, unit LayerNorm gains
    and a zero class token would hide a mistake in moving them)."""
    torch.manual_seed(seed)
    net = Transformer(cfg).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in ("bias", "b_q", "b_k", "b_v", "b_o", "cls"):
                param.normal_(0.0, 0.3)
            elif ".ln" in f".{name}":  # a LayerNorm's gain
                param.normal_(1.0, 0.3)
    return net


def _logits(net: Transformer, cfg: TransformerConfig, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *cfg.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c.d_model}h{c.heads}x{c.depth}")
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_random_element_keeps_the_logits(cfg: TransformerConfig, seed: int) -> None:
    net = _net(cfg, seed % 991)
    moved = random_transformer_transform(cfg, net.state_dict(), seed)
    twin = Transformer(cfg).double()
    twin.load_state_dict(moved)
    torch.testing.assert_close(_logits(twin, cfg, 0), _logits(net, cfg, 0), rtol=1e-5,
                               atol=1e-5)
    assert not torch.equal(moved["blocks.0.w_q"], net.state_dict()["blocks.0.w_q"])


@pytest.mark.parametrize("weight", ["w_q", "w_v"])
def test_a_map_on_one_side_of_a_pair_changes_the_function(weight: str) -> None:
    """The check can fail: W_Q (or W_V) times an invertible map without W_K's (W_O's) inverse
    moves the logits."""
    cfg = CONFIGS[0]
    net = _net(cfg, 4)
    state = dict(net.state_dict())
    state[f"blocks.0.{weight}"] = state[f"blocks.0.{weight}"] * 2.0
    twin = Transformer(cfg).double()
    twin.load_state_dict(state)
    assert (_logits(twin, cfg, 0) - _logits(net, cfg, 0)).abs().max() > 1e-4


def test_the_query_key_product_of_a_head_is_invariant() -> None:
    """W_Q W_K^T of each head (its attention logits' bilinear form) survives the per-head map;
    W_Q alone does not."""
    cfg = TransformerConfig(d_model=8, heads=1, input_shape=(1, 8), patch=2)
    net = _net(cfg, 1)
    state = net.state_dict()
    moved = random_transformer_transform(cfg, state, 7)
    before = state["blocks.0.w_q"][0] @ state["blocks.0.w_k"][0].T
    after = moved["blocks.0.w_q"][0] @ moved["blocks.0.w_k"][0].T  # rows and columns permuted
    assert not torch.allclose(moved["blocks.0.w_q"][0].abs().sum(0),
                              state["blocks.0.w_q"][0].abs().sum(0))
    torch.testing.assert_close(torch.sort(after.flatten())[0], torch.sort(before.flatten())[0],
                               rtol=1e-9, atol=1e-12)
