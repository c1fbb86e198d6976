"""Strata that are another factor's cells (`[tests] strata`, HTT's strata_split="cell"): the
split is drawn in each (task, stratum) cell, the null permutes within (role, stratum) cells."""

from __future__ import annotations

import numpy as np
import pytest
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import ConfigError, parse_study
from distsim.stats import HTTOptions, htt
from distsim.stats.htt_split import make_split, permuted_labels


def _design(tasks: int, strata: int, per: int) -> tuple[np.ndarray, np.ndarray]:
    codes = np.repeat(np.arange(tasks), strata * per)
    s = np.tile(np.repeat(np.arange(strata), per), tasks)
    return codes, s


@settings(max_examples=20, deadline=None)
@given(tasks=st.integers(4, 6), strata=st.integers(1, 3), per=st.integers(3, 6),
       seed=st.integers(0, 2**16), protocol=st.sampled_from(["closed-set", "open-set"]))
def test_every_cell_is_split_and_the_null_keeps_each_cell(tasks, strata, per, seed,
                                                          protocol) -> None:
    codes, s = _design(tasks, strata, per)
    split = make_split(codes, np.arange(tasks), protocol, seed, strata=s, strata_split="cell")
    roles = ("train", "test") if protocol == "closed-set" else ("query", "gallery")
    held = np.arange(tasks) if protocol == "closed-set" else np.setdiff1d(
        np.arange(tasks), split.train_classes)
    for t in held:
        for k in range(strata):  # every (task, stratum) cell in both roles
            for role in roles:
                idx = split.blocks[role]
                assert ((codes[idx] == t) & (s[idx] == k)).any(), (t, k, role)
    perm = permuted_labels(split, 5, seed)
    for role, idx in split.blocks.items():
        for k in range(strata):  # per stratum, each role keeps its task counts
            inside = s[idx] == k
            want = np.bincount(codes[idx][inside], minlength=tasks)
            for row in perm[role]:
                assert (np.bincount(row[inside], minlength=tasks) == want).all()


def test_a_cell_of_one_model_is_a_one_line_error() -> None:
    codes, s = _design(3, 2, 2)
    s[0] = 1  # task 0 now has 1 model in stratum 0
    with pytest.raises(ValueError, match="task 0 has 1 model in a stratum"):
        make_split(codes, np.arange(3), "closed-set", 0, strata=s, strata_split="cell")
    with pytest.raises(ValueError, match="strata_split must be one of"):
        make_split(codes, np.arange(3), "closed-set", 0, strata=s, strata_split="row")


def test_calibrated_under_a_strong_stratum_effect_and_powerful_under_a_task_effect() -> None:
    """H0 true (no task effect) while the strata shift the features by 10 noise SDs: the
    closed-set test rejects at 0.05 in [0.02, 0.08] of 200 seeded replicates (measured: 0.05);
    with a task effect, in most (0.825)."""
    codes, s = _design(4, 2, 8)
    options = HTTOptions(strata_split="cell")

    def rate(effect: float, replicates: int) -> float:
        hits = 0
        for r in range(replicates):
            rng = np.random.default_rng([7, r])
            X = rng.normal(size=(len(codes), 6))
            X[:, 0] += 10.0 * s
            X[:, 1] += effect * codes
            res = htt(X, codes, "closed-set", permutations=39, seed=r, options=options,
                      strata=s)
            hits += res.p_value <= 0.05
        return hits / replicates

    assert 0.02 <= rate(0.0, 200) <= 0.08
    assert rate(2.5, 40) >= 0.8


@pytest.mark.parametrize(("tests", "train", "message"), [
    ({"strata": "seed"}, {"shared_init": True, "seeds_per_task": 4},
     "tests.strata: train.shared_init already sets the strata"),
    ({"strata": "task"}, {}, "tests.strata: 'task' is also tests.group_by"),
])
def test_conflicting_strata_are_one_line_errors(tests: dict, train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_study(study_toml(tests=tests, train={"seeds_per_task": 3, **train}))


def test_strata_enter_the_hash_only_when_set() -> None:
    plain = parse_study(study_toml())
    assert "strata" not in plain.resolved()["tests"]
    assert parse_study(study_toml(tests={"strata": "lr"})).hash != plain.hash
    assert parse_study(study_toml(tests={"strata": "lr"})).tests.htt_options().strata_split \
        == "cell"
