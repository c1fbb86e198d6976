"""Chain normalization: function preservation, unit norms, the GRU flag, the batched state path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.weights.normalize import chain_normalize, chain_normalize_state, layer_plan
from distsim.zoo.models import build

torch.set_num_threads(1)

ARCHS = [
    ArchConfig(kind="mlp", widths=(16, 12)),
    ArchConfig(kind="mlp", widths=(10,), activation="leaky_relu", negative_slope=0.1),
    ArchConfig(kind="cnn", channels=(4, 6)),
    ArchConfig(kind="cnn", channels=(3, 5), head_widths=(7,), input_shape=(2, 8, 8), num_classes=3),
]


def _trained(model: nn.Module, steps: int = 40) -> nn.Module:
    """A few Adam steps on random data so weights leave their init distribution."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, *_input_shape(model), generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return (first.in_channels, 8, 8) if isinstance(first, nn.Conv2d) else (1, 8, 8)


def _hidden_norms(model: nn.Sequential) -> list[torch.Tensor]:
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [
        torch.cat([m.weight.reshape(m.weight.shape[0], -1), m.bias[:, None]], 1).norm(dim=1)
        for m in layers[:-1]
    ]


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: f"{c.kind}-{c.activation}-{c.head_widths}")
def test_function_preserved_and_unit_norms(cfg: ArchConfig, trained: bool) -> None:
    torch.manual_seed(0)
    model = build(cfg)
    if trained:
        model = _trained(model)
    normed = chain_normalize(model)
    assert normed.function_preserving is True
    x = torch.randn(32, *cfg.input_shape)
    with torch.no_grad():
        ref, out = model(x), normed(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for norms in _hidden_norms(normed):
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the input model is untouched (a deep copy was normalized)
    assert any(not torch.allclose(n, torch.ones_like(n)) for n in _hidden_norms(model))


def test_conv_to_linear_block_scaling_with_avgpool() -> None:
    """conv -> avgpool -> flatten -> linear: the head's block of columns per channel absorbs the
    scale."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(3 * 16, 5), nn.LeakyReLU(0.2), nn.Linear(5, 2),
    )
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([0.01, 1.0, 50.0])[:, None, None, None])
    normed = chain_normalize(model)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(normed(x), model(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(_hidden_norms(normed)[0], torch.ones(3), atol=1e-6)


def test_rescaled_models_normalize_to_the_same_weights() -> None:
    """Chain normalization is a canonical form for the rescaling symmetry."""
    torch.manual_seed(0)
    model = build(ArchConfig(kind="mlp", widths=(8, 6)))
    scaled = chain_normalize(model)  # any copy; now rescale its units and compensate
    with torch.no_grad():
        a = torch.rand(8) * 9.9 + 0.1
        scaled[1].weight.mul_(a[:, None]), scaled[1].bias.mul_(a), scaled[3].weight.div_(a[None, :])
    n1, n2 = chain_normalize(model).state_dict(), chain_normalize(scaled).state_dict()
    for key in n1:
        assert torch.allclose(n1[key], n2[key], atol=1e-6), key


@pytest.mark.parametrize("bare", [False, True])
def test_gru_left_unchanged_and_flagged_function_preserving(bare: bool) -> None:
    """A GRU has no rescaling symmetry (σ, tanh are not homogeneous): normalization is the
    identity, so the copy is bit-identical and function-preserving."""
    torch.manual_seed(0)
    model = build(ArchConfig(kind="rnn", hidden=6, num_layers=2))
    if bare:
        model = nn.GRU(8, 6, num_layers=2, batch_first=True)
    normed = chain_normalize(model)
    assert normed.function_preserving is True
    for key, value in model.state_dict().items():
        assert torch.equal(normed.state_dict()[key], value)
    assert normed is not model


def test_state_path_matches_module_path_and_stacked_input() -> None:
    cfg = ArchConfig(kind="cnn", channels=(3, 4), head_widths=(5,))
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build(cfg))
    states = [m.state_dict() for m in models]
    from_list = chain_normalize_state(states, cfg)
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    from_stack = chain_normalize_state(stacked, cfg)
    for i, m in enumerate(models):
        single = chain_normalize(m).state_dict()
        for key, value in single.items():
            assert from_list[key].shape[0] == 3
            assert torch.allclose(from_list[key][i], value, atol=1e-7)
            assert torch.equal(from_stack[key][i], from_list[key][i])


def test_zero_unit_is_left_alone() -> None:
    torch.manual_seed(0)
    model = build(ArchConfig(kind="mlp", widths=(4,)))
    with torch.no_grad():
        model[1].weight[2].zero_(), model[1].bias[2].zero_()
    normed = chain_normalize(model)
    assert torch.isfinite(torch.cat([p.flatten() for p in normed.parameters()])).all()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(normed(x), model(x), atol=1e-6)


@pytest.mark.parametrize(
    "model, match",
    [
        (
            nn.Sequential(
                nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2)
            ),
            "'1' \\(BatchNorm2d\\)",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.SiLU(), nn.Linear(4, 2)),
            "'2' \\(SiLU\\)",
        ),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.ReLU()), "groups=1"),
        (nn.LSTM(4, 3), "LSTM"),
        (nn.GRU(4, 3, bidirectional=True), "unidirectional"),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), "at least one Linear"),
    ],
)
def test_unsupported_modules_are_named(model: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chain_normalize(model)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        chain_normalize({"a": 1})
    cfg = ArchConfig(kind="mlp", widths=(4,))
    with pytest.raises(ValueError, match="lacks"):
        chain_normalize_state([{"1.weight": torch.zeros(4, 64)}], cfg)
    with pytest.raises(ValueError, match="non-empty"):
        chain_normalize_state([], cfg)
    assert layer_plan(build(cfg)).layers == ("fc1", "out")


@pytest.mark.parametrize("kind", ["resnet", "transformer"])
def test_a_resnet_or_transformer_state_dict_is_refused_not_returned_unchanged(kind: str) -> None:
    """Their normalizations act on the folded convolutions / MLP units inside their feature
    modules; chain_normalize of the module would otherwise hand the weights back as they are."""
    cfg = ArchConfig(kind=kind, input_shape=(1, 8), channels=(2, 3), patch=2)
    with pytest.raises(ValueError, match=f"chain normalization of a {kind}"):
        chain_normalize(build(cfg))
    with pytest.raises(ValueError, match=f"chain normalization of a {kind}"):
        chain_normalize_state([build(cfg).state_dict()], cfg)
