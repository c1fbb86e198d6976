"""Chain normalization rule: remove the rescaling symmetry of ReLU networks (arXiv 2208.04369).

Walk the layers in order; for every hidden unit i of layer l take s_i = ||(W_l[i, ...], b_l[i])||,
divide the unit's incoming weights and bias by s_i and multiply the slice of W_{l+1} that reads
unit i (a column of a linear layer, an input-channel slice of a conv, the block of flattened
columns of a linear layer after conv + flatten) by s_i. A conv's (1-D or 2-D) hidden units are
its output channels. ReLU/LeakyReLU are positively
homogeneous and max/avg pooling commute with a positive per-channel scale, so the network's
function is unchanged and every hidden unit's incoming vector has unit norm afterwards.

Tanh, GELU and sigmoid are not positively homogeneous: the same walk runs on such a network (it
is the feature-extraction step of chain-gram and aligned, which compare the normalized weights),
but the normalized network computes another function, and a rescaled unit is a different network
that the normalization maps to the same weights. ``chain_normalize`` flags this
(``function_preserving``), :func:`function_preserving` says it of a plan and :func:`symmetries`
lists the hidden-unit transforms that do keep the function of an architecture (tested in
tests/test_invariance.py, with what each feature method does under them).

GRU gates (σ, tanh) are not homogeneous either, so a GRU has no rescaling symmetry to remove: its
weights are left as they are (normalizing its rows would discard scale that the function depends on
and remove no symmetry); its symmetries, hidden-unit permutations and tanh sign flips, are handled
by :mod:`distsim.weights.recurrent`.

Everything runs on stacks of K models (leading K dimension), so a pack of trained weights is
normalized at once: ``chain_normalize_state(state_dicts, arch_config)``. The walk of the layers
(``Plan``) is shared with :mod:`distsim.weights.features`.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.zoo.models import GRU, RNNClassifier, build
from distsim.zoo.resnet import ResNet, ResNetConfig
from distsim.zoo.transformer import Transformer, TransformerConfig

SUPPORTED = (
    "nn.Sequential of Linear, Conv1d/Conv2d (groups=1, zero padding), ReLU, LeakyReLU, Tanh, "
    "GELU, Sigmoid, "
    "MaxPool1d/MaxPool2d, AvgPool1d/AvgPool2d, Flatten, Identity, Dropout; "
    "distsim.zoo.models.RNNClassifier; distsim.zoo.models.GRU; distsim.zoo.resnet.ResNet; "
    "distsim.zoo.transformer.Transformer; "
    "nn.GRU (unidirectional, no projection)"
)

StateDict = Mapping[str, torch.Tensor]

# activation modules of a sequential walk and their names (Step.activation)
ACTIVATION_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.Tanh, "tanh"),
    (nn.GELU, "gelu"),
    (nn.Sigmoid, "sigmoid"),
)
# positively homogeneous (f(a x) = a f(x) for a > 0): the chain normalization keeps the function
HOMOGENEOUS = ("relu", "leaky_relu")


@dataclass(frozen=True)
class Step:
    """One module of a sequential walk: a parametric layer or a parameter-free op.

    op: linear | conv | act | maxpool | avgpool | flatten | identity.
    name: feature-layer name of a parametric layer (fc1, conv2, out); weight/bias: state-dict keys.
    activation: an act step's function, one of relu, leaky_relu, tanh, gelu, sigmoid.
    kernel/stride/padding/dilation: conv and pooling geometry, one entry per spatial dimension
    (pairs for Conv2d / pooling 2d, 1-tuples for Conv1d / pooling 1d).
    """

    op: str
    name: str = ""
    weight: str = ""
    bias: str | None = None
    kernel: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    activation: str = ""


@dataclass(frozen=True)
class Plan:
    """The layer walk of a supported model.

    kind "sequential": ``steps`` in forward order. kind "rnn": GRU parameters under ``gru_prefix``
    (weight_ih_l{k} ...), ``num_layers``, ``hidden``, optional linear head under ``head_prefix``.
    kind "resnet" / "transformer": the network's ``config`` (a distsim.zoo.resnet.ResNetConfig or
    distsim.zoo.transformer.TransformerConfig); their features: distsim.weights.residual and
    distsim.weights.attention.
    ``layers``: feature-layer names in order (see distsim.weights.features.feature_layers).
    """

    kind: str
    layers: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    gru_prefix: str = ""
    head_prefix: str | None = None
    num_layers: int = 0
    hidden: int = 0
    config: ResNetConfig | TransformerConfig | None = None

    @property
    def parametric(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.op in ("linear", "conv"))


def _ntuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    """A module's geometry argument as n ints (n spatial dimensions)."""
    return (int(v),) * n if isinstance(v, int) else tuple(int(a) for a in v)


def _sequential_steps(seq: nn.Sequential, prefix: str) -> list[Step]:
    steps: list[Step] = []
    for child_name, m in seq.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(m, nn.Sequential):
            steps += _sequential_steps(m, f"{name}.")
        elif isinstance(m, nn.Linear):
            bias = f"{name}.bias" if m.bias is not None else None
            steps.append(Step("linear", weight=f"{name}.weight", bias=bias))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(
                    f"unsupported module {name!r} ({m!r}): "
                    f"{type(m).__name__} needs groups=1, numeric zero padding"
                )
            n = 1 if isinstance(m, nn.Conv1d) else 2
            steps.append(
                Step(
                    "conv",
                    weight=f"{name}.weight",
                    bias=f"{name}.bias" if m.bias is not None else None,
                    kernel=_ntuple(m.kernel_size, n),
                    stride=_ntuple(m.stride, n),
                    padding=_ntuple(m.padding, n),
                    dilation=_ntuple(m.dilation, n),
                )
            )
        elif isinstance(m, tuple(kind for kind, _ in ACTIVATION_MODULES)):
            act = next(label for kind, label in ACTIVATION_MODULES if isinstance(m, kind))
            steps.append(Step("act", activation=act))
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            n = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
            kind = type(m).__name__
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) and _ntuple(m.dilation, n) != (1,) * n:
                raise ValueError(f"unsupported module {name!r} ({m!r}): {kind} needs dilation=1")
            if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
                raise ValueError(f"unsupported module {name!r} ({m!r}): AvgPool2d divisor_override")
            op = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
            stride = m.stride if m.stride is not None else m.kernel_size
            steps.append(
                Step(
                    op,
                    kernel=_ntuple(m.kernel_size, n),
                    stride=_ntuple(stride, n),
                    padding=_ntuple(m.padding, n),
                    ceil_mode=bool(m.ceil_mode),
                    count_include_pad=bool(getattr(m, "count_include_pad", True)),
                )
            )
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(
                    f"unsupported module {name!r} ({m!r}): Flatten must be Flatten(1, -1)"
                )
            steps.append(Step("flatten"))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            steps.append(Step("identity"))
        else:
            raise ValueError(
                f"chain normalization does not support module {name!r} ({type(m).__name__}); "
                f"supported: {SUPPORTED}"
            )
    return steps


def _name_layers(steps: list[Step]) -> tuple[Step, ...]:
    """Give parametric steps their feature-layer names: conv1.., fc1.., and 'out' for the last."""
    last = max((i for i, s in enumerate(steps) if s.op in ("linear", "conv")), default=None)
    if last is None:
        raise ValueError("chain normalization needs at least one Linear, Conv1d or Conv2d layer")
    counts = {"conv": 0, "linear": 0}
    named = []
    for i, s in enumerate(steps):
        if s.op in counts:
            counts[s.op] += 1
            label = "out" if i == last else f"{'conv' if s.op == 'conv' else 'fc'}{counts[s.op]}"
            s = Step(**{**s.__dict__, "name": label})
        named.append(s)
    return tuple(named)


def _gru_plan(gru: GRU | nn.GRU, prefix: str, head_prefix: str | None) -> Plan:
    if isinstance(gru, nn.GRU) and (gru.bidirectional or gru.proj_size or not gru.bias):
        raise ValueError(
            f"unsupported module {prefix or 'gru'!r} ({gru!r}): "
            "needs a unidirectional GRU with biases"
        )
    layers = ["gru_ih"] + [f"gru_ih_l{k}" for k in range(1, gru.num_layers)]
    if head_prefix is not None:
        layers.append("out")
    return Plan(
        "rnn",
        tuple(layers),
        gru_prefix=prefix,
        head_prefix=head_prefix,
        num_layers=gru.num_layers,
        hidden=gru.hidden_size,
    )


def layer_plan(model: nn.Module) -> Plan:
    """The layer walk of ``model``; raises ValueError naming the first unsupported module."""
    if isinstance(model, (ResNet, Transformer)):  # their own modules name the layers (these
        from distsim.weights.attention import transformer_layers  # import distsim.weights.cka,
        from distsim.weights.residual import resnet_layers  # which imports this module)

        if isinstance(model, ResNet):
            return Plan("resnet", resnet_layers(model.cfg), config=model.cfg)
        return Plan("transformer", transformer_layers(model.cfg), config=model.cfg)
    if isinstance(model, RNNClassifier):
        if not isinstance(model.gru, (GRU, nn.GRU)) or not isinstance(model.head, nn.Linear):
            raise ValueError(
                "RNNClassifier needs a GRU .gru and a Linear .head, "
                f"got {model.gru!r}, {model.head!r}"
            )
        return _gru_plan(model.gru, "gru.", "head.")
    if isinstance(model, (GRU, nn.GRU)):
        return _gru_plan(model, "", None)
    if isinstance(model, nn.Sequential):
        steps = _name_layers(_sequential_steps(model, ""))
        return Plan("sequential", tuple(s.name for s in steps if s.name), steps=steps)
    raise ValueError(
        f"chain normalization does not support {type(model).__name__}; supported: {SUPPORTED}"
    )


def plan_for(arch_config: ArchConfig) -> Plan:
    """The layer walk of every model built from ``arch_config`` (built once on the meta device)."""
    if not isinstance(arch_config, ArchConfig):
        raise TypeError(f"arch_config must be an ArchConfig, got {type(arch_config).__name__}")
    return _cached_plan(arch_config)


@functools.lru_cache(maxsize=64)
def _cached_plan(arch_config: ArchConfig) -> Plan:
    with torch.device("meta"):
        return layer_plan(build(arch_config))


def stack_state_dicts(params: Sequence[StateDict] | StateDict) -> dict[str, torch.Tensor]:
    """A list of K state dicts (or an already stacked dict) -> dict of (K, ...) tensors."""
    if isinstance(params, Mapping):
        stacked = {k: torch.as_tensor(v) for k, v in params.items()}
        sizes = {v.shape[0] if v.dim() else None for v in stacked.values()}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "a stacked state dict needs one leading K dimension on every tensor, "
                f"got sizes {sizes}"
            )
        return stacked
    if not isinstance(params, Sequence) or len(params) == 0:
        raise ValueError("state_dicts must be a non-empty list of state dicts or a stacked dict")
    keys = list(params[0].keys())
    for i, sd in enumerate(params):
        if list(sd.keys()) != keys:
            raise ValueError(
                f"state dict {i} has keys {sorted(sd.keys())}, expected {sorted(keys)}"
            )
    return {k: torch.stack([torch.as_tensor(sd[k]) for sd in params]) for k in keys}


def _gru_keys(plan: Plan, layer: int) -> list[str]:
    """State-dict keys of GRU layer ``layer``: weight_ih, weight_hh, bias_ih, bias_hh."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [f"{plan.gru_prefix}{w}_l{layer}" for w in names]


def _check_keys(plan: Plan, stacked: Mapping[str, torch.Tensor]) -> None:
    if plan.kind == "sequential":
        needed = [k for s in plan.parametric for k in (s.weight, s.bias) if k]
    else:
        needed = [key for k in range(plan.num_layers) for key in _gru_keys(plan, k)]
        if plan.head_prefix is not None:
            needed += [f"{plan.head_prefix}weight", f"{plan.head_prefix}bias"]
    missing = [k for k in needed if k not in stacked]
    if missing:
        raise ValueError(f"state dict lacks {missing} (has {sorted(stacked)})")


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Norms with all-zero units left as they are (scale 1) instead of dividing by zero."""
    return torch.where(s > 0, s, torch.ones_like(s))


def _normalize_sequential(plan: Plan, p: dict[str, torch.Tensor]) -> None:
    layers = plan.parametric
    for cur, nxt in itertools.pairwise(layers):
        w = p[cur.weight]  # (K, out, in[, *kernel])
        k, out = w.shape[:2]
        sq = w.reshape(k, out, -1).square().sum(-1)
        if cur.bias:
            sq = sq + p[cur.bias].square()
        s = _safe(sq.sqrt())  # (K, out)
        p[cur.weight] = w / s.reshape(k, out, *[1] * (w.dim() - 2))
        if cur.bias:
            p[cur.bias] = p[cur.bias] / s
        wn = p[nxt.weight]  # (K, out_next, in_next[, *kernel])
        if nxt.op == "conv":  # the in-channel slice that reads each unit
            p[nxt.weight] = wn * s.reshape(k, 1, out, *[1] * (wn.dim() - 3))
        elif wn.shape[2] == out:
            p[nxt.weight] = wn * s[:, None, :]
        elif cur.op == "conv" and wn.shape[2] % out == 0:
            # conv -> flatten -> linear: a block of columns per channel
            kk, o2, n_in = wn.shape
            blocks = wn.reshape(kk, o2, out, n_in // out) * s[:, None, :, None]
            p[nxt.weight] = blocks.reshape(kk, o2, n_in)
        else:
            raise ValueError(
                f"layer {nxt.name} reads {wn.shape[2]} inputs, "
                f"which do not match the {out} units of {cur.name}"
            )


def function_preserving(plan: Plan) -> bool:
    """Whether the chain normalization keeps the function of a model laid out as ``plan``: True
    for a GRU (left as it is) and for a sequential net whose activations are all positively
    homogeneous (ReLU, LeakyReLU); False when one is tanh, GELU or sigmoid."""
    if plan.kind != "sequential":
        return True
    return all(s.activation in HOMOGENEOUS for s in plan.steps if s.op == "act")


def symmetries(arch: ArchConfig, layer: str | None = None) -> tuple[str, ...]:
    """The transforms of hidden units that keep the function of the models of ``arch``.

    ``layer`` (a hidden layer of arch.feature_layers()): the transforms of that layer's units;
    None: those that hold at every hidden layer ('out' has none: the outputs are ordered).
    Names, as in tests/test_invariance.py (which checks each against the function):

    - "permutation": the layer's units (channels) and the next layer's reading slices permuted;
    - "rescaling": a unit's incoming weights and bias times a > 0, its reading slice times 1/a
      (ReLU, LeakyReLU: positively homogeneous, and max pooling commutes with it);
    - "sign flip": incoming weights and bias and reading slice negated (tanh: odd);
    - "sign flip + bias shift": the sign flip, then the reading slice (before the flip) added to
      the next layer's bias (sigmoid: σ(-x) = 1 - σ(x)).

    The two flips hold for linear units only: a conv channel is followed by max pooling, which
    does not commute with a negation (nor, for the shift, does zero padding). GELU has
    permutations only. GRU (``kind="rnn"``, whose gates do not follow ``activation``): the
    symmetries of distsim.weights.recurrent, tested in tests/test_recurrent.py. ResNet: a
    layer's channels (a stage's residual stream, shared by its writers and readers, or a
    block's inner channels) permute and rescale; transformer: a layer's units are residual
    stream coordinates, which only permute (its heads' maps act inside a block; the groups are
    drawn whole by distsim.symmetries.random_transform, tested in tests/test_symmetries.py).

    >>> symmetries(ArchConfig(kind="mlp", activation="relu"))
    ('permutation', 'rescaling')
    >>> symmetries(ArchConfig(kind="mlp", activation="tanh"))
    ('permutation', 'sign flip')
    >>> symmetries(ArchConfig(kind="mlp", activation="gelu"))
    ('permutation',)
    >>> symmetries(ArchConfig(kind="mlp", activation="sigmoid"))
    ('permutation', 'sign flip + bias shift')
    >>> symmetries(ArchConfig(kind="resnet")), symmetries(ArchConfig(kind="transformer"))
    (('permutation', 'rescaling'), ('permutation',))
    >>> cnn = ArchConfig(kind="cnn", channels=(4,), head_widths=(6,), activation="tanh")
    >>> symmetries(cnn), symmetries(cnn, "conv1"), symmetries(cnn, "fc1"), symmetries(cnn, "out")
    (('permutation',), ('permutation',), ('permutation', 'sign flip'), ())
    """
    if not isinstance(arch, ArchConfig):
        raise TypeError(f"arch must be an ArchConfig, got {type(arch).__name__}")
    layers = arch.feature_layers()
    if layer is not None and layer not in layers:
        raise ValueError(f"layer {layer!r} is not one of {list(layers)}")
    if layer == "out":
        return ()
    if arch.kind == "resnet":  # stream and inner channels alike (docs: resnet-symmetries.md)
        return ("permutation", "rescaling")
    if arch.kind == "transformer":  # a stream coordinate (docs: transformer-symmetries.md)
        return ("permutation",)
    if arch.kind == "rnn":
        return ("permutation", "sign flip", "r/z bias shift")
    flip = {"tanh": "sign flip", "sigmoid": "sign flip + bias shift"}.get(arch.activation)
    per_layer = []
    for name in ([layer] if layer is not None else layers[:-1]):
        found = ["permutation"]
        if arch.activation in HOMOGENEOUS:
            found.append("rescaling")
        if flip and not name.startswith("conv"):
            found.append(flip)
        per_layer.append(found)
    return tuple(t for t in per_layer[0] if all(t in found for found in per_layer))


def _normalize_gru(plan: Plan, p: dict[str, torch.Tensor]) -> None:
    """No-op: σ and tanh are not positively homogeneous, so no rescaling of a GRU's rows keeps
    its function, and a row normalization would only discard scale (see
    distsim.weights.recurrent)."""


def normalize_stacked(plan: Plan, stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chain-normalize a dict of (K, ...) tensors laid out as ``plan``; same keys and dtypes out.

    The arithmetic runs in float64 (the norms of long rows), results are cast back. A ResNet's
    or transformer's plan is refused: their normalizations act on other weights (the ResNet's
    BatchNorm-folded convolutions, distsim.weights.residual.resnet_chain_normalize; the
    transformer's MLP units, inside distsim.weights.attention).
    """
    if plan.kind in ("resnet", "transformer"):
        raise ValueError(f"chain normalization of a {plan.kind}'s state dict is not defined: "
                         "its features normalize inside distsim.weights."
                         f"{'residual' if plan.kind == 'resnet' else 'attention'}")
    _check_keys(plan, stacked)
    p = {
        k: v.detach().to(torch.float64) if v.is_floating_point() else v
        for k, v in stacked.items()
    }
    (_normalize_sequential if plan.kind == "sequential" else _normalize_gru)(plan, p)
    return {k: p[k].to(v.dtype) for k, v in stacked.items()}


def chain_normalize_state(
    state_dicts: Sequence[StateDict] | StateDict, arch_config: ArchConfig
) -> dict[str, torch.Tensor]:
    """Normalize a pack of K models of ``arch_config`` at once: list of state dicts or a stacked
    dict of (K, ...) tensors -> stacked dict of (K, ...) normalized tensors."""
    return normalize_stacked(plan_for(arch_config), stack_state_dicts(state_dicts))


def chain_normalize(model: nn.Module) -> nn.Module:
    """A chain-normalized deep copy of ``model`` with attribute ``function_preserving`` (bool).

    MLP/CNN: unit-norm hidden units; with ReLU/LeakyReLU the same outputs (function_preserving
    True), with tanh, GELU or sigmoid other outputs (False: a feature-extraction step there, see
    :func:`function_preserving`). GRU: unchanged (no rescaling symmetry to remove), so also
    function-preserving.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"chain_normalize takes an nn.Module, got {type(model).__name__}")
    plan = layer_plan(model)
    state = model.state_dict()
    normed = normalize_stacked(plan, {k: v[None] for k, v in state.items()})
    out = copy.deepcopy(model)
    out.load_state_dict({k: v[0] for k, v in normed.items()})
    out.function_preserving = function_preserving(plan)  # type: ignore[assignment]
    return out
