"""Hypothesis-training-testing: calibration, power, batched == naive re-fits, chance, errors."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.stats import (
    PROTOCOLS,
    HTTOptions,
    HTTResult,
    expected_ap,
    expected_cmc,
    htt,
    htt_null_chunk,
    htt_prepare,
    hypothesis_training,
    linear_embedding,
)
from distsim.stats.htt_split import make_split, permuted_labels


def _zoo(n_tasks, n_seeds, dim, effect, seed=0, rank=None):
    """Features (N, dim) with task means of size `effect` (in a rank-`rank` subspace if given)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_tasks), n_seeds)
    if rank is None:
        means = rng.normal(size=(n_tasks, dim))
    else:
        means = rng.normal(size=(n_tasks, rank)) @ rng.normal(size=(rank, dim)) / np.sqrt(rank)
    return rng.normal(size=(len(labels), dim)) + effect * means[labels], labels


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    ("protocol", "n_tasks", "n_seeds"),
    # open-set with 4 tasks: 2 training tasks, a 1-D embedding, cosines of +-1, so every score
    # ties; calibrated only if ties break in a label-independent order (zoos are stored by task)
    [("closed-set", 5, 8), ("open-set", 6, 8), ("open-set", 4, 20)],
)
def test_null_calibration(protocol, n_tasks, n_seeds):
    """Features independent of labels: P(p <= 0.05) over 120 replicates lies in [0.01, 0.10]."""
    pvals, null_means, chances = [], [], []
    for rep in range(120):
        X, y = _zoo(n_tasks, n_seeds, 16, effect=0.0, seed=1000 + rep)
        res = htt(X, y, protocol, permutations=39, seed=rep)
        pvals.append(res.p_value)
        null_means.append(res.null_mean)
        chances.append(res.chance)
    pvals = np.array(pvals)
    assert 0.01 <= np.mean(pvals <= 0.05) <= 0.10
    assert 0.25 <= np.mean(pvals <= 0.5) <= 0.75  # not degenerate at either end
    # the permutation null sits at the analytic chance level
    assert abs(np.mean(null_means) - np.mean(chances)) < 0.02


# ----------------------------------------------------------------------------- power


def test_closed_set_clear_effect_reaches_floor():
    X, y = _zoo(8, 10, 50, effect=1.0)
    res = htt(X, y, "closed-set", permutations=99, seed=1)
    assert isinstance(res, HTTResult) and res.metric == "accuracy"
    assert res.statistic >= 0.95
    assert res.p_value == pytest.approx(1 / 100)
    assert res.chance == pytest.approx(1 / 8)
    assert abs(res.null_mean - 1 / 8) < 0.05
    assert res.effect_size > 5
    assert res.null.shape == (99,) and res.permutations == 99
    assert res.extra["n_train"] == 8 * 6 and res.extra["n_test"] == 8 * 4


def test_open_set_clear_effect_reaches_floor():
    # held-out tasks share the training tasks' subspace, so a learned projection generalizes
    X, y = _zoo(12, 10, 40, effect=3.0, rank=3)
    res = htt(X, y, "open-set", permutations=49, seed=2, options=HTTOptions(n_query=2))
    assert res.metric == "mAP"
    assert res.statistic >= 0.9
    assert res.p_value == pytest.approx(1 / 50)
    assert res.extra["cmc@1"] >= 0.9 and res.extra["cmc@10"] == 1.0
    assert res.extra["n_train_tasks"] == 7 and res.extra["n_query"] == 5 * 2
    assert res.chance < 0.5 and res.extra["chance_cmc@1"] == pytest.approx(0.2)


def test_softmax_learner_finds_clear_effect():
    X, y = _zoo(6, 10, 40, effect=1.0, seed=3)
    softmax = HTTOptions(learner="softmax")
    res = htt(X, y, "closed-set", permutations=29, seed=0, options=softmax)
    assert res.statistic >= 0.95
    assert res.p_value == pytest.approx(1 / 30)
    assert res.extra["learner"] == "softmax" and res.extra["tol"] == 1e-4
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        htt(X, y, "closed-set", permutations=29, seed=0,
            options=dataclasses.replace(softmax, max_iter=1))


# ----------------------------------------------------------------------------- batched == naive


@pytest.mark.parametrize("learner", ["lda", "softmax"])
@pytest.mark.parametrize(
    ("protocol", "k"), [("closed-set", None), ("closed-set", 2), ("open-set", None)]
)
def test_batched_null_equals_loop_of_full_refits(protocol, learner, k):
    """The batched learner gives the same statistic as a full re-fit, permutation by permutation."""
    X, y = _zoo(6, 8, 30, effect=0.4, seed=5)
    kw = dict(protocol=protocol, permutations=12, seed=7)
    opts = HTTOptions(learner=learner, k=k)
    naive_opts = dataclasses.replace(opts, batched=False)
    batched = htt_null_chunk(X, y, options=opts, **kw)
    naive = htt_null_chunk(X, y, options=naive_opts, **kw)
    assert batched.shape == (12,)
    assert len(np.unique(batched)) > 3  # the statistic varies over permutations
    np.testing.assert_allclose(batched, naive, rtol=0, atol=1e-9)
    a = htt(X, y, options=opts, **kw)
    b = htt(X, y, options=naive_opts, **kw)
    assert a.statistic == pytest.approx(b.statistic, abs=1e-9) and a.p_value == b.p_value


# ----------------------------------------------------------------------------- primal == dual


@settings(max_examples=20, deadline=None)
@given(
    n_tasks=st.integers(4, 6),
    n_seeds=st.integers(3, 8),
    dim=st.integers(2, 60),
    protocol=st.sampled_from(PROTOCOLS),
    learner=st.sampled_from(["lda", "softmax"]),
    seed=st.integers(0, 1000),
)
def test_primal_equals_dual(n_tasks, n_seeds, dim, protocol, learner, seed):
    """The D x D (primal) and n x n (dual) bases give the same embeddings (1e-8), hence the same
    statistics, on both sides of n = D and for rank-deficient features."""
    rank = min(dim, 3) if seed % 2 else None
    X, y = _zoo(n_tasks, n_seeds, dim, effect=0.5, seed=seed, rank=rank)
    kw = dict(protocol=protocol, permutations=5, seed=seed)
    opts = HTTOptions(learner=learner, n_query=1, tol=1e-10)
    names, codes = np.unique(y, return_inverse=True)
    split = make_split(codes, names, protocol, seed, n_query=1)
    tr, ev = split.blocks["train"], split.eval_rows()
    Y = np.eye(len(split.train_classes))[np.searchsorted(split.train_classes, codes[tr])][None]
    emb = {
        solve: linear_embedding.embed(X, tr, ev, Y, learner, ridge=1.0, k=None, tol=1e-10,
                                      solve=solve)
        for solve in ("primal", "dual")
    }
    scale = np.abs(emb["dual"][1]).max()
    np.testing.assert_allclose(emb["primal"][0], emb["dual"][0], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(emb["primal"][1], emb["dual"][1], rtol=0, atol=1e-8 * scale)
    primal, dual = (dataclasses.replace(opts, solve=solve) for solve in ("primal", "dual"))
    np.testing.assert_allclose(htt_null_chunk(X, y, options=primal, **kw),
                               htt_null_chunk(X, y, options=dual, **kw), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("tol", "atol"), [(1e-9, 1e-6), (1e-5, 1e-6)])
def test_softmax_reaches_the_penalized_optimum(tol, atol):
    """The batched softmax stops at the minimum of mean cross-entropy + lam/2 ||W||^2 over W
    (D, C), found independently by scipy's L-BFGS in the original coordinates. tol = 1e-5 stops
    in the refined pass (float32 GEMMs on float64 corrections), 1e-9 in plain float64."""
    from scipy.optimize import minimize

    X, y = _zoo(5, 8, 70, effect=0.4, seed=2)  # D = 70 > n = 24: the dual basis
    names, codes = np.unique(y, return_inverse=True)
    split = make_split(codes, names, "closed-set", 0)
    tr, ev = split.blocks["train"], split.eval_rows()
    Y = np.eye(5)[codes[tr]]
    Z = linear_embedding._standardize(X, tr)
    Xtr = Z[tr]
    n = len(Xtr)
    lam = float((Xtr**2).sum()) / n**2

    def objective(w):
        W = w.reshape(-1, 5)
        logits = Xtr @ W
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        total = p.sum(axis=1)
        f = np.mean(np.log(total) - (logits * Y).sum(axis=1)) + 0.5 * lam * (W**2).sum()
        return f, (Xtr.T @ (p / total[:, None] - Y) / n + lam * W).ravel()

    w = minimize(objective, np.zeros(70 * 5), jac=True, method="L-BFGS-B",
                 options={"gtol": 1e-12, "ftol": 0, "maxiter": 10_000}).x.reshape(-1, 5)
    ztr, zev = linear_embedding.embed(X, tr, ev, Y[None], "softmax", ridge=1.0, k=None, tol=tol)
    np.testing.assert_allclose(ztr[0], Xtr @ w, rtol=0, atol=atol * np.abs(Xtr @ w).max())
    np.testing.assert_allclose(zev[0], Z[ev] @ w, rtol=0, atol=atol * np.abs(Z[ev] @ w).max())


def test_shared_fit_gives_the_same_test_and_rejects_another_split():
    X, y = _zoo(5, 6, 12, effect=0.3, seed=8)
    softmax = HTTOptions(learner="softmax")
    fit = htt_prepare(X, y, "closed-set", 4, options=softmax)
    a = htt(X, y, permutations=9, seed=4, options=softmax)
    b = htt(X, y, permutations=9, seed=4, options=softmax, fit=fit)
    np.testing.assert_array_equal(a.null, b.null)
    assert a.statistic == b.statistic and a.extra["rank"] == b.extra["rank"] == 12
    with pytest.raises(ValueError, match="another split"):
        htt(X, y, permutations=9, seed=5, options=softmax, fit=fit)
    with pytest.raises(ValueError, match="another split"):
        htt(X, y, permutations=9, seed=4, options=HTTOptions(learner="lda"), fit=fit)


@settings(max_examples=15, deadline=None)
@given(
    n_tasks=st.integers(4, 6),
    n_seeds=st.integers(3, 6),
    dim=st.integers(2, 40),
    protocol=st.sampled_from(PROTOCOLS),
    ridge=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    seed=st.integers(0, 1000),
)
def test_batched_lda_equals_refits_property(n_tasks, n_seeds, dim, protocol, ridge, seed):
    """Batched == re-fits also for D < n (rank-deficient Gram) and weak/strong ridge."""
    X, y = _zoo(n_tasks, n_seeds, dim, effect=0.5, seed=seed)
    kw = dict(protocol=protocol, permutations=6, seed=seed)
    opts = HTTOptions(ridge=ridge, n_query=1)
    naive = dataclasses.replace(opts, batched=False)
    np.testing.assert_allclose(htt_null_chunk(X, y, options=opts, **kw),
                               htt_null_chunk(X, y, options=naive, **kw), rtol=0, atol=1e-9)


def test_chunks_combine_into_htt_null(monkeypatch):
    X, y = _zoo(5, 6, 12, effect=0.3, seed=8)
    res = htt(X, y, permutations=20, seed=4)
    np.testing.assert_array_equal(res.null, htt_null_chunk(X, y, permutations=20, seed=4))
    other = htt_null_chunk(X, y, permutations=20, seed=5, split_seed=4)
    assert not np.array_equal(other, res.null)  # another chunk: fresh permutations, same split
    pair = htt_null_chunk(X, y, permutations=20, seed=(4, 1), split_seed=4)
    assert not np.array_equal(pair, res.null) and not np.array_equal(pair, other)
    monkeypatch.setattr(hypothesis_training, "CHUNK_BYTES", 1)  # one permutation per internal chunk
    np.testing.assert_array_equal(res.null, htt_null_chunk(X, y, permutations=20, seed=4))


def test_deterministic_and_label_types():
    X, y = _zoo(6, 6, 10, effect=0.5, seed=9)
    names = [f"digits:{t}" for t in y]  # sorts like the integer codes
    a = htt(X, y, "open-set", permutations=15, seed=3)
    b = htt(X, names, "open-set", permutations=15, seed=3)
    assert a.statistic == b.statistic and a.p_value == b.p_value
    np.testing.assert_array_equal(a.null, b.null)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.statistic = 1.0


# ----------------------------------------------------------------------------- split & permutations


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(2, 7), min_size=4, max_size=7),
    protocol=st.sampled_from(PROTOCOLS),
    seed=st.integers(0, 10**6),
)
def test_permutations_keep_roles_and_counts(counts, protocol, seed):
    codes = np.repeat(np.arange(len(counts)), counts)
    names = np.arange(len(counts))
    split = make_split(codes, names, protocol, seed, 0.6, 0.6, None)
    roles = split.blocks
    assert np.array_equal(np.sort(np.concatenate(list(roles.values()))), np.arange(len(codes)))
    if protocol == "closed-set":  # every task on both sides
        assert set(codes[roles["train"]]) == set(codes[roles["test"]]) == set(names)
    else:  # disjoint task sets; every held-out task has a query and a gallery
        assert not set(codes[roles["train"]]) & set(codes[roles["query"]])
        assert set(codes[roles["query"]]) == set(codes[roles["gallery"]])
    perms = permuted_labels(split, 5, seed)
    for role, idx in roles.items():
        assert perms[role].shape == (5, len(idx))
        for row in perms[role]:  # a permutation within the block: same per-task counts
            assert np.array_equal(np.sort(row), np.sort(codes[idx]))


# ----------------------------------------------------------------------------- chance levels


@settings(max_examples=30, deadline=None)
@given(g=st.integers(2, 9), data=st.data())
def test_expected_ap_and_cmc_are_exact(g, data):
    """E[AP] and P(hit in top r) under a random ranking, against enumeration of all rankings."""
    r = data.draw(st.integers(1, g))
    aps, hits = [], {rank: [] for rank in (1, 3)}
    for pos in itertools.combinations(range(1, g + 1), r):  # relevant ranks, all equally likely
        aps.append(np.mean([(i + 1) / p for i, p in enumerate(pos)]))
        for rank in hits:
            hits[rank].append(pos[0] <= rank)
    assert expected_ap(r, g) == pytest.approx(np.mean(aps), rel=1e-12)
    for rank in hits:
        assert expected_cmc(r, g, rank) == pytest.approx(np.mean(hits[rank]), rel=1e-12)


# ----------------------------------------------------------------------------- errors


def _bad(**over):
    """htt's keyword arguments with `over`: HTTOptions' fields go into options=."""
    X, y = _zoo(4, 4, 5, effect=0.0)
    kw = dict(features=X, tasks=y, protocol="closed-set", permutations=9)
    fields = {f.name for f in dataclasses.fields(HTTOptions)}
    kw.update({k: v for k, v in over.items() if k not in fields})
    kw["options"] = HTTOptions(**{k: v for k, v in over.items() if k in fields})
    return kw


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (_bad(features=np.zeros(16)), ValueError, "2-D"),
        (_bad(features=np.full((16, 5), np.nan)), ValueError, "finite"),
        (_bad(features=np.zeros((16, 5), dtype=complex)), TypeError, "real"),
        (_bad(tasks=np.zeros(15)), ValueError, "one label per row"),
        (_bad(protocol="closed"), ValueError, "protocol"),
        (_bad(learner="svm"), ValueError, "learner"),
        (_bad(permutations=0), ValueError, "permutations must be >= 1"),
        (_bad(permutations=9.0), TypeError, "permutations"),
        (_bad(tasks=np.zeros(16)), ValueError, "at least 2 tasks"),
        (_bad(protocol="open-set", tasks=np.repeat(np.arange(3), [6, 5, 5])), ValueError,
         "at least 4 tasks"),
        (_bad(tasks=np.r_[np.repeat(np.arange(3), 5), 7]), ValueError, "task 7 has 1"),
        (_bad(train_fraction=1.0), ValueError, "train_fraction"),
        (_bad(protocol="open-set", train_task_fraction=0.0), ValueError, "train_task_fraction"),
        (_bad(protocol="open-set", n_query=4), ValueError, "n_query=4 leaves no gallery"),
        (_bad(k=4), ValueError, r"k must be None or an int in \[1, 3\]"),
        (_bad(ridge=-1.0), ValueError, "ridge"),
        (_bad(learner="softmax", max_iter=0), ValueError, "max_iter"),
        (_bad(learner="softmax", tol=0.0), ValueError, "tol"),
        (_bad(solve="qr"), ValueError, "solve must be one of"),
        (_bad(seed=-1), ValueError, "seed"),
        (_bad(features=np.ones((16, 5))), ValueError, "constant over the training solutions"),
    ],
)
def test_errors_name_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        htt(**kwargs)


def test_null_chunk_allows_zero_permutations():
    X, y = _zoo(4, 4, 5, effect=0.0)
    assert htt_null_chunk(X, y, permutations=0).shape == (0,)



def test_retrieval_scores_do_not_depend_on_the_query_blocks(monkeypatch):
    """Queries scored in blocks (bounded memory at any q x g) give the same mAP and CMC."""
    from distsim.stats import scoring

    rng = np.random.default_rng(3)
    Zq, Zg = rng.normal(size=(3, 17, 4)), rng.normal(size=(3, 40, 4))
    yq, yg = rng.integers(0, 4, (3, 17)), rng.integers(0, 4, (3, 40))
    whole = scoring.retrieval_scores(Zq, Zg, yq, yg)
    monkeypatch.setattr(scoring, "QUERY_BLOCK_BYTES", 56 * 3 * 40 * 2)  # blocks of 2 queries
    blocked = scoring.retrieval_scores(Zq, Zg, yq, yg)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])


def _ranked_reference(Zq, Zg, yq, yg):
    """mAP and CMC of one labelling, query by query: cosines rounded to 10 decimals, ranked by a
    stable sort (ties keep the gallery's order)."""
    unit = lambda Z: Z / np.linalg.norm(Z, axis=-1, keepdims=True)  # noqa: E731
    aps, cmc = [], []
    for z, label in zip(unit(Zq), yq, strict=True):
        order = np.argsort(-np.round(unit(Zg) @ z, 10), kind="stable")
        rel = yg[order] == label
        ranks = np.flatnonzero(rel) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        cmc.append([ranks[0] <= r for r in (1, 5, 10)])
    return np.mean(aps), np.mean(cmc, axis=0)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 3), q=st.integers(1, 6), g=st.integers(2, 30), seed=st.integers(0, 999))
def test_retrieval_scores_equal_a_query_by_query_ranking(k, q, g, seed):
    """Batched mAP and CMC equal a per-query stable ranking, ties included (k = 1: every cosine
    is +-1), and mAP equals scikit-learn's average precision when no scores tie."""
    from sklearn.metrics import average_precision_score

    from distsim.stats import scoring

    rng = np.random.default_rng(seed)
    Zq, Zg = rng.normal(size=(2, q, k)), rng.normal(size=(2, g, k))
    yq = rng.integers(0, 3, (2, q))
    yg = np.concatenate([yq[:, :1], rng.integers(0, 3, (2, g - 1))], axis=1)  # a hit for query 0
    relevant = (yq[:, :, None] == yg[:, None, :]).any(axis=2)
    Zq, yq = Zq[:, relevant.all(axis=0)], yq[:, relevant.all(axis=0)]  # queries with a hit
    mean_ap, cmc = scoring.retrieval_scores(Zq, Zg, yq, yg)
    for b in range(2):
        ref_ap, ref_cmc = _ranked_reference(Zq[b], Zg[b], yq[b], yg[b])
        assert mean_ap[b] == pytest.approx(ref_ap, abs=1e-12)
        np.testing.assert_allclose(cmc[b], ref_cmc, atol=1e-12)
        if k > 1:  # continuous scores: no ties
            cos = (Zq[b] / np.linalg.norm(Zq[b], axis=1, keepdims=True)) @ (
                Zg[b] / np.linalg.norm(Zg[b], axis=1, keepdims=True)).T
            sk = np.mean([average_precision_score(yg[b] == y, c) for y, c in
                          zip(yq[b], cos, strict=True)])
            assert mean_ap[b] == pytest.approx(sk, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 999), drift=st.sampled_from([0.0, 1e-4, 1e-3, 5e-3, 0.05, 0.5]))
def test_refined_softmax_objective_keeps_float64_accuracy(seed, drift):
    """The softmax's second pass (float32 GEMMs on the corrections to a float64 base point)
    gives the float64 objective to 1e-9 and gradient to 5e-9, where float32 GEMMs are off by
    1e-8 and 2e-7,
    near its base and, by re-basing, far from it."""
    rng = np.random.default_rng(seed)
    n, r, C, B, lam = 200, 40, 5, 3, 0.01
    F = rng.normal(size=(n, r)) * np.linspace(3, 0.1, r)
    Y = np.eye(C)[rng.integers(0, C, (B, n))]
    beta0 = rng.normal(size=(B, r, C))
    codes = Y.argmax(axis=-1)
    objective = linear_embedding._refined(F, F.astype(np.float32), codes, beta0, lam)
    for _ in range(2):  # the second call starts from the bases the first may have moved
        beta = beta0 + drift * rng.normal(size=beta0.shape)
        value, grad = objective(np.arange(B), beta)
        ref_value, ref_grad = linear_embedding._softmax_value_grad(F, codes, np.arange(B), beta,
                                                                   lam)
        scale = np.linalg.norm(ref_grad - lam * beta) + np.linalg.norm(lam * beta)
        np.testing.assert_allclose(value, ref_value, rtol=1e-9)  # float32 GEMMs: 1e-8
        assert np.linalg.norm(grad - ref_grad) < 5e-9 * scale
