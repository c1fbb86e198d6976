"""Hypothesis-training-testing (HTT): learn a linear weight representation, test it, permute.

The statistic is *trained* on one part of a zoo and *tested* on another (arXiv 2208.04369):

- closed-set: per task, solutions are split into train/test; a projection z = A phi(w) is learned
  on the training solutions; the statistic is the accuracy of assigning each held-out solution to
  the task whose training centroid is nearest in cosine (chance 1/tasks).
- open-set: tasks are split into training and held-out tasks; A is learned on the training tasks;
  each held-out task's solutions are split into query and gallery; embeddings are L2-normalised,
  scored by dot product; the statistic is mAP (CMC rank 1/5/10 in ``extra``).

Learners (both linear in the standardized features, both with an L2 penalty):

- ``"lda"``: ridge regression onto centred one-hot task indicators (penalized optimal scoring,
  i.e. regularized LDA, Hastie, Buja & Tibshirani 1995); closed form, solved in the dual
  (n x n training Gram) through one regularized inverse shared by every label vector.
- ``"softmax"``: softmax cross-entropy (multinomial logistic regression, as in the paper), a fixed
  number of full-batch Nesterov gradient steps from zero; deterministic. Run in the dual as well
  (W = X^T alpha), batched over label vectors.

Null: labels are permuted *within* each role block of the split (train/test; open-set:
train/query/gallery). This is "permute the labels, then split each task by position": the
positions keep their roles and every permuted task keeps its per-role counts, so it is the
permutation null conditional on the observed partition of positions into roles, which is exact
under H0 (solutions exchangeable across tasks). Because the training positions do not change,
standardization, the Gram and its regularized inverse are shared by all permutations and the
learners run batched; ``batched=False`` runs the same test as a loop of full re-fits (the reference).

Chance: closed-set 1/tasks; open-set the exact expected mAP of a uniformly random ranking of that
query/gallery structure, E[AP] = (H_G + (R-1)/(G-1) (G - H_G)) / G for a query with R relevant of G
gallery items (H_G harmonic), averaged over queries (likewise the CMC chance in ``extra``).
Ties: the gallery is stored in a seeded random order and sorted stably, so tied scores (e.g. a 1-D
embedding from 2 training tasks) break in an order independent of the labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsim.stats._pvalue import p_value

PROTOCOLS = ("closed-set", "open-set")
LEARNERS = ("lda", "softmax")
CMC_RANKS = (1, 5, 10)
_CHUNK_BYTES = 64 * 2**20  # working memory per chunk of permutations
# Cosines are rounded to 10 decimals before ranking, so that ties in exact arithmetic (e.g. the
# +-1 cosines of a 1-D embedding) stay ties whatever the float rounding of the solver.
_DECIMALS = 10


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
class _Split:
    """Roles of positions. codes (N,) task codes; closed-set: train/test; open-set: train/query/gallery."""

    protocol: str
    codes: np.ndarray
    n_tasks: int
    blocks: dict[str, np.ndarray]  # role -> position indices (sorted; the gallery shuffled)
    train_classes: np.ndarray  # task codes present in the train block (learner's classes)


# ----------------------------------------------------------------------------- validation & split


def _check_inputs(features, tasks, protocol, learner, permutations, min_permutations):
    X = np.asarray(features)
    if X.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise TypeError(f"features must be real numbers, got dtype {X.dtype}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError("features contain NaN or inf values; all entries must be finite")
    labels = np.asarray(tasks)
    if labels.ndim != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(
            f"tasks must be 1-D with one label per row of features ({X.shape[0]}), got shape {labels.shape}"
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
    min_tasks = 2 if protocol == "closed-set" else 4
    if n_tasks < min_tasks:
        raise ValueError(f"{protocol} HTT needs at least {min_tasks} tasks, got {n_tasks}")
    counts = np.bincount(codes, minlength=n_tasks)
    if counts.min() < 2:
        bad = names[int(np.argmin(counts))].item()
        raise ValueError(
            f"every task needs at least 2 solutions to split, task {bad!r} has {counts.min()}"
        )
    return X, names, codes.astype(np.int64)


def _make_split(codes, n_tasks, names, protocol, seed, train_fraction, train_task_fraction, n_query):
    """Seeded split of positions into roles (per task for closed-set, by task for open-set)."""
    rng = np.random.default_rng([*_seed_words(seed), 0])
    members = [np.flatnonzero(codes == t) for t in range(n_tasks)]
    if protocol == "closed-set":
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        train, test = [], []
        for idx in members:
            idx = rng.permutation(idx)
            n_tr = int(np.clip(round(train_fraction * len(idx)), 1, len(idx) - 1))
            train.append(idx[:n_tr])
            test.append(idx[n_tr:])
        blocks = {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}
        return _Split(protocol, codes, n_tasks, blocks, np.arange(n_tasks))
    if not 0.0 < train_task_fraction < 1.0:
        raise ValueError(f"train_task_fraction must be in (0, 1), got {train_task_fraction}")
    if n_query is not None and (
        isinstance(n_query, bool) or not isinstance(n_query, (int, np.integer)) or n_query < 1
    ):
        raise ValueError(f"n_query must be a positive int or None, got {n_query!r}")
    order = rng.permutation(n_tasks)
    n_train_tasks = int(np.clip(round(train_task_fraction * n_tasks), 2, n_tasks - 2))
    train_tasks = np.sort(order[:n_train_tasks])
    query, gallery = [], []
    for t in np.sort(order[n_train_tasks:]):
        idx = rng.permutation(members[t])
        n_q = int(np.clip(round(0.2 * len(idx)), 1, len(idx) - 1)) if n_query is None else int(n_query)
        if n_q >= len(idx):
            raise ValueError(
                f"n_query={n_q} leaves no gallery for task {names[t].item()!r} with {len(idx)} solutions"
            )
        query.append(idx[:n_q])
        gallery.append(idx[n_q:])
    blocks = {
        "train": np.sort(np.concatenate([members[t] for t in train_tasks])),
        "query": np.sort(np.concatenate(query)),
        # gallery in a seeded random order: the stable sort of tied scores then breaks ties in an
        # order independent of the labels (zoos are usually stored task by task)
        "gallery": rng.permutation(np.concatenate(gallery)),
    }
    return _Split(protocol, codes, n_tasks, blocks, train_tasks)


def _seed_words(seed) -> list[int]:
    words = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not words or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0 for w in words):
        raise ValueError(f"seed must be a non-negative int or a sequence of them, got {seed!r}")
    return [int(w) for w in words]


def _permuted_labels(split: _Split, permutations: int, seed) -> dict[str, np.ndarray]:
    """(B, n_role) task codes per role block: each row a uniform permutation within the block."""
    rng = np.random.default_rng([*_seed_words(seed), 1])
    out = {}
    for role, idx in split.blocks.items():
        tiled = np.tile(split.codes[idx], (permutations, 1))
        out[role] = rng.permuted(tiled, axis=1)
    return out


def _observed_labels(split: _Split) -> dict[str, np.ndarray]:
    return {role: split.codes[idx][None, :] for role, idx in split.blocks.items()}


# ----------------------------------------------------------------------------- learners


def _standardize(X, train_idx):
    """Centre and scale every feature by its training mean/sd (fit on training rows only)."""
    Xtr = X[train_idx]
    mean = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0)
    sd = np.where(sd > 1e-12 * max(float(sd.max()), 1e-300), sd, 1.0)
    return (X - mean) / sd


def _one_hot(codes, classes):
    """(B, n) codes -> (B, n, C) float one-hot over `classes` (sorted codes)."""
    col = np.searchsorted(classes, codes)
    return (col[..., None] == np.arange(len(classes))).astype(np.float64)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _grams(X, split: _Split):
    """Standardize on the training rows; Gram K (n, n) of training rows, K_ev (m, n) eval x train."""
    Z = _standardize(X, split.blocks["train"])
    Xtr = Z[split.blocks["train"]]
    Xev = Z[np.concatenate([idx for role, idx in split.blocks.items() if role != "train"])]
    return Xtr @ Xtr.T, Xev @ Xtr.T


def _ridge_lambda(K, ridge):
    return ridge * float(np.trace(K)) / K.shape[0]


def _softmax_lambda(K, ridge):
    return ridge * float(np.trace(K)) / K.shape[0] ** 2


@dataclass(frozen=True)
class _Fit:
    """Label-independent part of a fit, shared by every permutation (the training rows are fixed)."""

    K: np.ndarray  # (n, n) Gram of the standardized training rows
    Kev: np.ndarray  # (m, n) evaluation rows (test, or query then gallery) x training rows
    lam: float  # L2 strength
    hat_train: np.ndarray | None = None  # lda: (n, n) K (K + lam I)^-1
    hat_eval: np.ndarray | None = None  # lda: (m, n) K_ev (K + lam I)^-1
    lr: float = float("nan")  # softmax: gradient step 1/L


def _prepare(X, split: _Split, learner: str, ridge: float) -> _Fit:
    K, Kev = _grams(X, split)
    n = len(K)
    if learner == "lda":
        lam = _ridge_lambda(K, ridge)
        inv = np.linalg.inv(K + lam * np.eye(n))  # SPD; numpy's LAPACK (no 2nd BLAS pool)
        return _Fit(K, Kev, lam, hat_train=np.eye(n) - lam * inv, hat_eval=Kev @ inv)
    lam = _softmax_lambda(K, ridge)
    lr = 1.0 / (0.5 * np.linalg.eigvalsh(K)[-1] / n + lam)  # 1/L: CE Hessian in logits <= 1/2
    return _Fit(K, Kev, lam, lr=lr)


def _left(M, A):
    """M (p, n) applied to every matrix of A (B, n, C) -> (B, p, C), as one GEMM."""
    B, n, C = A.shape
    out = M @ np.moveaxis(A, 0, 1).reshape(n, B * C)
    return np.moveaxis(out.reshape(len(M), B, C), 1, 0)


def _lda_batched(fit: _Fit, Y):
    """Ridge onto centred one-hot Y (B, n, C) for all B at once: (Z_train (B,n,C), Z_eval (B,m,C)).

    alpha = (K + lam I)^-1 Yc, Z_train = K alpha, Z_eval = K_ev alpha: two GEMMs with the
    label-independent maps K (K + lam I)^-1 = I - lam (K + lam I)^-1 and K_ev (K + lam I)^-1.
    """
    Yc = Y - Y.mean(axis=1, keepdims=True)
    return _left(fit.hat_train, Yc), _left(fit.hat_eval, Yc)


def _lda_naive(X, split: _Split, Y, ridge):
    """Reference: one full re-fit (standardize, Gram, dense solve) for a single label matrix (n, C)."""
    K, Kev = _grams(X, split)
    lam = _ridge_lambda(K, ridge)
    alpha = np.linalg.solve(K + lam * np.eye(len(K)), Y - Y.mean(axis=0))
    return K @ alpha, Kev @ alpha


def _nesterov(n_iter, lr, grad, x0):
    """Fixed-step Nesterov accelerated gradient descent for n_iter steps from x0."""
    x, prev = x0, x0
    for t in range(n_iter):
        v = x + (t / (t + 3.0)) * (x - prev)
        prev, x = x, v - lr * grad(v)
    return x


def _softmax_batched(fit: _Fit, Y, n_iter):
    """Softmax regression for all B label matrices (B, n, C) at once, in the dual W = X^T alpha."""
    n = len(fit.K)
    alpha = _nesterov(
        n_iter, fit.lr, lambda a: (_softmax(_left(fit.K, a)) - Y) / n + fit.lam * a, np.zeros_like(Y)
    )
    return _left(fit.K, alpha), _left(fit.Kev, alpha)


def _softmax_naive(X, split: _Split, Y, ridge, n_iter):
    """Reference: one full re-fit in the primal (weights W (D, C)) for a single label matrix (n, C)."""
    Z = _standardize(X, split.blocks["train"])
    Xtr = Z[split.blocks["train"]]
    Xev = Z[np.concatenate([idx for role, idx in split.blocks.items() if role != "train"])]
    n = len(Xtr)
    lam = ridge * float(np.sum(Xtr**2)) / n**2  # = _softmax_lambda(Xtr Xtr^T, ridge)
    lr = 1.0 / (0.5 * np.linalg.norm(Xtr, 2) ** 2 / n + lam)
    W = _nesterov(
        n_iter, lr, lambda w: Xtr.T @ (_softmax(Xtr @ w) - Y) / n + lam * w,
        np.zeros((Xtr.shape[1], Y.shape[1])),
    )
    return Xtr @ W, Xev @ W


def _reduce(Ztr, Zev, k):
    """Keep the top-k principal directions of the training embeddings (B, n, C) -> (B, n, k)."""
    if k is None:
        return Ztr, Zev
    _, V = np.linalg.eigh(np.matmul(np.swapaxes(Ztr, 1, 2), Ztr))  # ascending
    V = V[..., ::-1][..., :k]
    return np.matmul(Ztr, V), np.matmul(Zev, V)


# ----------------------------------------------------------------------------- test statistics


def _unit(Z):
    return Z / np.maximum(np.linalg.norm(Z, axis=-1, keepdims=True), 1e-300)


def _closed_set_accuracy(Ztr, Zte, ytr, yte, n_tasks):
    """Nearest training centroid in cosine. Z (B, n|m, k), y (B, n|m) codes -> (B,) accuracy."""
    onehot = (ytr[..., None] == np.arange(n_tasks)).astype(np.float64)  # (B, n, T)
    centroids = _unit(np.matmul(np.swapaxes(onehot, 1, 2), Ztr))  # (B, T, k); sum ∝ mean
    cosine = np.round(np.matmul(_unit(Zte), np.swapaxes(centroids, 1, 2)), _DECIMALS)
    pred = np.argmax(cosine, axis=-1)  # ties (equal to 1e-10) go to the lowest task code
    return (pred == yte).mean(axis=1)


def _retrieval(Zq, Zg, yq, yg):
    """mAP (B,) and CMC (B, len(CMC_RANKS)) of queries vs gallery; Z (B, q|g, k), y (B, q|g)."""
    scores = np.round(np.matmul(_unit(Zq), np.swapaxes(_unit(Zg), 1, 2)), _DECIMALS)  # (B, q, g)
    order = np.argsort(-scores, axis=-1, kind="stable")
    rel = np.take_along_axis(yq[:, :, None] == yg[:, None, :], order, axis=-1)
    hits = np.cumsum(rel, axis=-1)
    precision = hits / np.arange(1, rel.shape[-1] + 1)
    ap = (precision * rel).sum(axis=-1) / rel.sum(axis=-1)
    cmc = np.stack([hits[..., min(r, rel.shape[-1]) - 1] > 0 for r in CMC_RANKS], axis=-1)
    return ap.mean(axis=1), cmc.mean(axis=1)


def _expected_ap(n_rel: int, n_gallery: int) -> float:
    """Exact E[AP] of one query under a uniformly random ranking of n_gallery items, n_rel relevant.

    E[AP] = (H_G + (R - 1)/(G - 1) * (G - H_G)) / G with H_G the G-th harmonic number.
    """
    G, R = n_gallery, n_rel
    H = float(np.sum(1.0 / np.arange(1, G + 1)))
    return (H + (R - 1) / (G - 1) * (G - H)) / G if G > 1 else 1.0


def _expected_cmc(n_rel: int, n_gallery: int, rank: int) -> float:
    """P(at least one relevant item in the top `rank`) under a random ranking."""
    r = min(rank, n_gallery)
    miss = np.prod((n_gallery - n_rel - np.arange(r)) / (n_gallery - np.arange(r)))
    return float(1.0 - max(miss, 0.0))


def _chance(split: _Split) -> tuple[float, dict[str, float]]:
    if split.protocol == "closed-set":
        return 1.0 / split.n_tasks, {}
    yq = split.codes[split.blocks["query"]]
    g_counts = np.bincount(split.codes[split.blocks["gallery"]], minlength=split.n_tasks)
    G = len(split.blocks["gallery"])
    chance_map = float(np.mean([_expected_ap(int(g_counts[t]), G) for t in yq]))
    cmc = {
        f"chance_cmc@{r}": float(np.mean([_expected_cmc(int(g_counts[t]), G, r) for t in yq]))
        for r in CMC_RANKS
    }
    return chance_map, cmc


# ----------------------------------------------------------------------------- batched evaluation


def _evaluate(X, split: _Split, labels, learner, ridge, k, n_iter, batched, fit=None):
    """Statistic (B,) and, for open-set, CMC (B, 3) for B label assignments {role: (B, n_role)}."""
    ytr = labels["train"]
    Y = _one_hot(ytr, split.train_classes)
    if batched:
        fit = fit if fit is not None else _prepare(X, split, learner, ridge)
        if learner == "lda":
            Ztr, Zev = _lda_batched(fit, Y)
        else:
            Ztr, Zev = _softmax_batched(fit, Y, n_iter)
    else:
        pairs = [
            _lda_naive(X, split, y, ridge) if learner == "lda"
            else _softmax_naive(X, split, y, ridge, n_iter)
            for y in Y
        ]
        Ztr = np.stack([p[0] for p in pairs])
        Zev = np.stack([p[1] for p in pairs])
    Ztr, Zev = _reduce(Ztr, Zev, k)
    if split.protocol == "closed-set":
        return _closed_set_accuracy(Ztr, Zev, ytr, labels["test"], split.n_tasks), None
    n_q = len(split.blocks["query"])
    return _retrieval(Zev[:, :n_q], Zev[:, n_q:], labels["query"], labels["gallery"])


def _check_options(split: _Split, ridge, k, n_iter):
    if not (isinstance(ridge, (int, float, np.floating)) and np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    n_classes = len(split.train_classes)
    if k is not None and (
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes - 1
    ):
        raise ValueError(
            f"k must be None or an int in [1, {n_classes - 1}] (training tasks - 1), got {k!r}"
        )


def _setup(features, tasks, protocol, learner, permutations, min_permutations, split_seed,
           train_fraction, train_task_fraction, n_query, ridge, k, n_iter):
    X, names, codes = _check_inputs(features, tasks, protocol, learner, permutations, min_permutations)
    split = _make_split(codes, len(names), names, protocol, split_seed, train_fraction,
                        train_task_fraction, n_query)
    _check_options(split, ridge, k, n_iter)
    if np.ptp(X[split.blocks["train"]], axis=0).max() == 0:
        raise ValueError("features are constant over the training solutions: nothing to learn")
    return X, split


def _null(X, split, permutations, seed, learner, ridge, k, n_iter, batched, fit=None):
    labels = _permuted_labels(split, permutations, seed)
    n_eval = sum(len(v) for r, v in split.blocks.items() if r != "train")
    n_train, n_cls = len(split.blocks["train"]), len(split.train_classes)
    per_perm = 8 * (4 * (n_train + n_eval) * max(n_cls, split.n_tasks) + n_train * n_cls * 4)
    if split.protocol == "open-set":
        per_perm += 8 * 4 * len(split.blocks["query"]) * len(split.blocks["gallery"])
    chunk = max(1, _CHUNK_BYTES // per_perm)
    if batched and fit is None:
        fit = _prepare(X, split, learner, ridge)
    out = np.empty(permutations)
    for start in range(0, permutations, chunk):
        part = {role: y[start:start + chunk] for role, y in labels.items()}
        out[start:start + chunk] = _evaluate(X, split, part, learner, ridge, k, n_iter, batched, fit)[0]
    return out


# ----------------------------------------------------------------------------- public API


def htt_null_chunk(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str = "closed-set",
    permutations: int = 199,
    seed: int | Sequence[int] = 0,
    learner: str = "lda",
    *,
    split_seed: int | Sequence[int] | None = None,
    train_fraction: float = 0.6,
    train_task_fraction: float = 0.6,
    n_query: int | None = None,
    k: int | None = None,
    ridge: float = 1.0,
    n_iter: int = 100,
    batched: bool = True,
) -> np.ndarray:
    """Null statistics (B,) for one chunk of label permutations; features (N, D), tasks (N,).

    `seed` seeds the permutations of this chunk, `split_seed` (default: `seed`) the train/test
    split. Chunks that share `split_seed` but differ in `seed` combine into one null: e.g.
    ``htt(..., seed=s)`` plus chunks ``seed=(s, i), split_seed=s`` for i = 1, 2, ..., then
    ``p_value(result.statistic, concatenate([result.null, *chunks]))``.
    batched=False: a loop of full re-fits (the reference; same values).
    """
    X, split = _setup(features, tasks, protocol, learner, permutations, 0,
                      seed if split_seed is None else split_seed, train_fraction,
                      train_task_fraction, n_query, ridge, k, n_iter)
    return _null(X, split, permutations, seed, learner, ridge, k, n_iter, batched)


def htt(
    features: np.ndarray,
    tasks: Sequence[Hashable] | np.ndarray,
    protocol: str = "closed-set",
    permutations: int = 199,
    seed: int | Sequence[int] = 0,
    learner: str = "lda",
    *,
    train_fraction: float = 0.6,
    train_task_fraction: float = 0.6,
    n_query: int | None = None,
    k: int | None = None,
    ridge: float = 1.0,
    n_iter: int = 100,
    batched: bool = True,
) -> HTTResult:
    """Hypothesis-training-testing of "solutions of one task are closer"; features (N, D), tasks (N,).

    closed-set: per-task split (train_fraction of each task's solutions train; paper 60/40),
    statistic = held-out accuracy of nearest training centroid in cosine, chance 1/tasks.
    open-set: train_task_fraction of the tasks train (paper 30 of 50); each held-out task gives
    n_query queries (default 20% of its solutions) and the rest gallery; statistic = mAP, chance
    = exact expected mAP of a random ranking. k: embedding dims (default all, tasks - 1);
    ridge: relative L2 strength; n_iter: gradient steps of the softmax learner.
    """
    X, split = _setup(features, tasks, protocol, learner, permutations, 1, seed, train_fraction,
                      train_task_fraction, n_query, ridge, k, n_iter)
    fit = _prepare(X, split, learner, ridge) if batched else None
    observed, cmc = _evaluate(X, split, _observed_labels(split), learner, ridge, k, n_iter, batched, fit)
    null = _null(X, split, permutations, seed, learner, ridge, k, n_iter, batched, fit)
    statistic = float(observed[0])
    chance, chance_extra = _chance(split)
    null_mean = float(null.mean())
    null_sd = float(null.std(ddof=1)) if permutations > 1 else 0.0
    if null_sd > 0:
        effect = (statistic - null_mean) / null_sd
    else:
        effect = float(np.sign(statistic - null_mean) * np.inf) if statistic != null_mean else 0.0
    extra: dict[str, Any] = {
        "protocol": protocol,
        "learner": learner,
        "n_models": int(X.shape[0]),
        "n_tasks": split.n_tasks,
        "n_features": int(X.shape[1]),
        "k": len(split.train_classes) - 1 if k is None else int(k),
        "ridge": float(ridge),
        "null": "labels permuted within each role of the fixed split",
        **{f"n_{role}": len(idx) for role, idx in split.blocks.items()},
    }
    if protocol == "open-set":
        extra["n_train_tasks"] = len(split.train_classes)
        extra.update({f"cmc@{r}": float(cmc[0, i]) for i, r in enumerate(CMC_RANKS)})
        extra.update(chance_extra)
    if learner == "softmax":
        extra["n_iter"] = int(n_iter)
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
