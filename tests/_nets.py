"""Small seeded networks the feature tests share: an MLP (leaky ReLU), a CNN, a 1-D CNN on
(1, 40) inputs (MNIST-1D's shape) and a 2-layer GRU."""

from __future__ import annotations

import torch
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.zoo.models import build

MLP = ArchConfig(kind="mlp", widths=(12, 9), activation="leaky_relu", negative_slope=0.05)
CNN = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), num_classes=3)
CNN1D = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), input_shape=(1, 40),
                   num_classes=3)
RNN = ArchConfig(kind="rnn", hidden=5, num_layers=2, num_classes=3)


def seeded_model(cfg: ArchConfig, seed: int) -> nn.Module:
    """build(cfg) after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return build(cfg)
