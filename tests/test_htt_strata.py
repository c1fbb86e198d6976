"""HTT with init-seed strata: calibration under a shared stratum effect, power, split, errors."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from distsim.stats import PROTOCOLS, HTTOptions, htt, htt_null_chunk, htt_prepare
from distsim.stats.htt_split import Split, make_split, permuted_labels

B = 19  # permutations per replicate: p-values on the grid 1/20, ..., 20/20
OPTIONS = {"closed-set": HTTOptions(train_fraction=0.5),  # 4 + 4 / 2 + 2 + 4 strata
           "open-set": HTTOptions()}


def _strata_zoo(n_tasks, n_strata, dim, stratum_effect, task_effect, seed=0, rank=2):
    """Features (N, dim) = stratum effect + task effect (rank-`rank` task means, which held-out
    tasks share with training tasks) + noise; one model per (task, stratum), stored by task."""
    rng = np.random.default_rng(seed)
    tasks = np.repeat(np.arange(n_tasks), n_strata)
    strata = np.tile(np.arange(n_strata), n_tasks)
    task_means = rng.normal(size=(n_tasks, rank)) @ rng.normal(size=(rank, dim)) / np.sqrt(rank)
    X = (rng.normal(size=(len(tasks), dim)) + stratum_effect * rng.normal(size=(n_strata, dim))
         [strata] + task_effect * task_means[tasks])
    return X, tasks, strata


def _randomized_p(statistic, null, rng):
    """p-value with ties to the observed statistic broken uniformly at random: exactly uniform
    on {1, ..., B+1} / (B+1) under an exact permutation null (the reported p counts ties as
    exceeding, so it is conservative where the statistic is discrete)."""
    tol = 1e-9 * max(abs(statistic), 1.0)
    above = np.count_nonzero(null > statistic + tol)
    ties = np.count_nonzero(null >= statistic - tol) - above
    return (1 + above + rng.integers(0, ties + 1)) / (len(null) + 1)


@functools.cache
def _replicates(protocol, with_strata, task_effect=0.0, n=1000):
    """n HTTs (lda, 6 tasks x 8 strata, 16 features, stratum effect 3) -> arrays of the reported
    p, the randomized p, the statistic, the null mean and the chance."""
    out = []
    for rep in range(n):
        X, y, s = _strata_zoo(6, 8, 16, 3.0, task_effect, seed=10_000 + rep)
        r = htt(X, y, protocol, permutations=B, seed=rep, strata=s if with_strata else None,
                options=OPTIONS[protocol])
        tie_break = np.random.default_rng(rep)
        out.append((r.p_value, _randomized_p(r.statistic, r.null, tie_break), r.statistic,
                    r.null_mean, r.chance))
    return tuple(np.array(col) for col in zip(*out, strict=True))


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_strata_null_is_calibrated_under_a_shared_stratum_effect(protocol):
    """Features = stratum effect shared across tasks + noise, no task effect: over 1000
    replicates, with ties broken at random, P(p <= 0.05) is in [0.02, 0.08] and P(p <= 0.5) in
    [0.45, 0.55] (the restricted permutation test is exact). The reported p counts ties as
    exceeding: conservative for the closed-set accuracy (multiples of 1/24 here), measured
    0.019 there, 0.057 for the open-set mAP."""
    p, p_rand, stat, null_mean, chance = _replicates(protocol, True)
    assert 0.02 <= np.mean(p_rand <= 0.05) <= 0.08
    assert 0.45 <= np.mean(p_rand <= 0.5) <= 0.55
    assert 0.01 <= np.mean(p <= 0.05) <= 0.08 and np.all(p >= p_rand)
    if protocol == "open-set":  # a continuous statistic: no ties
        assert 0.02 <= np.mean(p <= 0.05) <= 0.08
    assert abs(np.mean(stat) - np.mean(null_mean)) < 0.01  # the statistic is not biased
    assert abs(np.mean(null_mean) - np.mean(chance)) < 0.01


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_strata_the_same_zoos_give_a_miscalibrated_test(protocol):
    """The reason for the option: on the same zoos, the split by model puts a held-out model's
    same-stratum siblings of other tasks in train (closed-set) or in the gallery (open-set), so
    the statistic falls below its null and the test almost never rejects."""
    p, p_rand, stat, null_mean, chance = _replicates(protocol, False)
    assert np.mean(stat) < np.mean(null_mean) - 0.01
    assert np.mean(p <= 0.05) <= 0.025 and np.mean(p_rand <= 0.05) <= 0.025
    assert np.mean(p_rand <= 0.5) <= 0.4
    if protocol == "closed-set":  # nearest centroid = a same-stratum sibling's task: far below
        assert np.mean(stat) < 0.25 * np.mean(chance)


def test_strata_test_keeps_its_power():
    """With a task effect on top of the stratum effect the strata-restricted test rejects, in
    closed-set far more often than the split by model."""
    rate = {
        (protocol, with_strata): np.mean(_replicates(protocol, with_strata, 2.0, 200)[0] <= 0.05)
        for protocol in PROTOCOLS for with_strata in (True, False)
    }
    assert rate["closed-set", True] >= 0.85 and rate["open-set", True] >= 0.7
    assert rate["closed-set", True] > rate["closed-set", False] + 0.2
    X, y, s = _strata_zoo(6, 8, 16, 3.0, 8.0, seed=1, rank=5)  # a clear effect: the floor
    for protocol in PROTOCOLS:
        res = htt(X, y, protocol, permutations=B, seed=1, strata=s)
        assert res.statistic == 1.0 and res.p_value == pytest.approx(1 / (B + 1))


# ----------------------------------------------------------------------------- split & permutations


@st.composite
def _designs(draw):
    """An unbalanced zoo: (task codes, stratum labels); each (task, stratum) cell has 0-2 models,
    stratum labels of a drawn type."""
    n_tasks, n_strata = draw(st.integers(4, 7)), draw(st.integers(4, 9))
    sizes = draw(st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=n_tasks * n_strata,
                          max_size=n_tasks * n_strata))
    cells = [(t, j) for t, j in itertools.product(range(n_tasks), range(n_strata))]
    rows = [cell for cell, k in zip(cells, sizes, strict=True) for _ in range(k)]
    order = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in order]
    kind = draw(st.sampled_from(["int", "str", "tuple", "mixed"]))
    label = {"int": lambda j: 100 - 7 * j, "str": lambda j: f"seed{j}", "tuple": lambda j: (j, "x"),
             "mixed": lambda j: j if j % 2 else str(j)}[kind]
    return np.array([t for t, _ in rows]), [label(j) for _, j in rows]


@settings(max_examples=40, deadline=None)
@given(design=_designs(), protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 10**6),
       n_query=st.sampled_from([None, 2, 3]))
def test_split_keeps_strata_in_one_role_and_permutations_keep_cells(design, protocol, seed,
                                                                    n_query):
    tasks, labels = design
    names, codes = np.unique(tasks, return_inverse=True)
    if len(names) < 4 or np.bincount(codes).min() < 2:
        reject()
    try:
        split = make_split(codes, names, protocol, seed, 0.5, 0.6, n_query, strata=labels)
    except ValueError as exc:  # an unbalanced draw the design cannot split: a named reason
        assert "strat" in str(exc) or "without a" in str(exc) or "n_query" in str(exc)
        reject()
    first = {}
    expected = np.array([first.setdefault(v, len(first)) for v in labels])
    np.testing.assert_array_equal(split.strata, expected)  # numbered by first appearance
    s, roles = split.strata, split.blocks
    assert np.array_equal(np.sort(np.concatenate(list(roles.values()))), np.arange(len(codes)))
    role_strata = {role: set(s[idx]) for role, idx in roles.items()}
    assert all(len(v) >= 2 for v in role_strata.values())
    if protocol == "closed-set":  # no test model has a same-stratum sibling in train
        assert not role_strata["train"] & role_strata["test"]
        assert set(codes[roles["train"]]) == set(codes[roles["test"]]) == set(range(len(names)))
    else:  # a query's same-stratum siblings are never in the gallery
        assert not role_strata["query"] & role_strata["gallery"]
        assert not set(codes[roles["train"]]) & set(codes[roles["query"]])
        assert set(codes[roles["query"]]) == set(codes[roles["gallery"]])
        np.testing.assert_array_equal(roles["train"],
                                      np.flatnonzero(np.isin(codes, split.train_classes)))
        held_strata = role_strata["query"] | role_strata["gallery"]
        want = n_query or int(np.clip(round(0.2 * len(held_strata)), 2, len(held_strata) - 2))
        assert len(role_strata["query"]) == want
    perms = permuted_labels(split, 7, seed)
    for role, idx in roles.items():
        assert perms[role].shape == (7, len(idx))
        for stratum in np.unique(s[idx]):
            cell = s[idx] == stratum  # every stratum keeps its per-task counts in each role
            want = np.sort(codes[idx][cell])
            assert all(np.array_equal(np.sort(row[cell]), want) for row in perms[role])


def test_permutations_are_uniform_within_each_cell():
    """Each (role, stratum) cell is permuted uniformly and independently of the others: over
    6000 draws every one of the 6 x 6 joint orders of two 3-model cells is about equally likely."""
    from scipy.stats import chisquare

    codes = np.array([0, 1, 2, 0, 1, 2, 3, 3])
    strata = np.array([0, 0, 0, 1, 1, 1, 2, 3])
    split = Split("closed-set", codes, 4, {"train": np.arange(6), "test": np.arange(6, 8)},
                  np.arange(4), strata)
    rows = permuted_labels(split, 6000, 3)["train"]
    orders = {p: i for i, p in enumerate(itertools.permutations(range(3)))}
    joint = [orders[tuple(r[:3])] * 6 + orders[tuple(r[3:])] for r in rows]
    counts = np.bincount(joint, minlength=36)
    assert chisquare(counts).pvalue > 1e-3 and counts.min() > 0


@settings(max_examples=12, deadline=None)
@given(protocol=st.sampled_from(PROTOCOLS), seed=st.integers(0, 1000),
       kind=st.sampled_from(["str", "tuple", "float", "mixed", "shuffled"]))
def test_result_depends_on_strata_only_through_their_partition(protocol, seed, kind):
    """Relabelling the strata by any one-to-one map (other types, other values) gives the same
    test: statistic, null and extras."""
    X, y, s = _strata_zoo(6, 8, 10, 1.0, 0.5, seed=seed)
    new = np.random.default_rng(seed).permutation(8)  # "shuffled": other integer labels
    relabel = {"str": lambda j: f"init-{j}", "tuple": lambda j: (j, j), "float": lambda j: j + 0.5,
               "mixed": lambda j: (j, "a") if j % 3 == 0 else (str(j) if j % 3 == 1 else j),
               "shuffled": lambda j: int(new[j])}[kind]
    a = htt(X, y, protocol, permutations=9, seed=seed, strata=s)
    b = htt(X, y, protocol, permutations=9, seed=seed, strata=[relabel(j) for j in s])
    assert a.statistic == b.statistic and a.extra == b.extra
    np.testing.assert_array_equal(a.null, b.null)


def test_strata_labels_are_compared_by_value():
    """1, 1.0, True and np.int64(1) are one stratum, "1" another; strata numbered by first
    appearance."""
    codes = np.repeat(np.arange(4), 5)
    labels = [1, "1", 2, 3, 4] + [1.0, "1", 2, 3, 4] + [np.int64(1), "1", 2.0, 3, 4] + \
        [True, "1", 2, 3, np.float32(4)]
    split = make_split(codes, np.arange(4), "closed-set", 0, strata=labels)
    np.testing.assert_array_equal(split.strata, np.tile(np.arange(5), 4))


# ----------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_strata_chunks_fit_and_batched_agree(protocol):
    """With strata: htt's null == its first chunk, batched == a loop of re-fits, a shared fit
    gives the same test, and a fit of the split without strata is refused."""
    X, y, s = _strata_zoo(6, 8, 30, 1.0, 0.4, seed=5)
    kw = dict(permutations=12, seed=7, strata=s)
    res = htt(X, y, protocol, **kw)
    np.testing.assert_array_equal(res.null, htt_null_chunk(X, y, protocol, **kw))
    assert len(np.unique(res.null)) > 3
    naive = HTTOptions(batched=False)
    np.testing.assert_allclose(htt_null_chunk(X, y, protocol, options=naive, **kw), res.null,
                               rtol=0, atol=1e-9)
    fit = htt_prepare(X, y, protocol, 7, strata=s)
    shared = htt(X, y, protocol, fit=fit, **kw)
    assert shared.statistic == res.statistic
    np.testing.assert_array_equal(shared.null, res.null)
    with pytest.raises(ValueError, match="another split"):
        htt(X, y, protocol, fit=htt_prepare(X, y, protocol, 7), **kw)
    other = htt_null_chunk(X, y, protocol, permutations=12, seed=(7, 1), split_seed=7, strata=s)
    assert not np.array_equal(other, res.null)


def test_extra_records_the_design():
    X, y, s = _strata_zoo(6, 10, 12, 1.0, 0.5)
    closed = htt(X, y, "closed-set", permutations=9, strata=s)
    assert closed.extra["strata"] == 10
    assert closed.extra["n_train_strata"] == 6 and closed.extra["n_test_strata"] == 4
    assert closed.extra["n_train"] == 36 and closed.extra["n_test"] == 24
    assert closed.extra["null"] == "labels permuted within each (role, stratum) cell of the " \
        "fixed split"
    opened = htt(X, y, "open-set", permutations=9, strata=s)
    assert opened.extra["n_query_strata"] == 2 and opened.extra["n_gallery_strata"] == 8
    assert opened.extra["n_query"] == 2 * 2 and opened.extra["n_gallery"] == 2 * 8
    assert "strata" not in htt(X, y, "closed-set", permutations=9).extra


# ----------------------------------------------------------------------------- errors


def _bad(protocol="closed-set", n_strata=6, **over):
    """htt's keyword arguments with `over`: HTTOptions' fields go into options=."""
    X, y, s = _strata_zoo(6, n_strata, 5, 1.0, 0.0)
    kw = dict(features=X, tasks=y, protocol=protocol, permutations=9, strata=s)
    fields = {f.name for f in dataclasses.fields(HTTOptions)}
    kw.update({k: v for k, v in over.items() if k not in fields})
    kw["options"] = HTTOptions(**{k: v for k, v in over.items() if k in fields})
    return kw


_S = list(np.tile(np.arange(6), 6))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (_bad(strata=_S[:-1]), ValueError, r"one label per row of features \(36\), got 35"),
        (_bad(strata=np.zeros((36, 1))), ValueError, r"got shape \(36, 1\)"),
        (_bad(strata="abc"), TypeError, "strata must be an array-like.*got str"),
        (_bad(strata=5), TypeError, "got int"),
        (_bad(strata=[*_S[:-1], [1, 2]]), TypeError,
         r"hashable labels, got \[1, 2\] at position 35"),
        (_bad(strata=[*_S[:-1], None]), ValueError, r"strata\[35\] is None"),
        (_bad(strata=[*_S[:-1], float("nan")]), ValueError, r"strata\[35\] is nan"),
        (_bad(n_strata=3), ValueError, "at least 4 strata \\(2 train, 2 test\\), got 3"),
        (_bad("open-set", n_strata=3), ValueError, "at least 4 strata among the held-out"),
        (_bad("open-set", n_query=1), ValueError, r"n_query=1 query strata.*\[2, 4\]"),
        (_bad("open-set", n_query=5), ValueError, r"n_query=5 query strata"),
        (_bad(strata=np.arange(36)), ValueError, "cannot move a label.*strata=None"),
        # task 0's models all in stratum 0: no test model for it with this seed's split
        (_bad(strata=[0] * 6 + _S[6:], seed=1), ValueError, "task 0 without a (train|test) model"),
    ],
)
def test_strata_errors_name_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        htt(**kwargs)
