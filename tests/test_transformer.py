"""The transformer of distsim.zoo.transformer and its symmetry group: random_transformer_transform
(the residual stream's permutation, head permutations, an invertible map per head between W_Q and
W_K and between W_V and W_O, the MLP's permutations and ReLU rescalings, then LayerNorm folding,
reader shifts, a redrawn b_K, b_V traded against b_O and the stream's all-ones direction) keeps the
logits; each added change alone keeps them and moves what it names; a map on one side of a pair
alone, and other changes outside the group, do not keep them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.symmetries import (
    _add_stream_mean,
    _fold_layernorms,
    _redraw_key_bias,
    _shift_readers,
    _trade_value_bias,
    random_transformer_transform,
)
from distsim.zoo.transformer import Transformer, TransformerConfig

StateDict = dict[str, torch.Tensor]

CONFIGS = [
    TransformerConfig(d_model=8, heads=2, depth=1, hidden=12, input_shape=(1, 20), patch=4),
    TransformerConfig(d_model=12, heads=3, depth=2, hidden=10, activation="gelu",
                      pooling="mean", input_shape=(2, 12), patch=3),
    TransformerConfig(d_model=8, heads=1, depth=2, hidden=6, input_shape=(1, 6, 6),
                      num_classes=3),
    TransformerConfig(d_model=16, heads=4, depth=1, hidden=8, pooling="mean",
                      input_shape=(1, 8, 8), num_classes=4),
]
CFG_IDS = [f"d{c.d_model}h{c.heads}x{c.depth}" for c in CONFIGS]


def _net(cfg: TransformerConfig, seed: int) -> Transformer:
    """A float64 transformer with every parameter random (zero biases, unit LayerNorm gains
    and a zero class token would hide a mistake in moving them)."""
    torch.manual_seed(seed)
    net = Transformer(cfg).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last in ("bias", "b_q", "b_k", "b_v", "b_o", "cls"):
                param.normal_(0.0, 0.3)
            elif ".ln" in f".{name}":  # a LayerNorm's gain
                param.normal_(1.0, 0.3)
    return net


def _logits(net: Transformer, cfg: TransformerConfig, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *cfg.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return net(x)


def _logits_of(cfg: TransformerConfig, state: StateDict) -> torch.Tensor:
    twin = Transformer(cfg).double()
    twin.load_state_dict(state)
    return _logits(twin, cfg, 0)


def _lns(cfg: TransformerConfig) -> list[str]:
    return [f"blocks.{i}.{ln}" for i in range(cfg.depth) for ln in ("ln1", "ln2")] + ["ln"]


def _centred(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with its mean over the stream axis `dim` removed (the all-ones direction)."""
    return x - x.mean(dim=dim, keepdim=True)


def _sorted(x: torch.Tensor) -> torch.Tensor:
    """The multiset of x's entries (invariant to the stream and head permutations)."""
    return torch.sort(x.flatten())[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_a_random_element_keeps_the_logits(cfg: TransformerConfig, seed: int) -> None:
    net = _net(cfg, seed % 991)
    moved = random_transformer_transform(cfg, net.state_dict(), seed)
    twin = Transformer(cfg).double()
    twin.load_state_dict(moved)
    torch.testing.assert_close(_logits(twin, cfg, 0), _logits(net, cfg, 0), rtol=1e-5,
                               atol=1e-5)
    assert not torch.equal(moved["blocks.0.w_q"], net.state_dict()["blocks.0.w_q"])
    assert all(moved[k].shape == v.shape for k, v in net.state_dict().items())
    assert moved.keys() == net.state_dict().keys()


# ---------------------------------------------------------------- the added changes, one by one


def _check_fold(cfg: TransformerConfig, old: StateDict, new: StateDict) -> None:
    """gamma and beta times the same c (|c| in [1/2, 2], some negative), readers' rows / c."""
    signs = []
    for ln in _lns(cfg):
        c = new[f"{ln}.weight"] / old[f"{ln}.weight"]
        assert _close(new[f"{ln}.bias"], old[f"{ln}.bias"] * c)
        assert bool(((c.abs() >= 0.5 - 1e-12) & (c.abs() <= 2 + 1e-12)).all())
        assert not _close(c.abs(), torch.ones_like(c))
        signs.append(torch.sign(c))
        # the readers: diag(gamma) W kept (only it and beta W + b enter)
        if ln == "ln":
            assert _close(new["head.weight"] * new["ln.weight"],
                          old["head.weight"] * old["ln.weight"])
    assert bool((torch.cat(signs) < 0).any()), "no coordinate's sign flipped"
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        for x in "qkv":
            assert _close(new[f"{b}.w_{x}"] * new[f"{b}.ln1.weight"][None, :, None],
                          old[f"{b}.w_{x}"] * old[f"{b}.ln1.weight"][None, :, None])
        assert _close(new[f"{b}.fc1.weight"] * new[f"{b}.ln2.weight"],
                      old[f"{b}.fc1.weight"] * old[f"{b}.ln2.weight"])


def _check_shift(cfg: TransformerConfig, old: StateDict, new: StateDict) -> None:
    """Each reader W gains u v^T (u = 1 / gamma): diag(gamma) W centred over the stream is kept,
    diag(gamma) W itself moves by 1 v^T; the bias plus beta W is kept."""
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        g, beta = old[f"{b}.ln1.weight"], old[f"{b}.ln1.bias"]
        for x in "qkv":
            gw_old = old[f"{b}.w_{x}"] * g[None, :, None]
            gw_new = new[f"{b}.w_{x}"] * g[None, :, None]
            assert _close(_centred(gw_new, 1), _centred(gw_old, 1))
            diff = gw_new - gw_old  # 1 v^T per head: every row alike, not zero
            assert _close(diff, diff[:, :1].expand_as(diff))
            assert not _close(diff, torch.zeros_like(diff))
            assert _close(new[f"{b}.b_{x}"] + torch.einsum("d,hdk->hk", beta, new[f"{b}.w_{x}"]),
                          old[f"{b}.b_{x}"] + torch.einsum("d,hdk->hk", beta, old[f"{b}.w_{x}"]))
    g, beta = old["ln.weight"], old["ln.bias"]
    diff = (new["head.weight"] - old["head.weight"]) * g
    assert _close(diff, diff[:, :1].expand_as(diff))
    assert not _close(diff, torch.zeros_like(diff))
    assert _close(new["head.bias"] + new["head.weight"] @ beta,
                  old["head.bias"] + old["head.weight"] @ beta)


def _check_key_bias(cfg: TransformerConfig, old: StateDict, new: StateDict) -> None:
    for i in range(cfg.depth):
        assert bool((new[f"blocks.{i}.b_k"] != old[f"blocks.{i}.b_k"]).all())


def _check_value_bias(cfg: TransformerConfig, old: StateDict, new: StateDict) -> None:
    """b_V moves, b_O compensates: b_O + sum_h b_V[h] W_O[h] is kept."""
    for i in range(cfg.depth):
        b = f"blocks.{i}"

        def total(p: StateDict, b: str = b) -> torch.Tensor:
            return p[f"{b}.b_o"] + torch.einsum("hk,hkd->d", p[f"{b}.b_v"], p[f"{b}.w_o"])

        assert bool((new[f"{b}.b_v"] != old[f"{b}.b_v"]).all())
        assert _close(total(new), total(old))


WRITERS = {"embed.weight": 0, "embed.bias": 0, "pos": 1, "cls": 0}  # key: its stream axis
BLOCK_WRITERS = {"w_o": 2, "b_o": 0, "fc2.weight": 0, "fc2.bias": 0}


def _writers(cfg: TransformerConfig, p: StateDict) -> dict[str, int]:
    keys = {k: a for k, a in WRITERS.items() if k in p}
    for i in range(cfg.depth):
        keys.update({f"blocks.{i}.{k}": a for k, a in BLOCK_WRITERS.items()})
    return keys


def _check_stream_mean(cfg: TransformerConfig, old: StateDict, new: StateDict) -> None:
    """Every writer gains a multiple of the all-ones vector: centred over the stream it is kept,
    and what it gained is constant along the stream axis (and not zero)."""
    for key, axis in _writers(cfg, old).items():
        assert _close(_centred(new[key], axis), _centred(old[key], axis)), key
        diff = new[key] - old[key]
        assert _close(diff, diff.mean(dim=axis, keepdim=True).expand_as(diff)), key
        assert not _close(diff, torch.zeros_like(diff)), key


Change = Callable[[TransformerConfig, StateDict, torch.Generator], None]
Check = Callable[[TransformerConfig, StateDict, StateDict], None]


def _moved_keys(cfg: TransformerConfig, name: str, p: StateDict) -> set[str]:
    blocks = [f"blocks.{i}" for i in range(cfg.depth)]
    if name == "layernorm fold":
        readers = [f"{b}.{w}" for b in blocks for w in ("w_q", "w_k", "w_v", "fc1.weight")]
        return {f"{ln}.{part}" for ln in _lns(cfg) for part in ("weight", "bias")} | {
            "head.weight", *readers}
    if name == "reader shift":
        return {f"{b}.{w}" for b in blocks for w in ("w_q", "w_k", "w_v", "b_q", "b_k", "b_v",
                                                     "fc1.weight", "fc1.bias")} | {
            "head.weight", "head.bias"}
    if name == "key bias":
        return {f"{b}.b_k" for b in blocks}
    if name == "value bias":
        return {f"{b}.{w}" for b in blocks for w in ("b_v", "b_o")}
    return set(_writers(cfg, p))


CHANGES: dict[str, tuple[Change, Check]] = {
    "layernorm fold": (_fold_layernorms, _check_fold),
    "reader shift": (_shift_readers, _check_shift),
    "key bias": (_redraw_key_bias, _check_key_bias),
    "value bias": (_trade_value_bias, _check_value_bias),
    "stream mean": (_add_stream_mean, _check_stream_mean),
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("name", list(CHANGES))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_added_change_keeps_the_logits_and_moves_what_it_names(
        cfg: TransformerConfig, name: str, seed: int) -> None:
    """Each change random_transformer_transform adds after the permutations and A, B, applied
    alone: the logits are kept (float64, 1e-9), the parameters it names move as it says, every
    other parameter is untouched, and no shape changes."""
    net = _net(cfg, 10 + seed)
    old = dict(net.state_dict())
    new = {k: v.clone() for k, v in old.items()}
    change, check = CHANGES[name]
    change(cfg, new, torch.Generator().manual_seed(100 + seed))
    torch.testing.assert_close(_logits_of(cfg, new), _logits(net, cfg, 0), rtol=1e-9, atol=1e-9)
    assert new.keys() == old.keys()
    assert all(new[k].shape == old[k].shape and new[k].dtype == old[k].dtype for k in old)
    names = _moved_keys(cfg, name, old)
    assert {k for k in old if not torch.equal(new[k], old[k])} == names
    check(cfg, old, new)


# ---------------------------------------------------------------- the drawn element has them


@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("seed", [3, 4])
def test_the_drawn_element_includes_the_added_changes(cfg: TransformerConfig, seed: int) -> None:
    """random_transformer_transform draws all five added changes, seen through quantities that
    the permutations and A, B leave as they are (or as a multiset):

    - fold: the multiset of |gamma| of every LayerNorm moves, that of beta / gamma does not;
    - reader shift: the head's rows of W diag(gamma) gain 1 v^T: their sums move, their
      centred entries (a multiset) do not;
    - key bias and value bias: in a freshly built net (b_K, b_V, b_O, beta all zero) only the
      redraw makes b_K nonzero and only the trade makes b_V and the centred b_O nonzero;
    - stream mean: the class token (zero at build) becomes a nonzero multiple of ones, and the
      embedding's columns change their mean over the stream but not their centred multiset."""
    net = _net(cfg, seed)
    old = net.state_dict()
    new = random_transformer_transform(cfg, old, seed)
    torch.testing.assert_close(_logits_of(cfg, new), _logits(net, cfg, 0), rtol=1e-5, atol=1e-5)
    for ln in _lns(cfg):
        g_old, g_new = old[f"{ln}.weight"], new[f"{ln}.weight"]
        assert not _close(_sorted(g_new.abs()), _sorted(g_old.abs()))
        assert _close(_sorted(new[f"{ln}.bias"] / g_new), _sorted(old[f"{ln}.bias"] / g_old))
    gw_old, gw_new = old["head.weight"] * old["ln.weight"], new["head.weight"] * new["ln.weight"]
    assert not _close(gw_new.sum(1), gw_old.sum(1))
    assert _close(torch.sort(_centred(gw_new, 1), dim=1)[0],
                  torch.sort(_centred(gw_old, 1), dim=1)[0])
    e_old, e_new = old["embed.weight"], new["embed.weight"]
    assert not _close(e_new.mean(0), e_old.mean(0))
    assert _close(torch.sort(_centred(e_new, 0), dim=0)[0],
                  torch.sort(_centred(e_old, 0), dim=0)[0])

    torch.manual_seed(seed)
    fresh = Transformer(cfg).double()  # zero b_Q, b_K, b_V, b_O, LayerNorm beta and class token
    old = fresh.state_dict()
    new = random_transformer_transform(cfg, old, seed)
    torch.testing.assert_close(_logits_of(cfg, new), _logits(fresh, cfg, 0), rtol=1e-5,
                               atol=1e-5)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        assert bool((old[f"{b}.b_k"] == 0).all()) and bool((new[f"{b}.b_k"] != 0).all())
        assert bool((old[f"{b}.b_v"] == 0).all()) and bool((new[f"{b}.b_v"] != 0).all())
        assert not _close(_centred(new[f"{b}.b_o"], 0), torch.zeros_like(new[f"{b}.b_o"]))
        assert bool((new[f"{b}.ln1.bias"] == 0).all())  # beta times c: zero stays zero
    if cfg.pooling == "cls":
        cls = new["cls"]
        assert bool((cls != 0).all()) and _close(cls, cls[:1].expand_as(cls))


# ---------------------------------------------------------------- outside the group


@pytest.mark.parametrize("weight", ["w_q", "w_v"])
def test_a_map_on_one_side_of_a_pair_changes_the_function(weight: str) -> None:
    """The check can fail: W_Q (or W_V) times an invertible map without W_K's (W_O's) inverse
    moves the logits."""
    cfg = CONFIGS[0]
    net = _net(cfg, 4)
    state = dict(net.state_dict())
    state[f"blocks.0.{weight}"] = state[f"blocks.0.{weight}"] * 2.0
    twin = Transformer(cfg).double()
    twin.load_state_dict(state)
    assert (_logits(twin, cfg, 0) - _logits(net, cfg, 0)).abs().max() > 1e-4


def _outside(cfg: TransformerConfig, p: StateDict, what: str) -> None:
    gen = torch.Generator().manual_seed(9)
    d = cfg.d_model
    if what == "b_q redrawn":  # unlike b_K, b_Q's term q . k_s depends on the key
        p["blocks.0.b_q"] = torch.randn(p["blocks.0.b_q"].shape, generator=gen,
                                        dtype=torch.float64)
    elif what == "b_v without b_o":
        p["blocks.0.b_v"] = p["blocks.0.b_v"] + 0.5
    elif what == "gamma scaled, readers not":
        p["blocks.0.ln1.weight"] = p["blocks.0.ln1.weight"] * 1.5
    elif what == "stream coordinate scaled":  # writers' coordinate 0 times 2, readers' / 2
        for key, axis in _writers(cfg, p).items():
            index = [slice(None)] * p[key].dim()
            index[axis] = slice(0, 1)
            p[key][tuple(index)] *= 2.0
        for ln in _lns(cfg):
            p[f"{ln}.weight"][0] /= 2.0
            p[f"{ln}.bias"][0] /= 2.0
    elif what == "writer gains a non-constant vector":
        p["embed.bias"] = p["embed.bias"] + torch.randn(d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("what", ["b_q redrawn", "b_v without b_o", "gamma scaled, readers not",
                                  "stream coordinate scaled",
                                  "writer gains a non-constant vector"])
def test_changes_outside_the_group_move_the_logits(what: str) -> None:
    """The checks can fail: b_Q (unlike b_K) is not free, b_V alone is not, a LayerNorm's gain
    alone is not, a per-coordinate scale of the stream is not (LayerNorm normalizes over all
    coordinates), and a writer's shift other than the all-ones direction is not."""
    cfg = CONFIGS[0]
    net = _net(cfg, 4)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _outside(cfg, state, what)
    assert (_logits_of(cfg, state) - _logits(net, cfg, 0)).abs().max() > 1e-4


def test_the_query_key_form_of_a_head_is_invariant() -> None:
    """C diag(gamma) W_Q W_K^T diag(gamma) C of each head (gamma: LN1's gain, C = I - 11^T / d;
    the attention logits' bilinear form as the normalized stream sees it) survives the drawn
    element up to the stream permutation: A cancels, the fold's c cancels against gamma, the
    reader shift's 1 v^T against C. W_Q alone, and the uncentred W_Q W_K^T, do not."""
    cfg = TransformerConfig(d_model=8, heads=1, input_shape=(1, 8), patch=2)
    net = _net(cfg, 1)
    state = net.state_dict()
    moved = random_transformer_transform(cfg, state, 7)
    C = torch.eye(8, dtype=torch.float64) - 1.0 / 8

    def form(p: StateDict) -> torch.Tensor:
        g = p["blocks.0.ln1.weight"][:, None]
        return C @ (g * p["blocks.0.w_q"][0]) @ (g * p["blocks.0.w_k"][0]).T @ C

    assert not torch.allclose(moved["blocks.0.w_q"][0].abs().sum(0),
                              state["blocks.0.w_q"][0].abs().sum(0))
    raw_before = state["blocks.0.w_q"][0] @ state["blocks.0.w_k"][0].T
    raw_after = moved["blocks.0.w_q"][0] @ moved["blocks.0.w_k"][0].T
    assert not torch.allclose(_sorted(raw_after), _sorted(raw_before))
    torch.testing.assert_close(_sorted(form(moved)), _sorted(form(state)), rtol=1e-9, atol=1e-12)
