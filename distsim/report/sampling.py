"""Which models a report figure shows and where they lie: a sample stratified by task, read
from the store without the rest of the matrix, and its 2-D PCA.

A figure of 10k models is unreadable and slow, so the report draws at most a few thousand
points and a few hundred heatmap rows; each task keeps its share of the sample, so the
picture of the tasks is the study's, only thinner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from distsim.store import FeatureMatrix, Store
from distsim.store.codecs import feature_matrix
from distsim.store.shards import polars_schema
from distsim.store.tables import TABLES

_EXACT = 512  # min(N, D) up to which the PCA is exact; above, a randomized one


def stratified_sample(tasks: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of at most `limit` of the rows whose task labels are `tasks` (N,).

    Every row when N <= limit; else each task keeps its share limit * n_task / N (largest
    remainders round it, so exactly `limit` rows), rows drawn within a task by a seeded rng.
    """
    tasks = np.asarray(tasks)
    n = len(tasks)
    if n <= limit:
        return np.arange(n)
    labels, inverse, counts = np.unique(tasks, return_inverse=True, return_counts=True)
    quota = counts * (limit / n)
    take = np.floor(quota).astype(np.int64)
    short = limit - int(take.sum())
    if short > 0:  # largest remainders first, ties to the smaller task label
        order = np.lexsort((np.arange(len(labels)), -(quota - take)))
        take[order[:short]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == i), size=int(k), replace=False)
              for i, k in enumerate(take) if k > 0]
    return np.sort(np.concatenate(chosen))


def pca_2d(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The rows of X (N, D) on their first two principal axes, (N, 2), and the share of the
    total variance each axis explains, (2,). Exact (the eigenvectors of the smaller of the two
    Gram matrices) when min(N, D) <= 512, else a randomized range finder with 4 power
    iterations (Halko et al. 2011), about 100 N D flops.
    """
    X = np.asarray(X, dtype=np.float32)
    n, d = X.shape
    out = np.zeros((n, 2))
    if n < 2 or d == 0:
        return out, np.zeros(2)
    Xc = X - X.mean(axis=0)
    k = min(2, n, d)
    if min(n, d) <= _EXACT:  # eigenvectors of the smaller Gram matrix: exact, BLAS-3 fast
        G = (Xc @ Xc.T if n <= d else Xc.T @ Xc).astype(np.float64)
        total = float(np.trace(G))
        if total <= 0.0:
            return out, np.zeros(2)
        w, V = np.linalg.eigh(G)
        s = np.sqrt(np.clip(w[::-1][:k], 0.0, None))
        V = V[:, ::-1][:, :k]
        U = V if n <= d else (Xc @ V) / np.where(s > 0, s, 1.0)
    else:
        total = float(np.square(Xc, dtype=np.float64).sum())
        if total <= 0.0:
            return out, np.zeros(2)
        rng = np.random.default_rng(seed)
        Q = np.linalg.qr(Xc @ rng.standard_normal((d, k + 10), dtype=np.float32))[0]
        for _ in range(4):
            Q = np.linalg.qr(Xc @ (Xc.T @ Q))[0]
        Ub, s, _ = np.linalg.svd(Q.T @ Xc, full_matrices=False)
        U = Q @ Ub
    U, s = U[:, :k], s[:k]
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(k)])  # a fixed orientation
    out[:, :k] = U * s * np.where(signs == 0, 1.0, signs)
    share = np.zeros(2)
    share[:k] = s**2 / total
    return out, share


@dataclass(frozen=True)
class MatrixSample:
    """A stratified sample of one feature matrix: its rows (sorted by task), the models the
    matrix has in all (`total`) and per task ({task: count})."""

    features: FeatureMatrix
    total: int
    per_task: dict[int, int]


def read_sample(store: Store, arch: str, method: str, layer: str, limit: int,
                seed: int = 0, epoch: int | None = None) -> MatrixSample:
    """At most `limit` rows of the features of (arch, method, layer), stratified by task; only
    the sampled rows' vectors are read (model ids and tasks come from the id columns alone).
    epoch: only the checkpoints of that epoch ([train] save_epochs), as feature_matrix."""
    files = store.shard_files("features", {"arch": arch, "method": method, "layer": layer})
    what = f"{arch}/{method}/{layer}"
    if not files:
        return MatrixSample(feature_matrix(pl.DataFrame(), what), 0, {})
    schema = polars_schema(TABLES["features"].file_schema)
    lf = pl.scan_parquet(files, schema=schema, missing_columns="insert")
    if epoch is not None:
        lf = lf.filter(pl.col("model_id").str.ends_with(f"-e{int(epoch)}"))
    ids = lf.select("model_id", "task", "seed").collect().sort("task", "seed", "model_id")
    tasks = ids["task"].to_numpy()
    labels, counts = np.unique(tasks, return_counts=True)
    keep = stratified_sample(tasks, limit, seed)
    rows = lf.select("model_id", "task", "seed", "vector", "trial_id")
    if len(keep) < ids.height:
        chosen = ids["model_id"].gather(keep).to_list()
        rows = rows.filter(pl.col("model_id").is_in(chosen))
    fm = feature_matrix(rows.collect(), what)
    per_task = {int(t): int(c) for t, c in zip(labels, counts, strict=True)}
    return MatrixSample(fm, ids.height, per_task)
