"""Small seeded networks the feature tests share: an MLP (leaky ReLU), a CNN, a 1-D CNN on
(1, 40) inputs (MNIST-1D's shape) and a 2-layer GRU; random BatchNorm statistics."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.zoo.models import build

MLP = ArchConfig(kind="mlp", widths=(12, 9), activation="leaky_relu", negative_slope=0.05)
CNN = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), num_classes=3)
CNN1D = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), input_shape=(1, 40),
                   num_classes=3)
RNN = ArchConfig(kind="rnn", hidden=5, num_layers=2, num_classes=3)
Net = TypeVar("Net", bound=nn.Module)


def seeded_model(cfg: ArchConfig, seed: int) -> nn.Module:
    """build(cfg) after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return build(cfg)


def random_batchnorms(net: Net, beta: tuple[float, float] = (-1.0, 1.0),
                      mean_std: float = 1.0) -> Net:
    """`net` with every BatchNorm's gamma in [0.5, 2], beta uniform in `beta`, running mean
    N(0, mean_std^2) and running variance in [0.2, 3] (the defaults 1, 0, 0, 1 would hide a
    mistake in moving them); drawn from torch's global generator, in place."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(*beta)
                m.running_mean.normal_(0.0, mean_std)
                m.running_var.uniform_(0.2, 3.0)
    return net
