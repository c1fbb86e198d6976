"""Architectures: shapes, the GRU against torch.nn.GRU, the packed forward, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from distsim.config.arch import ArchConfig
from distsim.zoo.models import GRU, build, forward_packed

SHAPES = [(1, 8, 8), (3, 16, 12)]


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize(
    "arch",
    [
        ArchConfig(kind="mlp", widths=(16, 8, 4)),
        ArchConfig(kind="mlp", widths=(5,), activation="leaky_relu", negative_slope=0.2),
        ArchConfig(kind="cnn", channels=(4, 6), head_widths=(7,)),
        ArchConfig(kind="cnn", channels=(3,), activation="leaky_relu"),
        ArchConfig(kind="mlp", widths=(6, 4), activation="tanh"),
        ArchConfig(kind="cnn", channels=(3,), head_widths=(5,), activation="gelu"),
        ArchConfig(kind="mlp", widths=(5,), activation="sigmoid"),
        ArchConfig(kind="rnn", hidden=9),
        ArchConfig(kind="rnn", hidden=5, num_layers=2),
    ],
)
def test_output_shape_and_packed_forward(arch, input_shape):
    arch = arch.with_task_shape(input_shape, 3)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build(arch))
    x = torch.rand(3, 5, *input_shape)  # one batch of 5 per model
    for m, xb in zip(models, x, strict=True):
        assert m(xb).shape == (5, 3)
    params, _ = stack_module_state(models)
    packed = forward_packed(models[0], params, x)
    expected = torch.stack([m(xb) for m, xb in zip(models, x, strict=True)])
    assert packed.shape == (3, 5, 3)
    torch.testing.assert_close(packed, expected, atol=1e-6, rtol=1e-5)
    # and the torch.func reference: vmap of functional_call over the stacked weights
    by_vmap = vmap(lambda p, xb: functional_call(models[0], p, (xb,)))(params, x)
    torch.testing.assert_close(packed, by_vmap, atol=1e-6, rtol=1e-5)


def test_layer_layout_is_plain_sequential():
    mlp = build(ArchConfig(kind="mlp", widths=(4, 4)))
    assert [type(m).__name__ for m in mlp] == [
        "Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    cnn = build(ArchConfig(kind="cnn", channels=(2, 3)))
    assert [type(m).__name__ for m in cnn] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert cnn[-1].in_features == 3 * 2 * 2
    rnn = build(ArchConfig(kind="rnn", hidden=6, input_shape=(2, 5, 7)))
    assert rnn.gru.weight_ih_l0.shape == (18, 14) and rnn.head.in_features == 6


@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru_equals_torch_gru(num_layers):
    torch.manual_seed(0)
    ours = GRU(input_size=6, hidden_size=5, num_layers=num_layers).double()
    torch.manual_seed(0)
    ref = nn.GRU(6, 5, num_layers=num_layers, batch_first=True).double()
    for name, p in ref.named_parameters():  # same init rule, same RNG consumption
        assert torch.equal(p, ours.get_parameter(name)), name
    shifted = {k: v + 0.1 if "bias" in k else v for k, v in ours.state_dict().items()}
    ours.load_state_dict(shifted)
    ref.load_state_dict(shifted)  # same names, shapes and gate order
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    out, h = ours(x)
    out_ref, h_ref = ref(x)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)


def test_rnn_reads_image_rows_as_steps():
    arch = ArchConfig(kind="rnn", hidden=4, input_shape=(2, 3, 5))
    torch.manual_seed(0)
    model = build(arch)
    x = torch.rand(2, 2, 3, 5)
    seq = x.permute(0, 2, 1, 3).reshape(2, 3, 10)  # step t = row t of every channel
    _, h = model.gru(seq)
    torch.testing.assert_close(model(x), model.head(h[-1]))


@pytest.mark.parametrize("input_shape", [(1, 40), (2, 8, 8)])
@pytest.mark.parametrize(
    "arch",
    [
        ArchConfig(kind="resnet", channels=(3, 5)),
        ArchConfig(kind="resnet", channels=(4, 4), blocks=2),
        ArchConfig(kind="transformer", d_model=8, heads=2, depth=2),
        ArchConfig(kind="transformer", d_model=6, heads=3, activation="gelu", pooling="mean"),
    ],
)
def test_resnet_and_transformer_packed_forward_equals_each_model(arch, input_shape):
    """forward_packed of K = 3 ResNets (BatchNorm in training mode without running statistics
    in params, in eval mode with them) and transformers equals each module's forward."""
    arch = arch.with_task_shape(input_shape, 3)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build(arch).double())
    with torch.no_grad():  # running statistics other than the defaults (0, 1)
        for m in models:
            for name, buf in m.named_buffers():
                buf.copy_(torch.rand_like(buf) + 0.5 if "var" in name else torch.randn_like(buf))
    x = torch.randn(3, 7, *input_shape, dtype=torch.float64)
    for train in (True, False) if arch.kind == "resnet" else (True,):
        params, buffers = stack_module_state(models)  # (a training-mode forward moves buffers)
        for m in models:
            m.train(train)
        expected = torch.stack([m(xb) for m, xb in zip(models, x, strict=True)])
        packed = forward_packed(models[0], params if train else {**params, **buffers}, x)
        torch.testing.assert_close(packed, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "vit"}, "arch.kind"),
        ({"kind": "resnet", "activation": "tanh"}, "arch.activation"),
        ({"kind": "resnet", "channels": ()}, "arch.channels"),
        ({"kind": "resnet", "channels": (2, 2, 2, 2, 2), "input_shape": (1, 8, 8)}, "halve"),
        ({"kind": "resnet", "blocks": 0}, "arch.blocks"),
        ({"kind": "transformer", "d_model": 10, "heads": 3}, "arch.heads"),
        ({"kind": "transformer", "activation": "tanh"}, "arch.activation"),
        ({"kind": "transformer", "input_shape": (1, 40), "patch": 3}, "arch.patch"),
        ({"kind": "transformer", "pooling": "max"}, "arch.pooling"),
        ({"activation": "silu"}, "arch.activation"),
        ({"input_shape": (8,)}, "arch.input_shape"),
        ({"input_shape": (1, 0, 8)}, "arch.input_shape"),
        ({"widths": (4, 0)}, "arch.widths"),
        ({"kind": "mlp", "widths": ()}, "arch.widths"),
        ({"kind": "cnn", "channels": ()}, "arch.channels"),
        ({"kind": "cnn", "channels": (4, 4, 4, 4), "input_shape": (1, 8, 8)}, "pooling blocks"),
        ({"hidden": 0}, "arch.hidden"),
        ({"num_classes": 1}, "arch.num_classes"),
    ],
)
def test_arch_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArchConfig(**kwargs)


def test_build_and_forward_packed_reject_other_types():
    with pytest.raises(TypeError, match="ArchConfig"):
        build({"kind": "mlp"})
    with pytest.raises(TypeError, match="build"):
        forward_packed(nn.Linear(2, 2), {}, torch.zeros(1, 1, 2))
    with pytest.raises(TypeError, match="unsupported layer"):
        forward_packed(nn.Sequential(nn.SiLU()), {}, torch.zeros(1, 1, 2))
