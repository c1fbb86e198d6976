"""The residual CNN of distsim.zoo.resnet: BatchNorm folds into its convolutions (the same
eval-mode function), and random_resnet_transform (residual-stream and inner-channel
permutations with positive scales) keeps its logits in eval and in training mode."""

from __future__ import annotations

import pytest
import torch
from _nets import random_batchnorms
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.symmetries import random_resnet_transform
from distsim.zoo.resnet import ResNet, ResNetConfig, fold_batchnorm, folded_forward, stream_layout

CONFIGS = [
    ResNetConfig(channels=(3,), blocks=2, input_shape=(2, 8, 8), num_classes=3),
    ResNetConfig(channels=(3, 5), blocks=1, input_shape=(1, 8, 8), num_classes=2),
    ResNetConfig(channels=(2, 4, 6), blocks=2, input_shape=(1, 16), num_classes=4),
    ResNetConfig(channels=(4, 4), blocks=2, input_shape=(3, 12), num_classes=2),
]


def _net(cfg: ResNetConfig, seed: int) -> ResNet:
    """A float64 ResNet whose BatchNorms have random affine maps and running statistics (the
    defaults, gamma 1, beta 0, mean 0, var 1, would hide a mistake in moving them)."""
    torch.manual_seed(seed)
    return random_batchnorms(ResNet(cfg).double())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.channels}x{c.blocks}-{c.dims}d")
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), train=st.booleans())
def test_a_random_element_keeps_the_logits(cfg: ResNetConfig, seed: int, train: bool) -> None:
    net = _net(cfg, seed % 997)
    twin = ResNet(cfg).double()
    moved = random_resnet_transform(cfg, net.state_dict(), seed)
    twin.load_state_dict(moved)
    net.train(train), twin.train(train)  # training mode: batch statistics
    x = torch.randn(12, *cfg.input_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(v, moved[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.channels}x{c.blocks}-{c.dims}d")
def test_folded_batchnorm_is_the_same_function(cfg: ResNetConfig) -> None:
    net = _net(cfg, 1).eval()
    folded = fold_batchnorm(net.state_dict(), cfg)
    assert not any("bn" in k or "running" in k for k in folded)
    x = torch.randn(9, *cfg.input_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded_forward(folded, cfg, x), net(x), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.channels}x{c.blocks}-{c.dims}d")
def test_every_layer_belongs_to_one_stream_or_one_block(cfg: ResNetConfig) -> None:
    """The layout names every BatchNorm but the blocks' first ones as a stream writer once,
    and every weight that reads a stream once."""
    keys = ResNet(cfg).state_dict()
    bns = {k.rsplit(".", 1)[0] for k in keys if k.endswith("running_mean")}
    streams = stream_layout(cfg)
    writers = [w for s in streams for w in s.writers]
    assert sorted(writers + [b for b in bns if b.endswith("bn1")]) == sorted(bns)
    readers = [r for s in streams for r in s.readers]
    convs = {k for k in keys if k.endswith(".weight") and keys[k].dim() >= 2}
    inner = {k for k in convs if k.endswith("conv2.weight")}  # they read a block's inner units
    stem = {"stem.0.weight"}  # reads the input
    assert sorted(readers) == sorted(convs - inner - stem)
    assert [s.width for s in streams] == list(cfg.channels)


def test_a_stream_permutation_missing_a_reader_changes_the_function() -> None:
    """The check can fail: permuting the stream's writers but not the head moves the logits."""
    cfg = CONFIGS[1]
    net = _net(cfg, 2).eval()
    moved = random_resnet_transform(cfg, net.state_dict(), 5)
    moved["head.weight"] = net.state_dict()["head.weight"]
    twin = ResNet(cfg).double().eval()
    twin.load_state_dict(moved)
    x = torch.randn(12, *cfg.input_shape, dtype=torch.float64)
    with torch.no_grad():
        assert (twin(x) - net(x)).abs().max() > 1e-4
