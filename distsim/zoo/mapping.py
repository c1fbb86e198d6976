"""Map a foreign checkpoint's tensors, by position, onto the parameters of a distsim architecture.

A foreign zoo names its tensors its own way (``module_list.0.weight``,
``sequential/conv2d/kernel:0``), so names are not matched: the i-th tensor in stored order
becomes the i-th parameter of ``distsim.zoo.models.build(arch)`` in its state_dict order, and
every shape must agree. Layout ``"torch"`` keeps tensors as they are. Layout ``"tensorflow"``
(Keras): within one variable scope (the name up to its last ``/``) the kernel is taken before
the bias (TensorFlow lists ``bias:0`` first, sorted by name), Conv2D kernels (kh, kw, in, out)
become (out, in, kh, kw), Conv1D (k, in, out) become (out, in, k), Dense (in, out) become
(out, in), and the first Dense after a flatten (the CNN's, or the MLP's of its input image) gets
its input rows reordered from Keras' channels-last (H, W, C) flatten order to torch's (C, H, W),
so the network computes the same function (on the same image, channels-last for Keras).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from distsim.config.arch import ArchConfig
from distsim.errors import DistsimError
from distsim.zoo.models import build

LAYOUTS = ("torch", "tensorflow")


class MappingError(DistsimError):
    """A checkpoint whose tensors do not fit the declared architecture (one line)."""


def to_state_dict(tensors: list[tuple[str, np.ndarray]], arch: ArchConfig,
                  layout: str = "torch", where: str = "") -> dict[str, torch.Tensor]:
    """The float32 state_dict of ``build(arch)`` made of a checkpoint's tensors, in stored order.

    layout: "torch" or "tensorflow" (see the module docstring; mlp and cnn only). where: what
    the error messages start with (the checkpoint's file). MappingError (one line) for a count
    mismatch (both counts and the first extra or missing tensor) or a shape mismatch:
    ``"<where>: tensor 'x' has shape (a, b), <arch>'s <param> needs (c, d)"``.
    """
    at = f"{where}: " if where else ""
    if layout not in LAYOUTS:
        raise MappingError(f"{at}unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout == "tensorflow" and arch.kind == "rnn":
        raise MappingError(f"{at}the tensorflow layout maps mlp and cnn architectures, "
                           f"{arch.name} is an rnn")
    items = _kernels_first(tensors) if layout == "tensorflow" else list(tensors)
    targets = _targets(arch)
    if len(items) != len(targets):
        first = (f"first extra tensor: {items[len(targets)][0]!r}" if len(items) > len(targets)
                 else f"first missing: {arch.name}'s {targets[len(items)][0]}")
        raise MappingError(f"{at}{len(items)} tensors, {arch.name} has {len(targets)} "
                           f"parameters ({first})")
    out: dict[str, torch.Tensor] = {}
    flatten_pending = layout == "tensorflow"
    for (name, value), (param, needed) in zip(items, targets, strict=True):
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            raise MappingError(f"{at}tensor {name!r} has dtype {arr.dtype}, not floating point")
        stored = tuple(arr.shape)
        if layout == "tensorflow":
            arr = _tf_to_torch(arr)
        shape = tuple(arr.shape)
        if shape != needed:
            note = f" (tensorflow {stored} in torch order)" if layout == "tensorflow" else ""
            raise MappingError(f"{at}tensor {name!r} has shape {shape}{note}, {arch.name}'s "
                               f"{param} needs {needed}")
        if flatten_pending and arr.ndim == 2:  # the first Dense after the flatten
            arr, flatten_pending = _flatten_rows(arr, arch), False
        out[param] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a contiguous copy
    return out


@functools.lru_cache(maxsize=32)
def _targets(arch: ArchConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of build(arch), in state_dict order."""
    return [(k, tuple(v.shape)) for k, v in build(arch).state_dict().items()]


def _kernels_first(tensors: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Tensors grouped by variable scope (in order of first appearance), kernels before
    biases within a scope; a name without ``/`` is a scope of its own."""
    scopes: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, value in tensors:
        scopes.setdefault(name.rsplit("/", 1)[0] if "/" in name else name, []).append(
            (name, value))
    return [t for group in scopes.values() for t in sorted(group, key=lambda t: t[1].ndim < 2)]


def _tf_to_torch(arr: np.ndarray) -> np.ndarray:
    """A Keras kernel in torch's order: Conv2D (kh, kw, in, out) -> (out, in, kh, kw),
    Conv1D (k, in, out) -> (out, in, k), Dense (in, out) -> (out, in); a bias unchanged."""
    if arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)
    if arr.ndim == 3:
        return arr.transpose(2, 1, 0)
    return arr.T if arr.ndim == 2 else arr


def flattened_shape(arch: ArchConfig) -> tuple[int, ...]:
    """(C, *spatial) of what the first Linear layer of build(arch) reads, flattened: the input
    of an mlp, the last block's output of a cnn (each block halves every spatial size)."""
    if arch.kind == "mlp":
        return tuple(arch.input_shape)
    sizes = list(arch.input_shape[1:])
    for _ in arch.channels:
        sizes = [n // 2 for n in sizes]
    return (arch.channels[-1], *sizes)


def _flatten_rows(weight: np.ndarray, arch: ArchConfig) -> np.ndarray:
    """The first Dense after the flatten, its inputs reordered from Keras' (*spatial, C)
    flatten order to torch's (C, *spatial): weight (out, C * prod(spatial))."""
    channels, *sizes = flattened_shape(arch)
    out = weight.shape[0]
    assert weight.shape[1] == channels * math.prod(sizes)
    return np.moveaxis(weight.reshape(out, *sizes, channels), -1, 1).reshape(out, -1)
