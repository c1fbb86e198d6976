"""The linearized chain of a sequential network (MLP, CNN): the map from input pixels to the units
of a layer with activations dropped (max pooling as its linear average, avg pooling as itself),
in homogeneous coordinates [linear part | offset]; and the walk of shapes it follows. Convs and
pooling are 2-D (input (C, H, W)) or 1-D (input (C, L), "pixels" its C*L values).

Everything runs on stacks of K models (leading K dimension). distsim.weights.features builds the
chain-gram and gram features from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distsim.weights.normalize import Plan, StateDict, layer_plan

CHAIN_DIRECTIONS = ("auto", "forward", "backward")


def upper_triangle(g: torch.Tensor) -> torch.Tensor:
    """(K, J, J) symmetric -> (K, J(J+1)/2): upper triangle with the diagonal, row-major."""
    i, j = torch.triu_indices(g.shape[-1], g.shape[-1])
    return g[:, i, j]




def _out_size(n: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


_CONV = {1: F.conv1d, 2: F.conv2d}  # by number of spatial dimensions
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d}


def unit_shapes(
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
            w, dims = shapes[step.weight], len(step.kernel)  # w: (out, in, *kernel)
            if len(shape) != 1 + dims or shape[0] != w[-1 - dims]:
                raise ValueError(
                    f"layer {step.name} expects {w[-1 - dims]} channels and {dims} spatial "
                    f"dimension(s), the walk gives shape {shape}"
                )
            sizes = [
                _out_size(shape[i + 1], step.kernel[i], step.stride[i], step.padding[i],
                          step.dilation[i])
                for i in range(dims)
            ]
            shape = (w[-2 - dims], *sizes)
        elif step.op in ("maxpool", "avgpool"):
            dims = len(step.kernel)
            if len(shape) != 1 + dims:
                raise ValueError(f"a {dims}-D pooling step gets shape {shape}")
            sizes = [
                _out_size(shape[i + 1], step.kernel[i], step.stride[i], step.padding[i], 1,
                          step.ceil_mode)
                for i in range(dims)
            ]
            shape = (shape[0], *sizes)
        elif step.op == "flatten":
            shape = (math.prod(shape),)
        if min(shape) < 1:
            raise ValueError(f"input shape {tuple(input_shape)} is too small for this network")
        out.append(shape)
    return out


def infer_input_shape(model: nn.Module, plan: Plan | None = None) -> tuple[int, ...]:
    """Input shape of a sequential model: (P,) for an MLP; for a CNN the smallest square (C, H, H)
    (a 1-D CNN: the shortest (C, L), L <= 4096) whose walk fits its head (pass ``input_shape``
    to weight_features when that is not the one)."""
    plan = plan or layer_plan(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first = next(s for s in plan.steps if s.op in ("linear", "conv"))
    if first.op == "linear":
        return (shapes[first.weight][1],)
    channels, dims = shapes[first.weight][1], len(first.kernel)
    for size in range(1, 4097 if dims == 1 else 1025):
        try:
            unit_shapes(plan, shapes, (channels, *[size] * dims))
            return (channels, *[size] * dims)
        except ValueError:
            continue
    wanted = "(C, L)" if dims == 1 else "(C, H, W)"
    raise ValueError(f"cannot infer the input shape of this CNN; pass input_shape={wanted}")


# ---------------------------------------------------------------- the chain


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
        elif step.op == "conv":  # x (K, J, C, *spatial); w (K, out, C, *kernel)
            w, dims = p[step.weight], len(step.kernel)
            c, spatial = x.shape[2], x.shape[3:]
            y = _CONV[dims](
                x.transpose(0, 1).reshape(j, k * c, *spatial),
                w.reshape(k * w.shape[1], *w.shape[2:]),
                stride=step.stride,
                padding=step.padding,
                dilation=step.dilation,
                groups=k,
            )
            x = y.reshape(j, k, w.shape[1], *y.shape[2:]).transpose(0, 1)
        elif step.op in ("maxpool", "avgpool"):
            c, spatial = x.shape[2], x.shape[3:]
            y = _AVG_POOL[len(step.kernel)](
                x.reshape(k * j, c, *spatial),
                step.kernel,
                step.stride,
                step.padding,
                ceil_mode=step.ceil_mode,
                count_include_pad=step.count_include_pad,
            )
            x = y.reshape(k, j, c, *y.shape[2:])
        elif step.op == "flatten":
            x = x.reshape(k, j, -1)
        if step.op in ("linear", "conv"):
            if step.bias:
                b = p[step.bias]  # (K, out): broadcast over a conv's positions
                if step.op == "conv":
                    b = b.reshape(*b.shape, *[1] * (x.dim() - 3))
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
        units = math.prod(unit_shapes(plan, shapes, input_shape)[_step_index(plan, upto)])
        direction = "backward" if 4 * units < math.prod(input_shape) else "forward"
    if direction == "backward":
        return _chain_backward(plan, params, input_shape, upto)
    return _chain_forward(plan, params, input_shape, upto)


def _step_index(plan: Plan, upto: int) -> int:
    """Position in plan.steps of the parametric layer number ``upto``."""
    return [i for i, s in enumerate(plan.steps) if s.op in ("linear", "conv")][upto]


def sketched_chain(
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
