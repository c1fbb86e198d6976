"""The GRU's weight-space symmetries, and GRU features invariant to exactly those.

A GRU layer (gate order r, z, n as torch.nn.GRU) with hidden units j = 1..H computes
r = σ(W_ir x + b_ir + W_hr h + b_hr), z = σ(W_iz x + b_iz + W_hz h + b_hz),
n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h' = (1 - z) ⊙ n + z ⊙ h, from h = 0. Exact
symmetries of its weights (the classifier's function is unchanged, tested to 1e-10 in float64):

(a) permutation of a layer's hidden units: the rows of every gate block of W_ih, W_hh, b_ih, b_hh,
    the columns of W_hh, and the columns of the reader (next layer's W_ih, or the head);
(b) sign flip of a hidden unit j (tanh is odd, h_j -> -h_j): the n-gate rows j of W_ih, b_ih,
    W_hh, b_hh, column j of every W_hh block and column j of the reader flip; r and z rows do not;
(c) bias shift of the r and z gates: only b_ir + b_hr and b_iz + b_hz enter the function.

``gru_symmetry`` applies (a) and (b); there is no positive rescaling (σ and tanh are not
homogeneous), so the features use UNNORMALIZED weights: ``chain-gram`` and ``gram`` are the same
feature for the GRU (distsim.weights.normalize leaves a GRU as it is). A_g = [W_ig | β_g] ((H,
in+1), β_r,z = b_i + b_h, β_n = b_in) is gate g's affine response to one input row x (for n without
the r ⊙ b_hn term, which E_n below keeps); a deeper layer reads through the previous candidate map,
A_g(k) = W_ig(k) A_n(k-1) + [0 | β_g(k)]. Under (a) A_g -> P A_g, under (b) A_r, A_z stay and
A_n -> D A_n (D = diag(±1)), and (c) leaves A_g as is.

``chain-gram`` / ``gram`` at ``gru_ih`` / ``gru_ih_l{k}``: for every layer <= k (W_ih and biases,
like raw), the per-gate Grams A_g^T A_g (upper triangles of r, z, n; (in+1)(in+2)/2 each), then the
pairings (A_n ⊙ A_n)^T A_r and (A_n ⊙ A_n)^T A_z ((in+1)^2 each: Σ_j a_nj[a]^2 a_gj[b]), which see
a flipped r or z row and r / z rows moved to another unit, where a per-gate Gram does not (it is
even in every row). Every layer's own part is kept because the chain through A_n is linear, so it
cannot see a unit of layer k-1 scaled by a and read by 1/a in layer k (a change of the function).
At ``out``: the parts of every layer, then, with E_r = [A_r | W_hr A_n], E_z = [A_z | W_hz A_n],
E_n = [A_n | W_hn A_n | b_hn] of the last layer (a gate's response to this row and, through the
recurrence, to the previous one) and the head W (classes, H): W E_n (classes, 2(in+1)+1), then for
g = r, z the tensor T_g[c, a, b] = Σ_j W[c, j] E_n[j, a] E_g[j, b] (classes, 2(in+1)+1, 2(in+1)),
then the head bias. Unit j's head column and n row flip together, so every term is even in each
unit's sign, and the r and z rows are paired with their own unit's (head column, n row). The former
``out`` (W A_g per gate) paired the r and z rows with the head alone, which is odd in the sign.
What the feature loses, being sums over units of low-order products: the units themselves
(different sets of units with the same sums get the same feature), the recurrent weights W_hh, b_hn
of layers below the last (raw and aligned keep them), and the sign pattern of an n row against its
unit's r / z rows that the squares A_n ⊙ A_n discard (T_g keeps it only as seen through the head).
Sizes (in = C*W, the values of one image row; c classes): per layer 3(in+1)(in+2)/2 + 2(in+1)^2,
297 for 8x8 digits; ``out`` adds c(2in+3)(4in+5) + c, 704c.

``raw``: the parameters as they are (identical to distsim.weights.features' raw). ``aligned``: each
model matched to a template (``make_template``) by a permutation and signs per layer
(``align_to_template``), then flattened like raw with the r, z biases merged (b_i + b_h):
hidden layer k: W_ih, β of layers <= k; ``out``: per layer W_ih, W_hh, β (r, z merged; n: b_in),
b_hn, then the head weight and bias.

Exact statements (each checked in tests/test_recurrent.py; the non-symmetries tested are: a unit's
gate rows scaled by 3 with its reader column by 1/3, the sign flip (b) with an r or z row also
flipped, two units' r rows swapped, and a change of the last layer's W_hh):

| method          | (a) permutation | (b) sign flip | (c) r/z bias shift | non-symmetries      |
|-----------------|-----------------|---------------|--------------------|---------------------|
| chain-gram/gram | invariant       | invariant     | invariant          | change (*, ***)     |
| raw             | changes         | changes       | changes            | change (*)          |
| aligned         | invariant (**)  | invariant (**)| invariant          | change (*)          |

(*) a hidden-layer feature reads W_ih and biases only, so a change of W_hh alone moves only
``out``. (**) when the matching has a unique optimum (ties, e.g. two identical units, are broken
by order). (***) chain-gram's ``out`` reads the last layer's W_hh only: a change of a lower
layer's W_hh alone moves no chain-gram / gram feature (raw's and aligned's ``out`` do move).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from distsim.config.arch import ArchConfig
from distsim.weights.chain import upper_triangle
from distsim.weights.normalize import Plan, StateDict, plan_for, stack_state_dicts

__all__ = [
    "GRU_METHODS",
    "align_to_template",
    "gru_features",
    "gru_sketch_width",
    "gru_symmetry",
    "make_template",
    "random_gru_symmetry",
]

GRU_METHODS = ("chain-gram", "gram", "raw", "aligned")
ALIGN_SWEEPS = 10  # coordinate-descent sweeps over the layers at most (stops when none moves)


def _plan(plan_or_config: Plan | ArchConfig) -> Plan:
    plan = plan_for(plan_or_config) if isinstance(plan_or_config, ArchConfig) else plan_or_config
    if not isinstance(plan, Plan) or plan.kind != "rnn":
        raise ValueError(f"needs a GRU plan or an rnn ArchConfig, got {plan_or_config!r}")
    return plan


def _key(plan: Plan, name: str, layer: int) -> str:
    return f"{plan.gru_prefix}{name}_l{layer}"


def _reader(plan: Plan, layer: int) -> str | None:
    """Key of the weight that reads layer ``layer``'s hidden state (next W_ih, or the head)."""
    if layer + 1 < plan.num_layers:
        return _key(plan, "weight_ih", layer + 1)
    return None if plan.head_prefix is None else f"{plan.head_prefix}weight"


# ---------------------------------------------------------------- the symmetry group


def gru_symmetry(
    state_dict: StateDict,
    plan_or_config: Plan | ArchConfig,
    perms: Sequence[torch.Tensor | None],
    signs: Sequence[torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """The same GRU classifier with layer k's hidden units permuted and sign-flipped.

    perms[k] (H,) long: new unit i is old unit perms[k][i]; signs[k] (H,) of ±1: new h_i =
    signs[k][i] * old h_{perms[k][i]} (None: identity). Works on one model's state dict or on a
    stacked one ((K, ...) tensors, the same transform for every model).
    """
    plan = _plan(plan_or_config)
    if len(perms) != plan.num_layers or len(signs) != plan.num_layers:
        raise ValueError(
            f"perms and signs need one entry per layer ({plan.num_layers}), "
            f"got {len(perms)} and {len(signs)}"
        )
    h = plan.hidden
    p = {k: v.clone() for k, v in state_dict.items()}
    for layer, (perm, sign) in enumerate(zip(perms, signs, strict=True)):
        perm = torch.arange(h) if perm is None else torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(h)):
            raise ValueError(f"perms[{layer}] is not a permutation of range({h}): {perm.tolist()}")
        dtype = p[_key(plan, "weight_ih", layer)].dtype
        s = torch.ones(h, dtype=dtype) if sign is None else torch.as_tensor(sign, dtype=dtype)
        if not bool((s.abs() == 1).all()):
            raise ValueError(f"signs[{layer}] must be ±1, got {s.tolist()}")
        rows = torch.cat([perm, perm + h, perm + 2 * h])  # the same permutation in r, z, n
        row_sign = torch.cat([torch.ones(2 * h, dtype=dtype), s])  # only n rows flip
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            key = _key(plan, name, layer)
            x = p[key].index_select(-2 if "weight" in name else -1, rows)
            p[key] = x * (row_sign[:, None] if "weight" in name else row_sign)
        key = _key(plan, "weight_hh", layer)
        p[key] = p[key].index_select(-1, perm) * s  # columns: h_{t-1} is the flipped state
        reader = _reader(plan, layer)
        if reader is not None:
            p[reader] = p[reader].index_select(-1, perm) * s
    return p


def random_gru_symmetry(
    state_dict: StateDict, plan_or_config: Plan | ArchConfig, seed: int
) -> dict[str, torch.Tensor]:
    """``gru_symmetry`` with a seeded uniform permutation and uniform signs per layer."""
    plan = _plan(plan_or_config)
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(plan.hidden, generator=gen) for _ in range(plan.num_layers)]
    signs = [
        torch.randint(0, 2, (plan.hidden,), generator=gen) * 2 - 1 for _ in range(plan.num_layers)
    ]
    return gru_symmetry(state_dict, plan, perms, signs)


# ---------------------------------------------------------------- chain-gram / gram


def _gate_biases(plan: Plan, p: StateDict, layer: int) -> torch.Tensor:
    """(K, 3H) β: b_i + b_h for r and z (only their sum enters), b_in for n."""
    h = plan.hidden
    b_ih, b_hh = p[_key(plan, "bias_ih", layer)], p[_key(plan, "bias_hh", layer)]
    return torch.cat([b_ih[:, : 2 * h] + b_hh[:, : 2 * h], b_ih[:, 2 * h :]], dim=1)


def _input_maps(plan: Plan, p: StateDict, upto: int) -> list[list[torch.Tensor]]:
    """[[A_r, A_z, A_n] of GRU layer k for k <= ``upto``], each (K, H, in+1), chained through
    A_n of the layer below."""
    maps: list[list[torch.Tensor]] = []
    for layer in range(upto + 1):
        w, beta = p[_key(plan, "weight_ih", layer)], _gate_biases(plan, p, layer)
        if not maps:
            a = torch.cat([w, beta[..., None]], dim=-1)  # (K, 3H, in+1)
        else:
            a = (w @ maps[-1][2]).clone()  # (K, 3H, in+1)
            a[..., -1] += beta
        maps.append(list(a.split(plan.hidden, dim=1)))
    return maps


def _layer_part(a_r: torch.Tensor, a_z: torch.Tensor, a_n: torch.Tensor) -> torch.Tensor:
    """(K, 3 C(C+1)/2 + 2 C^2) one layer's invariants from its (K, H, C) gate maps: the Grams
    A_g^T A_g (upper triangles), then (A_n ⊙ A_n)^T A_r and (A_n ⊙ A_n)^T A_z, which tie each
    unit's r and z rows to its own n row (even in the n row's sign, odd in the r / z row's)."""
    k, sq = a_n.shape[0], a_n * a_n
    grams = [upper_triangle(a.transpose(1, 2) @ a) for a in (a_r, a_z, a_n)]
    pairs = [(sq.transpose(1, 2) @ a).reshape(k, -1) for a in (a_r, a_z)]
    return torch.cat(grams + pairs, dim=1)


def _chain_gram(plan: Plan, p: StateDict, upto: int, s: torch.Tensor | None) -> torch.Tensor:
    """(K, D) chain-gram (= gram) feature at layer ``upto`` (module docstring); ``s`` ((in+1, m)
    or None): input-side sketch applied to every A_g."""
    last = plan.num_layers - 1
    maps = _input_maps(plan, p, min(upto, last))
    if s is not None:
        maps = [[a @ s for a in gates] for gates in maps]  # (K, H, m) each
    parts = [_layer_part(*gates) for gates in maps]
    if upto <= last:
        return torch.cat(parts, dim=1)
    h = plan.hidden
    w_hh = p[_key(plan, "weight_hh", last)].split(h, dim=1)  # W_hr, W_hz, W_hn: (K, H, H)
    a_r, a_z, a_n = maps[-1]
    b_hn = p[_key(plan, "bias_hh", last)][:, 2 * h :, None]  # (K, H, 1)
    e_r = torch.cat([a_r, w_hh[0] @ a_n], dim=-1)  # (K, H, 2(in+1))
    e_z = torch.cat([a_z, w_hh[1] @ a_n], dim=-1)
    e_n = torch.cat([a_n, w_hh[2] @ a_n, b_hn], dim=-1)  # (K, H, 2(in+1)+1)
    head_w, head_b = p[f"{plan.head_prefix}weight"], p[f"{plan.head_prefix}bias"]
    k = head_w.shape[0]
    parts.append((head_w @ e_n).reshape(k, -1))  # (K, classes * C_n)
    for e_g in (e_r, e_z):  # T_g[c, a, b] = sum_j W[c, j] E_n[j, a] E_g[j, b]
        parts.append(torch.einsum("kcj,kja,kjb->kcab", head_w, e_n, e_g).reshape(k, -1))
    return torch.cat([*parts, head_b], dim=1)


def gru_sketch_width(dim: int, layers: int) -> int:
    """Input-sketch width m for a hidden-layer feature over ``layers`` GRU layers: the largest
    m >= 1 with layers * (3 m(m+1)/2 + 2 m^2) <= dim (1 when even m = 1 does not fit)."""
    if dim < 1 or layers < 1:
        raise ValueError(f"dim and layers must be >= 1, got dim={dim}, layers={layers}")
    m = 1
    while layers * (3 * (m + 1) * (m + 2) // 2 + 2 * (m + 1) ** 2) <= dim:
        m += 1
    return m


# ---------------------------------------------------------------- raw


def _raw_keys(plan: Plan, upto: int) -> list[str]:
    """State-dict keys raw flattens at layer ``upto``, in order (as
    distsim.weights.features._raw)."""
    if upto < plan.num_layers:
        return [_key(plan, w, k) for k in range(upto + 1) for w in ("weight_ih", "bias_ih")]
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    keys = [_key(plan, w, k) for k in range(plan.num_layers) for w in names]
    return keys + [f"{plan.head_prefix}weight", f"{plan.head_prefix}bias"]


def _raw(plan: Plan, p: StateDict, upto: int) -> torch.Tensor:
    """(K, D) unnormalized parameters of the layers <= ``upto``, flattened in layer order."""
    keys = _raw_keys(plan, upto)
    k = p[keys[0]].shape[0]
    return torch.cat([p[key].reshape(k, -1) for key in keys], dim=1)


# ---------------------------------------------------------------- aligned


def _unit_rows(
    plan: Plan, p: StateDict, layer: int, full: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden unit of one model, its parameters split by how a sign flip acts on them:
    (H, *) even (r, z rows) and (H, *) odd (n rows, W_hh columns, reader columns). ``full``
    False: only the rows that read the (already aligned) layer below (W_ih, biases)."""
    h = plan.hidden
    w_ih = p[_key(plan, "weight_ih", layer)].split(h)  # (H, in) each
    beta = _gate_biases(plan, {k: v[None] for k, v in p.items()}, layer)[0].split(h)
    b_hn = p[_key(plan, "bias_hh", layer)][2 * h :]
    even = [w_ih[0], w_ih[1], beta[0][:, None], beta[1][:, None]]
    odd = [w_ih[2], beta[2][:, None], b_hn[:, None]]
    if full:
        w_hh = p[_key(plan, "weight_hh", layer)]
        even += list(w_hh.split(h)[:2])  # rows of W_hr, W_hz
        odd += [w_hh.split(h)[2], w_hh.T]  # rows of W_hn; columns of W_hh (all gates)
        reader = _reader(plan, layer)
        if reader is not None:
            odd.append(p[reader].T)  # (H, readers)
    return torch.cat(even, dim=1), torch.cat(odd, dim=1)


def _match(
    plan: Plan, p: StateDict, template: StateDict, layer: int, full: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation and signs of layer ``layer`` that best match ``p``'s units to the template's:
    maximize Σ_i <t_i, s_i p_π(i)>, i.e. the linear assignment on C_even + |C_odd|."""
    t_even, t_odd = _unit_rows(plan, template, layer, full)
    m_even, m_odd = _unit_rows(plan, p, layer, full)
    c_even, c_odd = t_even @ m_even.T, t_odd @ m_odd.T  # (H template, H model)
    _, perm = linear_sum_assignment((c_even + c_odd.abs()).numpy(), maximize=True)
    perm_t = torch.as_tensor(perm, dtype=torch.long)
    picked = c_odd[torch.arange(plan.hidden), perm_t]
    return perm_t, torch.where(picked < 0, -1.0, 1.0).to(c_odd.dtype)


def align_to_template(
    state_dict: StateDict, template: StateDict, plan_or_config: Plan | ArchConfig
) -> dict[str, torch.Tensor]:
    """One model (float64) moved by (a) and (b) to match ``template`` (weight matching per layer).

    A forward pass matches each layer on the rows that read the layer below (already aligned), so
    the result does not depend on the model's own permutation and signs; then coordinate-descent
    sweeps over the layers with every parameter of the unit (W_hh rows and columns, reader
    columns) until no layer moves (at most ALIGN_SWEEPS). The function is unchanged.
    """
    plan = _plan(plan_or_config)
    p = {k: torch.as_tensor(v).to(torch.float64) for k, v in state_dict.items()}
    t = {k: torch.as_tensor(v).to(torch.float64) for k, v in template.items()}
    identity: list[torch.Tensor | None] = [None] * plan.num_layers
    for sweep in range(ALIGN_SWEEPS + 1):
        moved = False
        for layer in range(plan.num_layers):
            perm, sign = _match(plan, p, t, layer, full=sweep > 0)
            if sweep > 0 and torch.equal(perm, torch.arange(plan.hidden)) and bool(
                (sign > 0).all()
            ):
                continue
            perms, signs = list(identity), list(identity)
            perms[layer], signs[layer] = perm, sign
            p = gru_symmetry(p, plan, perms, signs)
            moved = True
        if sweep > 0 and not moved:
            break
    return p


def make_template(
    state_dicts: Sequence[StateDict] | StateDict,
    plan_or_config: Plan | ArchConfig,
    iterations: int = 3,
    start: int = 0,
) -> dict[str, torch.Tensor]:
    """A study-wide GRU template (one model's float64 state dict): start from model ``start``,
    then ``iterations`` times align every model to it and average (N matchings per iteration)."""
    plan = _plan(plan_or_config)
    stacked = stack_state_dicts(state_dicts)
    n = next(iter(stacked.values())).shape[0]
    if not 0 <= start < n:
        raise ValueError(f"start must index one of the {n} models, got {start}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    models = [{k: v[i].to(torch.float64) for k, v in stacked.items()} for i in range(n)]
    template = dict(models[start])
    for _ in range(iterations):
        aligned = stack_state_dicts([align_to_template(m, template, plan) for m in models])
        template = {k: v.mean(dim=0) for k, v in aligned.items()}
    return template


def _aligned_flat(plan: Plan, p: StateDict, upto: int) -> torch.Tensor:
    """(K, D) aligned weights flattened like raw, r and z biases merged (symmetry (c))."""
    h, k = plan.hidden, next(iter(p.values())).shape[0]
    parts = []
    for layer in range(min(upto, plan.num_layers - 1) + 1):
        parts.append(p[_key(plan, "weight_ih", layer)])
        if upto >= plan.num_layers:
            parts.append(p[_key(plan, "weight_hh", layer)])
        parts.append(_gate_biases(plan, p, layer))
        if upto >= plan.num_layers:
            parts.append(p[_key(plan, "bias_hh", layer)][:, 2 * h :])
    if upto >= plan.num_layers:
        parts += [p[f"{plan.head_prefix}weight"], p[f"{plan.head_prefix}bias"]]
    return torch.cat([x.reshape(k, -1) for x in parts], dim=1)


def _aligned(plan: Plan, p: StateDict, upto: int, template: StateDict) -> torch.Tensor:
    k = next(iter(p.values())).shape[0]
    moved = [align_to_template({n: v[i] for n, v in p.items()}, template, plan) for i in range(k)]
    return _aligned_flat(plan, stack_state_dicts(moved), upto)


# ---------------------------------------------------------------- entry point


def gru_features(
    plan: Plan,
    stacked: Mapping[str, torch.Tensor],
    method: str,
    upto: int,
    s: torch.Tensor | None = None,
    template: StateDict | None = None,
) -> torch.Tensor:
    """(K, D) float64 features of K stacked GRU models ((K, ...) tensors laid out as ``plan``) at
    layer number ``upto`` of plan.layers; ``s``: input-side sketch (chain-gram/gram only);
    ``template``: from make_template (aligned only)."""
    plan = _plan(plan)
    if method not in GRU_METHODS:
        raise ValueError(f"method must be one of {GRU_METHODS}, got {method!r}")
    if not 0 <= upto < len(plan.layers):
        raise ValueError(f"upto must be in [0, {len(plan.layers)}), got {upto}")
    if method == "raw":
        return _raw(plan, stacked, upto).to(torch.float64)
    p = {k: v.to(torch.float64) for k, v in stacked.items()}
    if method == "aligned":
        if template is None:
            raise ValueError("method 'aligned' needs a template (see make_template), got None")
        return _aligned(plan, p, upto, template)
    return _chain_gram(plan, p, upto, s)
