"""Architectures of a zoo: MLP, CNN (no BatchNorm) and GRU classifiers, and the residual CNN
with BatchNorm (distsim.zoo.resnet) and transformer (distsim.zoo.transformer) built from an
ArchConfig of kind ``resnet`` / ``transformer``.

Every model of a zoo is built from one :class:`ArchConfig`, so all models share the same
parameter names and shapes. The layouts are kept plain (``nn.Sequential`` of Linear and
Conv2d, or Conv1d for 1-D inputs, activations (ReLU, LeakyReLU, Tanh, GELU or Sigmoid, after
``ArchConfig.activation``), pooling, Flatten) because the chain
normalization rule walks them in order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.zoo.resnet import ResNet, ResNetConfig, forward_packed_resnet
from distsim.zoo.resnet import running_statistics as resnet_statistics
from distsim.zoo.transformer import Transformer, TransformerConfig


def _activation(cfg: ArchConfig) -> nn.Module:
    """The hidden layers' activation module of ``cfg`` (one of ACTIVATIONS)."""
    if cfg.activation == "relu":
        return nn.ReLU()
    if cfg.activation == "leaky_relu":
        return nn.LeakyReLU(cfg.negative_slope)
    if cfg.activation == "tanh":
        return nn.Tanh()
    if cfg.activation == "gelu":
        return nn.GELU()  # approximate="none": x * Phi(x), the exact erf form
    if cfg.activation == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {cfg.activation!r}")


class GRU(nn.Module):
    """A batch-first GRU written with plain matmuls (vmap-able, same maths as ``nn.GRU``).

    Parameter names, shapes, gate order (r, z, n) and default initialization match
    ``torch.nn.GRU``, so ``nn.GRU(...).load_state_dict(gru.state_dict())`` gives the same map.
    Input (B, T, input_size) -> output (B, T, hidden), last hidden (num_layers, B, hidden).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}",
                                    nn.Parameter(torch.empty(3 * hidden_size, n_in)))
            self.register_parameter(f"weight_hh_l{k}",
                                    nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(3 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(3 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = x.shape
        hid = self.hidden_size
        h_last = []
        for k in range(self.num_layers):
            w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
            gi_all = x @ w_ih.T + b_ih  # (B, T, 3H): input projections of every step at once
            h = x.new_zeros(batch, self.hidden_size)
            outs = []
            for t in range(steps):
                gi, gh = gi_all[:, t], h @ w_hh.T + b_hh
                r, z = torch.sigmoid(gi[..., : 2 * hid] + gh[..., : 2 * hid]).chunk(2, dim=-1)
                n = torch.tanh(gi[..., 2 * hid :] + r * gh[..., 2 * hid :])
                h = n + z * (h - n)  # = (1 - z) * n + z * h, the torch.nn.GRU update
                outs.append(h)
            x = torch.stack(outs, dim=1)
            h_last.append(h)
        return x, torch.stack(h_last, dim=0)


class RNNClassifier(nn.Module):
    """GRU over an image's rows (T = H steps of C*W features), linear head on the last state.

    A 1-D input (C, L) is read as T = L / step_width steps of C * step_width features.
    """

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.one_d = len(cfg.input_shape) == 2
        self.step_width = cfg.step_width
        c, _, w = (*cfg.input_shape, cfg.step_width) if self.one_d else cfg.input_shape
        self.gru = GRU(c * w, cfg.hidden, cfg.num_layers)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.one_d:  # (B, C, L) -> T steps of C * step_width features
            seq = _steps(x.reshape(batch, -1, x.shape[-1]), self.step_width)
        else:
            c, h, w = x.shape[-3:] if x.dim() == 4 else (1, *x.shape[-2:])
            seq = x.reshape(batch, c, h, w).permute(0, 2, 1, 3).reshape(batch, h, c * w)
        _, h_last = self.gru(seq)
        return self.head(h_last[-1])


def _steps(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., C, L) -> (..., T, C * width) with T = L / width: step t holds positions
    [t * width, (t + 1) * width) of every channel, channel-major."""
    *lead, c, length = x.shape
    steps = x.reshape(*lead, c, length // width, width).transpose(-3, -2)  # (..., T, C, width)
    return steps.reshape(*lead, length // width, c * width)


def resnet_config(cfg: ArchConfig) -> ResNetConfig:
    """The ResNetConfig of a ``kind = "resnet"`` ArchConfig (its channels are the stages)."""
    return ResNetConfig(channels=tuple(cfg.channels), blocks=cfg.blocks,
                        input_shape=tuple(cfg.input_shape), num_classes=cfg.num_classes)


def transformer_config(cfg: ArchConfig) -> TransformerConfig:
    """The TransformerConfig of a ``kind = "transformer"`` ArchConfig (its MLP width is
    ``hidden``; a 2-D input is read a row per token, whatever ``patch``)."""
    patch = cfg.patch if len(cfg.input_shape) == 2 else 1
    return TransformerConfig(d_model=cfg.d_model, heads=cfg.heads, depth=cfg.depth,
                             hidden=cfg.hidden, activation=cfg.activation, patch=patch,
                             pooling=cfg.pooling, input_shape=tuple(cfg.input_shape),
                             num_classes=cfg.num_classes)


def build(cfg: ArchConfig) -> nn.Module:
    """A freshly initialized model for ``cfg`` (default init; seed it with torch.manual_seed).

    Input (B, C, H, W) or (B, C, L) -> logits (B, num_classes). MLP and CNN are
    ``nn.Sequential``; the CNN of a (C, L) input uses Conv1d / MaxPool1d.

    >>> build(ArchConfig(kind="resnet", channels=(4, 8), input_shape=(1, 40))).cfg.channels
    (4, 8)
    """
    if not isinstance(cfg, ArchConfig):
        raise TypeError(f"build() takes an ArchConfig, got {type(cfg).__name__}")
    if cfg.kind == "resnet":
        return ResNet(resnet_config(cfg))
    if cfg.kind == "transformer":
        return Transformer(transformer_config(cfg))
    c, sizes = cfg.input_shape[0], cfg.input_shape[1:]
    if cfg.kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = math.prod(cfg.input_shape)
        for width in cfg.widths:
            layers += [nn.Linear(n_in, width), _activation(cfg)]
            n_in = width
        layers.append(nn.Linear(n_in, cfg.num_classes))
        return nn.Sequential(*layers)
    if cfg.kind == "cnn":
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(sizes) == 1 else (nn.Conv2d, nn.MaxPool2d)
        layers = []
        n_in = c
        for ch in cfg.channels:
            layers += [conv(n_in, ch, kernel_size=3, padding=1), _activation(cfg), pool(2)]
            n_in, sizes = ch, tuple(n // 2 for n in sizes)
        layers.append(nn.Flatten())
        n_in = n_in * math.prod(sizes)
        for width in cfg.head_widths:
            layers += [nn.Linear(n_in, width), _activation(cfg)]
            n_in = width
        layers.append(nn.Linear(n_in, cfg.num_classes))
        return nn.Sequential(*layers)
    return RNNClassifier(cfg)


def forward_packed(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """K copies of ``model``'s architecture with stacked weights, run as one batched call.

    params[name]: (K, *shape) for every parameter name of ``model`` (its own weights are unused).
    x: (K, B, C, H, W) or (K, B, C, L), one batch per copy -> logits (K, B, num_classes). Linear
    layers become batched matmuls, Conv2d / Conv1d a grouped convolution (groups=K), the GRU
    batched matmuls per step. A ResNet: distsim.zoo.resnet.forward_packed_resnet (its
    BatchNorms in eval mode where params hold their running statistics, else in training
    mode); a transformer: ``torch.func.vmap`` of the module over the stacked weights.
    """
    if isinstance(model, ResNet):
        return forward_packed_resnet(model.cfg, params, x)
    if isinstance(model, Transformer):
        return torch.func.vmap(
            lambda p, xb: torch.func.functional_call(model, p, (xb,)))(dict(params), x)
    if isinstance(model, RNNClassifier):
        if model.one_d:  # (K, B, C, L): T steps of C * step_width features
            seq = _steps(x, model.step_width)
        else:
            k, b, c, h, w = x.shape
            seq = x.permute(0, 1, 3, 2, 4).reshape(k, b, h, c * w)  # rows of the image as steps
        return _linear(params, "head", _gru_packed(model.gru, params, "gru", seq))
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"forward_packed() takes a model from build(), got {type(model).__name__}")
    k, b = int(x.shape[0]), int(x.shape[1])
    out, grouped = x, False  # grouped: (B, K*C, *spatial) layout of a grouped convolution
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            two_d = isinstance(layer, nn.Conv2d)
            if not grouped:
                out = out.transpose(0, 1).reshape(b, -1, *out.shape[(-2 if two_d else -1):])
                if two_d:  # channels-last: CPU max-pool and grouped conv are far faster on it
                    out = out.contiguous(memory_format=torch.channels_last)
                grouped = True
            weight = params[f"{name}.weight"]
            out = (F.conv2d if two_d else F.conv1d)(
                out, weight.reshape(-1, *weight.shape[2:]), params[f"{name}.bias"].reshape(-1),
                stride=layer.stride, padding=layer.padding, groups=k)
        elif isinstance(layer, nn.MaxPool2d):
            out = F.max_pool2d(out, layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, nn.MaxPool1d):
            out = F.max_pool1d(out, layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, nn.Flatten):
            out = out.reshape(b, k, -1).transpose(0, 1) if grouped else out.flatten(2)
            grouped = False
        elif isinstance(layer, nn.Linear):
            out = _linear(params, name, out)
        elif isinstance(layer, nn.LeakyReLU):
            out = F.leaky_relu(out, layer.negative_slope)
        elif isinstance(layer, nn.ReLU):
            out = F.relu(out)
        elif isinstance(layer, nn.Tanh):
            out = torch.tanh(out)
        elif isinstance(layer, nn.GELU):
            out = F.gelu(out, approximate=layer.approximate)
        elif isinstance(layer, nn.Sigmoid):
            out = torch.sigmoid(out)
        else:
            raise TypeError(f"forward_packed(): unsupported layer {name}: {type(layer).__name__}")
    return out


def running_statistics(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                       batch_size: int) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics of K trained copies of ``model`` (params (K, *shape)) on
    the training inputs x (N, ...): distsim.zoo.resnet.running_statistics for a ResNet, {} for
    the architectures without BatchNorm."""
    if isinstance(model, ResNet):
        return resnet_statistics(model.cfg, params, x, batch_size)
    return {}


def _linear(params: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """(K, B, in) -> (K, B, out) with weight (K, out, in) and bias (K, out)."""
    return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x,
                         params[f"{name}.weight"].transpose(1, 2))


def _gru_packed(
    gru: GRU, params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor
) -> torch.Tensor:
    """K stacked GRUs (the maths of GRU.forward): x (K, B, T, in) -> last hidden state (K, B, H)."""
    k, b, steps, _ = x.shape
    hid = gru.hidden_size
    for layer in range(gru.num_layers):
        w_ih, w_hh = params[f"{prefix}.weight_ih_l{layer}"], params[f"{prefix}.weight_hh_l{layer}"]
        b_ih, b_hh = params[f"{prefix}.bias_ih_l{layer}"], params[f"{prefix}.bias_hh_l{layer}"]
        gi_all = torch.baddbmm(b_ih.unsqueeze(1), x.reshape(k, b * steps, -1), w_ih.transpose(1, 2))
        gi_all = gi_all.view(k, b, steps, -1)  # input projections of every step at once
        h = x.new_zeros(k, b, gru.hidden_size)
        outs = []
        for t in range(steps):
            gi, gh = gi_all[:, :, t], torch.baddbmm(b_hh.unsqueeze(1), h, w_hh.transpose(1, 2))
            r, z = torch.sigmoid(gi[..., : 2 * hid] + gh[..., : 2 * hid]).chunk(2, dim=-1)
            n = torch.tanh(gi[..., 2 * hid :] + r * gh[..., 2 * hid :])
            h = n + z * (h - n)  # = (1 - z) * n + z * h, as GRU.forward
            outs.append(h)
        if layer + 1 < gru.num_layers:  # the next layer reads every step's output
            x = torch.stack(outs, dim=2)
    return h
