"""A small residual CNN with BatchNorm (``kind = "resnet"`` of an ``[[arch]]``): the network,
its BatchNorm folded into the convolutions, its layout, its packed forward and its BatchNorm
statistics computed from trained weights.

    stem:   conv3 (C_0) -> BN -> ReLU
    stage s (width C_s, `blocks` basic blocks; the first of stage s > 0 halves the resolution):
        block: h = ReLU(BN(conv3(x)));  y = ReLU(BN(conv3(h)) + shortcut(x))
        shortcut: x itself, or BN(conv1x1, stride 2)(x) where the width or resolution changes
    head:   global average pooling -> linear (C_last -> classes)

Convolutions have no bias (BatchNorm follows each); 1-D inputs (C, L) use Conv1d/BatchNorm1d,
2-D inputs (C, H, W) Conv2d/BatchNorm2d. In eval mode a BatchNorm is the per-channel affine map
x -> gamma (x - mean) / sqrt(var + eps) + beta of its running statistics, so it folds into the
convolution before it (``fold_batchnorm``): a conv with a bias, the same function.

The residual stream of a stage (its C_s channels) is written by the stem (stage 0) or the first
block's projection shortcut, and by every block's second BatchNorm; it is read by every block's
first convolution and identity or projection shortcut, and by the head. ``stream_layout`` lists
those parameters: what a symmetry of the stream must move together
(``distsim.symmetries.random_resnet_transform``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # torch's BatchNorm default, the eps of every BatchNorm here


@dataclass(frozen=True)
class ResNetConfig:
    """channels: C_s of each stage; blocks: basic blocks per stage; input_shape (C, H, W) or
    (C, L); num_classes: outputs of the head."""

    channels: tuple[int, ...] = (8, 16)
    blocks: int = 1
    input_shape: tuple[int, ...] = (1, 8, 8)
    num_classes: int = 2

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1 or self.blocks < 1:
            raise ValueError(f"a ResNet needs stages of >= 1 channel and >= 1 block, got "
                             f"channels={self.channels}, blocks={self.blocks}")
        if len(self.input_shape) not in (2, 3):
            raise ValueError(f"input_shape must be (C, L) or (C, H, W), got {self.input_shape}")

    @property
    def dims(self) -> int:
        return len(self.input_shape) - 1


class _Countless:
    """A BatchNorm without the num_batches_tracked counter (an integer buffer the momentum
    update does not use): its state dict holds float tensors only, and loading one does not
    ask for the counter (torch adds it to a state dict without version metadata)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)  # type: ignore[call-arg]
        self._buffers["num_batches_tracked"] = None  # type: ignore[attr-defined]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        nn.Module._load_from_state_dict(self, *args, **kwargs)  # type: ignore[arg-type]


class BatchNorm1d(_Countless, nn.BatchNorm1d):
    """nn.BatchNorm1d without num_batches_tracked (_Countless)."""


class BatchNorm2d(_Countless, nn.BatchNorm2d):
    """nn.BatchNorm2d without num_batches_tracked (_Countless)."""


def batch_norm(channels: int, dims: int) -> nn.Module:
    """The BatchNorm of `channels` for 1-D or 2-D inputs, without num_batches_tracked."""
    return BatchNorm1d(channels) if dims == 1 else BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """conv3 -> BN -> ReLU -> conv3 -> BN, plus the identity or a projection, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = batch_norm(c_out, dims)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = batch_norm(c_out, dims)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False),
                                          batch_norm(c_out, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """The residual CNN of a ResNetConfig (module docstring)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        conv = nn.Conv1d if cfg.dims == 1 else nn.Conv2d
        c0 = cfg.channels[0]
        self.stem = nn.Sequential(conv(cfg.input_shape[0], c0, 3, padding=1, bias=False),
                                  batch_norm(c0, cfg.dims))
        blocks, c_in = [], c0
        for s, c in enumerate(cfg.channels):
            for b in range(cfg.blocks):
                blocks.append(BasicBlock(c_in, c, 2 if s > 0 and b == 0 else 1, cfg.dims))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cfg.channels[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))  # (B, C_last, *spatial)
        return self.head(h.flatten(2).mean(dim=2))  # global average pooling, then linear


@dataclass(frozen=True)
class Stream:
    """One stage's residual stream: the conv (or BN) prefixes that write it (their output
    channels) and the convs and linear layers that read it (their input channels)."""

    width: int
    writers: tuple[str, ...]  # BatchNorm prefixes whose channels are stream channels
    readers: tuple[str, ...]  # conv / linear weight keys whose input channels read the stream


def stream_layout(cfg: ResNetConfig) -> list[Stream]:
    """The residual streams of a ResNet's state dict, stage by stage (module docstring).

    >>> [s.writers for s in stream_layout(ResNetConfig(channels=(4, 8), blocks=1))]
    [('stem.1', 'blocks.0.bn2'), ('blocks.1.shortcut.1', 'blocks.1.bn2')]
    """
    out, i = [], 0
    for s, c in enumerate(cfg.channels):
        writers = ["stem.1"] if s == 0 else []
        readers: list[str] = []
        for b in range(cfg.blocks):
            block = f"blocks.{i}"
            if s > 0 and b == 0:
                writers.append(f"{block}.shortcut.1")
            writers.append(f"{block}.bn2")
            i += 1
        # readers: every block of this stage but the first of a stage > 0 (it reads the stage
        # before; stage 0's first block keeps the stem's width and resolution: an identity
        # shortcut), the next stage's first block (conv1 and its projection), or the head
        first = i - cfg.blocks
        for j in range(first + (1 if s > 0 else 0), i):
            readers.append(f"blocks.{j}.conv1.weight")
        if s + 1 < len(cfg.channels):
            readers += [f"blocks.{i}.conv1.weight", f"blocks.{i}.shortcut.0.weight"]
        else:
            readers.append("head.weight")
        out.append(Stream(c, tuple(writers), tuple(readers)))
    return out


def conv_of(bn: str) -> str:
    """The conv before a BatchNorm prefix of stream_layout's writers: stem.1 -> stem.0,
    blocks.i.bn2 -> blocks.i.conv2, blocks.i.shortcut.1 -> blocks.i.shortcut.0.

    >>> [conv_of(bn) for bn in ("stem.1", "blocks.0.bn2", "blocks.1.shortcut.1")]
    ['stem.0', 'blocks.0.conv2', 'blocks.1.shortcut.0']
    """
    head, _, last = bn.rpartition(".")
    return f"{head}.0" if last == "1" else f"{head}.conv{last[-1]}"


def fold_batchnorm(state_dict: Mapping[str, torch.Tensor], cfg: ResNetConfig,
                   eps: float = BN_EPS) -> dict[str, torch.Tensor]:
    """Every (conv, BN) pair of an eval-mode ResNet as one conv with a bias: W' = W gamma /
    sqrt(var + eps) per output channel, b' = beta - mean gamma / sqrt(var + eps). Keys:
    ``<conv>.weight`` and ``<conv>.bias`` of each conv (the BN's keys dropped); the head as is."""
    p = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    pairs = [("stem.0", "stem.1")]
    for i in range(cfg.blocks * len(cfg.channels)):
        pairs += [(f"blocks.{i}.conv1", f"blocks.{i}.bn1"),
                  (f"blocks.{i}.conv2", f"blocks.{i}.bn2")]
        if f"blocks.{i}.shortcut.0.weight" in p:
            pairs.append((f"blocks.{i}.shortcut.0", f"blocks.{i}.shortcut.1"))
    for conv, bn in pairs:
        scale = p[f"{bn}.weight"] / torch.sqrt(p[f"{bn}.running_var"] + eps)  # (C,)
        w = p[f"{conv}.weight"]
        out[f"{conv}.weight"] = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        out[f"{conv}.bias"] = p[f"{bn}.bias"] - p[f"{bn}.running_mean"] * scale
    out["head.weight"], out["head.bias"] = p["head.weight"], p["head.bias"]
    return out


def folded_layers(params: Mapping[str, torch.Tensor], cfg: ResNetConfig, x: torch.Tensor,
                  act: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
                  upto: int | None = None) -> list[torch.Tensor]:
    """The outputs (B, units), channel-major, of the folded eval-mode net's layers in order, up
    to layer number ``upto`` (None: every one): the stem, then per block its inner channels and
    the stream after its add, then the logits; ``act`` in place of every ReLU (the identity: the
    linearized net). x (B, C, *spatial)."""
    conv = F.conv1d if cfg.dims == 1 else F.conv2d
    outs: list[torch.Tensor] = []

    def layer(name: str, h: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
        return conv(h, params[f"{name}.weight"], params[f"{name}.bias"], stride=stride,
                    padding=padding)

    def done(h: torch.Tensor) -> bool:
        outs.append(h.flatten(1))
        return upto is not None and len(outs) > upto

    h = act(layer("stem.0", x))  # (B, C_0, *spatial)
    if done(h):
        return outs
    i = 0
    for s in range(len(cfg.channels)):
        for b in range(cfg.blocks):
            stride = 2 if s > 0 and b == 0 else 1
            inner = act(layer(f"blocks.{i}.conv1", h, stride))  # (B, C_s, *spatial / stride)
            if done(inner):
                return outs
            short = (layer(f"blocks.{i}.shortcut.0", h, stride, padding=0)
                     if f"blocks.{i}.shortcut.0.weight" in params else h)
            h = act(layer(f"blocks.{i}.conv2", inner) + short)
            if done(h):
                return outs
            i += 1
    done(F.linear(h.flatten(2).mean(dim=2), params["head.weight"], params["head.bias"]))
    return outs


def folded_forward(params: Mapping[str, torch.Tensor], cfg: ResNetConfig,
                   x: torch.Tensor) -> torch.Tensor:
    """The eval-mode ResNet's logits from its folded weights (``fold_batchnorm``): the same
    function, every BatchNorm inside a conv's weight and bias. x (B, C, *spatial)."""
    return folded_layers(params, cfg, x)[-1]


def forward_packed_resnet(cfg: ResNetConfig, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                          collect: dict[str, list[tuple[torch.Tensor, ...]]] | None = None
                          ) -> torch.Tensor:
    """K ResNets with stacked weights as one call: x (K, B, C, *spatial) -> logits (K, B, classes).

    params: (K, *shape) per parameter name of ``ResNet(cfg)``. A BatchNorm whose running
    statistics are in params (``<bn>.running_mean`` / ``running_var``, (K, C)) normalizes with
    them (eval mode); one without normalizes with the batch's statistics (training mode), per
    model and channel, and appends (mean, unbiased var, samples) of each channel to
    ``collect[<bn>]`` when given (``running_statistics``). The K models' channels sit side by
    side, (B, K*C, *spatial): convolutions are grouped (groups=K) and a BatchNorm over K*C
    channels is each model's own.
    """
    k, b = int(x.shape[0]), int(x.shape[1])
    conv = F.conv1d if cfg.dims == 1 else F.conv2d
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])  # (B, K*C, *spatial)

    def conv_bn(c: str, bn: str, h: torch.Tensor, stride: int = 1, padding: int = 1
                ) -> torch.Tensor:
        w = params[f"{c}.weight"]  # (K, out, in, *kernel)
        h = conv(h, w.reshape(-1, *w.shape[2:]), None, stride=stride, padding=padding, groups=k)
        gamma, beta = params[f"{bn}.weight"].reshape(-1), params[f"{bn}.bias"].reshape(-1)
        if f"{bn}.running_mean" in params:
            return F.batch_norm(h, params[f"{bn}.running_mean"].reshape(-1),
                                params[f"{bn}.running_var"].reshape(-1), gamma, beta,
                                training=False, eps=BN_EPS)
        if collect is not None:
            dims = [0, *range(2, h.dim())]  # a channel's samples: batch and positions
            with torch.no_grad():
                collect.setdefault(bn, []).append(
                    (h.mean(dims), h.var(dims), torch.tensor(h.numel() // h.shape[1])))
        return F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)

    h = torch.relu(conv_bn("stem.0", "stem.1", h))
    i = 0
    for s in range(len(cfg.channels)):
        for j in range(cfg.blocks):
            stride, block = (2 if s > 0 and j == 0 else 1), f"blocks.{i}"
            inner = torch.relu(conv_bn(f"{block}.conv1", f"{block}.bn1", h, stride))
            short = h
            if f"{block}.shortcut.0.weight" in params:
                short = conv_bn(f"{block}.shortcut.0", f"{block}.shortcut.1", h, stride, 0)
            h = torch.relu(conv_bn(f"{block}.conv2", f"{block}.bn2", inner) + short)
            i += 1
    pooled = h.flatten(2).mean(dim=2).reshape(b, k, -1).transpose(0, 1)  # (K, B, C_last)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), pooled,
                         params["head.weight"].transpose(1, 2))


def running_statistics(cfg: ResNetConfig, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                       batch_size: int) -> dict[str, torch.Tensor]:
    """Every BatchNorm's running statistics of K trained ResNets (params: (K, *shape) per
    parameter) on the training inputs x (N, C, *spatial): one pass over x in its order, in
    batches of ``batch_size``, in training mode; each channel's batch means and unbiased batch
    variances averaged, weighted by the batch's samples (the "precise BN" estimate of Wu and
    Johnson, Rethinking "Batch" in BatchNorm, 2021). Returns ``<bn>.running_mean`` and
    ``<bn>.running_var``, (K, C) each.

    The statistics are those of the final weights on the whole training set, not torch's
    exponential moving average over the last steps' weights, and they do not depend on the
    update path or the pack (each model's channels are its own).
    """
    k = next(iter(params.values())).shape[0]
    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    with torch.no_grad():
        for lo in range(0, len(x), batch_size):
            xb = x[lo : lo + batch_size]
            forward_packed_resnet(cfg, params, xb.expand(k, *xb.shape), collect=seen)
    out = {}
    for bn, parts in seen.items():
        n = torch.stack([p[2] for p in parts]).to(parts[0][0].dtype)  # (batches,)
        mean = (torch.stack([p[0] for p in parts]) * n[:, None]).sum(0) / n.sum()  # (K*C,)
        var = (torch.stack([p[1] for p in parts]) * n[:, None]).sum(0) / n.sum()
        out[f"{bn}.running_mean"], out[f"{bn}.running_var"] = mean.view(k, -1), var.view(k, -1)
    return out
