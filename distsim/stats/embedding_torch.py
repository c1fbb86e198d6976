"""The torch backend of distsim.stats.linear_embedding's batched fits: the same ridge (lda) and
softmax learners, the same arithmetic, on a torch device (distsim.stats.backend).

Every step mirrors its numpy counterpart in linear_embedding (read that module for the
maths): the basis (`prepare_fit`, numpy, once per test) is moved to the device; lda is two
float64 GEMMs; the softmax's batched L-BFGS runs its three passes (float32 GEMMs, float32
corrections around a float64 base, float64) with the same memory, line search and stopping
rule; the per-row softmax that linear_embedding runs as a numba kernel is torch's log-softmax
in float64. So both backends take the same steps up to rounding and give the same embeddings
to the fit's tolerance (tests/test_backend.py: the HTT statistics and their nulls equal).

Shapes as in linear_embedding: B labellings, n training rows, m evaluation rows, r basis
directions, C classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from distsim.stats.backend import device
from distsim.stats.linear_embedding import (
    _FLOAT32_TOL,
    _REFINED_TOL,
    MEMORY,
    REBASE,
    Fit,
    _codes,
)

Tensor = torch.Tensor
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _left(M: Tensor, A: Tensor) -> Tensor:
    """M (p, n) applied to every matrix of A (B, n, C) -> (B, p, C), as one GEMM."""
    B, n, C = A.shape
    out = M @ A.permute(1, 0, 2).reshape(n, B * C)
    return out.reshape(len(M), B, C).permute(1, 0, 2)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-labelling inner products of (b, r, C) tensors -> (b,). On the CPU by numpy's
    einsum, one fused pass: torch's einsum, vecdot and bmm took 5-20 times as long there
    (measured at (20, 2145, 45) float64)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.einsum("brc,brc->b", a.numpy(), b.numpy()))
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _softmax_rows(z: Tensor, z0: Tensor | None, rows: Tensor, codes: Tensor,
                  p0: Tensor | None, mode: int) -> tuple[Tensor, Tensor]:
    """linear_embedding._softmax_rows in float64: cross-entropy (b, n) of the logits z (b, n,
    C) (plus z0[rows]) against codes[rows], and (n, b, C): p - onehot (mode 0), p - p0[:, rows]
    (mode 1) or p (mode 2)."""
    v = z.to(torch.float64)
    if z0 is not None:
        v = v + z0[rows]
    logp = torch.log_softmax(v, dim=-1)
    lab = codes[rows]  # (b, n)
    ce = -logp.gather(-1, lab[..., None])[..., 0]
    p = logp.exp()
    if mode == 0:
        p = p - torch.nn.functional.one_hot(lab, p.shape[-1]).to(p.dtype)
    elif mode == 1:
        assert p0 is not None
        p = p - p0[:, rows].permute(1, 0, 2)
    return ce, p.permute(1, 0, 2)


def _residual_grad(F: Tensor, residual: Tensor, beta: Tensor, lam: float) -> Tensor:
    """F^T residual / n + lam beta (b, r, C) for residual (n, b, C) in F's dtype."""
    n, b, C = residual.shape
    g = (F.T @ residual.reshape(n, b * C)).reshape(-1, b, C)
    return g.permute(1, 0, 2).to(torch.float64) / n + lam * beta


def _value_grad(F: Tensor, codes: Tensor, rows: Tensor, beta: Tensor,
                lam: float) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy + lam/2 ||beta||^2 (b,) and its gradient (b, r, C) at beta."""
    n, (b, _, C) = len(F), beta.shape
    if bool(beta.any()):
        logits = _left(F, beta.to(F.dtype))
    else:  # the start, beta = 0
        logits = torch.zeros((b, n, C), dtype=F.dtype, device=F.device)
    ce, residual = _softmax_rows(logits, None, rows, codes, None, 0)
    grad = _residual_grad(F, residual.to(F.dtype), beta, lam)
    return ce.mean(dim=1) + 0.5 * lam * _dot(beta, beta), grad


def _refined(F: Tensor, F32: Tensor, codes: Tensor, beta0: Tensor, lam: float) -> Objective:
    """linear_embedding._refined: float32 corrections around float64 base points."""
    n, (B, r, C) = len(F), beta0.shape
    f64, dev = torch.float64, F.device
    base = torch.empty((B, r, C), dtype=f64, device=dev)
    logits0 = torch.empty((B, n, C), dtype=f64, device=dev)  # F base
    p0 = torch.empty((n, B, C), dtype=f64, device=dev)  # its softmax, rows' layout
    ce0 = torch.empty(B, dtype=f64, device=dev)  # cross-entropy
    g0 = torch.empty((B, r, C), dtype=f64, device=dev)  # F^T (p0 - Y) / n

    def rebase(rows: Tensor, beta: Tensor) -> None:
        base[rows], logits0[rows] = beta, _left(F, beta)
        ce, p = _softmax_rows(logits0[rows], None, rows, codes, None, 2)
        ce0[rows] = ce.mean(dim=1)
        p0[:, rows] = p
        p = p - torch.nn.functional.one_hot(codes[rows], C).to(p.dtype).permute(1, 0, 2)
        g0[rows] = _residual_grad(F, p, torch.zeros_like(beta), 0.0)

    rebase(torch.arange(B, device=F.device), beta0)

    def objective(rows: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        delta = beta - base[rows]
        if not bool(delta.any()):
            return ce0[rows] + 0.5 * lam * _dot(beta, beta), g0[rows] + lam * beta
        far = _dot(delta, delta) > REBASE**2 * _dot(base[rows], base[rows])
        if bool(far.any()):
            rebase(rows[far], beta[far])
            delta[far] = 0.0
        dlogits = _left(F32, delta.to(torch.float32))
        ce, dp = _softmax_rows(dlogits, logits0, rows, codes, p0, 1)
        grad = g0[rows] + _residual_grad(F32, dp.to(torch.float32), beta, lam)
        return ce.mean(dim=1) + 0.5 * lam * _dot(beta, beta), grad

    return objective


def _lbfgs(objective: Objective, B: int, beta: Tensor, inverse: Tensor, tol: float,
           max_iter: int) -> tuple[Tensor, int, int]:
    """linear_embedding._lbfgs on tensors: the same directions, line search and stops."""
    beta = beta.clone()
    active = torch.arange(B, device=beta.device)
    value, grad = objective(active, beta)
    hist_s = torch.zeros((MEMORY, *beta.shape), dtype=beta.dtype, device=beta.device)
    hist_y = torch.zeros_like(hist_s)
    rho = torch.zeros((MEMORY, B), dtype=beta.dtype, device=beta.device)
    gamma = torch.ones(B, dtype=beta.dtype, device=beta.device)
    eta = torch.ones_like(gamma)
    it = 0
    while len(active) and it < max_iter:
        q = grad.clone()
        lags = range(1, min(it, MEMORY) + 1)
        alpha = {}
        for lag in lags:  # newest to oldest
            slot = (it - lag) % MEMORY
            alpha[lag] = rho[slot] * _dot(hist_s[slot], q)
            q.addcmul_(alpha[lag][:, None, None], hist_y[slot], value=-1.0)  # in place
        d = gamma[:, None, None] * inverse * q
        for lag in reversed(lags):  # oldest to newest
            slot = (it - lag) % MEMORY
            coef = alpha[lag] - rho[slot] * _dot(hist_y[slot], d)
            d.addcmul_(coef[:, None, None], hist_s[slot])
        d = -d
        slope = _dot(grad, d)
        uphill = slope >= 0
        if bool(uphill.any()):
            d[uphill] = -(inverse * grad)[uphill]
            slope[uphill] = _dot(grad[uphill], d[uphill])
        step = eta[:, None, None] * d
        cand = beta[active] + step
        v_new, g_new = objective(active, cand)
        ok = v_new <= value + 1e-4 * eta * slope + 1e-13 * value.abs()
        beta[active[ok]] = cand[ok]
        change = g_new - grad
        ys = _dot(change, step)
        keep = ok & (ys > 0)
        slot = it % MEMORY
        hist_s[slot], hist_y[slot] = step, change
        rho[slot] = torch.where(keep, 1.0 / torch.where(keep, ys, torch.ones_like(ys)),
                                torch.zeros_like(ys))
        yy = _dot(change, inverse * change)
        gamma = torch.where(keep, ys / yy.clamp_min(1e-300), gamma)
        it += 1
        value = torch.where(ok, v_new, value)
        grad = torch.where(ok[:, None, None], g_new, grad)
        eta = torch.where(ok, torch.ones_like(eta), 0.5 * eta)
        size = _dot(step, step).sqrt()
        norm = _dot(beta[active], beta[active]).sqrt()
        going = size > tol * norm.clamp_min(1e-300)
        if not bool(going.all()):
            active, value, grad, eta = active[going], value[going], grad[going], eta[going]
            hist_s, hist_y, rho = hist_s[:, going], hist_y[:, going], rho[:, going]
            gamma = gamma[going]
    return beta, it, len(active)


def _softmax(F: Tensor, s2: Tensor, lam: float, codes: Tensor, C: int, tol: float,
             max_iter: int) -> tuple[Tensor, int, int]:
    """linear_embedding._softmax's three passes -> (beta (B, r, C), steps, not converged)."""
    (B, n), r = codes.shape, F.shape[1]
    inverse = (1.0 / (s2 / (n * C) + lam))[:, None]
    beta = torch.zeros((B, r, C), dtype=torch.float64, device=F.device)
    steps = left = 0
    F32 = F.to(torch.float32)
    passes: list[tuple[Callable[[Tensor], Objective], float]] = [
        (lambda b: lambda rows, x: _value_grad(F32, codes, rows, x, lam), _FLOAT32_TOL),
        (lambda b: _refined(F, F32, codes, b, lam), _REFINED_TOL),
        (lambda b: lambda rows, x: _value_grad(F, codes, rows, x, lam), 0.0),
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


def _reduce(Ztr: Tensor, Zev: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """The top-k principal directions of the training embeddings (B, n, C) -> (B, n, k)."""
    if k is None:
        return Ztr, Zev
    _, V = torch.linalg.eigh(Ztr.transpose(1, 2) @ Ztr)  # ascending
    V = V.flip(-1)[..., :k]
    return Ztr @ V, Zev @ V


def embed_fit(fit: Fit, Y: np.ndarray, k: int | None, tol: float, max_iter: int,
              train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """linear_embedding.embed's batched path for a prepared `fit` and one-hot labels Y (B, n,
    C), on the torch backend's device -> (Z_train (B, n, k), Z_eval (B, m, k)) as numpy."""
    dev = device()
    b = fit.basis
    F = torch.from_numpy(np.ascontiguousarray(b.train)).to(dev)
    E = torch.from_numpy(np.ascontiguousarray(b.eval)).to(dev)
    s2 = torch.from_numpy(np.ascontiguousarray(b.s2)).to(dev)
    if fit.learner == "lda":
        y = torch.from_numpy(np.asarray(Y, dtype=np.float64)).to(dev)
        beta = _left(F.T, y - y.mean(dim=1, keepdim=True)) / (s2 + fit.lam)[:, None]
    else:
        codes = torch.from_numpy(_codes(Y)).to(dev)
        beta, _, left = _softmax(F, s2, fit.lam, codes, Y.shape[2], tol, max_iter)
        if left:
            warnings.warn(
                f"softmax learner: {left} of {len(Y)} fits did not reach tol={tol} within "
                f"max_iter={max_iter} steps; their last iterates are used",
                RuntimeWarning, stacklevel=3)
    if not train and k is None:
        return np.empty((len(Y), 0, Y.shape[2])), _left(E, beta).cpu().numpy()
    Ztr, Zev = _reduce(_left(F, beta), _left(E, beta), k)
    return Ztr.cpu().numpy(), Zev.cpu().numpy()
