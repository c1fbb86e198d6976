"""Random elements of an architecture's weight-space symmetry group: ``random_transform``.

A symmetry maps one set of weights to another that computes the same function. What each
architecture's group is, is stated in :func:`distsim.weights.normalize.symmetries` (per hidden
layer of a sequential net) and :mod:`distsim.weights.recurrent` (GRU); ``random_transform`` draws
one element of the whole group at once, every hidden layer transformed together:

- every hidden layer's units (a linear layer's outputs, a convolution's output channels)
  permuted uniformly, and the slice of the next layer that reads each unit (a column, an input
  channel, a block of flattened columns) moved with it;
- with ReLU / LeakyReLU, each unit rescaled by a > 0 (log-uniform in [1/4, 4]): its incoming
  weights and bias times a, its reading slice times 1/a;
- with tanh, each linear unit's sign flipped with probability 1/2 (incoming and reading
  negated); with sigmoid, the flip plus the reading slice added to the next layer's bias
  (sigma(-x) = 1 - sigma(x)); convolution channels are not flipped (max pooling does not
  commute with a negation);
- a GRU's hidden units permuted and sign-flipped per layer (``random_gru_symmetry``);
- a ResNet (``kind = "resnet"``): ``random_resnet_transform``; a transformer:
  ``random_transformer_transform`` (their groups: docs/explanation/resnet-symmetries.md and
  transformer-symmetries.md).

The output layer's units are the classes, in order: never moved. tests/test_symmetries.py checks
that the logits do not change (float64, 1e-5) for every kind and activation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from distsim.config.arch import ArchConfig
from distsim.weights.normalize import plan_for, symmetries
from distsim.weights.recurrent import random_gru_symmetry
from distsim.zoo.models import resnet_config, transformer_config
from distsim.zoo.resnet import ResNetConfig, conv_of, stream_layout
from distsim.zoo.transformer import TransformerConfig

SCALE = 4.0  # rescaling factors are log-uniform in [1 / SCALE, SCALE]


def random_transform(arch_config: ArchConfig, state_dict: Mapping[str, torch.Tensor],
                     seed: int) -> dict[str, torch.Tensor]:
    """A random element of the symmetry group of `arch_config`'s networks applied to one
    model's `state_dict` (not a pack: no leading K dimension): other weights, the same function.
    `arch_config` must have its input_shape and num_classes set (``with_task_shape``).

    >>> from distsim.zoo.models import build
    >>> cfg = ArchConfig(kind="mlp", widths=(5,), input_shape=(1, 2, 2), num_classes=3)
    >>> _ = torch.manual_seed(0)
    >>> net = build(cfg).double()
    >>> moved = random_transform(cfg, net.state_dict(), seed=1)
    >>> twin = build(cfg).double()
    >>> _ = twin.load_state_dict(moved)
    >>> x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), twin(x), atol=1e-10))
    True
    >>> bool(torch.equal(moved["1.weight"], net.state_dict()["1.weight"]))
    False
    """
    if arch_config.kind == "resnet":
        return random_resnet_transform(resnet_config(arch_config), state_dict, seed)
    if arch_config.kind == "transformer":
        return random_transformer_transform(transformer_config(arch_config), state_dict, seed)
    plan = plan_for(arch_config)
    if plan.kind == "rnn":
        stacked = {k: v[None] for k, v in state_dict.items()}
        return {k: v[0] for k, v in random_gru_symmetry(stacked, plan, seed).items()}
    p = {k: v.clone() for k, v in state_dict.items()}
    gen = torch.Generator().manual_seed(int(seed))
    steps = plan.parametric
    for cur, nxt in zip(steps[:-1], steps[1:], strict=True):
        allowed = symmetries(arch_config, cur.name)
        w = p[cur.weight]
        units = w.shape[0]
        perm = torch.randperm(units, generator=gen)
        scale = torch.ones(units, dtype=w.dtype)
        shift = torch.zeros(units, dtype=torch.bool)  # sigmoid flips: next bias += old slice
        if "rescaling" in allowed:
            scale = _log_uniform(units, gen).to(w.dtype)
        elif "sign flip" in allowed or "sign flip + bias shift" in allowed:
            flip = torch.rand(units, generator=gen) < 0.5
            scale = torch.where(flip, -1.0, 1.0).to(w.dtype)
            shift = flip & ("sign flip + bias shift" in allowed)
        # this layer: unit i of the new weights is unit perm[i] of the old, times scale[i]
        view = (-1, *[1] * (w.dim() - 1))
        p[cur.weight] = w[perm] * scale.view(view)
        if cur.bias:
            p[cur.bias] = p[cur.bias][perm] * scale
        # the next layer reads unit i through a slice (a column, an input channel, a block of
        # flattened columns): (out, units, rest) moves with it, times 1 / scale
        wn = p[nxt.weight]
        read = wn.reshape(wn.shape[0], units, -1)  # (out_next, units, rest)
        if shift.any():  # sigma(-z) = 1 - sigma(z): the flipped units' old slices into the bias
            if not nxt.bias:
                raise ValueError(f"a sigmoid flip of {cur.name} needs a bias in {nxt.name}")
            p[nxt.bias] = p[nxt.bias] + read[:, perm][:, shift].sum(dim=(1, 2))
        p[nxt.weight] = (read[:, perm] / scale.view(1, -1, 1)).reshape(wn.shape)
    return p


def random_resnet_transform(cfg: ResNetConfig, state_dict: Mapping[str, torch.Tensor],
                            seed: int) -> dict[str, torch.Tensor]:
    """A random element of the symmetry group of a ResNet (distsim.zoo.resnet) applied to one
    model's state dict, exact in eval and in training mode:

    - per stage, a permutation and a positive per-channel scale a (log-uniform in
      [1/SCALE, SCALE]) of the residual stream, shared by every layer that writes it (the
      output channels of its conv; its BatchNorm's gamma and beta times a, running statistics
      moved) and reads it (input channels of convs and the head, times 1 / a): the stream is
      followed by a ReLU after every add (and the stem), which commutes with a > 0, and the
      identity shortcuts carry it as it is;
    - per block, a permutation and a positive scale of its inner channels (conv1's outputs,
      bn1, conv2's inputs).

    The weights of a conv that feeds a BatchNorm are not rescaled: in eval mode
    gamma (a x - a mean) / sqrt(a^2 var + eps) differs from the unscaled map by the eps term,
    so only the BatchNorm's affine part carries the scale exactly.

    >>> from distsim.zoo.resnet import ResNet
    >>> cfg = ResNetConfig(channels=(3, 4), blocks=1, input_shape=(1, 8), num_classes=2)
    >>> _ = torch.manual_seed(0)
    >>> net = ResNet(cfg).double().eval()
    >>> twin = ResNet(cfg).double().eval()
    >>> _ = twin.load_state_dict(random_resnet_transform(cfg, net.state_dict(), seed=3))
    >>> x = torch.randn(5, 1, 8, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), twin(x), atol=1e-10))
    True
    """
    p = {k: v.clone() for k, v in state_dict.items()}
    gen = torch.Generator().manual_seed(int(seed))

    def draw(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(width, generator=gen)
        return perm, _log_uniform(width, gen)

    def write(bn: str, conv: str, perm: torch.Tensor, a: torch.Tensor) -> None:
        p[f"{conv}.weight"] = p[f"{conv}.weight"][perm]
        for stat in ("running_mean", "running_var"):
            p[f"{bn}.{stat}"] = p[f"{bn}.{stat}"][perm]
        for affine in ("weight", "bias"):
            v = p[f"{bn}.{affine}"]
            p[f"{bn}.{affine}"] = v[perm] * a.to(v.dtype)

    def read(key: str, perm: torch.Tensor, a: torch.Tensor) -> None:
        w = p[key]
        p[key] = w[:, perm] / a.to(w.dtype).reshape(1, -1, *[1] * (w.dim() - 2))

    for stream in stream_layout(cfg):
        perm, a = draw(stream.width)
        for bn in stream.writers:
            write(bn, conv_of(bn), perm, a)
        for key in stream.readers:
            read(key, perm, a)
    for i in range(cfg.blocks * len(cfg.channels)):
        block = f"blocks.{i}"
        perm, a = draw(p[f"{block}.conv1.weight"].shape[0])
        write(f"{block}.bn1", f"{block}.conv1", perm, a)
        read(f"{block}.conv2.weight", perm, a)
    return p


def random_transformer_transform(cfg: TransformerConfig, state_dict: Mapping[str, torch.Tensor],
                                 seed: int) -> dict[str, torch.Tensor]:
    """A random element of the symmetry group of a transformer (distsim.zoo.transformer)
    applied to one model's state dict. Drawn first, in this order:

    - the residual stream's coordinates permuted (one permutation for the whole network): the
      embedding's rows, the positions, the class token, every LayerNorm's weight and bias (a
      LayerNorm's mean and variance over the coordinates do not depend on their order), the
      columns of W_O, b_O and fc2 that write the stream, and the rows of W_Q, W_K, W_V, fc1 and
      the head that read it. The stream itself admits no map beyond a permutation and the
      all-ones direction below (a per-coordinate scale or a rotation does not commute with the
      normalization; a global scale of everything written is inexact by LayerNorm's eps: not
      drawn);
    - in every block, the heads permuted; per head an invertible A (d_k x d_k) with
      W_Q -> W_Q A, W_K -> W_K A^-T (biases too: q k^T is what the softmax sees) and an
      invertible B with W_V -> W_V B, W_O -> B^-1 W_O;
    - in every block, the MLP's hidden units permuted, and with ReLU each rescaled by a > 0
      (fc1's row and bias times a, fc2's column times 1 / a).

    Then, on the moved weights, changes that the LayerNorms' affine parts and the softmax allow
    (each exact on the weights it is applied to, so their composition is too):

    - LayerNorm folding: per LayerNorm (ln1, ln2 of every block, ln) and coordinate, gamma and
      beta times c (|c| log-uniform in [1/2, 2], sign random), the readers' rows (W_Q, W_K,
      W_V of every head for ln1, fc1 for ln2, the head for ln) divided by c: z -> c z, z W kept;
    - reader shift: per LayerNorm and reader, W -> W + u v^T with u = 1 / gamma and v random,
      the reader's bias minus (u . beta) v: u . LN(x) = u . beta, since the normalized
      coordinates sum to 0 (skipped for a LayerNorm with a zero gamma);
    - b_K replaced by random values: it adds q_t . b_K to every score of query t alike, which the
      softmax ignores;
    - b_V[h] -> b_V[h] + e_h, e random, and b_O -> b_O - sum_h e_h W_O[h]: the attention weights
      sum to 1, so only b_O + sum_h b_V[h] W_O[h] enters;
    - stream mean: every writer of the stream gains random multiples of the all-ones vector (the
      embedding's weight 1 w^T and its bias, a constant per token of the positions, the class
      token, per head and row of W_O, b_O, fc2's weight 1 w^T and its bias): every reader of the
      stream is a LayerNorm, which removes a token's mean.

    The random amounts are normal: b_K, e and the multiples of the all-ones vector scaled to the
    root mean square of the tensor they change (1 where that is zero), v so that u v^T is of the
    size of the reader's weight; so float64 keeps the logits to rounding.

    >>> from distsim.zoo.transformer import Transformer
    >>> cfg = TransformerConfig(d_model=8, heads=2, input_shape=(1, 12), patch=3)
    >>> _ = torch.manual_seed(0)
    >>> net = Transformer(cfg).double()
    >>> moved = random_transformer_transform(cfg, net.state_dict(), seed=2)
    >>> twin = Transformer(cfg).double()
    >>> _ = twin.load_state_dict(moved)
    >>> x = torch.randn(4, 1, 12, dtype=torch.float64)
    >>> bool(torch.allclose(net(x), twin(x), atol=1e-9))
    True
    >>> bool(torch.equal(moved["blocks.0.b_k"], net.state_dict()["blocks.0.b_k"]))
    False
    """
    p = {k: v.clone() for k, v in state_dict.items()}
    gen = torch.Generator().manual_seed(int(seed))
    d, dk = cfg.d_model, cfg.d_k
    P = torch.randperm(d, generator=gen)  # the residual stream
    for key in ("embed.weight", "embed.bias", "cls", "ln.weight", "ln.bias"):
        if key in p:
            p[key] = p[key][P]
    p["pos"] = p["pos"][:, P]
    p["head.weight"] = p["head.weight"][:, P]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        for ln in ("ln1", "ln2"):
            for part in ("weight", "bias"):
                p[f"{b}.{ln}.{part}"] = p[f"{b}.{ln}.{part}"][P]
        for w in ("w_q", "w_k", "w_v"):
            p[f"{b}.{w}"] = p[f"{b}.{w}"][:, P]  # (heads, d, d_k): rows read the stream
        p[f"{b}.w_o"] = p[f"{b}.w_o"][:, :, P]  # (heads, d_k, d): columns write it
        p[f"{b}.b_o"] = p[f"{b}.b_o"][P]
        p[f"{b}.fc1.weight"] = p[f"{b}.fc1.weight"][:, P]
        p[f"{b}.fc2.weight"] = p[f"{b}.fc2.weight"][P]
        p[f"{b}.fc2.bias"] = p[f"{b}.fc2.bias"][P]
        # heads: a permutation, then per head the Q/K map A and the V/O map B
        order = torch.randperm(cfg.heads, generator=gen)
        for w in ("w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o"):
            p[f"{b}.{w}"] = p[f"{b}.{w}"][order]
        dtype = p[f"{b}.w_q"].dtype
        A = torch.stack([_invertible(dk, gen) for _ in range(cfg.heads)]).to(dtype)
        B = torch.stack([_invertible(dk, gen) for _ in range(cfg.heads)]).to(dtype)
        a_inv_t = torch.linalg.inv(A).transpose(1, 2)
        p[f"{b}.w_q"], p[f"{b}.b_q"] = p[f"{b}.w_q"] @ A, _rowvec(p[f"{b}.b_q"], A)
        p[f"{b}.w_k"], p[f"{b}.b_k"] = p[f"{b}.w_k"] @ a_inv_t, _rowvec(p[f"{b}.b_k"], a_inv_t)
        p[f"{b}.w_v"], p[f"{b}.b_v"] = p[f"{b}.w_v"] @ B, _rowvec(p[f"{b}.b_v"], B)
        p[f"{b}.w_o"] = torch.linalg.inv(B) @ p[f"{b}.w_o"]
        # the MLP's hidden units
        perm = torch.randperm(cfg.hidden, generator=gen)
        a = torch.ones(cfg.hidden, dtype=torch.float64)
        if cfg.activation == "relu":
            a = _log_uniform(cfg.hidden, gen)
        a = a.to(p[f"{b}.fc1.weight"].dtype)
        p[f"{b}.fc1.weight"] = p[f"{b}.fc1.weight"][perm] * a[:, None]
        p[f"{b}.fc1.bias"] = p[f"{b}.fc1.bias"][perm] * a
        p[f"{b}.fc2.weight"] = p[f"{b}.fc2.weight"][:, perm] / a[None]
    # what the LayerNorms' affine parts, the softmax and the mean removal allow
    _fold_layernorms(cfg, p, gen)
    _shift_readers(cfg, p, gen)
    _redraw_key_bias(cfg, p, gen)
    _trade_value_bias(cfg, p, gen)
    _add_stream_mean(cfg, p, gen)
    return p


# (weight, bias, per head): a per-head weight is (heads, d, d_k) read as z W, else (out, d) as W z
_Reader = tuple[str, str, bool]


def _layernorm_readers(cfg: TransformerConfig) -> list[tuple[str, list[_Reader]]]:
    """Each LayerNorm's prefix and the layers that read its output."""
    out: list[tuple[str, list[_Reader]]] = []
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        out.append((f"{b}.ln1", [(f"{b}.w_{x}", f"{b}.b_{x}", True) for x in "qkv"]))
        out.append((f"{b}.ln2", [(f"{b}.fc1.weight", f"{b}.fc1.bias", False)]))
    out.append(("ln", [("head.weight", "head.bias", False)]))
    return out


def _rows(c: torch.Tensor, per_head: bool) -> torch.Tensor:
    """(d,) per stream coordinate -> broadcastable over a reader's input coordinates."""
    return c[None, :, None] if per_head else c[None, :]


def _normal(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A standard normal draw of `shape` times the root mean square of `like` (1 where that is
    zero), in like's dtype and device."""
    rms = float(like.detach().double().pow(2).mean().sqrt()) if like.numel() else 0.0
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * (rms if rms > 0 else 1.0)
    return z.to(like)


def _fold_layernorms(cfg: TransformerConfig, p: dict[str, torch.Tensor],
                     gen: torch.Generator) -> None:
    """Per LayerNorm and coordinate, gamma and beta times c (|c| log-uniform in [1/2, 2], sign
    random), its readers' rows divided by c: the output z becomes c z, and z W is kept."""
    for ln, readers in _layernorm_readers(cfg):
        sign = torch.where(torch.rand(cfg.d_model, generator=gen) < 0.5, -1.0, 1.0)
        c = (_log_uniform(cfg.d_model, gen, 2.0) * sign.double()).to(p[f"{ln}.weight"])
        for part in ("weight", "bias"):
            p[f"{ln}.{part}"] = p[f"{ln}.{part}"] * c
        for w, _, per_head in readers:
            p[w] = p[w] / _rows(c.to(p[w]), per_head)


def _shift_readers(cfg: TransformerConfig, p: dict[str, torch.Tensor],
                   gen: torch.Generator) -> None:
    """Per LayerNorm z = gamma n + beta (sum(n) = 0, so u . z = u . beta for u = 1 / gamma) and
    reader, W gains u v^T (v random, like the reader's bias in shape) and the bias -(u . beta) v.
    v is scaled so that u v^T is of the size of W. A LayerNorm with a zero gamma is left alone."""
    for ln, readers in _layernorm_readers(cfg):
        gamma, beta = p[f"{ln}.weight"], p[f"{ln}.bias"]
        if not bool((gamma != 0).all()):
            continue
        u = 1.0 / gamma
        u_rms = float(u.double().pow(2).mean().sqrt())
        for w, bias, per_head in readers:
            v = _normal(tuple(p[bias].shape), gen, p[w]) / u_rms
            if per_head:  # (heads, d, d_k) + u (d,) x v (heads, d_k)
                p[w] = p[w] + u[None, :, None] * v[:, None, :]
            else:  # (out, d) + v (out,) x u (d,)
                p[w] = p[w] + v[:, None] * u[None, :]
            p[bias] = p[bias] - (u @ beta) * v


def _redraw_key_bias(cfg: TransformerConfig, p: dict[str, torch.Tensor],
                     gen: torch.Generator) -> None:
    """Every block's b_K replaced by random values (of its size): the softmax ignores it."""
    for i in range(cfg.depth):
        key = f"blocks.{i}.b_k"
        p[key] = _normal(tuple(p[key].shape), gen, p[key])


def _trade_value_bias(cfg: TransformerConfig, p: dict[str, torch.Tensor],
                      gen: torch.Generator) -> None:
    """Every block's b_V[h] + e_h (e random) and b_O - sum_h e_h W_O[h]: only
    b_O + sum_h b_V[h] W_O[h] enters, the attention weights summing to 1."""
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        e = _normal(tuple(p[f"{b}.b_v"].shape), gen, p[f"{b}.b_v"])
        p[f"{b}.b_v"] = p[f"{b}.b_v"] + e
        p[f"{b}.b_o"] = p[f"{b}.b_o"] - torch.einsum("hk,hkd->d", e, p[f"{b}.w_o"])


def _add_stream_mean(cfg: TransformerConfig, p: dict[str, torch.Tensor],
                     gen: torch.Generator) -> None:
    """Every writer of the residual stream gains random multiples of the all-ones vector, per
    token and per input: every reader of the stream is a LayerNorm, which removes the mean."""
    def add(key: str, shape: tuple[int, ...]) -> None:
        # shape: the multiples, broadcast over the stream axis (the weight's last or first)
        p[key] = p[key] + _normal(shape, gen, p[key])

    add("embed.weight", (1, cfg.token_width))  # (d, token_width): 1 w^T
    add("embed.bias", (1,))
    add("pos", (cfg.tokens, 1))  # (T, d): a constant per token
    if "cls" in p:
        add("cls", (1,))
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        add(f"{b}.w_o", (cfg.heads, cfg.d_k, 1))  # (heads, d_k, d): per head and row
        add(f"{b}.b_o", (1,))
        add(f"{b}.fc2.weight", (1, cfg.hidden))  # (d, hidden): 1 w^T
        add(f"{b}.fc2.bias", (1,))


def _invertible(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random well-conditioned (n, n) float64 matrix: U diag(s) V, U and V orthogonal, s
    log-uniform in [1/2, 2]."""
    u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    return u @ torch.diag(_log_uniform(n, gen, 2.0)) @ v


def _rowvec(b: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """(heads, d_k) rows times (heads, d_k, d_k) maps: b[h] @ M[h]."""
    return torch.einsum("hk,hkl->hl", b, M)


def _log_uniform(n: int, gen: torch.Generator, bound: float = SCALE) -> torch.Tensor:
    """(n,) float64 positive factors, log-uniform in [1 / bound, bound]."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp((2 * u - 1) * math.log(bound))
