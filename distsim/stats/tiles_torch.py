"""The torch backend of a distance tile (distsim.stats.backend): its distances, their sums by
group and its top-k lists, all on the torch device, so that only the close pairs and the
tile's summaries cross to the host.

* ``sq_block``: distances.distance_block's arithmetic on the device: the float32 GEMM d2 =
  |z_a|^2 + |z_b|^2 - 2 z_a z_b^T on centred rows, then the close pairs (d2 below TAU32 of
  |z_a|^2 + |z_b|^2) recomputed in float64 on the CPU by the same ``_refined`` the numpy
  backend uses, written back; a diagonal block mirrored from its upper triangle.
* ``group_sums``: the intra- and inter-group count, sum and sum of squares of a tile's
  distances, in float64 (pipeline.pairs.tile_summary's).
* ``topk``: the rows' (and columns') k nearest by int64 keys (distance bits << 32 | global
  index), as distsim.stats.neighbors orders them: by distance, ties to the smaller index, the
  own index excluded, short lists padded with (-1, inf). Keys are unique, so ``torch.topk``
  gives neighbors' lists exactly, whatever its order among equal values.

The distances equal the numpy backend's to the float32 GEMM's rounding (tests/test_backend.py);
for the same distances the sums agree to float64 rounding and the lists exactly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from distsim.stats.backend import device
from distsim.stats.distances import TAU32, _prepare_pair, _Prepared, _refined

Tensor = torch.Tensor
_PAD = torch.iinfo(torch.int64).max  # a list's padding key: index -1, distance inf


def sq_block(a: _Prepared, b: _Prepared, diagonal: bool) -> Tensor:
    """(n_a, n_b) float32 squared distances (halved for cosine: 1 - cos) of a block, on the
    device: distances._sq_block's result."""
    dev = device()
    za = torch.from_numpy(a.z).to(dev)
    zb = za if b is a else torch.from_numpy(b.z).to(dev)
    d2 = za @ zb.T
    d2 *= -2.0
    sa = torch.from_numpy(a.sq.astype(np.float32)).to(dev)
    sb = sa if b is a else torch.from_numpy(b.sq.astype(np.float32)).to(dev)
    bound = sa[:, None] + sb[None, :]
    d2 += bound
    bound *= np.float32(TAU32).item()
    close = d2 < bound
    if diagonal:
        close.fill_diagonal_(False)
    pairs = close.nonzero()  # (P, 2): few, or a dense patch of near-duplicates
    if len(pairs):
        ri, ci = pairs.cpu().numpy().T
        d2[pairs[:, 0], pairs[:, 1]] = torch.from_numpy(
            _refined(ri, ci, a, b).astype(np.float32)).to(dev)
    d2.clamp_(min=0.0)
    if diagonal:  # symmetric, zero diagonal: the upper triangle mirrored
        upper = torch.triu(d2, diagonal=1)
        d2 = upper + upper.T
    return d2


def finish(d2: Tensor, metric: str, unit: float = 1.0) -> Tensor:
    """Squared distances -> distances, in place (distances._finish)."""
    if metric == "euclidean":
        d2.sqrt_()
        if unit != 1.0:
            d2 *= np.float32(unit).item()
        return d2
    return d2.mul_(0.5)


def group_sums(D: Tensor, groups_i: np.ndarray, groups_j: np.ndarray,
               diagonal: bool) -> dict[str, Any]:
    """Intra-group and inter-group distance count, sum and sum of squares of a tile D (n_I,
    n_J) on the device, in float64; a diagonal tile counts each unordered pair once."""
    dev = D.device
    gi = torch.from_numpy(np.asarray(groups_i)).to(dev)
    gj = torch.from_numpy(np.asarray(groups_j)).to(dev)
    same = gi[:, None] == gj[None, :]
    other = ~same
    if diagonal:
        upper = torch.ones_like(same).triu_(diagonal=1)
        same &= upper
        other &= upper
    d = D.to(torch.float64)
    out: dict[str, Any] = {}
    for name, mask in (("intra", same), ("inter", other)):
        v = d[mask]
        out |= {f"{name}_count": int(v.numel()), f"{name}_sum": float(v.sum()),
                f"{name}_sumsq": float(v.square().sum())}
    return out


def _lists(D: Tensor, k: int, row_start: int, col_start: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows' top-k of D (n_I, n_J) -> (indices (n_I, k) int64, distances (n_I, k) float32),
    as neighbors.block_topk."""
    n_i, n_j = D.shape
    dev = D.device
    cols = torch.arange(col_start, col_start + n_j, device=dev)
    bits = (D + 0.0).view(torch.int32).to(torch.int64)  # -0.0 -> +0.0; order kept
    keys = (bits << 32) | cols
    rows = torch.arange(row_start, row_start + n_i, device=dev)
    keys[rows[:, None] == cols[None, :]] = _PAD  # a row's own index
    best = torch.topk(keys, min(k, n_j), dim=1, largest=False, sorted=True).values
    if best.shape[1] < k:
        best = torch.cat([best, best.new_full((n_i, k - best.shape[1]), _PAD)], dim=1)
    pad = best == _PAD
    idx = (best & 0xFFFFFFFF).masked_fill_(pad, -1)
    dist = (best >> 32).to(torch.int32).view(torch.float32).masked_fill_(pad, float("inf"))
    return idx.cpu().numpy(), dist.cpu().numpy()


def topk(D: Tensor, k: int, row_start: int, col_start: int, columns: bool
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows' top-k lists of a tile D on the device, and (columns=True) the columns' too,
    else (0, k) ones: neighbors.block_topk / tile_topk's results, exactly."""
    ri, rd = _lists(D, k, row_start, col_start)
    if not columns:
        return ri, rd, np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    ci, cd = _lists(D.T, k, col_start, row_start)
    return ri, rd, ci, cd


def _now(dev: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA runs asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def tile_parts(X_i: np.ndarray, X_j: np.ndarray | None, groups_i: np.ndarray,
               groups_j: np.ndarray, start_i: int, start_j: int, k: int, metric: str,
               seconds: dict[str, float] | None = None
               ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """pipeline.pairs.block_tile on the device: (the tile's group sums, the global rows of
    its lists, their indices (rows, k), their distances (rows, k)); X_j None: a diagonal
    tile. ``seconds`` gets the time of each step ("distances", "sums", "topk").

    >>> X = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    >>> sums, rows, idx, dist = tile_parts(X, None, np.array([0, 0, 1]), np.array([0, 0, 1]),
    ...                                    0, 0, 1, "euclidean")
    >>> sums["intra_sum"], sums["inter_sum"], idx.ravel().tolist(), dist.ravel().tolist()
    (5.0, 15.0, [1, 0, 1], [5.0, 5.0, 5.0])
    """
    dev = device()
    t0 = _now(dev)
    a, b, unit = _prepare_pair(X_i, X_j, metric)
    D = finish(sq_block(a, a if b is None else b, b is None), metric, unit)
    t1 = _now(dev)
    summary = group_sums(D, groups_i, groups_j, X_j is None)
    t2 = _now(dev)
    ri, rd, ci, cd = topk(D, k, start_i, start_j, columns=X_j is not None)
    rows = np.arange(start_i, start_i + len(X_i))
    if X_j is not None:
        rows = np.concatenate([rows, np.arange(start_j, start_j + len(X_j))])
        ri, rd = np.concatenate([ri, ci]), np.concatenate([rd, cd])
    if seconds is not None:
        for step, t in (("distances", t1 - t0), ("sums", t2 - t1), ("topk", _now(dev) - t2)):
            seconds[step] = seconds.get(step, 0.0) + t
    return summary, rows, ri, rd
