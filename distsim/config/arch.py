"""The ``[[arch]]`` section: :class:`ArchConfig`, the architecture every model of a zoo shares,
and its constraint table.

Plain data (no torch): the config, the store and the CLI read it without loading the models;
:mod:`distsim.zoo.models` builds the networks from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from distsim.errors import ConfigError
from distsim.params import NAME_PATTERN, Array, Integer, Number, Options, Table, Text, check_fields

KINDS = ("mlp", "cnn", "rnn", "resnet", "transformer")
# keys added after the first studies: a study's resolved config (and hash) omits them at these
# defaults, so older studies keep their hashes
ADDED_DEFAULTS = {"step_width": 1, "blocks": 1, "d_model": 16, "heads": 2, "depth": 1,
                  "patch": 4, "pooling": "cls"}
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "gelu", "sigmoid")


@dataclass(frozen=True)
class ArchConfig:
    """The architecture shared by every model of a zoo.

    kind: ``mlp`` | ``cnn`` | ``rnn`` | ``resnet`` | ``transformer``.
    widths: hidden widths of the MLP.
    channels: output channels of each CNN block (3x3 conv, padding 1, activation, 2x2 max-pool;
    for a 1-D input: kernel-3 Conv1d, padding 1, activation, MaxPool1d(2)); a ResNet's stage
    widths (distsim.zoo.resnet: a stem conv, then per stage ``blocks`` basic blocks with
    BatchNorm, the first of each later stage halving the resolution; ReLU only).
    blocks: basic blocks per ResNet stage.
    d_model, heads, depth, patch, pooling: the transformer's (distsim.zoo.transformer) stream
    width, heads per block, blocks, values of the length axis per token of a 1-D input (a 2-D
    input is read a row per token), and ``cls`` (a class token) or ``mean`` pooling; its MLP's
    width is ``hidden`` and its activation ``relu`` or ``gelu``.
    head_widths: hidden linear layers of the CNN between its flatten and its output layer.
    hidden, num_layers: GRU hidden size and depth (the RNN reads image rows as a sequence: H
    steps of C*W values; a 1-D input: L / step_width steps of C * step_width values, each step
    step_width consecutive positions of every channel).
    activation: the hidden layers' activation of the MLP and CNN (the GRU's gates are its own):
    ``relu``, ``leaky_relu`` (slope ``negative_slope`` below 0), ``tanh``, ``gelu`` (the exact erf
    form) or ``sigmoid``. Which hidden-unit transforms keep the function depends on it
    (distsim.weights.normalize.symmetries).
    input_shape: (C, H, W) or (C, L) of one sample; num_classes: outputs of the linear head.
    """

    kind: str = "mlp"
    widths: tuple[int, ...] = (32, 32)
    channels: tuple[int, ...] = (8, 16)
    head_widths: tuple[int, ...] = ()
    hidden: int = 32
    num_layers: int = 1
    step_width: int = 1
    blocks: int = 1
    d_model: int = 16
    heads: int = 2
    depth: int = 1
    patch: int = 4
    pooling: str = "cls"
    activation: str = "relu"
    negative_slope: float = 0.01
    input_shape: tuple[int, ...] = (1, 8, 8)  # (C, H, W) or (C, L)
    num_classes: int = 2
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.kind)
        check_fields(self, "arch", ARCH_PARAMS)
        if self.kind == "mlp" and not self.widths:
            raise ConfigError.at("arch.widths", "must name at least one hidden layer for an mlp")
        if self.kind == "cnn":
            if not self.channels:
                raise ConfigError.at("arch.channels", "must name at least one block for a cnn")
            sizes = self.input_shape[1:]
            if min(sizes) < 2 ** len(self.channels):
                side = "x".join([str(2 ** len(self.channels))] * len(sizes))
                raise ConfigError.at("arch.channels",
                                     f"{len(self.channels)} pooling blocks need an input of at "
                                     f"least {side}, got {'x'.join(map(str, sizes))}")
        if self.kind == "resnet":
            self._check_resnet()
        if self.kind == "transformer":
            self._check_transformer()
        if self.step_width != 1 and (self.kind != "rnn" or len(self.input_shape) != 2):
            raise ConfigError.at("arch.step_width", "applies only to an rnn over 1-D inputs "
                                 f"(C, L), got {self.kind} over {self.input_shape}")
        if self.step_width != 1 and self.input_shape[1] % self.step_width:
            raise ConfigError.at("arch.step_width", f"must divide the input length "
                                 f"{self.input_shape[1]}, got {self.step_width}")

    def _check_resnet(self) -> None:
        if not self.channels:
            raise ConfigError.at("arch.channels", "must name at least one stage for a resnet")
        if self.activation != "relu":
            raise ConfigError.at("arch.activation", "a resnet's activation is relu (its "
                                 f"symmetries and BatchNorm folding assume it), got "
                                 f"{self.activation!r}")
        sizes = self.input_shape[1:]
        if min(sizes) < 2 ** (len(self.channels) - 1):
            raise ConfigError.at("arch.channels", f"{len(self.channels)} stages halve the input "
                                 f"{len(self.channels) - 1} times; got {'x'.join(map(str, sizes))}")

    def _check_transformer(self) -> None:
        if self.d_model % self.heads:
            raise ConfigError.at("arch.heads", f"must divide d_model {self.d_model}, "
                                 f"got {self.heads}")
        if self.activation not in ("relu", "gelu"):
            raise ConfigError.at("arch.activation", "a transformer's MLP uses relu or gelu, got "
                                 f"{self.activation!r}")
        if len(self.input_shape) == 2 and self.input_shape[1] % self.patch:
            raise ConfigError.at("arch.patch", f"must divide the input length "
                                 f"{self.input_shape[1]}, got {self.patch}")

    def with_task_shape(self, input_shape: tuple[int, ...], num_classes: int) -> ArchConfig:
        """A copy sized for a task's samples (input_shape) and labels (num_classes)."""
        return replace(self, input_shape=tuple(input_shape), num_classes=int(num_classes))

    def feature_layers(self) -> tuple[str, ...]:
        """Layer names a feature can be taken at, in order: mlp fc1.., out; cnn conv1.., fc1..
        (its head_widths), out; rnn gru_ih, gru_ih_l1.., out; resnet stem, block1.conv1, block1,
        .., out (a block's inner channels, then the residual stream after it); transformer
        embed, attn1, mlp1, .., out (the stream after each residual add). The names of
        distsim.weights.features.feature_layers, which a test keeps equal."""
        if self.kind == "resnet":
            n = self.blocks * len(self.channels)
            inner = [x for i in range(1, n + 1) for x in (f"block{i}.conv1", f"block{i}")]
            return ("stem", *inner, "out")
        if self.kind == "transformer":
            blocks = [x for i in range(1, self.depth + 1) for x in (f"attn{i}", f"mlp{i}")]
            return ("embed", *blocks, "out")
        if self.kind == "mlp":
            hidden = [f"fc{i + 1}" for i in range(len(self.widths))]
        elif self.kind == "cnn":
            hidden = ([f"conv{i + 1}" for i in range(len(self.channels))]
                      + [f"fc{i + 1}" for i in range(len(self.head_widths))])
        else:
            hidden = ["gru_ih"] + [f"gru_ih_l{k}" for k in range(1, self.num_layers)]
        return (*hidden, "out")


ARCH_PARAMS: Table = {
    "kind": Options(KINDS),
    "widths": Array(Integer(lo=1)),
    "channels": Array(Integer(lo=1)),
    "head_widths": Array(Integer(lo=1)),
    "hidden": Integer(lo=1),
    "num_layers": Integer(lo=1),
    "step_width": Integer(lo=1),
    "blocks": Integer(lo=1),
    "d_model": Integer(lo=1),
    "heads": Integer(lo=1),
    "depth": Integer(lo=1),
    "patch": Integer(lo=1),
    "pooling": Options(("cls", "mean")),
    "activation": Options(ACTIVATIONS),
    "negative_slope": Number(),
    "input_shape": Array(Integer(lo=1), size=(2, 3)),  # (C, H, W) or (C, L)
    "num_classes": Integer(lo=2),
    "name": Text(pattern=NAME_PATTERN),
}

