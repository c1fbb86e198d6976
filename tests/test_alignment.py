"""Weight matching (distsim.weights.alignment): planted permutations, optimality, template."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distsim.weights.alignment as alignment
from distsim.config.arch import ArchConfig
from distsim.weights.alignment import align_stacked, make_template, match_permutations
from distsim.weights.features import weight_features_batch
from distsim.weights.normalize import normalize_stacked, plan_for, stack_state_dicts
from distsim.zoo.models import build

torch.set_num_threads(1)

MLP = ArchConfig(kind="mlp", widths=(12, 9), num_classes=3)
CNN = ArchConfig(kind="cnn", channels=(4, 5), num_classes=3)  # conv2 -> flatten -> out
TINY = ArchConfig(kind="mlp", widths=(4, 3), input_shape=(1, 2, 3), num_classes=2)


def _normalized(cfg: ArchConfig, seeds: list[int]) -> dict[str, torch.Tensor]:
    states = []
    for s in seeds:
        torch.manual_seed(s)
        states.append(build(cfg).state_dict())
    stacked = stack_state_dicts(states)
    return normalize_stacked(plan_for(cfg), {k: v.double() for k, v in stacked.items()})


def _permuted(cfg: ArchConfig, p: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    """Model 0 of ``p`` with every hidden layer's units permuted at random (same function)."""
    plan = plan_for(cfg)
    out = {k: v[0].clone() for k, v in p.items()}
    steps = plan.parametric
    for cur, nxt in itertools.pairwise(steps):
        n = out[cur.weight].shape[0]
        perm = torch.randperm(n, generator=gen)
        out[cur.weight], out[cur.bias] = out[cur.weight][perm], out[cur.bias][perm]
        w = out[nxt.weight]
        out[nxt.weight] = w.reshape(w.shape[0], n, -1)[:, perm].reshape(w.shape)
    return {k: v[None] for k, v in out.items()}


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), cfg=st.sampled_from([MLP, CNN]))
def test_planted_permutation_is_recovered(seed: int, cfg: ArchConfig) -> None:
    """A permuted copy of the template (plus small noise) aligns back onto the template."""
    plan = plan_for(cfg)
    p = _normalized(cfg, [seed])
    gen = torch.Generator().manual_seed(seed)
    moved = _permuted(cfg, p, gen)
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in moved.items()}
    template = {k: v[0] for k, v in p.items()}
    for key, v in align_stacked(plan, noisy, template).items():
        torch.testing.assert_close(v[0], template[key], atol=5e-3, rtol=0)
    exact = align_stacked(plan, moved, template)
    for key, v in exact.items():
        torch.testing.assert_close(v[0], template[key], atol=1e-12, rtol=0)


def _objective(t: alignment.Blocks, w: alignment.Blocks, perms: list[np.ndarray]) -> float:
    """sum_l <T_l, P_l W_l P_{l-1}^T> + <t_l, P_l b_l> (the weight-matching objective)."""
    total = 0.0
    for (tw, tb), (mw, mb) in zip(t, alignment._apply(w, perms), strict=True):
        total += float((tw * mw).sum()) + (float(tb @ mb) if tb is not None else 0.0)
    return total


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_result_is_a_coordinate_optimum(seed: int) -> None:
    """No single layer's permutation can be improved (brute force over all of them), and the
    objective is at least the identity's and the forward pass's."""
    plan = plan_for(TINY)
    p = _normalized(TINY, [seed, seed + 1])
    t, w = alignment._blocks(plan, p, 0), alignment._blocks(plan, p, 1)
    perms = match_permutations(t, w, seed=seed)
    best = _objective(t, w, perms)
    identity = [np.arange(len(q)) for q in perms]
    assert best >= _objective(t, w, identity) - 1e-12
    for layer, q in enumerate(perms):
        for other in itertools.permutations(range(len(q))):
            trial = [*perms[:layer], np.array(other), *perms[layer + 1 :]]
            assert _objective(t, w, trial) <= best + 1e-12


def test_template_is_the_mean_of_aligned_models_with_n_matchings_per_iteration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    states = []
    for s in range(5):
        torch.manual_seed(s)
        states.append(build(MLP).state_dict())
    calls = []
    real = alignment.match_permutations
    monkeypatch.setattr(alignment, "match_permutations",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    template = make_template(states, MLP, iterations=3, seed=1)
    assert len(calls) == 5 * 3
    assert set(template) == {k for k in states[0]} and template["1.weight"].dtype == torch.float64
    # iteration i + 1 = the mean of the models aligned to iteration i's template; deterministic
    plan = plan_for(MLP)
    p = normalize_stacked(plan, {k: v.double() for k, v in stack_state_dicts(states).items()})
    start = make_template(states, MLP, iterations=0)
    one = make_template(states, MLP, iterations=1, seed=1)
    mean = {k: v.mean(0) for k, v in align_stacked(plan, p, start, seed=1).items()}
    for k in template:
        torch.testing.assert_close(start[k], p[k][0], rtol=0, atol=0)
        torch.testing.assert_close(one[k], mean[k], rtol=0, atol=0)
        assert not torch.equal(one[k], start[k])
    rebuilt = make_template(states, MLP, iterations=3, seed=1)
    for k in template:
        torch.testing.assert_close(rebuilt[k], template[k], rtol=0, atol=0)


def test_aligned_feature_is_the_flattened_aligned_weights() -> None:
    states = []
    for s in range(3):
        torch.manual_seed(s)
        states.append(build(CNN).state_dict())
    template = make_template(states, CNN, iterations=1)
    plan = plan_for(CNN)
    p = normalize_stacked(plan, {k: v.double() for k, v in stack_state_dicts(states).items()})
    a = align_stacked(plan, p, template)
    keys = ["0.weight", "0.bias", "3.weight", "3.bias"]  # conv1, conv2
    want = torch.cat([a[k].reshape(3, -1) for k in keys], dim=1).float().numpy()
    got = weight_features_batch(states, CNN, "aligned", "conv2", template=template)
    np.testing.assert_array_equal(got, want)


def test_errors() -> None:
    states = []
    for s in range(2):
        torch.manual_seed(s)
        states.append(build(MLP).state_dict())
    template = make_template(states, MLP, iterations=1)
    with pytest.raises(ValueError, match="needs template="):
        weight_features_batch(states, MLP, "aligned")
    with pytest.raises(ValueError, match=r"template\['3.weight'\] has shape"):
        weight_features_batch(states, MLP, "aligned",
                              template={**template, "3.weight": template["3.weight"][:3]})
    with pytest.raises(ValueError, match="template lacks '5.bias'"):
        weight_features_batch(states, MLP, "aligned",
                              template={k: v for k, v in template.items() if k != "5.bias"})
    with pytest.raises(ValueError, match="iterations must be"):
        make_template(states, MLP, iterations=-1)
