"""[train] save_epochs and init_scale in the packed trainer: a checkpoint is exactly the model
a shorter run would have trained, saving changes nothing else, and init_scale scales the
initial weight matrices and kernels only."""

from __future__ import annotations

import pytest
import torch

from distsim.config.training import TrainConfig
from distsim.zoo.models import ArchConfig
from distsim.zoo.tasks import DataConfig, make_tasks
from distsim.zoo.train import init_model, train_pack

TASK = make_tasks(DataConfig(dataset="synthetic", num_tasks=1, synthetic_samples=60))[0]
ARCHS = [ArchConfig(name="mlp", kind="mlp", widths=(6,)),
         ArchConfig(name="cnn", kind="cnn", channels=(2, 3))]
SEEDS = [3, 4, 5]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.kind)
def test_a_checkpoint_is_the_model_a_shorter_run_trains(arch: ArchConfig) -> None:
    long = train_pack(TASK, arch, SEEDS, TrainConfig(epochs=4, batch_size=16,
                                                     save_epochs=(0, 1, 3)))
    plain = train_pack(TASK, arch, SEEDS, TrainConfig(epochs=4, batch_size=16))
    for saved, r in zip(long, plain, strict=True):
        assert _equal(saved.state_dict, r.state_dict)  # saving changes nothing else
        assert (saved.test_acc, saved.epochs) == (r.test_acc, r.epochs)
        assert [c.epoch for c in saved.checkpoints] == [0, 1, 3]  # the last is the model
        assert not r.checkpoints
    for epochs in (1, 3):
        short = train_pack(TASK, arch, SEEDS, TrainConfig(epochs=epochs, batch_size=16))
        for saved, r in zip(long, short, strict=True):
            c = next(c for c in saved.checkpoints if c.epoch == epochs)
            assert _equal(c.state_dict, r.state_dict)
            assert c.metrics == pytest.approx((r.train_loss, r.train_acc, r.test_loss,
                                               r.test_acc))
            assert c.status == "ok"
    shaped = arch.with_task_shape(TASK.input_shape, TASK.num_classes)
    for saved, seed in zip(long, SEEDS, strict=True):
        init = init_model(shaped, seed).state_dict()
        assert _equal(saved.checkpoints[0].state_dict, init)


@pytest.mark.parametrize("arch", [ARCHS[1], ArchConfig(kind="transformer", d_model=4, hidden=6),
                                  ArchConfig(kind="resnet", channels=(2, 3))],
                         ids=["cnn", "transformer", "resnet"])
def test_init_scale_scales_weight_matrices_and_kernels_not_biases(arch: ArchConfig) -> None:
    """(A ResNet's BatchNorm statistics are computed from the scaled weights: parameters
    only. A transformer's per-head biases b_Q, b_K, b_V are (heads, d_k) but biases; they start
    at zero, so here only its matrices, positions and class token are told apart.)"""
    arch = arch.with_task_shape(TASK.input_shape, TASK.num_classes)
    r = train_pack(TASK, arch, [7], TrainConfig(epochs=1, init_scale=2.5, save_epochs=(0,)))
    init = init_model(arch, 7)
    got = r[0].checkpoints[0].state_dict
    for name, value in init.named_parameters():
        bias = value.dim() < 2 or name.rpartition(".")[2].startswith("b_")
        want = value.detach() * (1.0 if bias else 2.5)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def test_a_seed_that_diverged_keeps_its_frozen_weights_in_later_checkpoints() -> None:
    arch = ARCHS[0]
    r = train_pack(TASK, arch, [1, 2], TrainConfig(epochs=3, lr=1e6, momentum=0.0,
                                                   save_epochs=(1, 2)))
    for seed in r:
        assert seed.status == "diverged"
        for c in seed.checkpoints:
            if c.epoch > seed.epochs:
                assert c.status == "diverged" and _equal(c.state_dict, seed.state_dict)
            assert all(torch.isfinite(v).all() for v in c.state_dict.values())
