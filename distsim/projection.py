"""Seeded random maps shared by every model of a study: output projection and input sketch.

Both are functions of their arguments only (sizes and ``seed``), so every worker builds the same
matrix for every model of a study, whatever the batching.

Output projection R (D x dim, entries N(0, 1/dim), float32): generated in row blocks of 8192,
block b from ``numpy.random.default_rng([seed, b])``, so that `project` can stream the blocks of a
matrix too large to keep (more than CACHE_BYTES) and still apply the same R. It costs D x dim
random numbers per call: for a CIFAR-size input a hidden Gram has D = 3073 * 3074 / 2 = 4.7M.

Input sketch S ((P+1) x m, entries N(0, 1/m), float64): from ``default_rng([seed, 2**31 - 1])``,
apart from every projection block's stream. ``sketch_width(dim)`` is the largest m such that a
sketched Gram's upper triangle, m(m+1)/2 values, fits in dim (see distsim.features).
"""

from __future__ import annotations

import functools
import math

import numpy as np

# SeedSequence entropy [seed, this] of the input sketch: apart from the projection's [seed, block]
_SKETCH_STREAM = 2**31 - 1
_PROJECTION_BLOCK = 8192
# Cache a projection matrix up to this size (bytes); stream larger ones. Results do not depend
# on it beyond float32 rounding.
CACHE_BYTES = 256 * 2**20


def _projection_block(seed: int, block: int, rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng([seed, block])
    return rng.standard_normal((rows, dim), dtype=np.float32) / np.float32(math.sqrt(dim))


@functools.lru_cache(maxsize=16)
def _cached_projection(n_features: int, dim: int, seed: int) -> np.ndarray:
    blocks = [
        _projection_block(seed, b, min(_PROJECTION_BLOCK, n_features - start), dim)
        for b, start in enumerate(range(0, n_features, _PROJECTION_BLOCK))
    ]
    r = np.concatenate(blocks, axis=0)
    r.setflags(write=False)
    return r


def projection_matrix(n_features: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n_features, dim) float32 Gaussian projection N(0, 1/dim), a function of its arguments."""
    if n_features < 1 or dim < 1:
        raise ValueError(f"n_features and dim must be >= 1, got {n_features}, {dim}")
    return _cached_projection(int(n_features), int(dim), int(seed))


def check_dim(dim: object) -> None:
    """Raise ValueError unless ``dim`` (a feature size) is a positive int."""
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be None or a positive int, got {dim!r}")


def project(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """(K, D) -> (K, dim) float32 with the study's seeded projection (streamed when R is large)."""
    check_dim(dim)
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[1]
    if n * dim * 4 <= CACHE_BYTES:
        return x @ projection_matrix(n, dim, seed)
    out = np.zeros((x.shape[0], dim), dtype=np.float32)
    for b, start in enumerate(range(0, n, _PROJECTION_BLOCK)):
        stop = min(start + _PROJECTION_BLOCK, n)
        out += x[:, start:stop] @ _projection_block(seed, b, stop - start, dim)
    return out


def sketch_width(dim: int) -> int:
    """Input-sketch width m for a feature size ``dim``: the largest m with m(m+1)/2 <= dim."""
    check_dim(dim)
    return (math.isqrt(8 * int(dim) + 1) - 1) // 2


@functools.lru_cache(maxsize=16)
def _cached_sketch(n_in: int, m: int, seed: int) -> np.ndarray:
    s = np.random.default_rng([seed, _SKETCH_STREAM]).standard_normal((n_in, m)) / math.sqrt(m)
    s.setflags(write=False)
    return s


def sketch_matrix(n_in: int, m: int, seed: int = 0) -> np.ndarray:
    """(n_in, m) float64 input-side sketch S, entries N(0, 1/m), a function of its arguments only
    (rows are inputs then the bias; the same S for every model of a study and any batching)."""
    if n_in < 1 or m < 1:
        raise ValueError(f"n_in and m must be >= 1, got {n_in}, {m}")
    return _cached_sketch(int(n_in), int(m), int(seed))
