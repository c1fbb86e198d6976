"""Linear task embeddings for HTT: ridge (regularized LDA) and softmax regression, exact at any N.

Both learners are linear in the features standardized on the training rows and carry an L2
penalty on the weights W (D, C). Both optima lie in the span of the training rows, so both are
solved in an orthogonal basis of that span: with the thin SVD X_train = U S V^T (rank r),

    F_train = X_train V = U S (n, r),   F_eval = X_eval V (m, r),   W = V beta (beta (r, C)),

and ||W|| = ||beta||: the same problem in r <= min(n, D) coordinates, exactly. The basis comes
from the smaller Gram: the primal X^T X (D, D) when n > D (no n x n array anywhere), the dual
X X^T (n, n) otherwise (`training_basis`; both give the same embeddings to rounding).

- ``"lda"``: ridge regression onto centred one-hot task indicators (penalized optimal scoring,
  i.e. regularized LDA, Hastie, Buja & Tibshirani 1995): beta = diag(1 / (s^2 + lam)) F^T Y_c,
  closed form, two GEMMs per label matrix.
- ``"softmax"``: softmax cross-entropy (multinomial logistic regression) with an L2 penalty,
  solved to a checked tolerance by L-BFGS batched over the labellings, preconditioned with the
  Hessian at beta = 0, s^2 / (n C) + lam (every prediction uniform there: the first step is a
  Newton step); a step that does not lower the objective enough is halved for that labelling
  (the objective never rises); it stops when every labelling's step is below ``tol`` of its
  weights (float32 GEMMs down to 1e-3, then float32 GEMMs on the corrections to a float64 base
  point, which keeps float64's accuracy; see `_softmax`).

The training rows, hence the basis, do not depend on the labels, so `prepare_fit` computes it
once and `embed` runs B label matrices (B permutations) as a few GEMMs. ``batched=False`` fits
each label matrix from scratch instead (standardize, Gram, solve; the ridge by a dense solve in
the dual): the reference the batched path is tested against.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

SOLVES = ("auto", "primal", "dual")
# Directions of the training rows with s^2 below this fraction of the largest are dropped:
# their share of any embedding is at most s^2 / lam of it, below float64 rounding for ridge >= 1e-3.
_RANK_TOL = 1e-13
_FLOAT32_TOL = 1e-3  # the softmax's float32 pass stops here; see _softmax
_REFINED_TOL = 1e-5  # its refined pass here: below, value noise (~1e-12) rivals the decrease
REBASE = 1e-2  # `_refined` recomputes a labelling's float64 base beyond this drift
MEMORY = 5  # step pairs the softmax's L-BFGS keeps


@dataclass(frozen=True)
class Basis:
    """Standardized rows in an orthogonal basis of the training rows' span (r directions).

    train (n, r) = U S and eval (m, r) = X_eval V: coordinates of the training and evaluation
    rows; s2 (r,): squared singular values of X_train, descending (train^T train = diag(s2));
    trace: ||X_train||_F^2; solve: "primal" (from X^T X, D x D) or "dual" (from X X^T, n x n).
    """

    train: np.ndarray
    eval: np.ndarray
    s2: np.ndarray
    trace: float
    solve: str


@dataclass(frozen=True)
class Fit:
    """The label-independent part of a fit, shared by every permutation: the basis of the
    training rows train_idx (n,) with eval_idx (m,) expressed in it, the learner, its relative
    ridge and the L2 strength lam it gives."""

    basis: Basis
    learner: str
    ridge: float
    lam: float
    train_idx: np.ndarray
    eval_idx: np.ndarray


def _standardize(X: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    """Centre and scale every feature by its training mean/sd (fit on training rows only), in
    float64 whatever X's dtype."""
    X = np.asarray(X, dtype=np.float64)
    Xtr = X[train_idx]
    mean = Xtr.mean(axis=0)
    sd = Xtr.std(axis=0)
    sd = np.where(sd > 1e-12 * max(float(sd.max()), 1e-300), sd, 1.0)
    return (X - mean) / sd


def training_basis(
    X: np.ndarray, train_idx: np.ndarray, eval_idx: np.ndarray, solve: str = "auto"
) -> Basis:
    """Standardize X (N, D) on rows train_idx (n,) and express the rows train_idx and eval_idx
    (m,) in the orthogonal basis of the training rows' span (see the module docstring).

    solve: "primal" eigendecomposes X_train^T X_train (D, D), "dual" X_train X_train^T (n, n),
    "auto" the smaller. Memory O((n + m) r + min(n, D)^2).
    """
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    Z = _standardize(X, train_idx)
    Xtr, Xev = Z[train_idx], Z[eval_idx]
    n, d = Xtr.shape
    if solve == "auto":
        solve = "primal" if n > d else "dual"
    gram = Xtr.T @ Xtr if solve == "primal" else Xtr @ Xtr.T
    s2, vecs = np.linalg.eigh(gram)  # ascending
    keep = s2 > _RANK_TOL * max(float(s2[-1]), 1e-300)
    s2, vecs = s2[keep][::-1], vecs[:, keep][:, ::-1]
    if solve == "primal":  # vecs = V (D, r)
        V = vecs
    else:  # vecs = U (n, r): V = X_train^T U / s
        V = (Xtr.T @ vecs) / np.sqrt(s2)
    return Basis(
        train=np.ascontiguousarray(Xtr @ V),
        eval=np.ascontiguousarray(Xev @ V),
        s2=s2,
        trace=float(np.einsum("ij,ij->", Xtr, Xtr)),
        solve=solve,
    )


def _ridge_lambda(trace: float, n: int, ridge: float) -> float:
    """L2 strength of the ridge: ridge x the mean squared norm of a standardized training row."""
    return ridge * trace / n


def _softmax_lambda(trace: float, n: int, ridge: float) -> float:
    """L2 strength of the softmax (its loss is a mean over n rows): ridge x trace / n^2."""
    return ridge * trace / n**2


def prepare_fit(
    X: np.ndarray,
    train_idx: np.ndarray,
    eval_idx: np.ndarray,
    learner: str,
    ridge: float,
    solve: str = "auto",
) -> Fit:
    """The label-independent part of fitting `learner` on rows train_idx (n,) of X (N, D).

    eval_idx (m,): the rows to embed besides the training rows. ridge: L2 strength relative to
    the mean squared norm of the standardized training rows.
    """
    basis = training_basis(X, train_idx, eval_idx, solve)
    n = len(basis.train)
    lam = (_ridge_lambda if learner == "lda" else _softmax_lambda)(basis.trace, n, ridge)
    return Fit(basis, learner, float(ridge), lam, np.asarray(train_idx), np.asarray(eval_idx))


def _left(M: np.ndarray, A: np.ndarray) -> np.ndarray:
    """M (p, n) applied to every matrix of A (B, n, C) -> (B, p, C), as one GEMM."""
    B, n, C = A.shape
    out = M @ np.moveaxis(A, 0, 1).reshape(n, B * C)
    return np.moveaxis(out.reshape(len(M), B, C), 1, 0)


def _lda(fit: Fit, Y: np.ndarray) -> np.ndarray:
    """Ridge onto centred one-hot Y (B, n, C) for all B at once -> beta (B, r, C)."""
    b = fit.basis
    Yc = Y - Y.mean(axis=1, keepdims=True)
    return _left(b.train.T, Yc) / (b.s2 + fit.lam)[:, None]


def _lda_refit(
    X: np.ndarray, train_idx: np.ndarray, eval_idx: np.ndarray, Y: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: one full re-fit (standardize, Gram, dense solve in the dual) for one label
    matrix (n, C)."""
    Z = _standardize(X, train_idx)
    Xtr, Xev = Z[train_idx], Z[eval_idx]
    K = Xtr @ Xtr.T
    lam = _ridge_lambda(float(np.trace(K)), len(K), ridge)
    alpha = np.linalg.solve(K + lam * np.eye(len(K)), Y - Y.mean(axis=0))
    return K @ alpha, (Xev @ Xtr.T) @ alpha


Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(labellings (b,) indices into Y, beta (b, r, C)) -> (objective (b,), gradient (b, r, C))."""


@numba.njit(cache=True)
def _softmax_rows(z: np.ndarray, z0: np.ndarray, rows: np.ndarray, codes: np.ndarray,
                  p0: np.ndarray, mode: int, out: np.ndarray) -> np.ndarray:
    """Softmax of every (labelling, training row) of the logits z (b, n, C), plus z0[rows]
    when z0 (B, n, C) is not empty -> cross-entropy (b, n) against codes[rows] ((B, n) class
    codes), and into out (n, b, C): p - onehot (mode 0, the gradient's residual), p - p0[:,
    rows] (mode 1; p0 (n, B, C)) or p (mode 2). One pass over memory per row, in float64."""
    b, n, C = z.shape
    ce = np.empty((b, n))
    row = np.empty(C)
    for j in range(b):
        lab = rows[j]
        for i in range(n):
            top = -np.inf
            for c in range(C):
                v = z[j, i, c] + (z0[lab, i, c] if z0.shape[0] else 0.0)
                row[c] = v
                top = max(top, v)
            label = row[codes[lab, i]] - top
            total = 0.0
            for c in range(C):
                row[c] = np.exp(row[c] - top)
                total += row[c]
            ce[j, i] = np.log(total) - label
            for c in range(C):
                q = row[c] / total
                if mode == 0:
                    q -= 1.0 if c == codes[lab, i] else 0.0
                elif mode == 1:
                    q -= p0[i, lab, c]
                out[i, j, c] = q
    return ce


_NONE = np.empty((0, 0, 0))


def _codes(Y: np.ndarray) -> np.ndarray:
    """One-hot labels Y (B, n, C) -> class codes (B, n) int64 (checked one-hot)."""
    codes = Y.argmax(axis=-1)
    if not (np.all(Y.sum(axis=-1) == 1) and np.all((Y == 0) | (Y == 1))):
        raise ValueError("the softmax learner needs one-hot label matrices Y (B, n, C)")
    return codes


def _residual_grad(F: np.ndarray, residual: np.ndarray, beta: np.ndarray, lam: float,
                   ) -> np.ndarray:
    """F^T residual / n + lam beta (b, r, C) for residual (n, b, C) in F's dtype."""
    n, b, C = residual.shape
    g = (F.T @ residual.reshape(n, b * C)).reshape(-1, b, C)  # (r, b, C)
    return np.moveaxis(g, 1, 0).astype(np.float64) / n + lam * beta


def _softmax_value_grad(
    F: np.ndarray, codes: np.ndarray, rows: np.ndarray, beta: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Objective (b,) and gradient (b, r, C) of mean cross-entropy + lam/2 ||beta||^2 at beta
    (b, r, C) float64 of the labellings `rows` of codes (B, n), for training rows F (n, r).
    The two GEMMs run in F's dtype (float32 in `_softmax`'s first pass), the rest in float64."""
    n, (b, _, C) = len(F), beta.shape
    if beta.any():
        logits = _left(F, beta.astype(F.dtype))  # (b, n, C)
    else:  # the start, beta = 0: the GEMM's result is known
        logits = np.zeros((b, n, C), F.dtype)
    residual = np.empty((n, b, C), F.dtype)
    ce = _softmax_rows(logits, _NONE, rows, codes, _NONE, 0, residual)
    grad = _residual_grad(F, residual, beta, lam)
    return ce.mean(axis=1) + 0.5 * lam * _dot(beta, beta), grad


def _refined(F: np.ndarray, F32: np.ndarray, codes: np.ndarray, beta0: np.ndarray,
             lam: float) -> Objective:
    """The objective of `_softmax_value_grad` to float64 accuracy near beta0 (B, r, C), from
    float32 GEMMs (F32 = F in float32; codes (B, n) the labels).

    Around a base point computed once in float64 (logits0 = F beta0, p0 = softmax, g0 = F^T (p0
    - Y) / n), only the corrections run in float32:

        logits = logits0 + F (beta - beta0),   F^T (p - Y) = n g0 + F^T (p - p0),

    so float32 rounds a term |beta - beta0| / |beta| of the whole: below 1e-2 x 1e-7 = 1e-9,
    since a labelling that drifts further than REBASE from its base gets a new float64 base.
    """
    n, (B, r, C) = len(F), beta0.shape
    base = np.empty((B, r, C))
    logits0, p0 = np.empty((B, n, C)), np.empty((n, B, C))  # F base, softmax (rows' layout)
    ce0, g0 = np.empty(B), np.empty((B, r, C))  # cross-entropy, F^T (p0 - Y) / n

    def rebase(rows: np.ndarray, beta: np.ndarray) -> None:
        """Float64 bases for the labellings `rows` at beta (b, r, C)."""
        base[rows], logits0[rows] = beta, _left(F, beta)
        p = np.empty((n, len(rows), C))
        ce0[rows] = _softmax_rows(logits0[rows], _NONE, rows, codes, _NONE, 2, p).mean(axis=1)
        p0[:, rows] = p
        p[np.arange(n)[:, None], np.arange(len(rows)), codes[rows].T] -= 1.0  # p - onehot
        g0[rows] = _residual_grad(F, p, np.zeros_like(beta), 0.0)

    rebase(np.arange(B), beta0)

    def objective(rows: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        delta = beta - base[rows]
        if not delta.any():  # at the bases themselves
            return ce0[rows] + 0.5 * lam * _dot(beta, beta), g0[rows] + lam * beta
        far = _dot(delta, delta) > REBASE**2 * _dot(base[rows], base[rows])
        if far.any():  # new float64 bases for these labellings
            rebase(rows[far], beta[far])
            delta[far] = 0.0
        dlogits = _left(F32, delta.astype(np.float32))  # (b, n, C)
        dp = np.empty((n, len(rows), C), np.float32)
        ce = _softmax_rows(dlogits, logits0, rows, codes, p0, 1, dp)
        grad = g0[rows] + _residual_grad(F32, dp, beta, lam)
        return ce.mean(axis=1) + 0.5 * lam * _dot(beta, beta), grad

    return objective


def _softmax(fit: Fit, Y: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int, int]:
    """Penalized softmax regression for all B label matrices (B, n, C) -> (beta (B, r, C),
    steps of the slowest labelling, labellings not converged within max_iter).

    Up to three passes of `_lbfgs`, each down to the accuracy its arithmetic allows:
    float32 GEMMs (about 2x faster than float64) down to a step of 1e-3 of the weights (float32
    rounding of the logits shows near 1e-4); then the same float32 GEMMs on the corrections
    around a float64 base point (`_refined`, float64 to about 1e-9) down to max(tol, 1e-5);
    then, only when tol < 1e-5, plain float64. So tol holds whatever the earlier passes did.
    """
    F, s2, lam = fit.basis.train, fit.basis.s2, fit.lam
    B, n, C = Y.shape
    codes = _codes(Y)
    inverse = 1.0 / (s2 / (n * C) + lam)[:, None]  # (r, 1): the Hessian at beta = 0, inverted
    beta = np.zeros((B, F.shape[1], C))
    steps = left = 0
    F32 = F.astype(np.float32)
    passes: list[tuple[Callable[[np.ndarray], Objective], float]] = [
        (lambda b: lambda rows, x: _softmax_value_grad(F32, codes, rows, x, lam), _FLOAT32_TOL),
        (lambda b: _refined(F, F32, codes, b, lam), _REFINED_TOL),
        (lambda b: lambda rows, x: _softmax_value_grad(F, codes, rows, x, lam), 0.0),
    ]
    for make, floor in passes:
        if steps >= max_iter:
            break
        beta, more, left = _lbfgs(make(beta), B, beta, inverse, max(tol, floor),
                                  max_iter - steps)
        steps += more
        if tol >= floor:
            break
    return beta, steps, left


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-labelling inner products of (b, r, C) arrays -> (b,)."""
    return np.einsum("brc,brc->b", a, b)


def _lbfgs(objective: Objective, B: int, beta: np.ndarray, inverse: np.ndarray, tol: float,
           max_iter: int) -> tuple[np.ndarray, int, int]:
    """L-BFGS from beta (B, r, C), batched over the B labellings -> (beta, steps taken,
    labellings whose last step was above tol of their weights' norm).

    The direction is the two-loop recursion over the last MEMORY steps (a rejected one holds no
    pair for its labelling), started from
    the diagonal `inverse` (the Hessian at beta = 0, inverted: the first step is a Newton step)
    scaled by s^T y / y^T inverse y. A labelling's step of length eta is accepted when it
    lowers the objective enough (Armijo, 1e-4); otherwise that labelling keeps its beta and
    halves eta for its next step, so the objective never rises.
    """
    beta = beta.copy()
    active = np.arange(B)
    value, grad = objective(active, beta)
    shape = (MEMORY, *beta.shape)
    hist_s, hist_y = np.zeros(shape), np.zeros(shape)  # slot = step number % MEMORY
    rho = np.zeros((MEMORY, B))  # 1 / s^T y; 0 where a labelling's step was rejected
    gamma = np.ones(B)
    eta = np.ones(B)
    it = 0
    while len(active) and it < max_iter:
        q = grad.copy()
        lags = range(1, min(it, MEMORY) + 1)
        alpha = {}
        for lag in lags:  # newest to oldest
            slot = (it - lag) % MEMORY
            alpha[lag] = rho[slot] * _dot(hist_s[slot], q)
            q -= alpha[lag][:, None, None] * hist_y[slot]
        d = gamma[:, None, None] * inverse * q
        for lag in reversed(lags):  # oldest to newest
            slot = (it - lag) % MEMORY
            d += (alpha[lag] - rho[slot] * _dot(hist_y[slot], d))[:, None, None] * hist_s[slot]
        d = -d
        slope = _dot(grad, d)
        uphill = slope >= 0  # rounding: fall back to the preconditioned gradient
        if uphill.any():
            d[uphill] = -(inverse * grad)[uphill]
            slope[uphill] = _dot(grad[uphill], d[uphill])
        step = eta[:, None, None] * d
        cand = beta[active] + step
        v_new, g_new = objective(active, cand)
        ok = v_new <= value + 1e-4 * eta * slope + 1e-13 * np.abs(value)
        beta[active[ok]] = cand[ok]
        change = g_new - grad
        ys = _dot(change, step)
        keep = ok & (ys > 0)
        slot = it % MEMORY
        hist_s[slot], hist_y[slot] = step, change
        rho[slot] = np.where(keep, 1.0 / np.where(keep, ys, 1.0), 0.0)
        yy = _dot(change, inverse * change)
        gamma = np.where(keep, ys / np.maximum(yy, 1e-300), gamma)
        it += 1
        value = np.where(ok, v_new, value)
        grad = np.where(ok[:, None, None], g_new, grad)
        eta = np.where(ok, 1.0, 0.5 * eta)
        size = np.sqrt(_dot(step, step))
        norm = np.sqrt(_dot(beta[active], beta[active]))
        going = size > tol * np.maximum(norm, 1e-300)
        if not going.all():
            active, value, grad, eta = active[going], value[going], grad[going], eta[going]
            hist_s, hist_y, rho = hist_s[:, going], hist_y[:, going], rho[:, going]
            gamma = gamma[going]
    return beta, it, len(active)


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
    tol: float = 1e-4,
    max_iter: int = 1000,
    solve: str = "auto",
    batched: bool = True,
    fit: Fit | None = None,
    train: bool = True,
    backend: str = "numpy",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the training and evaluation rows learned from B label matrices at once.

    X (N, D) features; train_idx (n,), eval_idx (m,) row indices; Y (B, n, C) one-hot labels of
    the training rows. Returns (Z_train (B, n, k), Z_eval (B, m, k)): the learned projection
    reduced to its top-k principal directions on the training rows (k=None: all C).
    tol, max_iter: the softmax's stopping rule (see `_softmax`); a labelling not converged
    within max_iter is used as it is, with a RuntimeWarning. solve: see `training_basis`.
    ``fit``: `prepare_fit` of the same rows, learner and ridge, to share it between calls.
    ``batched=False``: a loop of full re-fits (the reference; the same values up to rounding).
    ``train=False`` with k=None: Z_train is not computed (returned with 0 rows), for callers that
    only read the evaluation rows. ``backend`` (distsim.stats.backend): "torch" runs the batched
    fit on torch's device (distsim.stats.embedding_torch; the basis is computed here either way).
    """
    if not batched:
        pairs = [
            _lda_refit(X, train_idx, eval_idx, y, ridge) if learner == "lda"
            else embed(X, train_idx, eval_idx, y[None], learner, ridge=ridge, k=None, tol=tol,
                       max_iter=max_iter, solve=solve)
            for y in Y
        ]
        Ztr = np.concatenate([np.reshape(p[0], (-1, *Y.shape[1:])) for p in pairs])
        Zev = np.concatenate([np.reshape(p[1], (-1, len(eval_idx), Y.shape[2])) for p in pairs])
        return _reduce(Ztr, Zev, k)
    fit = fit if fit is not None else prepare_fit(X, train_idx, eval_idx, learner, ridge, solve)
    from distsim.stats.backend import resolve

    if resolve(backend) == "torch":
        from distsim.stats.embedding_torch import embed_fit

        return embed_fit(fit, Y, k, tol, max_iter, train)
    if learner == "lda":
        beta = _lda(fit, Y)
    else:
        beta, _, left = _softmax(fit, Y, tol, max_iter)
        if left:
            warnings.warn(
                f"softmax learner: {left} of {len(Y)} fits did not reach tol={tol} within "
                f"max_iter={max_iter} steps; their last iterates are used",
                RuntimeWarning,
                stacklevel=2,
            )
    if not train and k is None:
        return np.empty((len(Y), 0, Y.shape[2])), _left(fit.basis.eval, beta)
    return _reduce(_left(fit.basis.train, beta), _left(fit.basis.eval, beta), k)
