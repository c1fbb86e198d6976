"""The transformer's weight features (distsim.zoo.transformer): chain-gram, gram, raw, aligned, cka.

Layers (``transformer_layers``): ``embed`` the residual stream after the embedding,
positions and class token; ``attnI`` after block I's attention add; ``mlpI`` after its MLP add;
``out`` the logits. A stream layer's units are tokens x d, token-major. The drawn group
(distsim.symmetries.random_transformer_transform): a stream permutation, per block a head
permutation, per head A (W_Q A, W_K A^-T) and B (W_V B, B^-1 W_O), MLP unit permutations and ReLU
rescalings, and five more function-preserving changes, each also tested alone
(tests/test_transformer_features.py, PARTS; docs/explanation/transformer-symmetries.md):
(1) a LayerNorm's gamma times c per coordinate and beta moved, its readers' rows / c and biases
moved (only diag(gamma) W and beta W + b enter); (2) a reader of z = gamma n + beta gaining u v^T,
u = 1 / gamma, its bias -(u . beta) v (sum(n) = 0); (3) any b_K (it adds q_t . b_K to every score
of query t); (4) b_V[h] + e_h, b_O - sum_h e_h W_O[h] (attention weights sum to 1); (5) any
multiple of the all-ones vector added by a writer of the stream, per token (every reader of the
stream is a LayerNorm, which removes a token's mean).

``gram``: the network linearized, an affine map of the input: each LayerNorm as
x -> (x - mean(x)) * gamma + beta (no division by the standard deviation), each head's attention
uniform over the tokens (a token gets the token mean of z W_V + b_V, times W_O, plus b_O),
ReLU / GELU dropped. M_l = [linear part | offset] (units x (P+1), P the input's values), by pushing
the P basis inputs and a zero input (biases, positions, class token) through it; at a stream
layer each token's mean over its d coordinates removed (change 5). Hidden layers: the upper
triangle (diagonal included, row-major) of G_l = M_l^T M_l; ``out``: M_L flattened, class-major.
At ``attnI`` also the query-key form: N the linearized map (homogeneous, d x (P+1)) to the token
mean of LN1's output in block I, Q_h = N^T W_Q[h] + e b_Q[h] (e: the homogeneous coordinate's unit
vector), K_h = N_lin^T W_K[h] with N's offset column zeroed (change 3), then the (P+1)^2 entries
of sum_h Q_h K_h^T (its last column zero). Invariant to the drawn group (the stream permutation
permutes the rows of M_l and N, A cancels in Q_h K_h^T, B in W_V W_O, heads in the head sums,
ReLU's a in fc2 diag(1/a) diag(a) fc1) and to changes 1-5. An input sketch S ((P+1) x m) gives
M S, its Grams and S^T (sum_h Q_h K_h^T) S. In the tests' random nets the query-key form's
largest entry is 1/1000 to 1/300 of the Gram's, so it weighs little in a distance.

What gram does not see of a change of the function: W_Q, W_K, b_Q of block I enter at ``attnI``
only (the linearized value path does not read them), so ``mlpI``, later layers and ``out`` stay;
at ``attnI`` a change keeping sum_h Q_h K_h^T (two heads with one key map, a query change moved
from one to the other); the sign flip of an MLP hidden unit (fc1 row and bias, fc2 column).

``chain-gram``: fc1's rows with their biases to unit norm, fc2's columns times the norm (ReLU;
GELU is not homogeneous and is left as it is), then gram. The positive scales cancel in every
product gram uses, so chain-gram equals gram to rounding (GELU: exactly).

``raw``: the parameters of the layers up to the asked one, flattened in the order embed
(embed.weight, embed.bias, pos, cls), attnI (ln1, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o),
mlpI (ln2, fc1, fc2), out (ln, head), weights before biases. Invariant to nothing.

``aligned``: quantities free of the continuous symmetries, then matched to a template
(``make_transformer_template``). With C = I - 11^T / d and each LayerNorm folded into its readers
(W -> C diag(gamma) W, b -> b + beta W; changes 1, 2): per head QK_h = [W_Q; b_Q] W_K^T
((d+1) x d, no b_K: change 3) and OV_h = W_V W_O C (d x d), one output bias
(b_O + sum_h b_V[h] W_O[h]) C (change 4); the MLP folded and chain-normalized as for chain-gram,
fc2 and its bias centred; embedding, positions, class token centred (change 5); the head folded.
Matching by linear assignment (max inner product) in forward order: the stream permutation from
the embedding (a coordinate's embed.weight row, embed.bias, pos column and cls entry), then per
block the heads from QK_h and OV_h (stream indices mapped), the MLP units from fc1's rows and
biases and fc2's columns. Each match reads only what earlier ones aligned, so a permuted model
aligns to the same weights (barring ties). The feature: embed (embed.weight, embed.bias, pos,
cls), attnI (qk, ov, b_o), mlpI (fc1.weight, fc1.bias, fc2.weight, fc2.bias), out (head.weight,
head.bias), flattened; the template has these keys (blocks.i.qk ...) for every layer.

``cka``: linear CKA (distsim.weights.cka.cka_vector) of the real network on the probe: the stream
after the layer with each token's mean coordinate removed (change 5), or the logits. Centred over
the probe, it misses a shift alike for every sample of the layer a parameter enters: embed.bias,
pos, cls at ``embed``, b_V, b_O at ``attnI``, fc2's bias at ``mlpI``, ln.bias, head.bias at ``out``.

Invariant (< 1e-4 of its size, max-abs) or moved (> 1e-3), tests/test_transformer_features.py:

    change                               chain-gram   gram         raw  aligned  cka
    the drawn group, changes 1-5         yes          yes          no   yes      yes
    W_Q / W_K / b_Q noise, block I       moves at attnI, not later no   no       no
    head-sum keeping query change        yes (blind)  yes (blind)  no   no       no
    MLP hidden unit sign flip            yes (blind)  yes (blind)  no   no       no
    other parameters' noise              no           no           no   no       no (a)

(a) but the per-sample shifts above, at the layer they enter. Each "no" holds at every layer
from the first the change enters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from distsim.weights.chain import upper_triangle
from distsim.weights.cka import cka_vector
from distsim.zoo.transformer import Transformer, TransformerConfig, tokens

__all__ = ["METHODS", "make_transformer_template", "transformer_features", "transformer_layers"]

METHODS = ("chain-gram", "gram", "raw", "aligned", "cka")
Params = dict[str, torch.Tensor]


def transformer_layers(cfg: TransformerConfig) -> tuple[str, ...]:
    """Layer names a transformer feature can be taken at, in order.

    >>> transformer_layers(TransformerConfig(depth=2))
    ('embed', 'attn1', 'mlp1', 'attn2', 'mlp2', 'out')
    """
    blocks = [f"{kind}{i}" for i in range(1, cfg.depth + 1) for kind in ("attn", "mlp")]
    return ("embed", *blocks, "out")


def _layer(cfg: TransformerConfig, upto: int) -> tuple[str, int]:
    """(kind, block): kind embed / attn / mlp / out, block the 0-based block (-1 for embed,
    depth - 1 for out)."""
    n = len(transformer_layers(cfg))
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto < n:
        raise ValueError(f"upto must be an int in [0, {n}), got {upto!r}")
    if upto == 0:
        return "embed", -1
    if upto == n - 1:
        return "out", cfg.depth - 1
    return ("attn" if upto % 2 else "mlp"), (upto - 1) // 2


def _models(stacked: Mapping[str, torch.Tensor]) -> list[Params]:
    """K stacked state dicts -> K float64 state dicts."""
    k = next(iter(stacked.values())).shape[0]
    return [{n: v[i].detach().to(torch.float64) for n, v in stacked.items()} for i in range(k)]


# ---------------------------------------------------------------- the linearized network


def _ln(h: torch.Tensor, p: Params, name: str, t: torch.Tensor) -> torch.Tensor:
    """Linearized LayerNorm of h (J, T, d): centred, times gamma, plus beta times t (J, 1, 1)."""
    return (h - h.mean(dim=-1, keepdim=True)) * p[f"{name}.weight"] + t * p[f"{name}.bias"]


def _walk(cfg: TransformerConfig, p: Params, x: torch.Tensor, t: torch.Tensor,
          upto: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linearized network on J inputs x (J, *input_shape) with homogeneous coordinate t (J,)
    (biases, positions and the class token enter times t): (J, units) of layer ``upto``, and at
    an attn layer the token mean of LN1's output (J, d), else None."""
    kind, block = _layer(cfg, upto)
    t3 = t[:, None, None]
    h = tokens(cfg, x) @ p["embed.weight"].T + t3 * p["embed.bias"]  # (J, N, d)
    if cfg.pooling == "cls":
        h = torch.cat([t3 * p["cls"], h], dim=1)  # (J, T, d)
    h = h + t3 * p["pos"]
    if kind == "embed":
        return h.flatten(1), None
    for i in range(block + 1):
        b = f"blocks.{i}."
        zbar = _ln(h, p, b + "ln1", t3).mean(dim=1)  # (J, d): uniform attention reads the mean
        v = torch.einsum("jd,hdk->jhk", zbar, p[b + "w_v"]) + t3 * p[b + "b_v"]  # (J, H, d_k)
        out = torch.einsum("jhk,hkd->jd", v, p[b + "w_o"]) + t[:, None] * p[b + "b_o"]
        h = h + out[:, None]  # every token gets the same (J, d)
        if kind == "attn" and i == block:
            return h.flatten(1), zbar
        z = _ln(h, p, b + "ln2", t3)
        u = z @ p[b + "fc1.weight"].T + t3 * p[b + "fc1.bias"]  # (J, T, hidden), no activation
        h = h + u @ p[b + "fc2.weight"].T + t3 * p[b + "fc2.bias"]
    if kind == "mlp":
        return h.flatten(1), None
    z = _ln(h, p, "ln", t3)
    pooled = z[:, 0] if cfg.pooling == "cls" else z.mean(dim=1)  # (J, d)
    return pooled @ p["head.weight"].T + t[:, None] * p["head.bias"], None


def _pushes(cfg: TransformerConfig, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (J, *input_shape) and homogeneous coordinates (J,): the P basis inputs and the zero
    input with t = 1 (J = P+1), or the m columns of S (J = m, t = S's last row)."""
    n = math.prod(cfg.input_shape)
    if s is None:
        x = torch.eye(n + 1, n, dtype=torch.float64)
        t = torch.zeros(n + 1, dtype=torch.float64)
        t[n] = 1.0
    else:
        x, t = s[:n].T.to(torch.float64), s[n].to(torch.float64)
    return x.reshape(-1, *cfg.input_shape), t


def _centre(y: torch.Tensor, d: int) -> torch.Tensor:
    """(J, T * d) stream values with each token's mean over its d coordinates removed."""
    y = y.reshape(y.shape[0], -1, d)
    return (y - y.mean(dim=-1, keepdim=True)).flatten(1)


def _gram(cfg: TransformerConfig, p: Params, upto: int, s: torch.Tensor | None) -> torch.Tensor:
    """(D,) gram feature of one model (module docstring)."""
    x, t = _pushes(cfg, s)
    y, zbar = _walk(cfg, p, x, t, upto)  # y (J, units) = (M S)^T
    kind, block = _layer(cfg, upto)
    if kind == "out":
        return y.T.reshape(-1)  # (classes * J): class-major
    y = _centre(y, cfg.d_model)
    parts = [upper_triangle((y @ y.T)[None])[0]]
    if zbar is not None:  # the query-key form of the token mean, summed over heads
        b = f"blocks.{block}."
        zero = torch.zeros(1, *cfg.input_shape, dtype=torch.float64)
        offset = _walk(cfg, p, zero, torch.ones(1, dtype=torch.float64), upto)[1]
        assert offset is not None
        q = torch.einsum("jd,hdk->hjk", zbar, p[b + "w_q"]) + t[:, None] * p[b + "b_q"][:, None]
        # keys without their offset: a key shift alike for all tokens leaves the softmax
        k = torch.einsum("jd,hdk->hjk", zbar - t[:, None] * offset, p[b + "w_k"])
        parts.append(torch.einsum("hak,hbk->ab", q, k).reshape(-1))  # (J * J)
    return torch.cat(parts)


def _normalize(cfg: TransformerConfig, p: Params) -> Params:
    """Chain normalization of every block's MLP (ReLU only; GELU: unchanged): fc1's rows with
    their biases to unit norm (all-zero units left as they are), fc2's columns times the norm."""
    q = dict(p)
    if cfg.activation != "relu":
        return q
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        w1, b1 = p[b + "fc1.weight"], p[b + "fc1.bias"]  # (hidden, d), (hidden,)
        norm = (w1.square().sum(dim=1) + b1.square()).sqrt()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        q[b + "fc1.weight"], q[b + "fc1.bias"] = w1 / norm[:, None], b1 / norm
        q[b + "fc2.weight"] = p[b + "fc2.weight"] * norm[None]  # (d, hidden)
    return q


# ---------------------------------------------------------------- raw and aligned


def _keys(cfg: TransformerConfig, upto: int, aligned: bool) -> list[str]:
    """Keys flattened by raw (``aligned`` False) or aligned at layer ``upto``, in order."""
    keys = ["embed.weight", "embed.bias", "pos"] + (["cls"] if cfg.pooling == "cls" else [])
    for index in range(1, upto + 1):
        kind, block = _layer(cfg, index)
        b = f"blocks.{block}."
        if kind == "out":
            keys += ([] if aligned else ["ln.weight", "ln.bias"]) + ["head.weight", "head.bias"]
        elif kind == "attn":
            heads = ["w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o"]
            keys += [b + w for w in (["qk", "ov"] if aligned else ["ln1.weight", "ln1.bias",
                                                                    *heads])]
            keys.append(b + "b_o")
        else:
            fc = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
            keys += [b + w for w in (fc if aligned else ["ln2.weight", "ln2.bias", *fc])]
    return keys


def _flat(p: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([p[key].reshape(-1) for key in keys])


def _quantities(cfg: TransformerConfig, p: Params) -> Params:
    """One model's aligned representation before matching (module docstring): LayerNorms folded
    into their readers, readers and writers centred over the stream's coordinates, each head as
    QK_h (H, d+1, d) and OV_h (H, d, d), the attention's biases as one, the MLP normalized."""
    d = cfg.d_model
    c = torch.eye(d, dtype=torch.float64) - 1.0 / d  # (d, d): removes the mean coordinate

    def fold(ln: str, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reader (.., d, out) of LayerNorm ``ln``: (C diag(gamma) w, bias + beta w)."""
        return c @ (p[f"{ln}.weight"][:, None] * w), bias + p[f"{ln}.bias"] @ w

    q = {"embed.weight": c @ p["embed.weight"], "embed.bias": c @ p["embed.bias"],
         "pos": p["pos"] @ c}
    if cfg.pooling == "cls":
        q["cls"] = c @ p["cls"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        wq, bq = fold(b + "ln1", p[b + "w_q"], p[b + "b_q"])  # (H, d, d_k), (H, d_k)
        wk, _ = fold(b + "ln1", p[b + "w_k"], p[b + "b_k"])  # a key bias is invisible
        wv, bv = fold(b + "ln1", p[b + "w_v"], p[b + "b_v"])
        q[b + "qk"] = torch.cat([wq, bq[:, None]], dim=1) @ wk.transpose(1, 2)  # (H, d+1, d)
        q[b + "ov"] = wv @ p[b + "w_o"] @ c  # (H, d, d)
        q[b + "b_o"] = (p[b + "b_o"] + torch.einsum("hk,hkd->d", bv, p[b + "w_o"])) @ c
        w1, b1 = fold(b + "ln2", p[b + "fc1.weight"].T, p[b + "fc1.bias"])  # (d, hidden)
        q[b + "fc1.weight"], q[b + "fc1.bias"] = w1.T, b1
        q[b + "fc2.weight"], q[b + "fc2.bias"] = c @ p[b + "fc2.weight"], c @ p[b + "fc2.bias"]
    w, bias = fold("ln", p["head.weight"].T, p["head.bias"])
    q["head.weight"], q["head.bias"] = w.T, bias
    return _normalize(cfg, q)


def _assign(sim: torch.Tensor) -> torch.Tensor:
    """perm with perm[i] the model's unit matched to the template's unit i (max total sim)."""
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _stream_rows(cfg: TransformerConfig, q: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(d, token_width + 1 + T [+ 1]) what the embedding writes into each stream coordinate."""
    parts = [q["embed.weight"], q["embed.bias"][:, None], q["pos"].T]
    if cfg.pooling == "cls":
        parts.append(q["cls"][:, None])
    return torch.cat(parts, dim=1)


def _align(cfg: TransformerConfig, q: Params, t: Mapping[str, torch.Tensor]) -> Params:
    """Quantities ``q`` with the stream, the heads and the MLP units permuted to match ``t``."""
    d = cfg.d_model
    pi = _assign(_stream_rows(cfg, t) @ _stream_rows(cfg, q).T)  # the stream: (d,)
    ext = torch.cat([pi, torch.tensor([d])])  # the homogeneous row stays last
    a = {"embed.weight": q["embed.weight"][pi], "embed.bias": q["embed.bias"][pi],
         "pos": q["pos"][:, pi], "head.weight": q["head.weight"][:, pi],
         "head.bias": q["head.bias"]}
    if cfg.pooling == "cls":
        a["cls"] = q["cls"][pi]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        a[b + "b_o"], a[b + "fc2.bias"] = q[b + "b_o"][pi], q[b + "fc2.bias"][pi]
        qk = q[b + "qk"][:, ext][:, :, pi]  # (H, d+1, d) in the template's stream order
        ov = q[b + "ov"][:, pi][:, :, pi]  # (H, d, d)
        sim = (torch.einsum("iab,jab->ij", t[b + "qk"], qk)
               + torch.einsum("iab,jab->ij", t[b + "ov"], ov))  # (H, H)
        order = _assign(sim)
        a[b + "qk"], a[b + "ov"] = qk[order], ov[order]
        w1, b1 = q[b + "fc1.weight"][:, pi], q[b + "fc1.bias"]  # (hidden, d), (hidden,)
        w2 = q[b + "fc2.weight"][pi]  # (d, hidden)

        def units(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
            return torch.cat([w1, b1[:, None], w2.T], dim=1)  # (hidden, 2d + 1)

        u = _assign(units(t[b + "fc1.weight"], t[b + "fc1.bias"], t[b + "fc2.weight"])
                    @ units(w1, b1, w2).T)
        a[b + "fc1.weight"], a[b + "fc1.bias"], a[b + "fc2.weight"] = w1[u], b1[u], w2[:, u]
    return a


def make_transformer_template(cfg: TransformerConfig, stacked: Mapping[str, torch.Tensor],
                              iterations: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Study-wide template for ``aligned``: the first model's quantities (module docstring:
    QK_h, OV_h per head, the MLP chain-normalized), then ``iterations`` rounds of "align every
    model to it, take the mean". ``seed`` is unused (the forward matching has no random order);
    it keeps the signature of distsim.weights.alignment.make_template.

    >>> from distsim.zoo.transformer import Transformer
    >>> cfg = TransformerConfig(d_model=4, heads=2, hidden=6, input_shape=(1, 8), patch=4)
    >>> _ = torch.manual_seed(0)
    >>> sds = [Transformer(cfg).state_dict() for _ in range(3)]
    >>> stacked = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    >>> t = make_transformer_template(cfg, stacked, iterations=1)
    >>> tuple(t["blocks.0.qk"].shape), tuple(t["blocks.0.ov"].shape), t["pos"].dtype
    ((2, 5, 4), (2, 4, 4), torch.float64)
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    qs = [_quantities(cfg, p) for p in _models(stacked)]
    template = {k: v.clone() for k, v in qs[0].items()}
    for _ in range(iterations):
        aligned = [_align(cfg, q, template) for q in qs]
        template = {k: torch.stack([a[k] for a in aligned]).mean(dim=0) for k in aligned[0]}
    return template


# ---------------------------------------------------------------- cka


def _activations(cfg: TransformerConfig, models: list[Params], probe: torch.Tensor,
                 upto: int) -> torch.Tensor:
    """(K, n, units) the real network's layer ``upto`` on ``probe``, float64."""
    kind, block = _layer(cfg, upto)
    net = Transformer(cfg).double()
    seen: list[torch.Tensor] = []
    if kind in ("embed", "attn"):  # the input of the blocks / of block I's ln2
        pre = net.get_submodule("blocks" if kind == "embed" else f"blocks.{block}.ln2")
        handle = pre.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    else:  # the output of block I / of the head
        post = net.get_submodule(f"blocks.{block}" if kind == "mlp" else "head")
        handle = post.register_forward_hook(lambda _m, _a, out: seen.append(out))
    x = probe.to(torch.float64)
    try:
        with torch.no_grad():
            for p in models:
                net.load_state_dict(p)
                net(x)
    finally:
        handle.remove()
    if kind == "out":
        return torch.stack([a.reshape(x.shape[0], -1) for a in seen])
    return torch.stack([_centre(a.reshape(x.shape[0], -1), cfg.d_model) for a in seen])


# ---------------------------------------------------------------- entry point


def transformer_features(cfg: TransformerConfig, stacked: Mapping[str, torch.Tensor], method: str,
                         upto: int, s: torch.Tensor | None = None,
                         template: Mapping[str, torch.Tensor] | None = None,
                         probe: torch.Tensor | None = None) -> torch.Tensor:
    """(K, D) float64 features of K stacked transformers at layer number ``upto`` of
    ``transformer_layers(cfg)`` (module docstring). ``s`` ((P+1, m) input sketch): chain-gram and
    gram only, the others ignore it; ``template``: for aligned (make_transformer_template);
    ``probe`` (n, *input_shape): for cka.

    >>> from distsim.zoo.transformer import Transformer
    >>> cfg = TransformerConfig(d_model=4, heads=2, hidden=6, input_shape=(1, 8), patch=4)
    >>> _ = torch.manual_seed(0)
    >>> stacked = {k: v[None] for k, v in Transformer(cfg).state_dict().items()}
    >>> [tuple(transformer_features(cfg, stacked, "gram", i).shape) for i in range(4)]
    [(1, 45), (1, 126), (1, 45), (1, 18)]
    >>> tuple(transformer_features(cfg, stacked, "raw", 0).shape)  # 4*4 + 4 + 3*4 + 4
    (1, 36)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "aligned" and template is None:
        raise ValueError("method 'aligned' needs template= (see make_transformer_template)")
    if method == "cka" and probe is None:
        raise ValueError("method 'cka' needs probe= (n, *input_shape) inputs")
    _layer(cfg, upto)
    models = _models(stacked)
    if method == "cka":
        assert probe is not None
        return cka_vector(_activations(cfg, models, probe, upto))
    if method == "raw":
        return torch.stack([_flat(p, _keys(cfg, upto, aligned=False)) for p in models])
    if method == "aligned":
        assert template is not None
        t = {k: torch.as_tensor(v).to(torch.float64) for k, v in template.items()}
        keys = _keys(cfg, upto, aligned=True)
        return torch.stack([_flat(_align(cfg, _quantities(cfg, p), t), keys) for p in models])
    if method == "chain-gram":
        models = [_normalize(cfg, p) for p in models]
    return torch.stack([_gram(cfg, p, upto, s) for p in models])
