"""Packed training: a seed in a pack is the same experiment as that seed trained alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import DEFAULT_TRAIN, TrainConfig
from distsim.zoo.models import build
from distsim.zoo.tasks import Task, make_tasks
from distsim.zoo.train import SeedResult, batch_orders, init_model, resolve_device, train_pack

KINDS = ("mlp", "cnn", "rnn", "resnet", "transformer")
pytestmark = pytest.mark.usefixtures("one_thread")  # packs compared bit for bit


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _sgd_alone(
    task: Task, arch: ArchConfig, seed: int, cfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """The reference experiment: nn.Module + torch.optim (+ MultiStepLR), float64, one seed; its
    trained parameters (a BatchNorm's running statistics are train_pack's own, tested apart)."""
    model = build_seeded(arch.with_task_shape(task.input_shape, task.num_classes), seed).double()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)
    x, y = torch.as_tensor(task.x_train).double(), torch.as_tensor(task.y_train)
    for order in batch_orders([seed], len(x), cfg.epochs):
        for lo in range(0, len(x), cfg.batch_size):
            idx = torch.as_tensor(order[0, lo : lo + cfg.batch_size])
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def build_seeded(arch: ArchConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(arch)


def test_init_model_is_manual_seed_then_build_and_keeps_global_rng():
    arch = ArchConfig(kind="cnn")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model = init_model(arch, 7)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    lone = build_seeded(arch, 7)
    pairs = zip(model.state_dict().items(), lone.state_dict().items(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


def test_batch_order_of_a_seed_is_the_same_in_any_pack():
    pack = list(batch_orders([3, 11, 0, 42], n=50, epochs=3))
    for row, seed in enumerate([3, 11, 0, 42]):
        alone = list(batch_orders([seed], n=50, epochs=3))
        for epoch in range(3):
            np.testing.assert_array_equal(pack[epoch][row], alone[epoch][0])
            assert sorted(pack[epoch][row]) == list(range(50))  # a permutation per epoch
    assert not np.array_equal(pack[0][0], pack[1][0])  # reshuffled every epoch


@pytest.mark.parametrize("kind", KINDS)
def test_seed_in_pack_of_8_equals_seed_trained_alone(task, kind):
    # Measured on x86 CPU (torch 2.13), 2 epochs, max |diff| of any weight: float32 0 for MLP,
    # RNN and transformer (bitwise), 9e-8 for the CNN (grouped-conv kernels round differently
    # for 8 groups than for 1); float64 0 (MLP, RNN, transformer), 1.1e-16 (CNN), 5.6e-17
    # (ResNet). The float32 ResNet: 9e-8 after one epoch, 2.7e-3 after two (BatchNorm's
    # division by a channel's batch deviation amplifies the grouped convolutions' rounding);
    # float64 shows the maths is the same. Asserted: 1e-6 (float32; ResNet 1e-2), 1e-12
    # (float64).
    seeds = [0, 1, 2, 3, 4, 5, 6, 7]
    for dtype, tol in (("float32", 1e-2 if kind == "resnet" else 1e-6), ("float64", 1e-12)):
        cfg = TrainConfig(epochs=2, lr=0.05, dtype=dtype)
        pack = train_pack(task, ArchConfig(kind=kind), seeds, cfg)
        for seed in (0, 5):
            (alone,) = train_pack(task, ArchConfig(kind=kind), [seed], cfg)
            assert pack[seed].seed == seed
            assert _max_diff(pack[seed].state_dict, alone.state_dict) <= tol
            assert math.isclose(pack[seed].test_loss, alone.test_loss, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("kind", "cfg"),
    [
        ("mlp", TrainConfig(epochs=3, lr=0.05, momentum=0.9, dtype="float64")),
        ("mlp", TrainConfig(epochs=3, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                            milestones=(1, 2), gamma=0.5, dtype="float64")),
        ("mlp", TrainConfig(epochs=2, lr=0.01, optimizer="adam", weight_decay=1e-4,
                            dtype="float64")),
        ("cnn", TrainConfig(epochs=2, lr=0.05, momentum=0.5, dtype="float64")),
        ("rnn", TrainConfig(epochs=2, lr=0.05, momentum=0.9, dtype="float64")),
        ("resnet", TrainConfig(epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3,
                               dtype="float64")),
        ("transformer", TrainConfig(epochs=2, lr=0.01, optimizer="adam", dtype="float64")),
    ],
)
def test_packed_training_is_the_plain_torch_experiment(task, kind, cfg):
    """K=3 pack vs nn.Module + torch.optim.SGD/Adam + MultiStepLR, same init and batch order."""
    # Measured max |diff| (float64, x86 CPU): 0 to 2.4e-16 over the five cases (float32 packs vs
    # this float64 reference: 6e-8 to 3e-7). Asserted at 1e-10.
    pack = train_pack(task, ArchConfig(kind=kind), [4, 9, 2], cfg)
    reference = _sgd_alone(task, ArchConfig(kind=kind), 9, cfg)
    assert _max_diff({k: pack[1].state_dict[k] for k in reference}, reference) <= 1e-10


def test_batchnorm_statistics_are_the_training_sets_under_the_trained_weights(task):
    """A ResNet's running statistics: each BatchNorm's input over the training set, in batches
    of batch_size in training mode, batch means and unbiased variances averaged by batch size
    (an independent computation: forward hooks on the plain module)."""
    arch = ArchConfig(kind="resnet", channels=(3, 5)).with_task_shape(task.input_shape,
                                                                       task.num_classes)
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64, dtype="float64")
    (trained,) = train_pack(task, arch, [3], cfg)
    model = build(arch).double()
    model.load_state_dict(trained.state_dict)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    def hook(name):
        def record(module, inputs, output):
            h = inputs[0].transpose(0, 1).flatten(1)  # (C, samples x positions)
            seen.setdefault(name, []).append((h.mean(1), h.var(1), h.shape[1]))
        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(hook(name))
    model.train()
    x = torch.as_tensor(task.x_train).double()
    with torch.no_grad():
        for lo in range(0, len(x), cfg.batch_size):
            model(x[lo : lo + cfg.batch_size])
    assert len(seen) == 6  # the stem, two per block, the projection
    for name, parts in seen.items():
        n = sum(p[2] for p in parts)
        mean = sum(p[0] * p[2] for p in parts) / n
        var = sum(p[1] * p[2] for p in parts) / n
        torch.testing.assert_close(trained.state_dict[f"{name}.running_mean"], mean)
        torch.testing.assert_close(trained.state_dict[f"{name}.running_var"], var)


def test_results_shape_types_and_accuracy(task):
    for kind in KINDS:
        arch = ArchConfig(kind=kind)
        results = train_pack(task, arch, [2, 0], TrainConfig(epochs=1))
        assert [r.seed for r in results] == [2, 0]
        reference = build(arch.with_task_shape(task.input_shape, task.num_classes)).state_dict()
        for r in results:
            assert isinstance(r, SeedResult) and r.status == "ok" and r.epochs == 1
            assert list(r.state_dict) == list(reference)
            for name, value in r.state_dict.items():
                assert value.shape == reference[name].shape and value.dtype == torch.float32
                assert value.device.type == "cpu"
            assert 0.0 <= r.test_acc <= 1.0 and r.train_loss > 0 and r.seconds > 0
    (good,) = train_pack(task, ArchConfig(kind="mlp"), [0], DEFAULT_TRAIN["mlp"])
    assert good.test_acc >= 0.95 and good.train_acc >= 0.95


def test_same_call_twice_gives_identical_weights(task):
    cfg = TrainConfig(epochs=2)
    a = train_pack(task, ArchConfig(kind="cnn"), [5, 6], cfg)
    b = train_pack(task, ArchConfig(kind="cnn"), [5, 6], cfg)
    for ra, rb in zip(a, b, strict=True):
        for name in ra.state_dict:
            assert torch.equal(ra.state_dict[name], rb.state_dict[name])
        assert ra.test_loss == rb.test_loss


def test_diverged_seeds_are_frozen_and_do_not_touch_the_others(task):
    # lr=1.0 with LeakyReLU is at the edge of stability for this MLP: in a pack of 8 some seeds'
    # weights blow up to inf/nan during epoch 1 (on x86 float32: seeds 3 and 7) and others train.
    arch = ArchConfig(kind="mlp", activation="leaky_relu")
    cfg = TrainConfig(epochs=2, lr=1.0)
    pack = train_pack(task, arch, list(range(8)), cfg)
    ok = [r.seed for r in pack if r.status == "ok"]
    diverged = [r.seed for r in pack if r.status == "diverged"]
    assert ok and diverged, [r.status for r in pack]
    for r in pack:
        assert all(torch.isfinite(v).all() for v in r.state_dict.values())  # last finite weights
        assert r.epochs == (2 if r.status == "ok" else 1)
    survivors = train_pack(task, arch, ok, cfg)  # the same seeds with no diverging neighbours
    for r in survivors:
        assert _max_diff(r.state_dict, pack[r.seed].state_dict) <= 1e-6
    (alone,) = train_pack(task, arch, [diverged[0]], cfg)  # diverges alone the same way
    assert alone.status == "diverged"
    assert _max_diff(alone.state_dict, pack[diverged[0]].state_dict) <= 1e-6


def test_divergence_at_the_first_step_keeps_the_init(task):
    x = task.x_train.copy()
    x[0] = 3e38  # finite input whose activations overflow: every seed's loss is non-finite
    bad = Task(task.task_id, "overflow", task.classes, x, task.y_train, task.x_test, task.y_test)
    arch = ArchConfig(kind="mlp")
    results = train_pack(bad, arch, [0, 1], TrainConfig(epochs=3, batch_size=len(x)))
    for r in results:
        assert r.status == "diverged" and r.epochs == 0
        init = init_model(arch.with_task_shape(bad.input_shape, 2), r.seed).state_dict()
        assert _max_diff(r.state_dict, init) == 0.0


@pytest.mark.parametrize(
    ("seeds", "match"),
    [([], "non-empty"), ([1, 1], "distinct"), ([-1], "non-negative"), ([1.5], "non-negative"),
     ("01", "sequence")],
)
def test_bad_seeds_are_clear_errors(task, seeds, match):
    with pytest.raises(ValueError, match=match):
        train_pack(task, ArchConfig(), seeds, TrainConfig(epochs=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "train.epochs"),
        ({"batch_size": 2.5}, "train.batch_size"),
        ({"lr": 0.0}, "train.lr"),
        ({"lr": float("nan")}, "train.lr"),
        ({"momentum": 1.0}, "train.momentum"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"optimizer": "rmsprop"}, "train.optimizer"),
        ({"milestones": (5, 3)}, "train.milestones"),
        ({"gamma": 0.0}, "train.gamma"),
        ({"device": "tpu"}, "train.device"),
        ({"dtype": "float16"}, "train.dtype"),
        ({"weight_decay": -1.0}, "train.weight_decay"),
    ],
)
def test_train_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_wrong_argument_types_are_type_errors(task):
    with pytest.raises(TypeError, match="Task"):
        train_pack("digits", ArchConfig(), [0])
    with pytest.raises(TypeError, match="ArchConfig"):
        train_pack(task, "mlp", [0])
    with pytest.raises(TypeError, match="TrainConfig"):
        train_pack(task, ArchConfig(), [0], {"epochs": 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_pack_matches_cpu(task, kind):
    # float64 so that the comparison measures the algorithm, not TF32/cuBLAS rounding.
    cpu = train_pack(task, ArchConfig(kind=kind), [0, 1, 2], TrainConfig(epochs=2, dtype="float64"))
    gpu = train_pack(task, ArchConfig(kind=kind), [0, 1, 2],
                     TrainConfig(epochs=2, dtype="float64", device="cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.status == "ok" and _max_diff(a.state_dict, b.state_dict) <= 1e-9
        assert math.isclose(a.test_acc, b.test_acc)
    # float32: cuDNN convolutions use TF32 by default, so compare the outcome, not the weights.
    fast = train_pack(task, ArchConfig(kind=kind), [3, 4], TrainConfig(epochs=3, device="cuda"))
    slow = train_pack(task, ArchConfig(kind=kind), [3, 4], TrainConfig(epochs=3))
    for a, b in zip(fast, slow, strict=True):
        assert a.status == "ok" and abs(a.test_acc - b.test_acc) <= 0.05


def test_shared_init_seeds_start_models_of_two_tasks_from_the_same_weights():
    """init_seeds: the models of two tasks with the same init seed start from the same weights
    (lr 1e-12: after training they still equal the init to 1e-9) while their batch orders are
    their own seeds'; a length mismatch is a one-line error."""
    tasks = make_tasks(DataConfig(dataset="digits", num_tasks=2))
    arch = ArchConfig(kind="mlp", widths=(6,))
    cfg = TrainConfig(epochs=1, lr=1e-12)
    a = train_pack(tasks[0], arch, [10, 11], cfg, init_seeds=[3, 4])
    b = train_pack(tasks[1], arch, [20, 21], cfg, init_seeds=[3, 4])
    own = train_pack(tasks[1], arch, [20, 21], cfg)
    for ra, rb, ro in zip(a, b, own, strict=True):
        for k in ra.state_dict:
            torch.testing.assert_close(ra.state_dict[k], rb.state_dict[k], rtol=0, atol=1e-9)
        first = next(iter(ra.state_dict))
        assert not torch.allclose(ra.state_dict[first], ro.state_dict[first])
    with pytest.raises(ValueError, match="init_seeds must have one seed per model"):
        train_pack(tasks[0], arch, [10, 11], cfg, init_seeds=[3])
