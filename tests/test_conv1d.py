"""1-D CNNs ((C, L) inputs, MNIST-1D's (1, 40)): the properties the 2-D CNN has, through build,
the packed forward and training, chain normalization, the chain, features, weight matching and
CKA probes."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _nets import CNN1D, seeded_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from distsim.config.arch import ArchConfig
from distsim.config.training import TrainConfig
from distsim.errors import ConfigError
from distsim.weights.alignment import align_stacked, make_template
from distsim.weights.chain import infer_input_shape
from distsim.weights.cka import layer_activations, probe_inputs
from distsim.weights.features import (
    METHODS,
    chain_map,
    feature_layers,
    weight_features,
    weight_features_batch,
)
from distsim.weights.normalize import (
    chain_normalize,
    chain_normalize_state,
    layer_plan,
    normalize_stacked,
    plan_for,
    stack_state_dicts,
)
from distsim.zoo.models import build, forward_packed
from distsim.zoo.tasks import Task
from distsim.zoo.train import batch_orders, train_pack

torch.set_num_threads(1)

RNN1D = ArchConfig(kind="rnn", hidden=5, num_layers=2, input_shape=(2, 9), num_classes=3)


def _parametric(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------- build and the packed forward


@settings(max_examples=15, deadline=None)
@given(channels=st.lists(st.integers(1, 5), min_size=1, max_size=3), extra=st.integers(0, 20),
       c=st.integers(1, 3), head=st.sampled_from([(), (6,)]))
def test_layout_head_size_and_keys(channels: list[int], extra: int, c: int,
                                   head: tuple[int, ...]) -> None:
    """Conv1d(k=3, pad 1) / act / MaxPool1d(2) blocks, flatten, head of C_last * (L // 2**n)
    inputs; state-dict keys named as the 2-D CNN's."""
    length = 2 ** len(channels) + extra
    cfg = ArchConfig(kind="cnn", channels=tuple(channels), head_widths=head,
                     input_shape=(c, length), num_classes=3)
    model = build(cfg)
    convs = [m for m in model if isinstance(m, nn.Conv1d)]
    assert [(m.kernel_size, m.padding) for m in convs] == [((3,), (1,))] * len(channels)
    assert sum(isinstance(m, nn.MaxPool1d) for m in model) == len(channels)
    assert not any(isinstance(m, (nn.Conv2d, nn.MaxPool2d)) for m in model)
    first_linear = next(m for m in model if isinstance(m, nn.Linear))
    assert first_linear.in_features == channels[-1] * (length // 2 ** len(channels))
    assert model(torch.randn(2, c, length)).shape == (2, 3)
    two_d = build(ArchConfig(kind="cnn", channels=tuple(channels), head_widths=head,
                             input_shape=(c, length, length), num_classes=3))
    assert list(model.state_dict()) == list(two_d.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (8,)}, "arch.input_shape"),
        ({"input_shape": (1, 2, 3, 4)}, "arch.input_shape"),
        ({"input_shape": (1, 0)}, "arch.input_shape"),
        ({"kind": "cnn", "channels": (4, 4), "input_shape": (1, 3)}, "at least 4, got 3"),
    ],
)
def test_arch_config_errors_for_1d_shapes(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ArchConfig(**kwargs)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["cnn", "mlp", "rnn"]), k=st.integers(1, 4),
       length=st.integers(4, 24), c=st.integers(1, 3),
       activation=st.sampled_from(["relu", "leaky_relu"]), seed=st.integers(0, 2**16))
def test_forward_packed_equals_separate_forwards(kind: str, k: int, length: int, c: int,
                                                 activation: str, seed: int) -> None:
    cfg = ArchConfig(kind=kind, channels=(3, 4), widths=(5,), hidden=4, activation=activation,
                     negative_slope=0.1, input_shape=(c, length), num_classes=3)
    models = [seeded_model(cfg, seed + i) for i in range(k)]
    x = torch.randn(k, 5, c, length, generator=torch.Generator().manual_seed(seed))
    params, _ = stack_module_state(models)
    packed = forward_packed(models[0], params, x)
    expected = torch.stack([m(xb) for m, xb in zip(models, x, strict=True)])
    assert packed.shape == (k, 5, 3)
    torch.testing.assert_close(packed, expected, atol=1e-6, rtol=1e-5)
    by_vmap = vmap(lambda p, xb: functional_call(models[0], p, (xb,)))(params, x)
    torch.testing.assert_close(packed, by_vmap, atol=1e-6, rtol=1e-5)


def test_rnn_reads_positions_as_steps_of_channels() -> None:
    model = seeded_model(RNN1D, 0)
    x = torch.rand(3, 2, 9)
    _, h = model.gru(x.transpose(1, 2))  # step t = position t, its C values
    torch.testing.assert_close(model(x), model.head(h[-1]))
    assert model.gru.weight_ih_l0.shape == (15, 2)


@settings(max_examples=10, deadline=None)
@given(width=st.sampled_from([1, 2, 4]), c=st.integers(1, 3), k=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_rnn_step_width_reads_consecutive_positions_per_step(width: int, c: int, k: int,
                                                            seed: int) -> None:
    """step_width w: step t holds positions [t w, (t + 1) w) of every channel, channel-major;
    the packed forward reads the same steps."""
    cfg = ArchConfig(kind="rnn", hidden=4, step_width=width, input_shape=(c, 8), num_classes=3)
    models = [seeded_model(cfg, seed + i) for i in range(k)]
    x = torch.randn(k, 5, c, 8, generator=torch.Generator().manual_seed(seed))
    steps = torch.stack([x[..., t * width:(t + 1) * width].flatten(-2) for t in range(8 // width)],
                        dim=-2)  # (K, B, T, C * w)
    for m, xb, sb in zip(models, x, steps, strict=True):
        assert m.gru.input_size == c * width
        _, h = m.gru(sb)
        torch.testing.assert_close(m(xb), m.head(h[-1]))
    params, _ = stack_module_state(models)
    torch.testing.assert_close(forward_packed(models[0], params, x),
                               torch.stack([m(xb) for m, xb in zip(models, x, strict=True)]),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "rnn", "step_width": 3, "input_shape": (1, 40)}, "must divide the input length 40"),
    ({"kind": "rnn", "step_width": 2, "input_shape": (1, 8, 8)}, "only to an rnn over 1-D"),
    ({"kind": "mlp", "step_width": 2, "input_shape": (1, 40)}, "only to an rnn over 1-D"),
])
def test_step_width_errors_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"arch.step_width: .*{match}"):
        ArchConfig(**kwargs)


# ---------------------------------------------------------------- packed training


def _task(seed: int, n: int = 240) -> Task:
    """Two classes of (1, 40) signals: a bump at positions 8-13 or 26-31, anywhere in
    amplitude [0.5, 1.5], under unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0.0, 1.0, (n, 1, 40)).astype(np.float32)
    start = np.where(y == 0, 8, 26)
    for i in range(n):
        x[i, 0, start[i] : start[i] + 6] += rng.uniform(0.5, 1.5)
    cut = n * 3 // 4
    return Task(0, "bumps", (0, 1), x[:cut], y[:cut].astype(np.int64),
                x[cut:], y[cut:].astype(np.int64))


def test_packed_training_learns_a_synthetic_1d_task() -> None:
    task, arch = _task(0), ArchConfig(kind="cnn", channels=(4, 4))
    results = train_pack(task, arch, [0, 1, 2], TrainConfig(epochs=8, lr=0.05, momentum=0.9))
    keys = list(build(arch.with_task_shape((1, 40), 2)).state_dict())
    for r in results:
        assert r.status == "ok" and list(r.state_dict) == keys
        assert r.test_acc >= 0.8, r.test_acc  # chance: 0.5


def test_packed_training_is_the_plain_torch_experiment() -> None:
    """Seed 9 of a float64 pack equals nn.Module + torch.optim.SGD with its init and batches."""
    task, cfg = _task(1, 96), TrainConfig(epochs=2, lr=0.05, momentum=0.5, dtype="float64")
    arch = ArchConfig(kind="cnn", channels=(3, 4), head_widths=(5,))
    pack = train_pack(task, arch, [4, 9], cfg)
    model = seeded_model(arch.with_task_shape(task.input_shape, 2), 9).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = torch.as_tensor(task.x_train).double(), torch.as_tensor(task.y_train)
    for order in batch_orders([9], len(x), cfg.epochs):
        for lo in range(0, len(x), cfg.batch_size):
            idx = torch.as_tensor(order[0, lo : lo + cfg.batch_size])
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    for name, value in model.state_dict().items():
        assert (pack[1].state_dict[name] - value).abs().max().item() <= 1e-10, name


# ---------------------------------------------------------------- chain normalization


def _trained(model: nn.Module, steps: int = 40) -> nn.Module:
    """A few Adam steps on random data so weights leave their init distribution."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, *CNN1D.input_shape, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), trained=st.booleans(),
       activation=st.sampled_from(["relu", "leaky_relu"]))
def test_chain_normalization_preserves_the_function(seed: int, trained: bool,
                                                    activation: str) -> None:
    cfg = ArchConfig(kind="cnn", channels=(4, 5), head_widths=(6,), activation=activation,
                     negative_slope=0.1, input_shape=(1, 40), num_classes=3)
    model = seeded_model(cfg, seed)
    if trained:
        model = _trained(model)
    normed = chain_normalize(model)
    x = torch.randn(32, *cfg.input_shape)
    with torch.no_grad():
        ref, out = model(x), normed(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for m in _parametric(normed)[:-1]:  # hidden units: output channels / rows, unit norm
        rows = torch.cat([m.weight.reshape(m.weight.shape[0], -1), m.bias[:, None]], 1)
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(rows.shape[0]))
    state = chain_normalize_state([model.state_dict()], cfg)
    for key, value in normed.state_dict().items():
        torch.testing.assert_close(state[key][0], value)


def test_plan_of_conv1d_and_pooling_1d() -> None:
    plan = layer_plan(nn.Sequential(nn.Conv1d(2, 3, 5, stride=2, padding=2), nn.ReLU(),
                                    nn.AvgPool1d(3), nn.Flatten(), nn.Linear(3, 2)))
    conv, _, pool = plan.steps[:3]
    assert (conv.kernel, conv.stride, conv.padding, conv.dilation) == ((5,), (2,), (2,), (1,))
    assert (pool.op, pool.kernel, pool.stride) == ("avgpool", (3,), (3,))
    assert plan.layers == ("conv1", "out")
    with pytest.raises(ValueError, match="Conv1d needs groups=1"):
        layer_plan(nn.Sequential(nn.Conv1d(2, 2, 3, groups=2), nn.ReLU()))


# ---------------------------------------------------------------- the chain and the features


def _linearized(model: nn.Sequential) -> nn.Sequential:
    """Activations removed, max pooling replaced by its average: the map the chain describes."""
    layers = []
    for m in copy.deepcopy(model):
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            continue
        layers.append(nn.AvgPool1d(m.kernel_size, m.stride) if isinstance(m, nn.MaxPool1d) else m)
    return nn.Sequential(*layers)


def test_chain_is_the_linearized_network_both_ways() -> None:
    """M_L = [linear part | offset] of the linearized network; forward = backward chain map."""
    model = seeded_model(CNN1D, 0)
    assert infer_input_shape(model) == (1, 40)
    m = weight_features(model, "chain-gram").reshape(CNN1D.num_classes, -1)
    x = torch.randn(5, *CNN1D.input_shape, dtype=torch.float64)
    with torch.no_grad():
        ref = _linearized(model).double()(x).numpy()
    np.testing.assert_allclose(x.reshape(5, -1).numpy() @ m[:, :-1].T + m[:, -1], ref,
                               rtol=1e-4, atol=1e-5)
    plan = plan_for(CNN1D)
    stacked = stack_state_dicts([seeded_model(CNN1D, s).state_dict() for s in (0, 1)])
    p = normalize_stacked(plan, {k: v.double() for k, v in stacked.items()})
    units = [4 * 40, 5 * 20, 6, 3]  # conv: (channel, position) pairs before pooling
    for upto in range(len(plan.layers)):
        fwd = chain_map(plan, p, CNN1D.input_shape, upto, "forward")
        assert fwd.shape == (2, 41, units[upto])
        bwd = chain_map(plan, p, CNN1D.input_shape, upto, "backward")
        torch.testing.assert_close(bwd, fwd, rtol=1e-10, atol=1e-12)


def _reparametrize(model: nn.Module, name: str, seed: int) -> nn.Module:
    """Same function: every hidden layer's units (channels) permuted ("permutation") or scaled by
    a in [0.1, 10] ("rescaling"), the next layer's reading slice (in-channel / flattened block /
    column) compensating."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for cur, nxt in itertools.pairwise(_parametric(out)):
            n = cur.weight.shape[0]
            perm, a = torch.arange(n), torch.ones(n)
            if name == "permutation":
                perm = torch.randperm(n, generator=gen)
                perm = perm.roll(1) if torch.equal(perm, torch.arange(n)) else perm
            else:
                a = torch.rand(n, generator=gen) * 9.9 + 0.1
            cur.weight.copy_(cur.weight[perm] * a.reshape(n, *[1] * (cur.weight.dim() - 1)))
            cur.bias.copy_(cur.bias[perm] * a)
            block = nxt.weight.reshape(nxt.weight.shape[0], n, -1)  # (out, units, rest)
            nxt.weight.copy_((block[:, perm] / a[None, :, None]).reshape(nxt.weight.shape))
    return out


# invariant? (at hidden layers, at 'out'), as in the features module docstring's table
INVARIANT = {
    "permutation": {"chain-gram": (True, True), "gram": (True, True), "raw": (False, False),
                    "aligned": (True, True), "cka": (True, True)},
    "rescaling": {"chain-gram": (True, True), "gram": (False, True), "raw": (False, False),
                  "aligned": (True, True), "cka": (False, True)},
}


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), transform=st.sampled_from(sorted(INVARIANT)))
def test_features_invariant_to_channel_permutations_and_rescalings(seed: int,
                                                                   transform: str) -> None:
    model = seeded_model(CNN1D, seed)
    moved = _reparametrize(model, transform, seed + 1)
    x = torch.randn(20, *CNN1D.input_shape)
    with torch.no_grad():
        assert _rel(moved(x).numpy(), model(x).numpy()) < 1e-5
    template = make_template([seeded_model(CNN1D, 1000 + s).state_dict() for s in range(4)],
                             CNN1D, 2)
    extra = {"template": template, "probe": torch.randn(30, *CNN1D.input_shape)}
    layers = feature_layers(CNN1D)
    for method in METHODS:
        for i, layer in enumerate(layers):
            invariant = INVARIANT[transform][method][i == len(layers) - 1]
            change = _rel(weight_features(moved, method, layer, **extra),
                          weight_features(model, method, layer, **extra))
            what = f"{method} at {layer} under {transform}"
            assert change < 1e-4 if invariant else change > 1e-3, (what, change)
    for layer in layers:
        sketched = [weight_features(m, "chain-gram", layer, dim=10, seed=seed, sketch="input")
                    for m in (moved, model)]
        assert _rel(*sketched) < 1e-4


def test_batch_equals_single() -> None:
    models = [seeded_model(CNN1D, s) for s in range(3)]
    states = [m.state_dict() for m in models]
    for method, layer in itertools.product(("chain-gram", "gram", "raw"), feature_layers(CNN1D)):
        batch = weight_features_batch(states, CNN1D, method, layer)
        for i, m in enumerate(models):
            np.testing.assert_allclose(weight_features(m, method, layer), batch[i], rtol=1e-5,
                                       atol=1e-6)


# ---------------------------------------------------------------- weight matching


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_weight_matching_recovers_a_planted_channel_permutation(seed: int) -> None:
    plan = plan_for(CNN1D)
    model = seeded_model(CNN1D, seed)
    moved = _reparametrize(model, "permutation", seed + 1)
    p = normalize_stacked(plan, {k: v.double()[None] for k, v in model.state_dict().items()})
    q = normalize_stacked(plan, {k: v.double()[None] for k, v in moved.state_dict().items()})
    assert any(not torch.equal(p[k], q[k]) for k in p)
    template = {k: v[0] for k, v in p.items()}
    for key, v in align_stacked(plan, q, template).items():
        torch.testing.assert_close(v[0], template[key], atol=1e-12, rtol=0)
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in q.items()}
    for key, v in align_stacked(plan, noisy, template).items():
        torch.testing.assert_close(v[0], template[key], atol=5e-3, rtol=0)


# ---------------------------------------------------------------- cka probes


@pytest.mark.parametrize("cfg", [CNN1D, RNN1D], ids=["cnn", "rnn"])
def test_probe_and_cka_shapes(cfg: ArchConfig) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, *cfg.input_shape)).astype(np.float32)
    y = np.repeat(np.arange(3), 30)
    probe = probe_inputs(x, y, 12, seed=1)
    assert probe.shape == (12, *cfg.input_shape) and probe.dtype == np.float32
    models = [seeded_model(cfg, s) for s in range(2)]
    plan = plan_for(cfg)
    units = {"conv1": 4 * 40, "conv2": 5 * 20, "fc1": 6, "out": 3,  # a conv's before pooling
             "gru_ih": 5, "gru_ih_l1": 5}
    for upto, layer in enumerate(feature_layers(cfg)):
        acts = layer_activations(models[0], plan, None, torch.as_tensor(probe), upto)
        assert acts.shape == (12, units[layer])
        f = weight_features_batch([m.state_dict() for m in models], cfg, "cka", layer,
                                  probe=probe)
        assert f.shape == (2, 12 * 13 // 2)
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    if cfg.kind == "cnn":  # a 2-D probe of another size is refused
        with pytest.raises(ValueError, match="probe must be"):
            weight_features(models[0], "cka", probe=np.zeros((5, 1, 8, 8), np.float32))
