"""Permutation-invariant weight features of chain-normalized networks (arXiv 2208.04369).

``chain-gram`` (the method): with chain-normalized weights, M_1 = Ŵ_1 and M_l = Ŵ_l M_{l-1} map
input pixels to the units of layer l. Biases ride along in homogeneous coordinates: M_l is the
(units x (P+1)) matrix [linear part | offset], the offset being the layer's response to a zero
input with activations linearized, so the feature sees the whole affine chain. A conv is applied
as its exact linear map on the flattened input, max pooling is taken as its linear average
(avg pooling as itself), flatten feeds the head, and activations are dropped (linearized).
Permuting the units of any layer <= l permutes the rows of M_l, so the Gram G_l = M_l^T M_l
((P+1) x (P+1), over input pixels) is invariant to them; for a conv the rows are
(channel, position) pairs, so G_l is invariant to channel permutations. Feature = upper triangle
of G_l including the diagonal, row-major; at the last layer ('out', outputs are ordered) it is
M_L itself flattened (output-major).

GRU (not function-preserving, see distsim.normalize): ``gru_ih`` = per-gate Grams A_g^T A_g of the
row-normalized input map A_g = [Ŵ_ih_g | b̂_ih_g] (gates r, z, n; each (in+1) x (in+1), upper
triangles concatenated) — per gate rather than summed, because the three blocks are separately
invariant and together say more. For a deeper GRU, ``gru_ih_l{k}`` chains through the candidate
gate: A_g(k) = Ŵ_ih_g(k) N(k-1) + [0 | b̂_ih_g(k)], N = A_n. ``out`` = head weight times each gate
map of the last layer, W_head A_g (classes x (in+1) each, ordered), followed by the head bias.

``raw`` (the paper's unaligned control): unnormalized weights and biases of every layer up to the
asked one, flattened in layer order (GRU: W_ih, b_ih of layers <= k; ``out``: every parameter).

``dim`` with ``sketch="output"`` (the default): a seeded output projection of the feature
vector to dim values, the same map for every model of a study and any batching
(distsim.projection). ``projection="countsketch"`` (the default): each of the D feature values is
added, with a hashed sign, into one of dim hashed buckets: O(D) per model, no D x dim matrix,
squared distances estimated without bias with a variance never above the Gaussian's, and
pairwise distances that correlate with the full features' as well as the Gaussian's do (equal
within 0.01 over 40 sketch seeds on trained digits features, benchmarks/bench_sketch.py).
Measured there at dim 4096 on one core: a 3073 x 3073 Gram's triangle (D = 4.7M) in 8 ms per
model and raw CIFAR-size weights (D = 1.6M) in 3 ms, so at CIFAR sizes the full Gram it sketches
is the cost (0.5-0.7 s per model for a 512- or 256-unit MLP layer, 10-14 s for a CNN conv layer
of 8192-32768 units). ``projection="gaussian"`` (legacy): R (D x dim, entries N(0, 1/dim)), D x
dim random numbers and a GEMM per call: 21 s per model for that triangle and 9 s for those raw
weights, in calls on 25 models; kept so that stores made with it can resume. The CountSketch is
applied to each chunk's float64 features, the Gaussian to the float32 features of the batch.

``dim`` with ``sketch="input"`` (chain-gram only; raw still uses the output projection): a seeded
Gaussian input-side sketch S ((P+1) x m, entries N(0, 1/m), from ``seed`` only, see
sketch_matrix) replaces every chain map M by M S before the Gram, with m = sketch_width(dim) the
largest m such that m(m+1)/2 <= dim (GRU: sketch_width(dim // 3), for its three gate Grams), so
that a hidden-layer feature, the upper triangle(s) of S^T G S, has at most dim values; 'out':
(M_L S) flattened (classes x m; GRU: per gate, then the head bias). Rows of M S permute with the
units of M, so the invariances are those of the full feature. M S is computed by pushing the m
columns of S through the linearized network (forward, m+1 inputs instead of P+1): cost units x
(P+1) x m per layer, memory (m+1) x units per model, no full Gram: 0.02-0.2 s per model and
layer at CIFAR sizes, CNN conv layers included. It is lossy: S^T G S keeps m(m+1)/2 values of
a width-m sketch, whose distance error shrinks like 1/sqrt(m) rather than like 1/sqrt(dim). On
trained digits chain-grams its pairwise distances correlate 0.57-0.97 with the full features'
where the output CountSketch's reach 0.85-1.0 at the same dim (MLP fc1 at dim 105: 0.57 against
0.85), and 0.91 / 0.94 against 0.998 / 0.999 at dim 4096 for an MLP's fc1 / fc2 on digits
upsampled to 3 x 32 x 32 (bench_sketch.py). Use it where the full Gram is too dear (CNN conv
layers at CIFAR sizes on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distsim.models import ArchConfig
from distsim.normalize import (
    Plan,
    StateDict,
    layer_plan,
    normalize_stacked,
    plan_for,
    stack_state_dicts,
)
from distsim.projection import (
    PROJECTIONS,
    check_dim,
    check_projection,
    count_sketch,
    project,
    projection_matrix,
    sketch_hashes,
    sketch_matrix,
    sketch_width,
)

__all__ = [
    "CHAIN_BYTES",
    "CHAIN_DIRECTIONS",
    "METHODS",
    "PROJECTIONS",
    "SKETCHES",
    "chain_map",
    "count_sketch",
    "feature_layers",
    "infer_input_shape",
    "project",
    "projection_matrix",
    "sketch_hashes",
    "sketch_matrix",
    "sketch_width",
    "weight_features",
    "weight_features_batch",
]

METHODS = ("chain-gram", "raw")
SKETCHES = ("output", "input")
CHAIN_DIRECTIONS = ("auto", "forward", "backward")
# Memory for the chain tensors of one chunk of models (bytes); results do not depend on it
# beyond float rounding.
CHAIN_BYTES = 256 * 2**20


def feature_layers(arch_config: ArchConfig) -> list[str]:
    """Layer names a feature can be taken at, in order (mlp: fc1.., out; cnn: conv1.., fc1.., out;
    rnn: gru_ih, gru_ih_l1.., out)."""
    return list(plan_for(arch_config).layers)


def _layer_index(plan: Plan, layer: str | int | None) -> int:
    n = len(plan.layers)
    if layer is None:
        return n - 1
    if isinstance(layer, str):
        if layer not in plan.layers:
            raise ValueError(f"layer {layer!r} is not one of {list(plan.layers)}")
        return plan.layers.index(layer)
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and -n <= layer < n:
        return int(layer) % n
    raise ValueError(
        f"layer must be None, one of {list(plan.layers)} or an int in [{-n}, {n}), got {layer!r}"
    )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------- shapes of a sequential walk


def _out_size(n: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def _unit_shapes(
    plan: Plan, shapes: Mapping[str, tuple[int, ...]], input_shape: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Shape of one sample after every step (unbatched); raises ValueError if they do not fit."""
    shape, out = tuple(input_shape), []
    for step in plan.steps:
        if step.op == "linear":
            n_in = math.prod(shape)
            w = shapes[step.weight]
            if len(shape) != 1 or w[-1] != n_in:
                raise ValueError(
                    f"layer {step.name} expects {w[-1]} inputs, the walk gives shape {shape}"
                )
            shape = (w[-2],)
        elif step.op == "conv":
            w = shapes[step.weight]
            if len(shape) != 3 or shape[0] != w[-3]:
                raise ValueError(
                    f"layer {step.name} expects {w[-3]} channels, the walk gives shape {shape}"
                )
            hw = [
                _out_size(shape[i + 1], step.kernel[i], step.stride[i], step.padding[i],
                          step.dilation[i])
                for i in (0, 1)
            ]
            shape = (w[-4], *hw)
        elif step.op in ("maxpool", "avgpool"):
            hw = [
                _out_size(shape[i + 1], step.kernel[i], step.stride[i], step.padding[i], 1,
                          step.ceil_mode)
                for i in (0, 1)
            ]
            shape = (shape[0], *hw)
        elif step.op == "flatten":
            shape = (math.prod(shape),)
        if min(shape) < 1:
            raise ValueError(f"input shape {tuple(input_shape)} is too small for this network")
        out.append(shape)
    return out


def infer_input_shape(model: nn.Module, plan: Plan | None = None) -> tuple[int, ...]:
    """Input shape of a sequential model: (P,) for an MLP; for a CNN the smallest square (C, H, H)
    whose walk fits its head (pass ``input_shape`` to weight_features when that is not the one)."""
    plan = plan or layer_plan(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first = next(s for s in plan.steps if s.op in ("linear", "conv"))
    if first.op == "linear":
        return (shapes[first.weight][1],)
    channels = shapes[first.weight][1]
    for size in range(1, 1025):
        try:
            _unit_shapes(plan, shapes, (channels, size, size))
            return (channels, size, size)
        except ValueError:
            continue
    raise ValueError("cannot infer the input shape of this CNN; pass input_shape=(C, H, W)")


# ---------------------------------------------------------------- chain-gram


def _upper(g: torch.Tensor) -> torch.Tensor:
    """(K, J, J) symmetric -> (K, J(J+1)/2): upper triangle with the diagonal, row-major."""
    i, j = torch.triu_indices(g.shape[-1], g.shape[-1])
    return g[:, i, j]


def _affine_walk(
    plan: Plan, p: StateDict, x: torch.Tensor, upto: int, bias_row: int | None
) -> torch.Tensor:
    """The linearized network (activations dropped, max pooling as average) applied to J inputs
    per model: x (K, J, *input_shape) -> (K, J, units of parametric layer ``upto``, after its bias).

    Biases are added to row ``bias_row`` only (None: to every row).
    """
    k, j = x.shape[:2]
    index = -1
    for step in plan.steps:
        if step.op == "linear":
            x = torch.einsum("kjn,kon->kjo", x.reshape(k, j, -1), p[step.weight])
        elif step.op == "conv":
            w = p[step.weight]
            _, _, c, h, wd = x.shape
            y = F.conv2d(
                x.transpose(0, 1).reshape(j, k * c, h, wd),
                w.reshape(k * w.shape[1], *w.shape[2:]),
                stride=step.stride,
                padding=step.padding,
                dilation=step.dilation,
                groups=k,
            )
            x = y.reshape(j, k, w.shape[1], *y.shape[-2:]).transpose(0, 1)
        elif step.op in ("maxpool", "avgpool"):
            _, _, c, h, wd = x.shape
            y = F.avg_pool2d(
                x.reshape(k * j, c, h, wd),
                step.kernel,
                step.stride,
                step.padding,
                ceil_mode=step.ceil_mode,
                count_include_pad=step.count_include_pad,
            )
            x = y.reshape(k, j, c, *y.shape[-2:])
        elif step.op == "flatten":
            x = x.reshape(k, j, -1)
        if step.op in ("linear", "conv"):
            if step.bias:
                b = p[step.bias] if step.op == "linear" else p[step.bias][:, :, None, None]
                if bias_row is None:
                    x = x + b[:, None]
                else:
                    x = x.clone()
                    x[:, bias_row] += b
            index += 1
            if index == upto:
                return x.reshape(k, j, -1)
    raise AssertionError("unreachable: layer index beyond the plan")


def _chain_forward(
    plan: Plan, p: StateDict, input_shape: tuple[int, ...], upto: int
) -> torch.Tensor:
    """`chain_map` by pushing the P basis pixels and a zero input (row P: biases only) through
    the linearized network."""
    k = next(iter(p.values())).shape[0]
    n = math.prod(input_shape)
    dtype = next(iter(p.values())).dtype
    x = torch.eye(n + 1, n, dtype=dtype).expand(k, n + 1, n).reshape(k, n + 1, *input_shape)
    return _affine_walk(plan, p, x, upto, bias_row=n)


def _chain_backward(
    plan: Plan, p: StateDict, input_shape: tuple[int, ...], upto: int
) -> torch.Tensor:
    """`chain_map` by one vector-Jacobian product per unit of layer ``upto``: cheaper when the
    layer has fewer units than the input has pixels (the head)."""
    k = next(iter(p.values())).shape[0]
    dtype = next(iter(p.values())).dtype
    x = torch.zeros(k, 1, *input_shape, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        y = _affine_walk(plan, p, x, upto, bias_row=None)[:, 0]  # (K, units): the offsets c
        rows = [
            torch.autograd.grad(y[:, u].sum(), x, retain_graph=u + 1 < y.shape[1])[0]
            .reshape(k, -1)
            for u in range(y.shape[1])
        ]
    return torch.cat([torch.stack(rows, dim=2), y.detach()[:, None, :]], dim=1)


def chain_map(
    plan: Plan,
    params: StateDict,
    input_shape: tuple[int, ...],
    upto: int,
    direction: str = "auto",
) -> torch.Tensor:
    """(K, P+1, units) homogeneous chain map M_l^T of K stacked sequential models at parametric
    layer number ``upto`` (after its bias), P = prod(input_shape).

    ``params``: the models' (chain-normalized) parameters as (K, ...) tensors laid out as
    ``plan`` (a sequential plan). Row j < P is the linearized response of layer l to input pixel
    j, row P the response to a zero input (biases only). direction "forward" pushes the P + 1
    inputs through the linearized network; "backward" takes one vector-Jacobian product per unit
    of the layer; both give the same map. "auto" picks the cheaper: backward when the layer is
    the much narrower side (the output layer of an image model).
    """
    if direction not in CHAIN_DIRECTIONS:
        raise ValueError(f"direction must be one of {CHAIN_DIRECTIONS}, got {direction!r}")
    if direction == "auto":
        shapes = {key: tuple(v.shape[1:]) for key, v in params.items()}
        units = math.prod(_unit_shapes(plan, shapes, input_shape)[_step_index(plan, upto)])
        direction = "backward" if 4 * units < math.prod(input_shape) else "forward"
    if direction == "backward":
        return _chain_backward(plan, params, input_shape, upto)
    return _chain_forward(plan, params, input_shape, upto)


def _step_index(plan: Plan, upto: int) -> int:
    """Position in plan.steps of the parametric layer number ``upto``."""
    return [i for i, s in enumerate(plan.steps) if s.op in ("linear", "conv")][upto]


def _rnn_chain(plan: Plan, p: StateDict, upto: int, s: torch.Tensor | None) -> torch.Tensor:
    """(K, D) chain-gram feature of a GRU classifier at layer ``upto`` (see the module docstring);
    ``s`` ((in+1) x m or None): input-side sketch applied to each gate map."""
    g, h = plan.gru_prefix, plan.hidden
    candidate = None
    for layer in range(plan.num_layers):
        w, b = p[f"{g}weight_ih_l{layer}"], p[f"{g}bias_ih_l{layer}"]
        if candidate is None:
            a = torch.cat([w, b[..., None]], dim=-1)  # (K, 3H, in+1)
        else:
            a = (w @ candidate).clone()  # (K, 3H, in+1)
            a[..., -1] += b
        gates = a.split(h, dim=1)  # r, z, n: (K, H, in+1) each
        if s is not None and layer in (upto, plan.num_layers - 1):  # the maps a feature reads
            gates = [q @ s for q in gates]  # (K, H, m) each
        if layer == upto:
            return torch.cat([_upper(q.transpose(1, 2) @ q) for q in gates], dim=1)
        candidate = gates[2]
    head_w, head_b = p[f"{plan.head_prefix}weight"], p[f"{plan.head_prefix}bias"]
    kk = head_w.shape[0]
    return torch.cat([(head_w @ q).reshape(kk, -1) for q in gates] + [head_b], dim=1)


def _raw(plan: Plan, p: StateDict, upto: int) -> torch.Tensor:
    """(K, D) unnormalized parameters of the layers <= ``upto``, flattened in layer order."""
    if plan.kind == "sequential":
        keys = [k for s in plan.parametric[: upto + 1] for k in (s.weight, s.bias) if k]
    elif upto < plan.num_layers:
        keys = [
            f"{plan.gru_prefix}{w}_l{layer}"
            for layer in range(upto + 1)
            for w in ("weight_ih", "bias_ih")
        ]
    else:
        keys = [
            f"{plan.gru_prefix}{w}_l{layer}"
            for layer in range(plan.num_layers)
            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        keys += [f"{plan.head_prefix}weight", f"{plan.head_prefix}bias"]
    k = p[keys[0]].shape[0]
    return torch.cat([p[key].reshape(k, -1) for key in keys], dim=1)


def _sketched_chain(
    plan: Plan, p: StateDict, input_shape: tuple[int, ...], upto: int, s: torch.Tensor
) -> torch.Tensor:
    """(K, m, units) = (M_l S)^T for S ((P+1) x m): the linear part applied to the m pixel columns
    of S plus the offset c weighted by S's bias row, (M S)[:, a] = M_lin S[:P, a] + c S[P, a]."""
    k = next(iter(p.values())).shape[0]
    n, m = math.prod(input_shape), s.shape[1]
    x = torch.cat([s[:n].T, s.new_zeros(1, n)])  # (m+1, P): sketch columns, then the zero input
    x = x.expand(k, m + 1, n).reshape(k, m + 1, *input_shape)
    y = _affine_walk(plan, p, x, upto, bias_row=m)
    return y[:, :m] + s[n][None, :, None] * y[:, m:]


def _features(
    plan: Plan,
    stacked: StateDict,
    input_shape: tuple[int, ...],
    method: str,
    upto: int,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K, D) float64 features of a stack of K models; ``s``: input-side sketch or None."""
    if method == "raw":
        return _raw(plan, stacked, upto).to(torch.float64)
    p = normalize_stacked(plan, {k: v.to(torch.float64) for k, v in stacked.items()})
    if plan.kind == "rnn":
        return _rnn_chain(plan, p, upto, s)
    if s is None:
        m = chain_map(plan, p, input_shape, upto)  # (K, P+1, units)
    else:
        m = _sketched_chain(plan, p, input_shape, upto, s)  # (K, m, units)
    if upto == len(plan.layers) - 1:
        return m.transpose(1, 2).reshape(m.shape[0], -1)
    return _upper(m @ m.transpose(1, 2))


# ---------------------------------------------------------------- public entry points


def _chunk_size(
    plan: Plan, stacked: StateDict, input_shape: tuple[int, ...], columns: int | None
) -> int:
    """Models per chunk so that the float64 chain tensors stay within CHAIN_BYTES (``columns``:
    inputs pushed per model, P+1 when None)."""
    if plan.kind != "sequential":
        return 4096
    shapes = {k: tuple(v.shape[1:]) for k, v in stacked.items()}
    walk = [tuple(input_shape), *_unit_shapes(plan, shapes, input_shape)]
    units = max(math.prod(s) for s in walk)
    # a few live copies during a step
    per_model = 8 * 3 * (columns or math.prod(input_shape) + 1) * units
    return max(1, CHAIN_BYTES // per_model)


def _input_sketch(
    plan: Plan, stacked: StateDict, input_shape: tuple[int, ...], dim: int, seed: int
) -> torch.Tensor:
    """(P+1, m) float64 sketch S for this architecture's input (GRU: its per-step input, and m
    such that its three gate Grams together hold at most dim values)."""
    if plan.kind == "sequential":
        n_in, m = math.prod(input_shape), sketch_width(dim)
    else:
        n_in = stacked[f"{plan.gru_prefix}weight_ih_l0"].shape[-1]
        m = sketch_width(max(1, dim // 3))
    return torch.tensor(sketch_matrix(n_in + 1, m, seed))  # a copy: the cached S is read-only


def _compute(
    plan: Plan,
    stacked: StateDict,
    input_shape: tuple[int, ...],
    method: str,
    layer: str | int | None,
    dim: int | None,
    seed: int,
    sketch: str,
    projection: str = "countsketch",
) -> np.ndarray:
    """(K, D) float32 features of a stack of K models (see weight_features for the options)."""
    _check_method(method)
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    check_projection(projection)
    if dim is not None:
        check_dim(dim)
    elif sketch == "input":
        raise ValueError(
            "sketch='input' needs dim (the feature size of a sketched Gram), got dim=None"
        )
    upto = _layer_index(plan, layer)
    if plan.kind == "sequential":
        _unit_shapes(plan, {k: tuple(v.shape[1:]) for k, v in stacked.items()}, input_shape)
    s = None
    if dim is not None and sketch == "input" and method == "chain-gram":
        s = _input_sketch(plan, stacked, input_shape, dim, seed)
    # the output projection, if any: CountSketch on each chunk's float64 features (a row's
    # result does not depend on the chunk); the legacy Gaussian on the float32 whole
    sparse = dim is not None and s is None and projection == "countsketch"
    k = next(iter(stacked.values())).shape[0]
    step = _chunk_size(plan, stacked, input_shape, None if s is None else s.shape[1] + 1)
    parts = []
    with torch.no_grad():
        for start in range(0, k, step):
            chunk = {name: v[start : start + step] for name, v in stacked.items()}
            feats = _features(plan, chunk, input_shape, method, upto, s)
            if sparse:
                assert dim is not None
                parts.append(count_sketch(feats.numpy(), dim, seed))
            else:
                parts.append(feats.to(torch.float32).numpy())
    x = np.concatenate(parts, axis=0)
    if dim is None or s is not None or sparse:
        return x
    return project(x, dim, seed, projection)


def weight_features(
    model: nn.Module,
    method: str = "chain-gram",
    layer: str | int | None = None,
    dim: int | None = None,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    sketch: str = "output",
    projection: str = "countsketch",
) -> np.ndarray:
    """1-D float32 feature of one model at ``layer`` (name or index; None = last).

    ``dim``: seeded random map to ``dim`` values (the same map for every model given ``seed``).
    ``sketch``: where ``dim`` applies, "output" (the feature vector) or "input" (the chain maps'
    input side, for chain-gram; see the module docstring). ``projection``: the output map,
    "countsketch" or the legacy "gaussian" (see distsim.projection). ``input_shape`` (C, H, W):
    only needed for a CNN whose input is not the smallest square that fits its head (see
    infer_input_shape).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"weight_features takes an nn.Module, got {type(model).__name__}")
    plan = layer_plan(model)
    stacked = {k: v.detach()[None] for k, v in model.state_dict().items()}
    if input_shape is not None:
        shape = tuple(input_shape)
    else:
        shape = infer_input_shape(model, plan) if plan.kind == "sequential" else ()
    return _compute(plan, stacked, shape, method, layer, dim, seed, sketch, projection)[0]


def weight_features_batch(
    state_dicts: Sequence[StateDict] | StateDict,
    arch_config: ArchConfig,
    method: str = "chain-gram",
    layer: str | int | None = None,
    dim: int | None = None,
    seed: int = 0,
    sketch: str = "output",
    projection: str = "countsketch",
) -> np.ndarray:
    """(K, D) float32 features of K models of ``arch_config``, vectorised over K.

    ``state_dicts``: a list of K state dicts or a stacked dict of (K, ...) tensors.
    Row i equals ``weight_features(model_i, method, layer, dim, seed, sketch=sketch,
    projection=projection)``.
    """
    plan = plan_for(arch_config)
    stacked = stack_state_dicts(state_dicts)
    input_shape = tuple(arch_config.input_shape) if plan.kind == "sequential" else ()
    return _compute(plan, stacked, input_shape, method, layer, dim, seed, sketch, projection)
