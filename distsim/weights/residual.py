"""Weight features of the residual CNN of distsim.zoo.resnet: chain-gram, gram, raw, aligned, cka.

Everything reads the FOLDED eval-mode network (``fold_batchnorm``, eps 1e-5): every conv with
a bias, no BatchNorm. Feature layers (``resnet_layers``), blocks numbered 1.. over the net:
``stem`` (the stem conv's output), ``blockI.conv1`` (block I's inner channels, conv1's output),
``blockI`` (the residual stream after block I's add), ``out`` (the logits). Units of a hidden
layer are (channel, position) pairs, channel-major.

``gram``: drop every ReLU; the network is then affine in its input. M_l (units x (P+1),
P = prod(input_shape)) is layer l's map in homogeneous coordinates: column j < P is
f_l(e_j) - f_l(0), column P the offset f_l(0), computed by pushing 0 and e_1..e_P through the
linearized folded net (``distsim.zoo.resnet.folded_layers`` with the identity; global average
pooling and the head at ``out``). Hidden layer: upper triangle (diagonal included, row-major)
of G_l = M_l^T M_l; ``out``: M_L flattened output-major (classes x (P+1)). With an input
sketch S ((P+1) x m) M is replaced by M S: the m columns S[:P, a] are pushed through and the
offset is added with weight S[P, a] (as distsim.weights.chain.sketched_chain), then the same
Gram / flattening (classes x m).

``chain-gram``: gram of the chain-normalized folded weights (``resnet_chain_normalize``), stage
by stage in forward order: the stream of stage s is scaled per channel by the norm of its FIRST
writer's row (the stem conv for stage 0, the first block's projection conv for a later stage;
row = the channel's incoming weights and bias; a zero row keeps scale 1); every writer of the
stream (first writer, each block's conv2) is divided by it, every reader (each block's conv1 and
projection reading the stream, the head) multiplied by it along its input channels. Then, per
block of the stage, the inner channels: conv1's row and bias divided by their norm, conv2's
input channels multiplied. ReLU commutes with positive per-channel scales and identity
shortcuts carry the stream's scale, so the function is kept; the result is a canonical form
under the positive scales of the group and is permuted with its channels.

``raw``: the folded weights and biases of every layer up to the asked one, flattened in layer
order (stem; per block conv1, then conv2 and its projection conv if any; ``out``: the head).

``aligned``: chain-normalize, then permute channels to match a template (``make_resnet_template``)
by Git Re-Basin weight matching (``scipy.optimize.linear_sum_assignment`` maximizing the inner
product), in forward order: the stream of stage s gets ONE permutation, shared by its writers
and readers, from its first writer's rows (their columns already mapped by the previous stream's
permutation; the last stage adds the head's columns); then each block of the stage gets an
inner permutation from conv1's rows (columns mapped) plus conv2's input-channel slices (rows
mapped). Each step sees a model's channels only through their weights, so the result does not
depend on the model's own permutation (barring ties). Feature: flattened like raw.

``cka``: activations on the probe with the ReLUs (stem, blockI.conv1, blockI: post-ReLU, the
stream after the add; ``out``: logits), flattened channel-major per sample, then
distsim.weights.cka.cka_vector.

Invariance ("yes": the feature moves by < 1e-4 of its size, "no": by > 1e-3; every entry at every
layer is checked on a 1-D and a 2-D net in tests/test_resnet_features.py). Transforms: ``perm``:
every stream and inner permutation; ``stream a`` / ``inner a``: positive per-channel scales of
the streams only / of the inner channels only; ``group``:
distsim.symmetries.random_resnet_transform (all three at once). Layer kinds: stem, blockI.conv1
(inner channels), blockI (stream), out. All of these transforms keep the function.

    method      transform  stem  blockI.conv1  blockI  out
    chain-gram  each       yes   yes           yes     yes
    aligned     each       yes   yes           yes     yes
    gram, cka   perm       yes   yes           yes     yes
                stream a   no    yes           no      yes
                inner a    yes*  no            yes     yes
                group      no    no            no      yes
    raw         perm       no    no            no      no
                stream a   no    no            no      no
                inner a    yes*  no            no      no
                group      no    no            no      no

(*: the transform does not touch the stem's weights at all.) gram and cka see a layer's units
up to a permutation, so only a scale of that layer's own units moves them; at ``out`` neither
can see the group. cka's "no" needs two or more channels of the layer that vary over the probe
(with one, a per-channel scale acts as a global one there; the tests draw such nets).

Blind spot of gram and chain-gram: they drop the ReLUs, so a change that keeps the linearized
network is invisible to them, e.g. negating a block's inner channel (conv1's folded row and bias
and conv2's reading slice): the function changes, chain-gram and gram do not move at any layer
and raw, aligned and cka move from that block on (tested). Noise in one conv's weights moves
every method at every layer from that conv's on, and chain-gram, gram, raw and cka not before
it (tested); aligned's matching also reads conv2 and the head, so a later layer can move an
earlier layer's aligned feature through a changed permutation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from distsim.weights.chain import upper_triangle
from distsim.weights.cka import cka_vector
from distsim.zoo.resnet import (
    BN_EPS,
    ResNetConfig,
    conv_of,
    fold_batchnorm,
    folded_layers,
    stream_layout,
)

__all__ = [
    "RESNET_METHODS",
    "make_resnet_template",
    "resnet_chain_normalize",
    "resnet_features",
    "resnet_layers",
]

RESNET_METHODS = ("chain-gram", "gram", "raw", "aligned", "cka")

Params = dict[str, torch.Tensor]  # one model's folded parameters: <conv>.weight, <conv>.bias


def resnet_layers(cfg: ResNetConfig) -> tuple[str, ...]:
    """Feature layers of a ResNet, in forward order (module docstring).

    >>> resnet_layers(ResNetConfig(channels=(4, 8), blocks=1))
    ('stem', 'block1.conv1', 'block1', 'block2.conv1', 'block2', 'out')
    """
    names = ["stem"]
    for i in range(1, _num_blocks(cfg) + 1):
        names += [f"block{i}.conv1", f"block{i}"]
    return (*names, "out")


def _num_blocks(cfg: ResNetConfig) -> int:
    return cfg.blocks * len(cfg.channels)


def _stride(cfg: ResNetConfig, i: int) -> int:
    """Stride of block i (0-based): 2 for the first block of a stage > 0 (it has a projection)."""
    return 2 if i >= cfg.blocks and i % cfg.blocks == 0 else 1


def _layer_convs(cfg: ResNetConfig) -> list[list[str]]:
    """Per feature layer, the folded layers it adds (raw / aligned flatten them in this order)."""
    out = [["stem.0"]]
    for i in range(_num_blocks(cfg)):
        out.append([f"blocks.{i}.conv1"])
        out.append([f"blocks.{i}.conv2"] + ([f"blocks.{i}.shortcut.0"] if _stride(cfg, i) > 1
                                           else []))
    return [*out, ["head"]]


def _fold(cfg: ResNetConfig, stacked: Mapping[str, torch.Tensor]) -> list[Params]:
    """K stacked state dicts -> K folded float64 parameter dicts."""
    sd = {k: v.to(torch.float64) for k, v in stacked.items()
          if not k.endswith("num_batches_tracked")}
    k = sd["head.weight"].shape[0]
    return [fold_batchnorm({n: v[i] for n, v in sd.items()}, cfg, BN_EPS) for i in range(k)]


# ---------------------------------------------------------------- the linearized chain


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _chain_map(cfg: ResNetConfig, p: Params, upto: int, s: torch.Tensor | None) -> torch.Tensor:
    """(J, units) = M_l^T (J = P+1) or (M_l S)^T (J = m) of the linearized folded net."""
    n = int(np.prod(cfg.input_shape))
    cols = torch.eye(n, dtype=torch.float64) if s is None else s[:n].T.to(torch.float64)
    x = torch.cat([cols, cols.new_zeros(1, n)]).reshape(-1, *cfg.input_shape)  # (J+1, *input)
    y = folded_layers(p, cfg, x, _identity, upto)[-1]  # (J+1, units)
    offset = y[-1:]  # (1, units): the response to a zero input
    linear = y[:-1] - offset  # (J, units)
    if s is None:
        return torch.cat([linear, offset])  # (P+1, units)
    return linear + s[n].to(y.dtype)[:, None] * offset  # (m, units): the offset weighted by S[P]


def _gram(cfg: ResNetConfig, models: list[Params], upto: int,
          s: torch.Tensor | None) -> torch.Tensor:
    maps = torch.stack([_chain_map(cfg, p, upto, s) for p in models])  # (K, J, units)
    if upto == len(resnet_layers(cfg)) - 1:
        return maps.transpose(1, 2).reshape(len(models), -1)  # (K, classes * J)
    return upper_triangle(maps @ maps.transpose(1, 2))  # (K, J(J+1)/2)


# ---------------------------------------------------------------- chain normalization


def _rows(p: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """(C, D) each output channel's incoming weights and bias."""
    return torch.cat([p[f"{name}.weight"].flatten(1), p[f"{name}.bias"][:, None]], dim=1)


def _scale_out(p: Params, name: str, n: torch.Tensor) -> None:
    w = p[f"{name}.weight"]
    p[f"{name}.weight"] = w / n.reshape(-1, *[1] * (w.dim() - 1))
    p[f"{name}.bias"] = p[f"{name}.bias"] / n


def _scale_in(p: Params, key: str, n: torch.Tensor) -> None:
    w = p[key]
    p[key] = w * n.reshape(1, -1, *[1] * (w.dim() - 2))


def _norm(p: Params, name: str) -> torch.Tensor:
    s = _rows(p, name).norm(dim=1)  # (C,)
    return torch.where(s > 0, s, torch.ones_like(s))  # a zero channel keeps scale 1


def _stage_blocks(cfg: ResNetConfig, stage: int) -> range:
    return range(stage * cfg.blocks, (stage + 1) * cfg.blocks)


def resnet_chain_normalize(cfg: ResNetConfig, params: Mapping[str, torch.Tensor]) -> Params:
    """One model's folded parameters (``fold_batchnorm``) chain-normalized (module docstring):
    the same function, every first writer's and conv1's rows of unit norm.

    >>> from distsim.zoo.resnet import ResNet, folded_forward
    >>> cfg = ResNetConfig(channels=(2, 3), blocks=1, input_shape=(1, 6), num_classes=2)
    >>> _ = torch.manual_seed(0)
    >>> p = fold_batchnorm(ResNet(cfg).double().state_dict(), cfg)
    >>> q = resnet_chain_normalize(cfg, p)
    >>> x = torch.randn(4, 1, 6, dtype=torch.float64)
    >>> bool(torch.allclose(folded_forward(q, cfg, x), folded_forward(p, cfg, x)))
    True
    >>> [round(float(v), 6) for v in _rows(q, "stem.0").norm(dim=1)]
    [1.0, 1.0]
    """
    p = dict(params)
    for stage, stream in enumerate(stream_layout(cfg)):
        n = _norm(p, conv_of(stream.writers[0]))  # (C_s,) from the first writer
        for bn in stream.writers:
            _scale_out(p, conv_of(bn), n)
        for key in stream.readers:
            _scale_in(p, key, n)
        for i in _stage_blocks(cfg, stage):
            n = _norm(p, f"blocks.{i}.conv1")  # (C_s,) inner channels
            _scale_out(p, f"blocks.{i}.conv1", n)
            _scale_in(p, f"blocks.{i}.conv2.weight", n)
    return p


# ---------------------------------------------------------------- aligned


def _assign(sim: torch.Tensor) -> torch.Tensor:
    """perm maximizing sum_i sim[i, perm[i]]: the model's channel perm[i] goes to i."""
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def _permute_out(p: Params, name: str, perm: torch.Tensor) -> None:
    p[f"{name}.weight"] = p[f"{name}.weight"][perm]
    p[f"{name}.bias"] = p[f"{name}.bias"][perm]


def _align(cfg: ResNetConfig, p: Params, t: Mapping[str, torch.Tensor]) -> Params:
    """A chain-normalized model's channels permuted to match the template ``t`` (module
    docstring): one forward pass, stream of each stage, then its blocks' inner channels."""
    p = dict(p)
    streams = stream_layout(cfg)
    for stage, stream in enumerate(streams):
        first = conv_of(stream.writers[0])
        sim = _rows(t, first) @ _rows(p, first).T  # (C_s template, C_s model)
        if stage == len(streams) - 1:
            sim = sim + t["head.weight"].T @ p["head.weight"]  # (C, classes) @ (classes, C)
        perm = _assign(sim)
        for bn in stream.writers:
            _permute_out(p, conv_of(bn), perm)
        for key in stream.readers:
            p[key] = p[key][:, perm]
        for i in _stage_blocks(cfg, stage):
            conv1, conv2 = f"blocks.{i}.conv1", f"blocks.{i}.conv2.weight"
            slices_t = t[conv2].transpose(0, 1).flatten(1)  # (C_inner, C_s * kernel)
            slices_p = p[conv2].transpose(0, 1).flatten(1)
            perm = _assign(_rows(t, conv1) @ _rows(p, conv1).T + slices_t @ slices_p.T)
            _permute_out(p, conv1, perm)
            p[conv2] = p[conv2][:, perm]
    return p


def _keys(cfg: ResNetConfig, upto: int | None = None) -> list[str]:
    """Folded keys of the feature layers <= upto (all of them when None), in layer order."""
    groups = _layer_convs(cfg)[: None if upto is None else upto + 1]
    return [f"{n}.{w}" for g in groups for n in g for w in ("weight", "bias")]


def _flat(cfg: ResNetConfig, models: list[Params], upto: int) -> torch.Tensor:
    keys = _keys(cfg, upto)
    return torch.stack([torch.cat([p[k].reshape(-1) for k in keys]) for p in models])


def make_resnet_template(cfg: ResNetConfig, stacked: Mapping[str, torch.Tensor],
                         iterations: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A study-wide template for ``aligned`` (float64, the folded keys): the first model
    chain-normalized, then ``iterations`` rounds of "align every model to the template, take the
    mean". ``seed`` is not used (the matching is one deterministic forward pass); it keeps the
    signature of distsim.weights.alignment.make_template.

    >>> from distsim.zoo.resnet import ResNet
    >>> cfg = ResNetConfig(channels=(2, 3), blocks=1, input_shape=(1, 6), num_classes=2)
    >>> _ = torch.manual_seed(0)
    >>> sds = [ResNet(cfg).state_dict() for _ in range(3)]
    >>> stacked = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    >>> t = make_resnet_template(cfg, stacked, iterations=2)
    >>> t["blocks.1.shortcut.0.weight"].shape, t["head.bias"].dtype
    (torch.Size([3, 2, 1]), torch.float64)
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    del seed
    models = [resnet_chain_normalize(cfg, p) for p in _fold(cfg, stacked)]
    keys = _keys(cfg)
    template = {k: models[0][k].clone() for k in keys}
    for _ in range(iterations):
        aligned = [_align(cfg, p, template) for p in models]
        template = {k: torch.stack([a[k] for a in aligned]).mean(dim=0) for k in keys}
    return template


def _check_template(cfg: ResNetConfig, template: Mapping[str, torch.Tensor],
                    model: Params) -> dict[str, torch.Tensor]:
    t = {}
    for key in _keys(cfg):
        if key not in template:
            raise ValueError(f"template lacks {key!r} (see make_resnet_template)")
        t[key] = torch.as_tensor(template[key]).to(torch.float64)
        if t[key].shape != model[key].shape:
            raise ValueError(f"template[{key!r}] has shape {tuple(t[key].shape)}, the models "
                             f"have {tuple(model[key].shape)}")
    return t


# ---------------------------------------------------------------- entry point


def resnet_features(cfg: ResNetConfig, stacked: Mapping[str, torch.Tensor], method: str,
                    upto: int, s: torch.Tensor | None = None,
                    template: Mapping[str, torch.Tensor] | None = None,
                    probe: torch.Tensor | None = None) -> torch.Tensor:
    """(K, D) float64 features of K stacked ResNet state dicts ((K, ...) per key) at feature
    layer number ``upto`` of ``resnet_layers(cfg)``. ``s``: (P+1, m) input-side sketch, used by
    chain-gram and gram (the others ignore it); ``template``: from make_resnet_template (aligned);
    ``probe``: (n, *input_shape) inputs (cka).

    >>> from distsim.zoo.resnet import ResNet
    >>> cfg = ResNetConfig(channels=(2, 3), blocks=1, input_shape=(1, 6), num_classes=2)
    >>> _ = torch.manual_seed(0)
    >>> stacked = {k: v[None] for k, v in ResNet(cfg).state_dict().items()}
    >>> resnet_features(cfg, stacked, "chain-gram", 0).shape  # stem: Gram of P+1 = 7 columns
    torch.Size([1, 28])
    >>> resnet_features(cfg, stacked, "gram", 5).shape  # out: 2 classes x 7
    torch.Size([1, 14])
    >>> probe = torch.randn(5, 1, 6)
    >>> round(float(resnet_features(cfg, stacked, "cka", 2, probe=probe).norm()), 6)
    1.0
    """
    if method not in RESNET_METHODS:
        raise ValueError(f"method must be one of {RESNET_METHODS}, got {method!r}")
    layers = resnet_layers(cfg)
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto < len(layers):
        raise ValueError(f"upto must be an int in [0, {len(layers)}), got {upto!r}")
    if method == "aligned" and template is None:
        raise ValueError("method 'aligned' needs a template (see make_resnet_template), got None")
    if method == "cka" and probe is None:
        raise ValueError("method 'cka' needs probe inputs (n, *input_shape), got None")
    models = _fold(cfg, stacked)
    if method == "raw":
        return _flat(cfg, models, upto)
    if method == "cka":
        assert probe is not None
        x = probe.to(torch.float64)  # (n, *input_shape)
        with torch.no_grad():
            acts = torch.stack([folded_layers(p, cfg, x, torch.relu, upto)[-1] for p in models])
        return cka_vector(acts)  # (K, n(n+1)/2)
    if method != "gram":
        models = [resnet_chain_normalize(cfg, p) for p in models]
    if method == "aligned":
        assert template is not None
        t = _check_template(cfg, template, models[0])
        return _flat(cfg, [_align(cfg, p, t) for p in models], upto)
    with torch.no_grad():
        return _gram(cfg, models, upto, s)
