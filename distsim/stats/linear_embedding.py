"""Linear task embeddings for HTT: ridge (regularized LDA) and softmax regression, in the dual.

Both learners are linear in the features standardized on the training rows and carry an L2
penalty; both are run in the dual (W = X^T alpha), on the Gram of the training rows:

- ``"lda"``: ridge regression onto centred one-hot task indicators (penalized optimal scoring,
  i.e. regularized LDA, Hastie, Buja & Tibshirani 1995); closed form through one regularized
  inverse of the training Gram, shared by every label matrix.
- ``"softmax"``: softmax cross-entropy (multinomial logistic regression), a fixed number of
  full-batch Nesterov gradient steps from zero; deterministic.

The training rows, hence the Gram and its inverse, do not depend on the labels, so `prepare_fit`
computes them once and `embed` runs B label matrices (B permutations) as a few GEMMs.
``batched=False`` re-fits each label matrix from scratch instead (standardize, Gram, solve; the
softmax in the primal): the reference the batched path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEARNERS = ("lda", "softmax")


@dataclass(frozen=True)
class DualFit:
    """Label-independent part of a fit, shared by every permutation (the training rows are fixed).

    K (n, n): Gram of the standardized training rows; Kev (m, n): evaluation rows x training
    rows; lam: L2 strength. lda: hat_train (n, n) = K (K + lam I)^-1 and hat_eval (m, n) =
    K_ev (K + lam I)^-1. softmax: lr, the gradient step 1/L.
    """

    K: np.ndarray
    Kev: np.ndarray
    lam: float
    hat_train: np.ndarray | None = None
    hat_eval: np.ndarray | None = None
    lr: float = float("nan")


def _standardize(X: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """Centre and scale every feature by its training mean/sd (fit on training rows only)."""
    Xtr = X[train_idx]
    mean = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0)
    sd = np.where(sd > 1e-12 * max(float(sd.max()), 1e-300), sd, 1.0)
    return (X - mean) / sd


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _grams(
    X: np.ndarray, train_idx: np.ndarray, eval_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Standardize on the training rows -> Gram K (n, n) of training rows, K_ev (m, n)."""
    Z = _standardize(X, train_idx)
    Xtr = Z[train_idx]
    Xev = Z[eval_idx]
    return Xtr @ Xtr.T, Xev @ Xtr.T


def _ridge_lambda(K: np.ndarray, ridge: float) -> float:
    return ridge * float(np.trace(K)) / K.shape[0]


def _softmax_lambda(K: np.ndarray, ridge: float) -> float:
    return ridge * float(np.trace(K)) / K.shape[0] ** 2


def prepare_fit(
    X: np.ndarray, train_idx: np.ndarray, eval_idx: np.ndarray, learner: str, ridge: float
) -> DualFit:
    """The label-independent part of fitting `learner` on rows train_idx (n,) of X (N, D).

    eval_idx (m,): the rows to embed besides the training rows. ridge: L2 strength relative to
    the mean squared norm of the standardized training rows.
    """
    K, Kev = _grams(X, train_idx, eval_idx)
    n = len(K)
    if learner == "lda":
        lam = _ridge_lambda(K, ridge)
        inv = np.linalg.inv(K + lam * np.eye(n))  # SPD; numpy's LAPACK (no 2nd BLAS pool)
        return DualFit(K, Kev, lam, hat_train=np.eye(n) - lam * inv, hat_eval=Kev @ inv)
    lam = _softmax_lambda(K, ridge)
    lr = 1.0 / (0.5 * np.linalg.eigvalsh(K)[-1] / n + lam)  # 1/L: CE Hessian in logits <= 1/2
    return DualFit(K, Kev, lam, lr=lr)


def _left(M: np.ndarray, A: np.ndarray) -> np.ndarray:
    """M (p, n) applied to every matrix of A (B, n, C) -> (B, p, C), as one GEMM."""
    B, n, C = A.shape
    out = M @ np.moveaxis(A, 0, 1).reshape(n, B * C)
    return np.moveaxis(out.reshape(len(M), B, C), 1, 0)


def _lda_batched(fit: DualFit, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge onto centred one-hot Y (B, n, C) for all B at once: (Z_train (B,n,C), Z_eval (B,m,C)).

    alpha = (K + lam I)^-1 Yc, Z_train = K alpha, Z_eval = K_ev alpha: two GEMMs with the
    label-independent maps K (K + lam I)^-1 = I - lam (K + lam I)^-1 and K_ev (K + lam I)^-1.
    """
    assert fit.hat_train is not None and fit.hat_eval is not None, "not an lda fit"
    Yc = Y - Y.mean(axis=1, keepdims=True)
    return _left(fit.hat_train, Yc), _left(fit.hat_eval, Yc)


def _lda_refit(
    X: np.ndarray, train_idx: np.ndarray, eval_idx: np.ndarray, Y: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one full re-fit (standardize, Gram, dense solve) for one label matrix (n, C)."""
    K, Kev = _grams(X, train_idx, eval_idx)
    lam = _ridge_lambda(K, ridge)
    alpha = np.linalg.solve(K + lam * np.eye(len(K)), Y - Y.mean(axis=0))
    return K @ alpha, Kev @ alpha


def _nesterov(
    n_iter: int, lr: float, grad: Callable[[np.ndarray], np.ndarray], x0: np.ndarray
) -> np.ndarray:
    """Fixed-step Nesterov accelerated gradient descent for n_iter steps from x0."""
    x, prev = x0, x0
    for t in range(n_iter):
        v = x + (t / (t + 3.0)) * (x - prev)
        prev, x = x, v - lr * grad(v)
    return x


def _softmax_batched(
    fit: DualFit, Y: np.ndarray, n_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression for all B label matrices (B, n, C) at once, in the dual W = X^T alpha."""
    n = len(fit.K)
    alpha = _nesterov(
        n_iter,
        fit.lr,
        lambda a: (_softmax(_left(fit.K, a)) - Y) / n + fit.lam * a,
        np.zeros_like(Y),
    )
    return _left(fit.K, alpha), _left(fit.Kev, alpha)


def _softmax_refit(
    X: np.ndarray,
    train_idx: np.ndarray,
    eval_idx: np.ndarray,
    Y: np.ndarray,
    ridge: float,
    n_iter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one full re-fit in the primal (weights W (D, C)) for one label matrix (n, C)."""
    Z = _standardize(X, train_idx)
    Xtr = Z[train_idx]
    Xev = Z[eval_idx]
    n = len(Xtr)
    lam = ridge * float(np.sum(Xtr**2)) / n**2  # = _softmax_lambda(Xtr Xtr^T, ridge)
    lr = float(1.0 / (0.5 * np.linalg.norm(Xtr, 2) ** 2 / n + lam))
    W = _nesterov(
        n_iter,
        lr,
        lambda w: Xtr.T @ (_softmax(Xtr @ w) - Y) / n + lam * w,
        np.zeros((Xtr.shape[1], Y.shape[1])),
    )
    return Xtr @ W, Xev @ W


def _reduce(
    Ztr: np.ndarray, Zev: np.ndarray, k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the top-k principal directions of the training embeddings (B, n, C) -> (B, n, k)."""
    if k is None:
        return Ztr, Zev
    _, V = np.linalg.eigh(np.matmul(np.swapaxes(Ztr, 1, 2), Ztr))  # ascending
    V = V[..., ::-1][..., :k]
    return np.matmul(Ztr, V), np.matmul(Zev, V)


def embed(
    X: np.ndarray,
    train_idx: np.ndarray,
    eval_idx: np.ndarray,
    Y: np.ndarray,
    learner: str,
    *,
    ridge: float,
    k: int | None,
    n_iter: int,
    batched: bool = True,
    fit: DualFit | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the training and evaluation rows learned from B label matrices at once.

    X (N, D) features; train_idx (n,), eval_idx (m,) row indices; Y (B, n, C) one-hot labels of
    the training rows. Returns (Z_train (B, n, k), Z_eval (B, m, k)): the learned projection
    reduced to its top-k principal directions on the training rows (k=None: all C).
    ``fit``: `prepare_fit` of the same rows, learner and ridge, to share it between calls.
    ``batched=False``: a loop of full re-fits (the reference; the same values up to rounding).
    """
    if batched:
        fit = fit if fit is not None else prepare_fit(X, train_idx, eval_idx, learner, ridge)
        if learner == "lda":
            Ztr, Zev = _lda_batched(fit, Y)
        else:
            Ztr, Zev = _softmax_batched(fit, Y, n_iter)
    else:
        pairs = [
            _lda_refit(X, train_idx, eval_idx, y, ridge) if learner == "lda"
            else _softmax_refit(X, train_idx, eval_idx, y, ridge, n_iter)
            for y in Y
        ]
        Ztr = np.stack([p[0] for p in pairs])
        Zev = np.stack([p[1] for p in pairs])
    return _reduce(Ztr, Zev, k)
