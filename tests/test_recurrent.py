"""GRU symmetries and features (distsim.weights.recurrent): the table of its module docstring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.weights.normalize import plan_for, stack_state_dicts
from distsim.weights.recurrent import (
    align_to_template,
    gru_features,
    gru_sketch_width,
    gru_symmetry,
    make_template,
    random_gru_symmetry,
)
from distsim.zoo.models import build

torch.set_num_threads(1)

H = 5
CFGS = {n: ArchConfig(kind="rnn", hidden=H, num_layers=n, num_classes=3) for n in (1, 2)}
SEARCHED = ("chain-gram", "gram", "aligned")  # the invariant methods


def _state(cfg: ArchConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.double() for k, v in build(cfg).state_dict().items()}


def _run(cfg: ArchConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = build(cfg).double()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _template(cfg: ArchConfig) -> dict[str, torch.Tensor]:
    return make_template([_state(cfg, 100 + i) for i in range(4)], cfg, iterations=2)


def _feats(cfg: ArchConfig, states: list[dict[str, torch.Tensor]], method: str, upto: int,
           template: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    return gru_features(plan_for(cfg), stack_state_dicts(states), method, upto, template=template)


def _flip_signs(cfg: ArchConfig, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A seeded permutation and signs per layer, with at least one flip and a true permutation."""
    gen = torch.Generator().manual_seed(seed)
    perms, signs = [], []
    for _ in range(cfg.num_layers):
        perm = torch.randperm(H, generator=gen)
        perms.append(perm.roll(1) if torch.equal(perm, torch.arange(H)) else perm)
        sign = torch.randint(0, 2, (H,), generator=gen) * 2 - 1
        sign[0] = -1
        signs.append(sign)
    return perms, signs


# ---------------------------------------------------------------- the symmetries themselves


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.sampled_from([1, 2]))
def test_symmetry_preserves_the_classifier(seed: int, layers: int) -> None:
    cfg = CFGS[layers]
    state = _state(cfg, seed)
    perms, signs = _flip_signs(cfg, seed + 1)
    moved = gru_symmetry(state, cfg, perms, signs)
    x = torch.randn(6, *cfg.input_shape, dtype=torch.float64)
    assert _rel(_run(cfg, moved, x), _run(cfg, state, x)) < 1e-10
    assert max(_rel(moved[k], state[k]) for k in state) > 0.1  # the weights did move
    # stacked (K, ...) state dicts take the same transform per model
    stacked = gru_symmetry(stack_state_dicts([state, state]), cfg, perms, signs)
    assert all(torch.equal(stacked[k][1], moved[k]) for k in state)


def test_symmetry_moves_a_bare_grus_hidden_state_by_p_and_d() -> None:
    """nn.GRU (no head): last states h' = D P h, so the flip really is h_j -> -h_j."""
    torch.manual_seed(0)
    gru = nn.GRU(4, H, num_layers=2, batch_first=True).double()
    from distsim.weights.normalize import layer_plan

    plan = layer_plan(gru)
    perms, signs = _flip_signs(CFGS[2], 3)
    moved = nn.GRU(4, H, num_layers=2, batch_first=True).double()
    moved.load_state_dict(gru_symmetry(gru.state_dict(), plan, perms, signs))
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    with torch.no_grad():
        _, h = gru(x)
        _, h2 = moved(x)
    for k in range(2):
        torch.testing.assert_close(h2[k], h[k][:, perms[k]] * signs[k], rtol=0, atol=1e-12)


def _shift_rz_biases(state: dict[str, torch.Tensor], layer: int, seed: int) -> dict:
    """Symmetry (c): b_ih += c, b_hh -= c on the r and z rows (only their sum enters)."""
    out = dict(state)
    c = torch.randn(2 * H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out[f"gru.bias_ih_l{layer}"] = state[f"gru.bias_ih_l{layer}"] + torch.cat([c, c.new_zeros(H)])
    out[f"gru.bias_hh_l{layer}"] = state[f"gru.bias_hh_l{layer}"] - torch.cat([c, c.new_zeros(H)])
    return out


def _scale_unit(state: dict[str, torch.Tensor], cfg: ArchConfig) -> dict:
    """NOT a symmetry: unit 0 of layer 0 scaled by 3 in every gate row, its readers by 1/3."""
    out = dict(state)
    rows = torch.tensor([0, H, 2 * H])
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        x = state[f"gru.{name}_l0"].clone()
        x[rows] *= 3
        out[f"gru.{name}_l0"] = x
    reader = "gru.weight_ih_l1" if cfg.num_layers > 1 else "head.weight"
    w = state[reader].clone()
    w[:, 0] /= 3
    out[reader] = w
    return out


def _flip_gate_row(state: dict[str, torch.Tensor], gate: int) -> dict:
    """NOT a symmetry: the sign flip (b) of unit 0 of layer 0, plus its r (gate 0) or z (gate 1)
    rows of W_ih, W_hh, b_ih, b_hh flipped too."""
    sign = torch.ones(H, dtype=torch.float64)
    sign[0] = -1
    cfg = CFGS[2] if "gru.weight_ih_l1" in state else CFGS[1]
    out = gru_symmetry(state, cfg, [None] * cfg.num_layers, [sign] + [None] * (cfg.num_layers - 1))
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        out[f"gru.{name}_l0"] = out[f"gru.{name}_l0"].clone()
        out[f"gru.{name}_l0"][gate * H] *= -1
    return out


def _perturb_last_hh(state: dict[str, torch.Tensor], cfg: ArchConfig) -> dict:
    """NOT a symmetry: the last layer's W_hh moved."""
    out = dict(state)
    key = f"gru.weight_hh_l{cfg.num_layers - 1}"
    out[key] = state[key] + 0.3 * torch.randn(state[key].shape, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(0))
    return out


def _repair_r_rows(state: dict[str, torch.Tensor]) -> dict:
    """NOT a symmetry: the r rows of units 0 and 1 of layer 0 swapped (z, n rows stay)."""
    out = dict(state)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        x = state[f"gru.{name}_l0"].clone()
        x[[0, 1]] = x[[1, 0]]
        out[f"gru.{name}_l0"] = x
    return out


NON_SYMMETRIES = {
    "scale-unit": lambda s, cfg: _scale_unit(s, cfg),
    "flip-r-row": lambda s, cfg: _flip_gate_row(s, 0),
    "flip-z-row": lambda s, cfg: _flip_gate_row(s, 1),
    "last-W_hh": lambda s, cfg: _perturb_last_hh(s, cfg),
    "re-pair-r-rows": lambda s, cfg: _repair_r_rows(s),
}


@pytest.mark.parametrize("layers", [1, 2])
def test_bias_shift_preserves_and_non_symmetries_change_the_classifier(layers: int) -> None:
    cfg = CFGS[layers]
    state = _state(cfg, 7)
    x = torch.randn(8, *cfg.input_shape, dtype=torch.float64)
    y = _run(cfg, state, x)
    for layer in range(layers):
        assert _rel(_run(cfg, _shift_rz_biases(state, layer, 1), x), y) < 1e-10
    for name, change in NON_SYMMETRIES.items():
        assert _rel(_run(cfg, change(state, cfg), x), y) > 1e-3, name


# ---------------------------------------------------------------- features


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.sampled_from([1, 2]))
def test_features_invariant_to_permutations_signs_and_bias_shifts(seed: int, layers: int) -> None:
    """chain-gram, gram, aligned: unchanged by (a), (b), (c); raw moves under each."""
    cfg = CFGS[layers]
    state = _state(cfg, seed)
    template = _template(cfg)
    perms, signs = _flip_signs(cfg, seed + 1)
    sym = gru_symmetry(state, cfg, perms, signs)
    flip = gru_symmetry(state, cfg, [None] * layers, signs)  # (b) alone
    shift = _shift_rz_biases(state, 0, seed)
    for upto in range(layers + 1):
        for method in SEARCHED:
            f = _feats(cfg, [state, sym, flip, shift], method, upto, template)
            for i in (1, 2, 3):
                assert _rel(f[i], f[0]) < 1e-10, (method, upto, i)
        raw = _feats(cfg, [state, sym, flip, shift], "raw", upto)
        for i in (1, 2, 3):
            assert _rel(raw[i], raw[0]) > 1e-2, (upto, i)


@pytest.mark.parametrize("layers", [1, 2])
def test_features_change_under_non_symmetries(layers: int) -> None:
    """Every non-symmetry moves ``out`` (chain-gram, gram, aligned) and ``gru_ih``, except a change
    of the last layer's W_hh, which hidden-layer chain-grams do not read (as raw does not)."""
    cfg = CFGS[layers]
    state, template = _state(cfg, 11), _template(cfg)
    out = layers
    for name, change in NON_SYMMETRIES.items():
        moved = change(state, cfg)
        for method in SEARCHED:
            f = _feats(cfg, [state, moved], method, out, template)
            assert _rel(f[1], f[0]) > 1e-3, (name, method)
        gram = _feats(cfg, [state, moved], "chain-gram", 0)
        aligned = _feats(cfg, [state, moved], "aligned", 0, template)
        if name == "last-W_hh":
            assert _rel(gram[1], gram[0]) < 1e-12  # gru_ih reads W_ih and biases only
        else:
            assert _rel(gram[1], gram[0]) > 1e-3 and _rel(aligned[1], aligned[0]) > 1e-3, name
    if layers == 2:  # a lower layer's W_hh: a function change only raw and aligned 'out' see
        moved = dict(state)
        moved["gru.weight_hh_l0"] = state["gru.weight_hh_l0"] + 0.3
        x = torch.randn(8, *cfg.input_shape, dtype=torch.float64)
        assert _rel(_run(cfg, moved, x), _run(cfg, state, x)) > 1e-3
        for upto in range(3):
            f = _feats(cfg, [state, moved], "chain-gram", upto)
            assert _rel(f[1], f[0]) < 1e-12
        for method in ("raw", "aligned"):
            f = _feats(cfg, [state, moved], method, out, template)
            assert _rel(f[1], f[0]) > 1e-3, method


def test_out_is_even_in_the_sign_where_head_times_gate_maps_were_not() -> None:
    """Main's W_head A_r is odd in a unit's sign (its head column flips, its r row does not);
    the new out feature's pieces are even."""
    cfg = CFGS[1]
    state = _state(cfg, 5)
    sign = -torch.ones(H, dtype=torch.float64)
    flip = gru_symmetry(state, cfg, [None], [sign])

    def head_times_r(s: dict[str, torch.Tensor]) -> torch.Tensor:
        a = torch.cat([s["gru.weight_ih_l0"], s["gru.bias_ih_l0"][:, None]], 1)[:H]
        return s["head.weight"] @ a

    assert _rel(head_times_r(flip), head_times_r(state)) > 0.5
    f = _feats(cfg, [state, flip], "chain-gram", 1)
    assert _rel(f[1], f[0]) < 1e-12


def test_chain_gram_equals_reference_and_gram() -> None:
    """Per layer upper(A_g^T A_g), (A_n ⊙ A_n)^T A_r, (A_n ⊙ A_n)^T A_z with A_g = [W_ig | β_g]
    chained through A_n; out: those, W E_n, T_r, T_z, head bias, by explicit loops over units in
    numpy. gram == chain-gram exactly."""
    cfg = CFGS[2]
    state = _state(cfg, 2)
    s = {k: v.numpy() for k, v in state.items()}
    iu = np.triu_indices(cfg.input_shape[2] + 1)
    want, prev = [], None
    for layer in range(2):
        w, bi = s[f"gru.weight_ih_l{layer}"], s[f"gru.bias_ih_l{layer}"]
        beta = np.concatenate([bi[: 2 * H] + s[f"gru.bias_hh_l{layer}"][: 2 * H], bi[2 * H :]])
        if prev is None:
            a = np.c_[w, beta]
        else:
            a = w @ prev + np.c_[np.zeros((3 * H, prev.shape[1] - 1)), beta]
        a_r, a_z, a_n = np.split(a, 3)
        prev = a_n
        want += [(g.T @ g)[iu] for g in (a_r, a_z, a_n)]
        for g in (a_r, a_z):  # sum_j a_n[j, a]^2 a_g[j, b]
            want.append(sum(np.outer(a_n[j] ** 2, g[j]) for j in range(H)).ravel())
        got = _feats(cfg, [state], "chain-gram", layer)[0].numpy()
        np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-12, atol=1e-14)
    w_hh, b_hh, head = s["gru.weight_hh_l1"], s["gru.bias_hh_l1"], s["head.weight"]
    e = {
        "r": np.c_[a_r, w_hh[:H] @ a_n],
        "z": np.c_[a_z, w_hh[H : 2 * H] @ a_n],
        "n": np.c_[a_n, w_hh[2 * H :] @ a_n, b_hh[2 * H :]],
    }
    t = {g: sum(np.einsum("c,a,b->cab", head[:, j], e["n"][j], e[g][j]) for j in range(H))
         for g in "rz"}
    want += [(head @ e["n"]).ravel(), t["r"].ravel(), t["z"].ravel(), s["head.bias"]]
    got = _feats(cfg, [state], "chain-gram", 2)[0].numpy()
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-12, atol=1e-14)
    for upto in range(3):
        gram, chain = (_feats(cfg, [state], m, upto) for m in ("gram", "chain-gram"))
        assert torch.equal(gram, chain)


def test_input_sketch_replaces_every_gate_map_a_by_a_s() -> None:
    """``s`` (in+1, m): the hidden-layer feature of the sketched maps A_g S, A_g = [W_ig | β_g]."""
    cfg = CFGS[1]
    state = _state(cfg, 3)
    n, m = cfg.input_shape[2] + 1, 4
    sk = torch.randn(n, m, dtype=torch.float64)
    got = gru_features(plan_for(cfg), stack_state_dicts([state]), "chain-gram", 0, s=sk)[0]
    beta = torch.cat([(state["gru.bias_ih_l0"] + state["gru.bias_hh_l0"])[: 2 * H],
                      state["gru.bias_ih_l0"][2 * H :]])
    a_r, a_z, a_n = (torch.cat([state["gru.weight_ih_l0"], beta[:, None]], 1) @ sk).split(H)
    iu = tuple(torch.triu_indices(m, m))
    want = [(g.T @ g)[iu] for g in (a_r, a_z, a_n)] + [((a_n**2).T @ g).ravel() for g in (a_r, a_z)]
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dim", [1, 7, 8, 30, 297, 600, 5000])
def test_gru_sketch_width_fits_dim(dim: int) -> None:
    """Hidden features of width m have layers * (3m(m+1)/2 + 2m^2) values: at most dim, and m + 1
    would not fit."""
    plan = plan_for(CFGS[2])
    for layers in (1, 2):
        m = gru_sketch_width(dim, layers)
        state = stack_state_dicts([_state(CFGS[2], 0)])
        sk = torch.randn(CFGS[2].input_shape[2] + 1, m, dtype=torch.float64)
        size = gru_features(plan, state, "chain-gram", layers - 1, s=sk).shape[1]
        assert size == layers * (3 * m * (m + 1) // 2 + 2 * m * m)
        assert size <= dim or m == 1
        assert layers * (3 * (m + 1) * (m + 2) // 2 + 2 * (m + 1) ** 2) > dim
    with pytest.raises(ValueError, match="dim=0"):
        gru_sketch_width(0, 1)


def test_raw_is_the_parameters_flattened_in_layer_order() -> None:
    """raw at layer k: W_ih, b_ih of the GRU layers <= k; at 'out': every parameter (W_ih, W_hh,
    b_ih, b_hh per layer, then the head), bit for bit (the layout stores hash)."""
    for cfg in CFGS.values():
        plan = plan_for(cfg)
        torch.manual_seed(0)
        stacked = stack_state_dicts([build(cfg).state_dict() for _ in range(3)])  # float32
        for upto in range(len(plan.layers)):
            if upto < plan.num_layers:
                names = [f"{w}_l{k}" for k in range(upto + 1) for w in ("weight_ih", "bias_ih")]
            else:
                names = [f"{w}_l{k}" for k in range(plan.num_layers)
                         for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            keys = [plan.gru_prefix + n for n in names]
            if upto == plan.num_layers:
                keys += [f"{plan.head_prefix}weight", f"{plan.head_prefix}bias"]
            want = torch.cat([stacked[k].reshape(3, -1) for k in keys], dim=1).to(torch.float64)
            assert torch.equal(gru_features(plan, stacked, "raw", upto), want)


# ---------------------------------------------------------------- alignment


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.sampled_from([1, 2]))
def test_alignment_undoes_a_symmetry_and_keeps_the_function(seed: int, layers: int) -> None:
    cfg = CFGS[layers]
    template = _state(cfg, seed)
    moved = random_gru_symmetry(template, cfg, seed + 1)
    back = align_to_template(moved, template, cfg)
    assert all(_rel(back[k], template[k]) < 1e-12 for k in template)
    other = _state(cfg, seed + 2)
    aligned = align_to_template(other, template, cfg)
    x = torch.randn(4, *cfg.input_shape, dtype=torch.float64)
    assert _rel(_run(cfg, aligned, x), _run(cfg, other, x)) < 1e-10
    # a noisy transformed copy is brought back to within the noise
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in moved.items()}
    back = align_to_template(noisy, template, cfg)
    assert max(float((back[k] - template[k]).abs().max()) for k in template) < 1e-2


def test_make_template_shape_start_and_errors() -> None:
    cfg = CFGS[2]
    states = [_state(cfg, i) for i in range(3)]
    t0 = make_template(states, cfg, iterations=0, start=1)
    assert all(torch.equal(t0[k], states[1][k]) for k in states[1])
    t = make_template(states, cfg, iterations=2)
    assert {k: v.shape for k, v in t.items()} == {k: v.shape for k, v in states[0].items()}
    assert all(v.dtype == torch.float64 for v in t.values())
    with pytest.raises(ValueError, match="start must index"):
        make_template(states, cfg, start=3)
    with pytest.raises(ValueError, match="iterations must be"):
        make_template(states, cfg, iterations=-1)
    stacked = stack_state_dicts(states)
    with pytest.raises(ValueError, match="needs a template"):
        gru_features(plan_for(cfg), stacked, "aligned", 0)
    with pytest.raises(ValueError, match="method must be one of"):
        gru_features(plan_for(cfg), stacked, "cka", 0)
    with pytest.raises(ValueError, match="not a permutation"):
        gru_symmetry(states[0], cfg, [torch.zeros(H, dtype=torch.long), None], [None, None])
    with pytest.raises(ValueError, match="must be ±1"):
        gru_symmetry(states[0], cfg, [None, None], [torch.full((H,), 2.0), None])
    with pytest.raises(ValueError, match="GRU plan"):
        gru_symmetry(states[0], ArchConfig(kind="mlp"), [None], [None])
