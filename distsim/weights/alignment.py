"""Weight matching of chain-normalized sequential networks to one template (Git Re-Basin).

Ainsworth et al. 2022, "weight matching": for every hidden layer l a permutation P_l of its
units (MLP) or channels (CNN) maximizing

    sum_l <T_l, P_l W_l P_{l-1}^T> + <t_l, P_l b_l>      (P_0 = P_L = I: inputs, outputs fixed)

for a model's weights W_l, b_l against the template's T_l, t_l. Every weight is seen as a
(out, in_units, rest) array: a linear layer after a linear layer (rest 1), a conv
(rest kh*kw, or k for a Conv1d: the conv's in-channels are the previous layer's units), a
linear layer after conv + flatten (rest = positions: the flattened input is channel-major, so
a channel permutation moves blocks of columns, as in distsim.weights.normalize). The aligned weights
are W'_l[i, a, r] = W_l[perm_l[i], perm_{l-1}[a], r] and b'_l[i] = b_l[perm_l[i]].

Search: perm_l starts from a forward pass that matches layer l's incoming weights (and bias)
given perm_{l-1}; then coordinate descent, each step one ``scipy.optimize.linear_sum_assignment``
for one layer with the others fixed, layers in a seeded order per round, until a round changes no
permutation (at most ``max_rounds``). Every step depends on the units only through the weights,
so permuting a model's hidden units permutes the result with it: the aligned weights are the
same (exactly, barring ties in an assignment). Cost per model and round: one assignment of
width n per hidden layer (O(n^3)) plus the similarity GEMMs.

The matching is by permutation only, whatever the activation: a tanh net's other symmetry, the
sign flip of a unit, is not removed (aligned moves under it, tests/test_invariance.py; the GRU's
matching, distsim.weights.recurrent, matches signs too), and with tanh, GELU or sigmoid the
chain-normalized weights it matches are those of another function (distsim.weights.normalize).

``make_template``: start from the first model, then ``iterations`` times align every model to the
template and set the template to the mean of the aligned chain-normalized weights: N matchings
per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from distsim.config.arch import ArchConfig
from distsim.weights import recurrent
from distsim.weights.attention import make_transformer_template
from distsim.weights.normalize import (
    Plan,
    StateDict,
    normalize_stacked,
    plan_for,
    stack_state_dicts,
)
from distsim.weights.residual import make_resnet_template
from distsim.zoo.resnet import ResNetConfig
from distsim.zoo.transformer import TransformerConfig

__all__ = ["align_stacked", "make_template", "match_permutations"]

Blocks = list[tuple[np.ndarray, np.ndarray | None]]  # per layer: W (out, in_units, rest), b (out,)


def _check_plan(plan: Plan) -> None:
    if plan.kind != "sequential":
        raise ValueError("weight matching: not available for the GRU yet")


def _blocks(plan: Plan, p: StateDict, i: int) -> Blocks:
    """Model ``i`` of a stack as (W (out, in_units, rest), b) per parametric layer, float64."""
    out: Blocks = []
    units = None  # units (channels) of the previous layer
    for step in plan.parametric:
        w = p[step.weight][i].detach().to(torch.float64).numpy()
        n_in = w.shape[1] if units is None or step.op == "conv" else units
        b = p[step.bias][i].detach().to(torch.float64).numpy() if step.bias else None
        out.append((w.reshape(w.shape[0], n_in, -1), b))
        units = w.shape[0]
    return out


def _similarity(
    t: Blocks, w: Blocks, perms: list[np.ndarray], k: int, ahead: bool
) -> np.ndarray:
    """(n, n) S[i, j]: gain of sending the model's unit j of hidden layer k to the template's i,
    the other permutations fixed (``ahead``: include layer k+1's outgoing weights)."""
    (tw, tb), (mw, mb) = t[k], w[k]
    if k > 0:
        mw = mw[:, perms[k - 1]]
    s = np.einsum("iar,jar->ij", tw, mw)
    if tb is not None and mb is not None:
        s += np.outer(tb, mb)
    if ahead:
        nw = w[k + 1][0]
        if k + 1 < len(perms):
            nw = nw[perms[k + 1]]
        s += np.einsum("oir,ojr->ij", t[k + 1][0], nw)
    return s


def _assign(s: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(s, maximize=True)
    return cols[np.argsort(rows)]


def match_permutations(
    template: Blocks, model: Blocks, seed: int = 0, max_rounds: int = 100
) -> list[np.ndarray]:
    """Permutations perm_l (one int array per hidden layer) aligning ``model`` to ``template``
    by weight matching (see the module docstring)."""
    hidden = len(model) - 1
    perms: list[np.ndarray] = []
    for k in range(hidden):  # forward pass: incoming weights only
        perms.append(_assign(_similarity(template, model, perms, k, ahead=False)))
    rng = np.random.default_rng(seed)
    for _ in range(max_rounds):
        changed = False
        for k in map(int, rng.permutation(hidden)):
            new = _assign(_similarity(template, model, perms, k, ahead=True))
            if not np.array_equal(new, perms[k]):
                perms[k], changed = new, True
        if not changed:
            break
    return perms


def _apply(blocks: Blocks, perms: list[np.ndarray]) -> Blocks:
    out: Blocks = []
    for k, (w, b) in enumerate(blocks):
        if k < len(perms):
            w, b = w[perms[k]], (b[perms[k]] if b is not None else None)
        if k > 0:
            w = w[:, perms[k - 1]]
        out.append((w, b))
    return out


def _template_blocks(plan: Plan, template: StateDict) -> Blocks:
    return _blocks(plan, {k: torch.as_tensor(v)[None] for k, v in template.items()}, 0)


def _check_template(plan: Plan, template: StateDict, stacked: StateDict) -> None:
    for step in plan.parametric:
        for key in (step.weight, step.bias):
            if not key:
                continue
            if key not in template:
                raise ValueError(f"template lacks {key!r} (has {sorted(template)})")
            want = tuple(stacked[key].shape[1:])
            if tuple(torch.as_tensor(template[key]).shape) != want:
                raise ValueError(
                    f"template[{key!r}] has shape {tuple(torch.as_tensor(template[key]).shape)}, "
                    f"the models have {want}"
                )


def align_stacked(
    plan: Plan, p: StateDict, template: StateDict, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Chain-normalized (K, ...) weights ``p`` of a sequential ``plan`` permuted to match
    ``template`` (unstacked, same keys): a float64 stacked dict of the parametric layers."""
    _check_plan(plan)
    _check_template(plan, template, p)
    t = _template_blocks(plan, template)
    k = next(iter(p.values())).shape[0]
    aligned: dict[str, list[torch.Tensor]] = {}
    for i in range(k):
        w = _blocks(plan, p, i)
        moved = _apply(w, match_permutations(t, w, seed))
        for step, (wi, bi) in zip(plan.parametric, moved, strict=True):
            shape = tuple(p[step.weight].shape[1:])
            aligned.setdefault(step.weight, []).append(torch.from_numpy(wi.reshape(shape)))
            if step.bias and bi is not None:
                aligned.setdefault(step.bias, []).append(torch.from_numpy(bi))
    return {key: torch.stack(v) for key, v in aligned.items()}


def make_template(
    state_dicts: Sequence[StateDict] | StateDict,
    arch_config: ArchConfig,
    iterations: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Study-wide template (float64 state dict of the parametric layers): the first model,
    chain-normalized, then ``iterations`` rounds of "align every model, take the mean"."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    plan = plan_for(arch_config)
    if plan.kind == "rnn":  # units match by permutation and sign: distsim.weights.recurrent
        return recurrent.make_template(state_dicts, plan, iterations=iterations)
    if isinstance(plan.config, ResNetConfig):  # shared stream permutations: weights.residual
        return make_resnet_template(plan.config, stack_state_dicts(state_dicts), iterations, seed)
    if isinstance(plan.config, TransformerConfig):  # heads and stream: weights.attention
        return make_transformer_template(plan.config, stack_state_dicts(state_dicts), iterations,
                                         seed)
    _check_plan(plan)
    stacked = stack_state_dicts(state_dicts)
    p = normalize_stacked(plan, {k: v.to(torch.float64) for k, v in stacked.items()})
    template = {key: v[0].clone() for key, v in p.items() if key in _keys(plan)}
    for _ in range(iterations):
        aligned = align_stacked(plan, p, template, seed)
        template = {key: v.mean(dim=0) for key, v in aligned.items()}
    return template


def _keys(plan: Plan) -> list[str]:
    return [k for s in plan.parametric for k in (s.weight, s.bias) if k]
