"""Seeded random maps shared by every model of a study: output projection and input sketch.

All are functions of their arguments only (sizes and ``seed``), so every worker builds the same
map for every model of a study, whatever the batching.

Output projection, ``projection="countsketch"`` (the default): a CountSketch C (D -> dim).
Coordinate j of the feature vector is added, times a sign sigma(j) = +-1, into bucket h(j) in
[0, dim): y[b] = sum over {j : h(j) = b} of sigma(j) x[j]. h and sigma come from
``numpy.random.default_rng([seed, 2**31 - 2, dim, block])`` in blocks of HASH_BLOCK coordinates
(block = j // HASH_BLOCK, the last block truncated), so coordinate j's hash depends on (j, dim,
seed) only: the same map for any D that holds j, cached (int32 bucket + int8 sign, 5 bytes per
coordinate) up to CACHE_BYTES and streamed block by block beyond. Applying it costs one
multiply-add per coordinate, O(K D) for a (K, D) batch, with no D x dim matrix; it sums each row
in float64 in coordinate order, so a row's result is bitwise the same whatever the batch, the
chunking or the streaming. It is linear, E|Cx|^2 = |x|^2, and Var|Cx|^2 = (2/dim)(|x|_2^4 -
|x|_4^4), never more than a Gaussian projection's 2|x|_2^4 / dim. (A sparse JL map with s
entries per column in s blocks of dim/s rows has that same variance at s times the cost, so
s = 1.)

Output projection, ``projection="gaussian"`` (legacy, the map of stores made before
"countsketch"): R (D x dim, entries N(0, 1/dim), float32), generated in row blocks of 8192,
block b from ``default_rng([seed, b])``, streamed beyond CACHE_BYTES. It costs D x dim random
numbers and a D x dim GEMM per call: hours per zoo at CIFAR sizes (D = 1.6M raw weights, or
3073 * 3074 / 2 = 4.7M for a Gram's triangle, dim 4096).

Input sketch S ((P+1) x m, entries N(0, 1/m), float64): from ``default_rng([seed, 2**31 - 1])``,
apart from every other stream. ``sketch_width(dim)`` is the largest m such that a sketched Gram's
upper triangle, m(m+1)/2 values, fits in dim (see distsim.weights.features). (P+1) x m random
numbers: cheap, so it stays Gaussian.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from distsim.config.choices import PROJECTIONS

# SeedSequence entropy [seed, this] of the input sketch: apart from the projection's [seed, block]
_SKETCH_STREAM = 2**31 - 1
# SeedSequence entropy [seed, this, dim, block] of the CountSketch hashes
_HASH_STREAM = 2**31 - 2
_PROJECTION_BLOCK = 8192
# Coordinates per CountSketch hash block; the hashes of coordinate j do not depend on D.
HASH_BLOCK = 1 << 16
# Cache a projection matrix or a hash table up to this size (bytes); stream larger ones. Results
# do not depend on it (CountSketch: bitwise; Gaussian: beyond float32 rounding).
CACHE_BYTES = 256 * 2**20


def check_dim(dim: object) -> None:
    """Raise ValueError unless ``dim`` (a feature size) is a positive int."""
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be None or a positive int, got {dim!r}")


def check_projection(projection: object) -> None:
    """Raise ValueError unless ``projection`` is one of PROJECTIONS."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")


def project(
    features: np.ndarray, dim: int, seed: int = 0, projection: str = "countsketch"
) -> np.ndarray:
    """(K, D) -> (K, dim) float32 with the study's seeded output projection (see the module
    docstring): ``count_sketch`` or the legacy ``gaussian_project``."""
    check_projection(projection)
    if projection == "gaussian":
        return gaussian_project(features, dim, seed)
    return count_sketch(features, dim, seed)


# ---------------------------------------------------------------- CountSketch


def _hash_block(seed: int, dim: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(HASH_BLOCK,) int32 buckets in [0, dim) and int8 signs +-1 of coordinates
    [block * HASH_BLOCK, (block + 1) * HASH_BLOCK)."""
    rng = np.random.default_rng([seed, _HASH_STREAM, dim, block])
    bucket = rng.integers(0, dim, HASH_BLOCK, dtype=np.int32)
    sign = (1 - 2 * rng.integers(0, 2, HASH_BLOCK, dtype=np.int8)).astype(np.int8)
    return bucket, sign


def _hash_range(seed: int, dim: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets and signs of coordinates [start, stop), generated block by block."""
    buckets, signs = [], []
    for block in range(start // HASH_BLOCK, -(-stop // HASH_BLOCK)):
        b, s = _hash_block(seed, dim, block)
        lo = max(start - block * HASH_BLOCK, 0)
        hi = min(stop - block * HASH_BLOCK, HASH_BLOCK)
        buckets.append(b[lo:hi])
        signs.append(s[lo:hi])
    return np.concatenate(buckets), np.concatenate(signs)


@functools.lru_cache(maxsize=8)
def _cached_hashes(n_features: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    bucket, sign = _hash_range(seed, dim, 0, n_features)
    bucket.setflags(write=False)
    sign.setflags(write=False)
    return bucket, sign


def sketch_hashes(n_features: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CountSketch hashes of coordinates 0..n_features-1: ((n,) int32 bucket in [0, dim),
    (n,) int8 sign +-1), a function of (coordinate, dim, seed) only (read-only, cached)."""
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    check_dim(dim)
    return _cached_hashes(int(n_features), int(dim), int(seed))


@numba.njit(cache=True)
def _scatter_add(x: np.ndarray, bucket: np.ndarray, sign: np.ndarray, out: np.ndarray) -> None:
    """out[k, bucket[j]] += sign[j] * x[k, j] for every row k and column j, in column order
    (x: (K, B) float32/float64, out: (K, dim) float64)."""
    for k in range(x.shape[0]):
        row = out[k]
        for j in range(x.shape[1]):
            row[bucket[j]] += sign[j] * np.float64(x[k, j])


def count_sketch(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """(K, D) -> (K, dim) float32 CountSketch of each row (float64 sums in coordinate order:
    row i is bitwise the same in any batch; hashes cached up to CACHE_BYTES, else streamed).
    Cost O(K D) multiply-adds, plus 2 D random numbers once per (D, dim, seed)."""
    check_dim(dim)
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (K, D), got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    n, dim = x.shape[1], int(dim)
    out = np.zeros((x.shape[0], dim), dtype=np.float64)
    if n * 5 <= CACHE_BYTES:
        bucket, sign = sketch_hashes(n, dim, seed)
        _scatter_add(x, bucket, sign, out)
    else:
        for start in range(0, n, HASH_BLOCK):
            stop = min(start + HASH_BLOCK, n)
            bucket, sign = _hash_range(int(seed), dim, start, stop)
            _scatter_add(x[:, start:stop], bucket, sign, out)
    return out.astype(np.float32)


# ---------------------------------------------------------------- Gaussian (legacy)


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
    """(n_features, dim) float32 Gaussian projection N(0, 1/dim), a function of its arguments
    (the legacy ``projection="gaussian"``)."""
    if n_features < 1 or dim < 1:
        raise ValueError(f"n_features and dim must be >= 1, got {n_features}, {dim}")
    return _cached_projection(int(n_features), int(dim), int(seed))


def gaussian_project(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """(K, D) -> (K, dim) float32 with the legacy Gaussian R (streamed when R is large):
    D x dim random numbers and a (K, D) x (D, dim) GEMM per call."""
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


# ---------------------------------------------------------------- input sketch


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
