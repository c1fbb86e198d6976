"""Weight features of trained networks: chain-gram, raw, gram, aligned, cka (arXiv 2208.04369).

``chain-gram`` (the method): with chain-normalized weights, M_1 = Ŵ_1 and M_l = Ŵ_l M_{l-1} map
input pixels to the units of layer l. Biases ride along in homogeneous coordinates: M_l is the
(units x (P+1)) matrix [linear part | offset], the offset being the layer's response to a zero
input with activations linearized, so the feature sees the whole affine chain. A conv (2-D, or
1-D for (C, L) inputs, whose C*L values are the "pixels") is applied
as its exact linear map on the flattened input, max pooling is taken as its linear average
(avg pooling as itself), flatten feeds the head, and activations are dropped (linearized).
Permuting the units of any layer <= l permutes the rows of M_l, so the Gram G_l = M_l^T M_l
((P+1) x (P+1), over input pixels) is invariant to them; for a conv the rows are
(channel, position) pairs, so G_l is invariant to channel permutations. Feature = upper triangle
of G_l including the diagonal, row-major; at the last layer ('out', outputs are ordered) it is
M_L itself flattened (output-major).

GRU: its gates are not positively homogeneous, so its weights are not normalized and ``chain-gram``
equals ``gram``; its features (chain-gram/gram, aligned, and raw as below) come from
distsim.weights.recurrent and are invariant to its true symmetries, hidden-unit permutations and the
tanh sign flip of a hidden unit (the table in distsim.weights.recurrent's docstring, tested there).

``raw`` (the paper's unaligned control): unnormalized weights and biases of every layer up to the
asked one, flattened in layer order (GRU: W_ih, b_ih of layers <= k; ``out``: every parameter).

``gram`` (the ablation of the normalization rule): chain-gram's Grams and 'out' map computed from
the UNNORMALIZED weights. At 'out' it equals chain-gram to rounding (the normalization is a
symmetry of the linearized network too), so 'out' features say nothing about the rule; at hidden
layers the two differ in length, hardly in direction. With g the gram and c the chain-gram feature
of one model at init, ||g - c|| / ||c|| (Euclidean norms) is 0.56-0.90 and the max-norm ratio
max|g - c| / max|c| about the same, but 1 - cos(g, c) is 0.0000-0.0068: g is nearly parallel to
c, 0.11-0.45 times as long, by a factor that varies from model to model. Measured on 20 seeds of
the quickstart's MLP (widths 32, 32) and CNN (channels 8, 16) on digits pair tasks, built by
distsim.zoo.models.build under torch.manual_seed(seed) (benchmarks/gram_vs_chain_init.py; min /
median / max over seeds):

    arch  layer  ||g-c||/||c||        max|g-c|/max|c|      1 - cos(g, c)           ||g||/||c||
    mlp   fc1    0.649/0.661/0.676    0.649/0.662/0.676    0.0018/0.0031/0.0042    0.325/0.341/0.353
    mlp   fc2    0.868/0.877/0.882    0.863/0.871/0.882    0.0021/0.0043/0.0068    0.119/0.124/0.132
    cnn   conv1  0.555/0.643/0.704    0.560/0.630/0.713    0.0006/0.0015/0.0066    0.296/0.358/0.446
    cnn   conv2  0.854/0.871/0.895    0.854/0.871/0.895    0.0000/0.0001/0.0005    0.105/0.129/0.146

``aligned`` (Git Re-Basin weight matching, distsim.weights.alignment): the chain-normalized weights
with each hidden layer's units (channels) permuted to match one study-wide template (``template=``,
from distsim.weights.alignment.make_template), then flattened like raw: weights and biases of the
layers <= the asked one.

``cka`` (linear CKA, distsim.weights.cka): the centred Gram H A A^T H of the layer's activations A
on the study's probe inputs (``probe=``, from distsim.weights.cka.probe_inputs), divided by its
Frobenius norm, upper triangle with off-diagonal entries times sqrt(2): f1 . f2 = linear CKA and
||f1 - f2||^2 = 2 - 2 CKA. A is the post-activation output of a hidden layer (a conv's before its
pooling), the logits at 'out', the last hidden state of GRU layer k at ``gru_ih`` / ``gru_ih_l{k}``.

What each method is invariant to (ReLU / LeakyReLU MLP and CNN, tests/test_invariance.py; "yes":
the feature does not move; the transform keeps the function except the sign flip; other
activations below):

    transform                                 chain-gram  gram       raw  aligned  cka
    permutation of hidden units / channels    yes         yes        no   yes      yes
    positive per-unit rescaling               yes         'out' only no   yes      'out' only
    sign flip of a hidden unit (changes f)    yes (blind) yes (blind) no  no       no
    other function-preserving change, e.g. a  no          no         no   no       yes
      dead unit's outgoing weights

cka is invariant to whatever keeps the layer's activations on the probe up to an orthogonal map
and a global scale: at 'out', to anything that keeps the function on the probe; at hidden layers
a per-unit rescaling moves it. chain-gram and gram drop the activations, so a sign flip, which
changes a ReLU network's function, leaves them unchanged. GRU cka: invariant to hidden-unit
permutations (tests/test_cka.py).

Other activations (``[[arch]] activation`` tanh, gelu, sigmoid; TABLES and FUNCTION in
tests/test_invariance.py, docs/explanation/activations.md). Which hidden-unit transforms keep the
function (distsim.weights.normalize.symmetries; the flips of a unit of the last hidden layer, for
a CNN a unit of its linear head: a flipped conv channel changes the function, max pooling does not
commute with a negation):

    transform                          relu, leaky_relu  tanh  gelu  sigmoid
    permutation                        yes               yes   yes   yes
    positive rescaling                 yes               no    no    no
    sign flip (row, bias, column: -1)  no                yes   no    no
    sign flip + bias shift (the next   -                 no    no    yes (σ(-x) = 1 - σ(x))
      bias gains the unit's column)
    dead unit's outgoing weights       relu: yes         yes   yes   yes

chain-gram, gram, raw and aligned never read the activation, so they move or not under a given
weight change whatever the activation is; the activation decides whether that is a symmetry
removed or a blind spot (the function changed). Invariant at hidden layers / at 'out' (the flips:
at the flipped last hidden layer / 'out'):

    method          permutation  rescaling  sign flip               flip + shift
    chain-gram      yes/yes      yes/yes a  yes/yes b               yes/no c
    gram            yes/yes      no/yes a   yes/yes b               yes/no c
    raw             no/no        no/no      no/no                   no/no
    aligned         yes/yes      yes/yes a  no/no (misses tanh's)   no/no (misses sigmoid's)
    cka, relu       yes/yes      no/yes     no/no                   -
    cka, tanh       yes/yes      no/no      yes/yes                 yes/yes d
    cka, gelu       yes/yes      no/no      no/no                   no/no
    cka, sigmoid    yes/yes      no/no      yes/yes d               yes/yes

a: blind unless ReLU / LeakyReLU (rescaling changes a tanh, GELU or sigmoid net's function).
b: blind unless tanh. c: misses sigmoid's symmetry (the bias shift moves 'out', and the next
hidden layer when an earlier layer is flipped). d: at 'out' blind (a constant logit shift).

- tanh: chain-gram and gram remove its symmetries (permutation, sign flip) and are blind to a
  rescaling (gram at 'out'); aligned matches by permutation only, so it misses the sign flip; cka
  is invariant to both (a flip negates a unit's centred activations: an orthogonal map).
- gelu: permutations only. The weight methods are blind to rescaling (gram at 'out') and
  chain-gram and gram to the sign flip; cka moves under both.
- sigmoid: its flip needs the next layer's bias shifted, which chain-gram and gram see: invariant
  at the flipped layer (its rows negated), not from the next layer on (tests/test_invariance.py
  flips an fc1 unit: fc2 and 'out' move), so they miss that symmetry; they are blind to the plain
  flip (a change of the function) instead. cka is invariant to the flip with the shift.
- cka at 'out' centres the logits over the probe, so it is blind to a constant shift of them:
  sigmoid's plain flip of a last-hidden-layer unit (logits - the unit's column) and tanh's flip +
  shift (logits + the column) change the function and leave cka at 'out' unchanged.
- dead unit's outgoing weights (zero incoming weights and a bias where the activation is 0: ReLU
  -1, GELU -10, sigmoid -100, tanh only 0): weight methods not invariant, cka invariant, as for
  ReLU, except tanh's all-zero unit, which the linearized chain maps to zero rows: gram is then
  invariant at every layer and chain-gram at 'out' but not at the hidden layers after it (the
  unit's outgoing weights enter the next layer's normalization norms).
- The flip + shift column and the dead units of tanh, GELU and sigmoid are tested on those three
  activations only; the ReLU rows above are the ReLU table's.
- The chain normalization runs on every activation (chain-gram and aligned use it) but keeps the
  function only for ReLU / LeakyReLU: chain_normalize(model).function_preserving is False for
  tanh, GELU and sigmoid nets (distsim.weights.normalize.function_preserving).

``dim`` with ``sketch="output"`` (the default): a seeded output projection of the feature vector to
dim values, the same map for every model of a study and any batching (distsim.weights.projection).
``projection="countsketch"`` (the default): each of the D feature values is added, with a hashed
sign, into one of dim hashed buckets: O(D) per model, no D x dim matrix, squared distances estimated
without bias with a variance never above the Gaussian's, and pairwise distances that correlate with
the full features' as well as the Gaussian's do (equal within 0.01 over 40 sketch seeds on trained
digits features, benchmarks/bench_sketch.py). Measured there at dim 4096 on one core: a 3073 x 3073
Gram's triangle (D = 4.7M) in 8 ms per model and raw CIFAR-size weights (D = 1.6M) in 3 ms, so at
CIFAR sizes the full Gram it sketches is the cost (0.5-0.7 s per model for a 512- or 256-unit MLP
layer, 10-14 s for a CNN conv layer of 8192-32768 units). ``projection="gaussian"`` (legacy): R (D x
dim, entries N(0, 1/dim)), D x dim random numbers and a GEMM per call: 21 s per model for that
triangle and 9 s for those raw weights, in calls on 25 models; kept so that stores made with it can
resume. The CountSketch is applied to each chunk's float64 features, the Gaussian to the float32
features of the batch.

``dim`` with ``sketch="input"`` (chain-gram and gram; raw still uses the output projection; aligned
and cka: ValueError): a seeded
Gaussian input-side sketch S ((P+1) x m, entries N(0, 1/m), from ``seed`` only, see
sketch_matrix) replaces every chain map M by M S before the Gram, with m = sketch_width(dim) the
largest m such that m(m+1)/2 <= dim (GRU: sketch_width(dim // 3), for its three gate Grams; a
transformer: m(m+1)/2 + m^2 <= dim, for an attention layer's Gram and query-key form), so
that a hidden-layer feature, the upper triangle(s) of S^T G S, has at most dim values; 'out':
(M_L S) flattened (classes x m; GRU: per gate, then the head bias). Rows of M S permute with the
units of M, so the invariances are those of the full feature. M S is computed by pushing the m
columns of S through the linearized network (forward, m+1 inputs instead of P+1): cost units x
(P+1) x m per layer, memory (m+1) x units per model, no full Gram: 0.02-0.2 s per model and
layer at CIFAR sizes, CNN conv layers included. It is lossy: S^T G S keeps m(m+1)/2 values of
a width-m sketch, whose distance error shrinks like 1/sqrt(m) rather than like 1/sqrt(dim). On
trained digits chain-grams its pairwise distances correlate 0.57-0.97 with the full features'
where the output CountSketch's reach 0.85-1.0 at the same dim (MLP fc1 at dim 105: 0.57 against
0.85), and 0.91 / 0.94 against 0.998 / 0.999 at dim 4096 for an MLP's fc1 / fc2 on digits
upsampled to 3 x 32 x 32 (bench_sketch.py). Use it where the full Gram is too dear (CNN conv
layers at CIFAR sizes on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.config.choices import METHODS, PROJECTIONS, SKETCHES
from distsim.weights.alignment import align_stacked
from distsim.weights.attention import transformer_features
from distsim.weights.chain import (
    CHAIN_DIRECTIONS,
    chain_map,
    infer_input_shape,
    sketched_chain,
    unit_shapes,
    upper_triangle,
)
from distsim.weights.cka import activations, cka_vector
from distsim.weights.normalize import (
    Plan,
    StateDict,
    layer_plan,
    normalize_stacked,
    plan_for,
    stack_state_dicts,
)
from distsim.weights.projection import (
    check_dim,
    check_projection,
    count_sketch,
    project,
    projection_matrix,
    sketch_hashes,
    sketch_matrix,
    sketch_width,
)
from distsim.weights.recurrent import gru_features, gru_sketch_width
from distsim.weights.residual import resnet_features
from distsim.zoo.models import build
from distsim.zoo.resnet import ResNetConfig
from distsim.zoo.transformer import TransformerConfig

__all__ = [
    "CHAIN_BYTES",
    "CHAIN_DIRECTIONS",
    "METHODS",
    "PROJECTIONS",
    "SKETCHES",
    "chain_map",
    "count_sketch",
    "feature_layers",
    "infer_input_shape",
    "project",
    "projection_matrix",
    "sketch_hashes",
    "sketch_matrix",
    "sketch_width",
    "weight_features",
    "weight_features_batch",
]

# Memory for the chain tensors of one chunk of models (bytes); results do not depend on it
# beyond float rounding.
CHAIN_BYTES = 256 * 2**20


def feature_layers(arch_config: ArchConfig) -> list[str]:
    """Layer names a feature can be taken at, in order (mlp: fc1.., out; cnn: conv1.., fc1.., out;
    rnn: gru_ih, gru_ih_l1.., out).

    >>> feature_layers(ArchConfig(kind="mlp", widths=(5, 4)))
    ['fc1', 'fc2', 'out']
    >>> feature_layers(ArchConfig(kind="cnn", channels=(2, 4), head_widths=(8,)))
    ['conv1', 'conv2', 'fc1', 'out']
    >>> feature_layers(ArchConfig(kind="rnn", hidden=4, num_layers=2))
    ['gru_ih', 'gru_ih_l1', 'out']
    >>> feature_layers(ArchConfig(kind="resnet", channels=(4, 8)))
    ['stem', 'block1.conv1', 'block1', 'block2.conv1', 'block2', 'out']
    >>> feature_layers(ArchConfig(kind="transformer", depth=2))
    ['embed', 'attn1', 'mlp1', 'attn2', 'mlp2', 'out']
    """
    return list(plan_for(arch_config).layers)


def _layer_index(plan: Plan, layer: str | int | None) -> int:
    n = len(plan.layers)
    if layer is None:
        return n - 1
    if isinstance(layer, str):
        if layer not in plan.layers:
            raise ValueError(f"layer {layer!r} is not one of {list(plan.layers)}")
        return plan.layers.index(layer)
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and -n <= layer < n:
        return int(layer) % n
    raise ValueError(
        f"layer must be None, one of {list(plan.layers)} or an int in [{-n}, {n}), got {layer!r}"
    )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------- chain-gram


def _raw(plan: Plan, p: StateDict, upto: int) -> torch.Tensor:
    """(K, D) unnormalized parameters of a sequential net's layers <= ``upto``, flattened in
    layer order (the GRU's: distsim.weights.recurrent)."""
    keys = [k for s in plan.parametric[: upto + 1] for k in (s.weight, s.bias) if k]
    k = p[keys[0]].shape[0]
    return torch.cat([p[key].reshape(k, -1) for key in keys], dim=1)


def _features(
    plan: Plan,
    stacked: StateDict,
    input_shape: tuple[int, ...],
    method: str,
    upto: int,
    s: torch.Tensor | None = None,
    template: StateDict | None = None,
    model: nn.Module | None = None,
    probe: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K, D) float64 features of a stack of K models; ``s``: input-side sketch or None;
    ``template``: for aligned; ``model`` (the architecture) and ``probe``: for cka."""
    if plan.kind == "resnet":  # a ResNet's and a transformer's own features
        assert isinstance(plan.config, ResNetConfig)
        return resnet_features(plan.config, stacked, method, upto, s, template, probe)
    if plan.kind == "transformer":
        assert isinstance(plan.config, TransformerConfig)
        return transformer_features(plan.config, stacked, method, upto, s, template, probe)
    if method == "cka":
        assert model is not None and probe is not None
        return cka_vector(activations(model, plan, stacked, probe, upto))
    if plan.kind == "rnn":  # the GRU's own symmetries: distsim.weights.recurrent
        return gru_features(plan, stacked, method, upto, s, template)
    if method == "raw":
        return _raw(plan, stacked, upto).to(torch.float64)
    p = {k: v.to(torch.float64) for k, v in stacked.items()}
    if method != "gram":
        p = normalize_stacked(plan, p)
    if method == "aligned":
        assert template is not None
        return _raw(plan, align_stacked(plan, p, template), upto)
    if s is None:
        m = chain_map(plan, p, input_shape, upto)  # (K, P+1, units)
    else:
        m = sketched_chain(plan, p, input_shape, upto, s)  # (K, m, units)
    if upto == len(plan.layers) - 1:
        return m.transpose(1, 2).reshape(m.shape[0], -1)
    return upper_triangle(m @ m.transpose(1, 2))


# ---------------------------------------------------------------- public entry points


def _chunk_size(
    plan: Plan, stacked: StateDict, input_shape: tuple[int, ...], columns: int | None
) -> int:
    """Models per chunk so that the float64 chain tensors stay within CHAIN_BYTES (``columns``:
    inputs pushed per model, P+1 when None)."""
    if plan.kind != "sequential":
        return 4096
    shapes = {k: tuple(v.shape[1:]) for k, v in stacked.items()}
    walk = [tuple(input_shape), *unit_shapes(plan, shapes, input_shape)]
    units = max(math.prod(s) for s in walk)
    # a few live copies during a step
    per_model = 8 * 3 * (columns or math.prod(input_shape) + 1) * units
    return max(1, CHAIN_BYTES // per_model)


def _input_sketch(
    plan: Plan, stacked: StateDict, input_shape: tuple[int, ...], dim: int, seed: int, upto: int
) -> torch.Tensor:
    """(P+1, m) float64 sketch S for this architecture's input (GRU: its per-step input, and m
    such that its hidden-layer feature at layer ``upto`` holds at most dim values)."""
    if plan.kind == "transformer":  # an attention layer adds an m x m query-key form
        n_in = math.prod(input_shape)
        m = 1
        while (m + 1) * (m + 2) // 2 + (m + 1) ** 2 <= dim:
            m += 1
    elif plan.kind != "rnn":
        n_in, m = math.prod(input_shape), sketch_width(dim)
    else:
        n_in = stacked[f"{plan.gru_prefix}weight_ih_l0"].shape[-1]
        m = gru_sketch_width(dim, min(upto, plan.num_layers - 1) + 1)
    return torch.tensor(sketch_matrix(n_in + 1, m, seed))  # a copy: the cached S is read-only


def _check_extras(
    plan: Plan,
    input_shape: tuple[int, ...],
    method: str,
    sketch: str,
    dim: int | None,
    template: StateDict | None,
    probe: np.ndarray | torch.Tensor | None,
) -> torch.Tensor | None:
    """One-line errors for the method-specific options; the probe as a float32 tensor."""
    if method == "aligned" and template is None:
        raise ValueError("method 'aligned' needs template= "
                         "(see distsim.weights.alignment.make_template)")
    if method == "cka" and probe is None:
        raise ValueError("method 'cka' needs probe= (see distsim.weights.cka.probe_inputs)")
    if dim is not None and sketch == "input" and method in ("aligned", "cka"):
        raise ValueError(
            f"sketch='input' is for chain-gram and gram, got method {method!r} "
            "(use sketch='output')"
        )
    if method != "cka" or probe is None:
        return None
    x = torch.as_tensor(np.asarray(probe, dtype=np.float32))
    size = math.prod(input_shape) if input_shape else None
    if x.dim() < 2 or x.shape[0] < 3 or (size and math.prod(x.shape[1:]) != size):
        raise ValueError(
            f"probe must be (n >= 3, *input_shape) with {size or 'C*H*W or C*L'} values per "
            f"sample, got {tuple(x.shape)}"
        )
    return x


def _compute(
    plan: Plan,
    stacked: StateDict,
    input_shape: tuple[int, ...],
    method: str,
    layer: str | int | None,
    dim: int | None,
    seed: int,
    sketch: str,
    projection: str = "countsketch",
    template: StateDict | None = None,
    probe: np.ndarray | torch.Tensor | None = None,
    model: nn.Module | None = None,
) -> np.ndarray:
    """(K, D) float32 features of a stack of K models (see weight_features for the options;
    ``model``: a model of the architecture, run by cka)."""
    _check_method(method)
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    check_projection(projection)
    if dim is not None:
        check_dim(dim)
    elif sketch == "input":
        raise ValueError(
            "sketch='input' needs dim (the feature size of a sketched Gram), got dim=None"
        )
    upto = _layer_index(plan, layer)
    if plan.kind == "sequential":
        unit_shapes(plan, {k: tuple(v.shape[1:]) for k, v in stacked.items()}, input_shape)
    x_probe = _check_extras(plan, input_shape, method, sketch, dim, template, probe)
    s = None
    if dim is not None and sketch == "input" and method in ("chain-gram", "gram"):
        s = _input_sketch(plan, stacked, input_shape, dim, seed, upto)
    # the output projection, if any: CountSketch on each chunk's float64 features (a row's
    # result does not depend on the chunk); the legacy Gaussian on the float32 whole
    sparse = dim is not None and s is None and projection == "countsketch"
    k = next(iter(stacked.values())).shape[0]
    step = _chunk_size(plan, stacked, input_shape, None if s is None else s.shape[1] + 1)
    parts = []
    with torch.no_grad():
        for start in range(0, k, step):
            chunk = {name: v[start : start + step] for name, v in stacked.items()}
            feats = _features(plan, chunk, input_shape, method, upto, s, template, model, x_probe)
            if sparse:
                assert dim is not None
                parts.append(count_sketch(feats.numpy(), dim, seed))
            else:
                parts.append(feats.to(torch.float32).numpy())
    x = np.concatenate(parts, axis=0)
    if dim is None or s is not None or sparse:
        return x
    return project(x, dim, seed, projection)


def weight_features(
    model: nn.Module,
    method: str = "chain-gram",
    layer: str | int | None = None,
    dim: int | None = None,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    sketch: str = "output",
    projection: str = "countsketch",
    template: StateDict | None = None,
    probe: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """1-D float32 feature of one model at ``layer`` (name or index; None = last).

    ``method``: one of METHODS (module docstring). ``dim``: seeded random map to ``dim`` values (the
    same map for every model given ``seed``). ``sketch``: where ``dim`` applies, "output" (the
    feature vector) or "input" (the chain maps' input side, for chain-gram and gram; see the module
    docstring). ``projection``: the output map, "countsketch" or the legacy "gaussian" (see
    distsim.weights.projection). ``input_shape`` (C, H, W) or (C, L): only needed for a CNN whose
    input is not the smallest square (1-D: the shortest length) that fits its head (see
    infer_input_shape). ``template``: the study's template for "aligned"
    (distsim.weights.alignment.make_template). ``probe`` (n, *input_shape): the study's probe inputs
    for "cka" (distsim.weights.cka.probe_inputs).

    A tiny MLP on 2 x 2 inputs (P = 4 pixels): at fc1 chain-gram is the upper triangle of a
    (P+1) x (P+1) Gram, 15 values; at 'out' the (2 classes x (P+1)) chain map, 10 values.

    >>> _ = torch.manual_seed(0)
    >>> cfg = ArchConfig(kind="mlp", widths=(5,), input_shape=(1, 2, 2), num_classes=2)
    >>> model = build(cfg)
    >>> f = weight_features(model, "chain-gram", "fc1")
    >>> f.shape, f.dtype
    ((15,), dtype('float32'))
    >>> weight_features(model, "chain-gram").shape, weight_features(model, "raw", "fc1").shape
    ((10,), (25,))
    >>> weight_features(model, "chain-gram", "fc1", dim=8, seed=0).shape  # output CountSketch
    (8,)

    Permuting the hidden units keeps the function and the chain-gram, not the raw weights:

    >>> perm, sd = torch.tensor([2, 0, 1, 4, 3]), model.state_dict()
    >>> moved = build(cfg)
    >>> moved.load_state_dict({"1.weight": sd["1.weight"][perm], "1.bias": sd["1.bias"][perm],
    ...                        "3.weight": sd["3.weight"][:, perm], "3.bias": sd["3.bias"]})
    <All keys matched successfully>
    >>> bool(np.allclose(weight_features(moved, "chain-gram", "fc1"), f, atol=1e-6))
    True
    >>> raw = weight_features(model, "raw", "fc1")
    >>> bool(np.allclose(weight_features(moved, "raw", "fc1"), raw))
    False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"weight_features takes an nn.Module, got {type(model).__name__}")
    plan = layer_plan(model)
    stacked = {k: v.detach()[None] for k, v in model.state_dict().items()}
    if input_shape is not None:
        shape = tuple(input_shape)
    elif plan.config is not None:  # a ResNet or transformer knows its input
        shape = tuple(plan.config.input_shape)
    else:
        shape = infer_input_shape(model, plan) if plan.kind == "sequential" else ()
    return _compute(
        plan, stacked, shape, method, layer, dim, seed, sketch, projection, template, probe, model
    )[0]


def weight_features_batch(
    state_dicts: Sequence[StateDict] | StateDict,
    arch_config: ArchConfig,
    method: str = "chain-gram",
    layer: str | int | None = None,
    dim: int | None = None,
    seed: int = 0,
    sketch: str = "output",
    projection: str = "countsketch",
    template: StateDict | None = None,
    probe: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """(K, D) float32 features of K models of ``arch_config``, vectorised over K (cka: one
    forward pass per model, 0.6-6 ms per digits-size model on a 256-sample probe, one core).

    ``state_dicts``: a list of K state dicts or a stacked dict of (K, ...) tensors.
    Row i equals ``weight_features(model_i, method, layer, dim, seed, sketch=sketch,
    projection=projection, template=template, probe=probe)``.

    >>> _ = torch.manual_seed(0)
    >>> cfg = ArchConfig(kind="mlp", widths=(5,), input_shape=(1, 2, 2), num_classes=2)
    >>> models = [build(cfg) for _ in range(3)]
    >>> X = weight_features_batch([m.state_dict() for m in models], cfg, "chain-gram", "fc1")
    >>> X.shape, X.dtype
    ((3, 15), dtype('float32'))
    >>> bool(np.allclose(X[1], weight_features(models[1], "chain-gram", "fc1")))
    True
    """
    plan = plan_for(arch_config)
    stacked = stack_state_dicts(state_dicts)
    input_shape = tuple(arch_config.input_shape) if plan.kind != "rnn" else ()
    model = build(arch_config) if method == "cka" else None
    return _compute(
        plan, stacked, input_shape, method, layer, dim, seed, sketch, projection, template, probe,
        model,
    )
