"""Every feature method's HTT is calibrated on features that carry no task signal.

One pack of MLPs is trained on ONE digits task; the models are then given fake task labels at
random, so no feature can know them. For each method (at a hidden layer and at 'out') and each
protocol, over 500 such labellings the 5% test's rejection rate is within [0.02, 0.08] with ties
broken at random (the exact test), and the reported p, which counts ties against the observed
statistic, is never below it (conservative: closed-set accuracy is discrete, so ties are common
and it rejects 2-4% of the time, measured).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import TrainConfig
from distsim.stats import HTTOptions, htt
from distsim.weights.alignment import make_template
from distsim.weights.cka import probe_inputs
from distsim.weights.features import METHODS, weight_features_batch
from distsim.zoo.tasks import digits, make_tasks
from distsim.zoo.train import train_pack

torch.set_num_threads(1)

N_TASKS, PER_TASK, REPLICATES = 6, 10, 500
pytestmark = pytest.mark.slow  # 20 x 500 replicated tests: minutes on 2 cores


@functools.lru_cache(maxsize=1)
def _zoo() -> tuple[ArchConfig, list[dict[str, torch.Tensor]]]:
    task = make_tasks(DataConfig(dataset="digits", num_tasks=1))[0]
    arch = ArchConfig(kind="mlp", widths=(16,)).with_task_shape(task.input_shape, 2)
    results = train_pack(task, arch, list(range(N_TASKS * PER_TASK)), TrainConfig(epochs=2))
    return arch, [r.state_dict for r in results]


@functools.cache
def _features(method: str, layer: str) -> np.ndarray:
    arch, states = _zoo()
    extra: dict = {}
    if method == "aligned":
        extra["template"] = make_template(states, arch, iterations=1)
    if method == "cka":
        extra["probe"] = probe_inputs(*digits(), 30, seed=0)
    return weight_features_batch(states, arch, method, layer, **extra)


def _randomized_p(statistic: float, null: np.ndarray, u: float) -> float:
    """The exact permutation p-value: the observed statistic's ties (as distsim.stats.p_value
    counts them) ranked at random among themselves."""
    tie = np.abs(null - statistic) <= 1e-9 * max(abs(statistic), 1.0)
    greater = np.sum((null > statistic) & ~tie)
    return float((greater + u * (1 + tie.sum())) / (1 + len(null)))


@pytest.mark.parametrize("protocol", ["closed-set", "open-set"])
@pytest.mark.parametrize("layer", ["fc1", "out"])
@pytest.mark.parametrize("method", METHODS)
def test_htt_rejects_at_its_level_without_task_signal(method, layer, protocol):
    X = _features(method, layer)
    rng = np.random.default_rng([7, METHODS.index(method), len(layer)])
    reported = randomized = 0
    for rep in range(REPLICATES):
        tasks = rng.permutation(np.repeat(np.arange(N_TASKS), PER_TASK))
        r = htt(X, tasks, protocol, permutations=39, seed=rep, options=HTTOptions(n_query=2))
        p_rand = _randomized_p(r.statistic, r.null, rng.random())
        assert r.p_value >= p_rand - 1e-12
        reported += r.p_value <= 0.05
        randomized += p_rand <= 0.05
    assert 0.02 <= randomized / REPLICATES <= 0.08, randomized / REPLICATES
    assert reported / REPLICATES <= 0.08, reported / REPLICATES
