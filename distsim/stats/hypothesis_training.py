"""Hypothesis-training-testing (HTT): learn a linear weight representation, test it, permute.

The statistic is *trained* on one part of a zoo and *tested* on another (arXiv 2208.04369):

- closed-set: per task, solutions are split into train/test; a projection z = A phi(w) is learned
  on the training solutions; the statistic is the accuracy of assigning each held-out solution to
  the task whose training centroid is nearest in cosine (chance 1/tasks).
- open-set: tasks are split into training and held-out tasks; A is learned on the training tasks;
  each held-out task's solutions are split into query and gallery; embeddings are L2-normalised,
  scored by dot product; the statistic is mAP (CMC rank 1/5/10 in ``extra``).

The learners (``"lda"``: ridge regression onto task indicators, i.e. regularized LDA;
``"softmax"``: multinomial logistic regression, as in the paper) are in
distsim.stats.linear_embedding, the statistics and their chance levels in distsim.stats.scoring.

Null: labels are permuted *within* each role block of the split (train/test; open-set:
train/query/gallery). This is "permute the labels, then split each task by position": the
positions keep their roles and every permuted task keeps its per-role counts, so it is the
permutation null conditional on the observed partition of positions into roles, which is exact
under H0 (solutions exchangeable across tasks). Because the training positions do not change,
standardization and the basis of the training rows' span (distsim.stats.linear_embedding:
primal D x D when there are more training rows than features, dual n x n otherwise) are shared
by all permutations and the learners run batched; ``HTTOptions(batched=False)`` runs the
same test as a loop of full re-fits (the reference).

Strata (``strata=``, e.g. the init seed of each model when model i of every task starts from the
same initial weights): the split is by stratum and the null permutes within (role, stratum)
cells; see distsim.stats.htt_split.

Chance: closed-set 1/tasks; open-set the exact expected mAP of a uniformly random ranking of
that query/gallery structure, averaged over queries (likewise the CMC chance in ``extra``).
Ties: the gallery is stored in a seeded random order and sorted stably, so tied scores (e.g. a
1-D embedding from 2 training tasks) break in an order independent of the labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distsim.config.choices import LEARNERS, PROTOCOLS
from distsim.stats.htt_split import (
    MIN_TASKS,
    Split,
    chance_levels,
    make_split,
    observed_labels,
    permuted_labels,
)
from distsim.stats.linear_embedding import MEMORY, SOLVES, Fit, embed, prepare_fit
from distsim.stats.permutation import SeedLike, p_value
from distsim.stats.scoring import (
    CMC_RANKS,
    centroid_accuracy,
    retrieval_scores,
)

# Working memory per chunk of permutations. Lower it to bound memory; the null does not depend
# on it (each permutation is evaluated on its own).
CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class HTTResult:
    """Outcome of one HTT: observed statistic, its permutation null (B,) and the p-value."""

    statistic: float
    metric: str  # "accuracy" (closed-set) or "mAP" (open-set)
    chance: float
    null_mean: float
    null_sd: float
    effect_size: float  # (statistic - null_mean) / null_sd
    p_value: float
    permutations: int
    null: np.ndarray = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HTTOptions:
    """How an HTT splits and learns, the same for every call of one test (`htt`,
    `htt_null_chunk`, `htt_prepare`); the defaults are the paper's.

    Split: ``train_fraction`` of each task's solutions train (closed-set; paper 60/40);
    ``train_task_fraction`` of the tasks train (open-set; paper 30 of 50), each held-out task
    giving ``n_query`` queries (default 20% of its solutions) and the rest gallery.
    Learner: ``"lda"`` (ridge regression onto task indicators) or ``"softmax"``; ``k``:
    embedding dims (default all, training tasks - 1); ``ridge``: relative L2 strength;
    ``tol``, ``max_iter``: the softmax runs until every fit's step is below tol of its weights
    (at most max_iter steps); ``solve``: "primal" (D x D, no n x n array), "dual" (n x n) or
    "auto" (the smaller; the same result to rounding); ``batched=False``: a loop of full
    re-fits (the reference; the same values). ``strata_split``: how strata enter the split
    (``make_split``): "stratum" (the strata are units split between the roles: init seeds) or
    "cell" (each (task, stratum) cell is split: strata that are another factor's cells).
    ``backend``: where the batched fits run (distsim.stats.backend: "numpy", "torch", "auto";
    the same statistics). Checked when a test runs (k against its tasks).

    >>> HTTOptions()  # doctest: +NORMALIZE_WHITESPACE
    HTTOptions(learner='lda', train_fraction=0.6, train_task_fraction=0.6, n_query=None,
               k=None, ridge=1.0, tol=0.0001, max_iter=1000, solve='auto', batched=True,
               strata_split='stratum', backend='numpy')
    >>> import dataclasses
    >>> softmax = HTTOptions(learner="softmax", k=1)
    >>> dataclasses.replace(softmax, ridge=10.0).ridge, softmax.ridge  # frozen: a changed copy
    (10.0, 1.0)
    """

    learner: str = "lda"
    train_fraction: float = 0.6
    train_task_fraction: float = 0.6
    n_query: int | None = None
    k: int | None = None
    ridge: float = 1.0
    tol: float = 1e-4
    max_iter: int = 1000
    solve: str = "auto"
    batched: bool = True
    strata_split: str = "stratum"
    backend: str = "numpy"


# ----------------------------------------------------------------------------- validation & split


def _check_inputs(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str,
    learner: str,
    permutations: int,
    min_permutations: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate -> (float features (N, D), sorted task names (T,), task codes (N,) int64).

    Float features keep their dtype (no copy per chunk: a shared fit does not read them);
    `training_basis` computes in float64."""
    X = np.asarray(features)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise TypeError(f"features must be real numbers, got dtype {X.dtype}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError("features contain NaN or inf values; all entries must be finite")
    labels = np.asarray(tasks)
    if labels.ndim != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(
            f"tasks must be 1-D with one label per row of features ({X.shape[0]}), "
            f"got shape {labels.shape}"
        )
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if learner not in LEARNERS:
        raise ValueError(f"learner must be one of {LEARNERS}, got {learner!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, (int, np.integer)):
        raise TypeError(f"permutations must be an int, got {permutations!r}")
    if permutations < min_permutations:
        raise ValueError(f"permutations must be >= {min_permutations}, got {permutations}")
    names, codes = np.unique(labels, return_inverse=True)
    n_tasks = len(names)
    min_tasks = MIN_TASKS[protocol]
    if n_tasks < min_tasks:
        raise ValueError(f"{protocol} HTT needs at least {min_tasks} tasks, got {n_tasks}")
    counts = np.bincount(codes, minlength=n_tasks)
    if counts.min() < 2:
        bad = names[int(np.argmin(counts))].item()
        raise ValueError(
            f"every task needs at least 2 solutions to split, task {bad!r} has {counts.min()}"
        )
    return X, names, codes.astype(np.int64)


# ----------------------------------------------------------------------------- batched evaluation


def _one_hot(codes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(B, n) codes -> (B, n, C) float one-hot over `classes` (sorted codes)."""
    col = np.searchsorted(classes, codes)
    return (col[..., None] == np.arange(len(classes))).astype(np.float64)


def _prepare(X: np.ndarray, split: Split, how: HTTOptions, fit: Fit | None = None) -> Fit:
    """The fit shared by every permutation: `fit` when given (checked to be this split's and
    learner's, from `htt_prepare`), else computed."""
    if fit is None:
        return prepare_fit(X, split.blocks["train"], split.eval_rows(), how.learner, how.ridge,
                           how.solve)
    if (fit.learner, fit.ridge) != (how.learner, how.ridge) or not (
        np.array_equal(fit.train_idx, split.blocks["train"])
        and np.array_equal(fit.eval_idx, split.eval_rows())
    ):
        raise ValueError("fit was prepared for another split, learner or ridge; make it with "
                         "htt_prepare and the same arguments")
    if how.solve not in ("auto", fit.basis.solve):
        raise ValueError(f"fit has solve={fit.basis.solve!r}, asked for {how.solve!r}")
    return fit


def _evaluate(
    X: np.ndarray,
    split: Split,
    labels: dict[str, np.ndarray],
    how: HTTOptions,
    fit: Fit | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Statistic (B,) and, for open-set, CMC (B, 3) for B label assignments {role: (B, n_role)}."""
    ytr = labels["train"]
    Ztr, Zev = embed(
        X,
        split.blocks["train"],
        split.eval_rows(),
        _one_hot(ytr, split.train_classes),
        how.learner,
        ridge=how.ridge,
        k=how.k,
        tol=how.tol,
        max_iter=how.max_iter,
        solve=how.solve,
        batched=how.batched,
        fit=fit,
        train=split.protocol == "closed-set",  # open-set scores the evaluation rows only
        backend=how.backend,
    )
    if split.protocol == "closed-set":
        return centroid_accuracy(Ztr, Zev, ytr, labels["test"], split.n_tasks), None
    n_q = len(split.blocks["query"])
    return retrieval_scores(Zev[:, :n_q], Zev[:, n_q:], labels["query"], labels["gallery"])


def _check_options(split: Split, how: HTTOptions) -> None:
    ridge, k, tol, max_iter = how.ridge, how.k, how.tol, how.max_iter
    if not (isinstance(ridge, (int, float, np.floating)) and np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
    if not (isinstance(tol, (int, float, np.floating)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if how.solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {how.solve!r}")
    n_classes = len(split.train_classes)
    if k is not None and (
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes - 1
    ):
        raise ValueError(
            f"k must be None or an int in [1, {n_classes - 1}] (training tasks - 1), got {k!r}"
        )


def _setup(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str,
    permutations: int,
    min_permutations: int,
    split_seed: SeedLike,
    how: HTTOptions,
    strata: Sequence[Hashable] | np.ndarray | None = None,
) -> tuple[np.ndarray, Split]:
    """Validate everything, split -> (float features (N, D), split)."""
    X, names, codes = _check_inputs(
        features, tasks, protocol, how.learner, permutations, min_permutations
    )
    split = make_split(codes, names, protocol, split_seed, how.train_fraction,
                       how.train_task_fraction, how.n_query, strata, how.strata_split)
    _check_options(split, how)
    if np.ptp(X[split.blocks["train"]], axis=0).max() == 0:
        raise ValueError("features are constant over the training solutions: nothing to learn")
    return X, split


def _null(
    X: np.ndarray,
    split: Split,
    permutations: int,
    seed: SeedLike,
    how: HTTOptions,
    fit: Fit | None = None,
) -> np.ndarray:
    """(permutations,) statistics under `permuted_labels`, in chunks of about CHUNK_BYTES."""
    labels = permuted_labels(split, permutations, seed)
    n_eval = sum(len(v) for r, v in split.blocks.items() if r != "train")
    n_train, n_cls = len(split.blocks["train"]), len(split.train_classes)
    per_perm = 8 * (4 * (n_train + n_eval) * max(n_cls, split.n_tasks) + n_train * n_cls * 4)
    if how.batched:
        fit = _prepare(X, split, how, fit)
        if how.learner == "softmax":  # L-BFGS's step pairs, (r, C) each
            per_perm += 8 * 2 * MEMORY * len(fit.basis.s2) * n_cls
    chunk = max(1, CHUNK_BYTES // per_perm)
    out = np.empty(permutations)
    for start in range(0, permutations, chunk):
        part = {role: y[start : start + chunk] for role, y in labels.items()}
        out[start : start + chunk] = _evaluate(X, split, part, how, fit)[0]
    return out


# ----------------------------------------------------------------------------- entry points


def htt_prepare(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str = "closed-set",
    seed: SeedLike = 0,
    *,
    options: HTTOptions | None = None,
    strata: Sequence[Hashable] | np.ndarray | None = None,
) -> Fit:
    """The label-independent part of an HTT's learner for the split of `seed`: the basis of the
    training rows (n, r) and the evaluation rows in it (m, r), r <= min(n, D). Pass it as
    ``fit=`` to `htt` / `htt_null_chunk` calls with the same split, learner and ridge, so that
    chunks of one test compute it once (the tests stage ships it to every chunk); with the
    same `strata` too (they change the split). Of `options` (default ``HTTOptions()``) it reads
    the split, learner, ridge and solve; k, tol, max_iter and batched do not change it.

    >>> import numpy as np
    >>> tasks = np.repeat(np.arange(3), 6)  # 3 tasks x 6 models, 5 features
    >>> X = np.random.default_rng(0).normal(size=(18, 5)) + 2 * np.eye(5)[tasks]
    >>> fit = htt_prepare(X, tasks, "closed-set", seed=0)
    >>> fit.basis.solve, len(fit.basis.s2)  # 12 training rows > 5 features: the D x D basis
    ('primal', 5)
    >>> shared = htt(X, tasks, "closed-set", permutations=9, seed=0, fit=fit)
    >>> bool(np.array_equal(shared.null, htt(X, tasks, "closed-set", permutations=9).null))
    True
    """
    how = options if options is not None else HTTOptions()
    how = replace(how, k=None, tol=1e-5, max_iter=1, batched=True)  # the fit does not read them
    X, split = _setup(features, tasks, protocol, 1, 0, seed, how, strata)
    return _prepare(X, split, how)


def htt_null_chunk(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str = "closed-set",
    permutations: int = 199,
    seed: SeedLike = 0,
    *,
    options: HTTOptions | None = None,
    split_seed: SeedLike | None = None,
    fit: Fit | None = None,
    strata: Sequence[Hashable] | np.ndarray | None = None,
) -> np.ndarray:
    """Null statistics (B,) for one chunk of label permutations; features (N, D), tasks (N,).

    `seed` seeds the permutations of this chunk, `split_seed` (default: `seed`) the train/test
    split. Chunks that share `split_seed` but differ in `seed` combine into one null: e.g.
    ``htt(..., seed=s)`` plus chunks ``seed=(s, i), split_seed=s`` for i = 1, 2, ..., then
    ``p_value(result.statistic, concatenate([result.null, *chunks]))``. options: as in `htt`,
    the same for every chunk of one test. fit: `htt_prepare` of the same split (split_seed),
    learner and ridge, shared by chunks. strata (N,): as in `htt`, the same for every chunk.

    >>> import numpy as np
    >>> from distsim.stats import p_value
    >>> tasks = np.repeat(np.arange(3), 6)  # 3 tasks x 6 models, 5 features
    >>> X = np.random.default_rng(0).normal(size=(18, 5)) + 2 * np.eye(5)[tasks]
    >>> head = htt(X, tasks, "closed-set", permutations=10, seed=0)
    >>> bool(np.array_equal(htt_null_chunk(X, tasks, "closed-set", 10, seed=0), head.null))
    True
    >>> more = htt_null_chunk(X, tasks, "closed-set", 10, seed=(0, 1), split_seed=0)
    >>> null = np.concatenate([head.null, more])  # one null of 20 permutations
    >>> null.shape, round(p_value(head.statistic, null), 4)  # 1 / 21
    ((20,), 0.0476)
    """
    how = options if options is not None else HTTOptions()
    X, split = _setup(features, tasks, protocol, permutations, 0,
                      seed if split_seed is None else split_seed, how, strata)
    return _null(X, split, permutations, seed, how, fit)


def htt(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str = "closed-set",
    permutations: int = 199,
    seed: SeedLike = 0,
    *,
    options: HTTOptions | None = None,
    fit: Fit | None = None,
    strata: Sequence[Hashable] | np.ndarray | None = None,
) -> HTTResult:
    """HTT of "solutions of one task are closer"; features (N, D), tasks (N,).

    closed-set: per-task split (train_fraction of each task's solutions train; paper 60/40),
    statistic = held-out accuracy of nearest training centroid in cosine, chance 1/tasks.
    open-set: train_task_fraction of the tasks train (paper 30 of 50); each held-out task gives
    n_query queries (default 20% of its solutions) and the rest gallery; statistic = mAP, chance
    = exact expected mAP of a random ranking. options: the split and the learner (`HTTOptions`;
    default ``HTTOptions()``, the paper's). seed: the split and the permutations.
    fit: `htt_prepare` of the same split, learner and ridge (computed here when None).
    strata (N,): a hashable stratum label per model (e.g. its init seed, when model i of every
    task starts from the same weights), or None: the split keeps a stratum in one role
    (closed-set: train_fraction of the strata train; open-set: n_query of the held-out tasks'
    strata, default 20%, give the queries) and the null permutes labels within each (role,
    stratum) cell; see the module docstring.

    >>> import numpy as np
    >>> tasks = np.repeat(np.arange(3), 6)  # 3 tasks x 6 models, 5 features
    >>> X = np.random.default_rng(0).normal(size=(18, 5)) + 2 * np.eye(5)[tasks]
    >>> r = htt(X, tasks, "closed-set", permutations=19, seed=0)
    >>> r.metric, round(r.statistic, 3), round(r.chance, 3), r.p_value  # 5 of 6 held out right
    ('accuracy', 0.833, 0.333, 0.05)
    >>> r.extra["n_train"], r.extra["n_test"], r.null.shape
    (12, 6, (19,))
    >>> soft = htt(X, tasks, "closed-set", 19, seed=0, options=HTTOptions(learner="softmax"))
    >>> soft.extra["learner"], round(soft.statistic, 3)
    ('softmax', 0.833)
    """
    how = options if options is not None else HTTOptions()
    X, split = _setup(features, tasks, protocol, permutations, 1, seed, how, strata)
    fit = _prepare(X, split, how, fit) if how.batched else None
    observed, cmc = _evaluate(X, split, observed_labels(split), how, fit)
    null = _null(X, split, permutations, seed, how, fit)
    statistic = float(observed[0])
    chance, chance_extra = chance_levels(split)
    null_mean = float(null.mean())
    null_sd = float(null.std(ddof=1)) if permutations > 1 else 0.0
    if null_sd > 0:
        effect = (statistic - null_mean) / null_sd
    else:
        effect = float(np.sign(statistic - null_mean) * np.inf) if statistic != null_mean else 0.0
    extra: dict[str, Any] = {
        "protocol": protocol,
        "learner": how.learner,
        "n_models": int(X.shape[0]),
        "n_tasks": split.n_tasks,
        "n_features": int(X.shape[1]),
        "k": len(split.train_classes) - 1 if how.k is None else int(how.k),
        "ridge": float(how.ridge),
        "null": "labels permuted within each role of the fixed split",
        **{f"n_{role}": len(idx) for role, idx in split.blocks.items()},
    }
    if split.strata is not None:
        extra["null"] = "labels permuted within each (role, stratum) cell of the fixed split"
        extra["strata"] = int(split.strata.max()) + 1
        extra.update({f"n_{role}_strata": len(np.unique(split.strata[idx]))
                      for role, idx in split.blocks.items()})
    if protocol == "open-set":
        assert cmc is not None  # open-set statistics come with CMC
        extra["n_train_tasks"] = len(split.train_classes)
        extra.update({f"cmc@{r}": float(cmc[0, i]) for i, r in enumerate(CMC_RANKS)})
        extra.update(chance_extra)
    extra["solve"] = fit.basis.solve if fit is not None else how.solve
    if fit is not None:
        extra["rank"] = len(fit.basis.s2)
    if how.learner == "softmax":
        extra.update(tol=float(how.tol), max_iter=int(how.max_iter))
    return HTTResult(
        statistic=statistic,
        metric="accuracy" if protocol == "closed-set" else "mAP",
        chance=chance,
        null_mean=null_mean,
        null_sd=null_sd,
        effect_size=float(effect),
        p_value=p_value(statistic, null),
        permutations=int(permutations),
        null=null,
        extra=extra,
    )
