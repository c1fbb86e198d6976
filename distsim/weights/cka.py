"""Linear CKA (Kornblith et al. 2019) as a per-model feature vector on a shared probe set.

For a layer's activations A (n x units) on the study's probe inputs (n samples, the same for
every model): K = H A A^T H with H = I - 11^T/n the centring matrix, and the feature is

    f = upper triangle of K / ||K||_F (diagonal included, row-major), off-diagonal entries x sqrt(2)

so that f1 . f2 = <K1, K2>_F / (||K1||_F ||K2||_F) = linear CKA(A1, A2) exactly and ||f|| = 1:
the distance GEMM gives ||f1 - f2||^2 = 2 - 2 CKA. A layer with K = 0 (no response varies over
the probe) gets the zero vector. n(n+1)/2 values (32,896 for n = 256).

The representation of a layer: hidden layers (fc*, conv*) their post-activation output (the
ReLU, LeakyReLU, Tanh, GELU or Sigmoid right after the layer; a conv's before its pooling,
flattened channel-major); ``out`` the logits; GRU ``gru_ih`` / ``gru_ih_l{k}`` the last hidden
state of GRU layer k on the probe images read as row sequences (a 1-D (C, L) probe: L steps of C
values; models from distsim.zoo.models.build).

Cost: one forward pass per model on the probe, then an n x n centred Gram (see
weight_features_batch for the measured time per model).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from distsim.weights.normalize import ACTIVATION_MODULES, Plan, StateDict
from distsim.zoo.models import RNNClassifier

__all__ = ["activations", "cka_vector", "layer_activations", "probe_inputs"]


def probe_inputs(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(size, *input_shape) float32: a seeded, class-balanced sample of ``x`` without replacement
    (size // classes per class, one more for the first size % classes classes), in data order."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape or y.ndim != 1:
        raise ValueError(f"x and y need one sample each per row, got {x.shape} and {y.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 3:
        raise ValueError(f"probe size must be an int >= 3, got {size!r}")
    classes = np.unique(y)
    rng = np.random.default_rng([int(seed), 2**31 - 3])
    picks = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(y == c)
        want = size // len(classes) + (1 if i < size % len(classes) else 0)
        if want > len(idx):
            raise ValueError(f"probe size {size}: class {c!r} has only {len(idx)} samples")
        picks.append(rng.choice(idx, want, replace=False))
    return np.ascontiguousarray(x[np.sort(np.concatenate(picks))], dtype=np.float32)


def cka_vector(a: torch.Tensor) -> torch.Tensor:
    """(K, n, units) activations -> (K, n(n+1)/2) float64 features whose dot products are
    linear CKA."""
    a = a.to(torch.float64)
    a = a - a.mean(dim=1, keepdim=True)  # H A
    g = a @ a.transpose(1, 2)  # (K, n, n) = H A A^T H
    norm = torch.linalg.matrix_norm(g)  # (K,) Frobenius
    g = g / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None, None]
    n = g.shape[-1]
    i, j = torch.triu_indices(n, n)
    w = torch.full(i.shape, math.sqrt(2.0), dtype=torch.float64)  # sqrt(2) in float64,
    w[i == j] = 1.0  # not a float32 constant widened

    return g[:, i, j] * w


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def _target(model: nn.Module, plan: Plan, upto: int) -> nn.Module:
    """The module whose output is layer ``upto``'s representation (sequential plans)."""
    leaves = _leaves(model)
    names = [n for n, _ in leaves]
    step = plan.parametric[upto]
    i = names.index(step.weight.removesuffix(".weight"))
    if upto == len(plan.parametric) - 1:
        return leaves[i][1]
    for _, m in leaves[i + 1 :]:  # the activation right after the layer, past Identity/Dropout
        if isinstance(m, tuple(kind for kind, _ in ACTIVATION_MODULES)):
            return m
        if not isinstance(m, (nn.Identity, nn.Dropout)):
            break
    return leaves[i][1]


def layer_activations(
    model: nn.Module, plan: Plan, params: StateDict | None, probe: torch.Tensor, upto: int
) -> torch.Tensor:
    """(n, units) representation of layer ``upto`` (see the module docstring) of ``model`` run
    on ``probe`` (n, *input_shape) with parameters ``params`` (None: the model's own)."""
    if plan.kind == "rnn":
        if not isinstance(model, RNNClassifier):
            raise ValueError(f"cka needs an RNNClassifier, got {type(model).__name__}")
        target: nn.Module = model.head if upto == plan.num_layers else model.gru
    else:
        target = _target(model, plan, upto)
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        seen.append(out[1][upto] if isinstance(out, tuple) else out)  # GRU: h_last[k]

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            if params is None:
                model(probe)
            else:
                functional_call(model, dict(params), (probe,))
    finally:
        handle.remove()
    return seen[-1].reshape(probe.shape[0], -1)


def activations(
    model: nn.Module, plan: Plan, stacked: StateDict, probe: torch.Tensor, upto: int
) -> torch.Tensor:
    """(K, n, units) layer ``upto`` of K stacked models of ``model``'s architecture on ``probe``
    (one forward pass per model)."""
    k = next(iter(stacked.values())).shape[0]
    dtype = next(p.dtype for p in model.parameters())
    probe = probe.to(dtype)
    return torch.stack(
        [
            layer_activations(model, plan, {n: v[i].to(dtype) for n, v in stacked.items()},
                              probe, upto)
            for i in range(k)
        ]
    )
