"""The pairs stage: all-pairs distances of each feature matrix, a Ray Data job over tiles (I, J).

For every feature matrix (arch, method, layer) the (N, D) feature matrix is cut into row blocks of
``pairs.block`` rows; tile (I, J), I <= J, computes the distance block with
``distsim.stats.distances.distance_block``, writes its intra-task / inter-task distance sums
as one ``pairs`` shard, and returns the partial top-k neighbours of the rows of I (and of J,
from the transposed block). The driver merges the partials of each row block with
``merge_topk`` and writes one ``neighbors`` shard per block. Ray Data has no cross join, so the
dataset is the list of tile ids (``ray.data.range``); each matrix is ``ray.put`` once and a
callable class fetches it. Tiles whose outputs are in the store are skipped.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import polars as pl

from distsim.config import MatrixKey, Study
from distsim.errors import LaunchError
from distsim.pipeline.progress import Progress
from distsim.pipeline.stage import RunContext, Stage
from distsim.stats import block_topk, distance_block, merge_topk
from distsim.store import FeatureMatrix, Store


def tile_plan(n: int, block: int) -> list[tuple[int, int]]:
    """Upper-triangle tiles (I, J), I <= J, of an n x n matrix cut in blocks of `block` rows."""
    if n < 0 or block < 1:
        raise ValueError(f"need n >= 0 and block >= 1, got n={n}, block={block}")
    nb = math.ceil(n / block)
    return [(i, j) for i in range(nb) for j in range(i, nb)]


def pending_tiles(store: Store, matrix: MatrixKey, n: int,
                  block: int) -> tuple[list[tuple[int, int]], set[int]]:
    """Tiles to compute and row blocks whose neighbours are missing, for one feature matrix.

    A tile is needed when its pairs shard is missing or when it touches a row block whose
    neighbors shard is missing (a block's top-k needs every tile of its row and column).
    """
    tiles = tile_plan(n, block)
    nb = math.ceil(n / block)
    have_pairs = {(k["block_i"], k["block_j"]) for k in store.shard_keys("pairs", matrix.key)}
    have_nbrs = {k["block"] for k in store.shard_keys("neighbors", matrix.key)}
    missing = set(range(nb)) - have_nbrs
    todo = [t for t in tiles if t not in have_pairs or t[0] in missing or t[1] in missing]
    return todo, missing


def tile_summary(D: np.ndarray, tasks_i: np.ndarray, tasks_j: np.ndarray,
                 diagonal: bool) -> dict[str, Any]:
    """Intra-task and inter-task distance count, sum and sum of squares of one block (float64).

    D (n_I, n_J); a diagonal block counts each unordered pair once (strict upper triangle).
    """
    same = tasks_i[:, None] == tasks_j[None, :]
    keep = np.triu(np.ones(D.shape, dtype=bool), k=1) if diagonal else np.ones(D.shape, dtype=bool)
    d = D.astype(np.float64)
    intra, inter = d[same & keep], d[~same & keep]
    return {
        "intra_count": int(intra.size), "intra_sum": float(intra.sum()),
        "intra_sumsq": float((intra**2).sum()),
        "inter_count": int(inter.size), "inter_sum": float(inter.sum()),
        "inter_sumsq": float((inter**2).sum()),
    }


TilePart = tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]


def compute_tile(X: np.ndarray, tasks: np.ndarray, i: int, j: int, block: int, k: int,
                 metric: str) -> TilePart:
    """One tile (I=i, J=j) of X (N, D): its summary dict and partial top-k
    (rows (r,), neighbour indices (r, k), distances (r, k))."""
    n = len(X)
    si = slice(i * block, min((i + 1) * block, n))
    sj = slice(j * block, min((j + 1) * block, n))
    diagonal = i == j
    D = distance_block(X[si], None if diagonal else X[sj], metric)
    summary = tile_summary(D, tasks[si], tasks[sj], diagonal)
    rows_i = np.arange(si.start, si.stop)
    idx, dist = block_topk(D, k, si.start, sj.start)
    if diagonal:
        return summary, rows_i, idx, dist
    idx_j, dist_j = block_topk(D.T, k, sj.start, si.start)
    rows = np.concatenate([rows_i, np.arange(sj.start, sj.stop)])
    return summary, rows, np.concatenate([idx, idx_j]), np.concatenate([dist, dist_j])


class _TileWorker:
    """Ray Data callable class: fetches the feature matrices lazily (one ray.get per matrix)."""

    def __init__(self, refs: list[Any], matrices: list[MatrixKey], tiles: np.ndarray,
                 store_root: str, block: int, k: int, metric: str) -> None:
        self.refs, self.matrices, self.tiles = refs, matrices, tiles
        self.store = Store(store_root)
        self.block, self.k, self.metric = block, k, metric
        self._cached: tuple[int, FeatureMatrix] | None = None

    def _matrix(self, g: int) -> FeatureMatrix:
        import ray

        if self._cached is None or self._cached[0] != g:
            self._cached = (g, ray.get(self.refs[g]))
        return self._cached[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {"tile": [], "matrix": [], "row": [], "nbr": [],
                                            "dist": []}
        for t in batch["id"]:
            g, i, j = (int(v) for v in self.tiles[int(t)])
            fm = self._matrix(g)
            summary, rows, idx, dist = compute_tile(fm.X, fm.tasks, i, j, self.block, self.k,
                                                    self.metric)
            key = {**self.matrices[g].key, "block_i": i, "block_j": j}
            self.store.write_shard("pairs", key, [{"metric": self.metric, **summary}])
            out["tile"].append(np.full(len(rows), int(t)))
            out["matrix"].append(np.full(len(rows), g))
            out["row"].append(rows)
            out["nbr"].append(idx)
            out["dist"].append(dist)
        return {c: np.concatenate(v) for c, v in out.items()}


def neighbor_rows(fm: FeatureMatrix, block: int, rows: np.ndarray, idx: np.ndarray,
                  dist: np.ndarray) -> list[dict[str, Any]]:
    """Rows of one neighbors shard: for each model, its neighbours by rank (padding dropped)."""
    out = []
    for r, nbrs, ds in zip(rows, idx, dist, strict=True):
        for rank, (n, d) in enumerate(zip(nbrs, ds, strict=True), start=1):
            if n < 0:
                break
            out.append({
                "model_id": fm.model_ids[r], "block": block, "task": int(fm.tasks[r]),
                "rank": rank, "neighbor_id": fm.model_ids[n], "neighbor_task": int(fm.tasks[n]),
                "distance": float(d), "same_task": bool(fm.tasks[r] == fm.tasks[n]),
            })
    return out


def merge_block(n: int, b: int, block: int, k: int, rows: np.ndarray, idx: np.ndarray,
                dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k neighbours of the rows of block b of an n-row matrix, from the partial lists
    (rows, idx (., k), dist (., k)) of every tile of its row and column: (rows, idx, dist)."""
    lo, hi = b * block, min((b + 1) * block, n)
    sel = (rows >= lo) & (rows < hi)
    order = np.argsort(rows[sel], kind="stable")
    r, i, d = rows[sel][order], idx[sel][order], dist[sel][order]
    parts = math.ceil(n / block)
    if len(r) != (hi - lo) * parts:
        raise RuntimeError(f"pairs: block {b} got {len(r)} partial rows, "
                           f"expected {(hi - lo) * parts}")
    m = hi - lo
    best_i, best_d = merge_topk([i.reshape(m, parts * k)], [d.reshape(m, parts * k)], k)
    return np.arange(lo, hi), best_i, best_d


def _feature_counts(store: Store) -> dict[tuple[str, str, str], int]:
    """{(arch, method, layer): feature rows} of the store."""
    by = store.scan("features").group_by("arch", "method", "layer").agg(pl.len()).collect()
    return {(a, m, layer): int(c) for a, m, layer, c in by.iter_rows()}


def pending(study: Study, store: Store) -> int:
    """Tiles to compute over every feature matrix (a matrix with no features counts 1)."""
    counts = _feature_counts(store)
    block = study.pairs.block
    total = 0
    for m in study.matrices():
        n = counts.get((m.arch, m.method, m.layer), 0)
        total += len(pending_tiles(store, m, n, block)[0]) or int(n == 0)
    return total


def run_pairs(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Compute the pending tiles of every feature matrix with one Ray Data job (a pool of
    half the cluster's CPUs); write pairs and neighbors."""
    import ray

    keys: list[MatrixKey] = []
    matrices: list[FeatureMatrix] = []
    missing: list[set[int]] = []
    todo: list[tuple[int, int, int]] = []
    total_tiles = 0
    block, metric = study.pairs.block, study.pairs.metric
    for key in study.matrices():
        fm = store.feature_matrix(key.arch, key.method, key.layer)
        if len(fm.model_ids) < 2:
            raise LaunchError(
                f"pairs: {key} has {len(fm.model_ids)} feature rows in the store; run the "
                "features stage first (it needs at least 2 ok models)"
            )
        tiles, blocks = pending_tiles(store, key, len(fm.model_ids), block)
        total_tiles += len(tile_plan(len(fm.model_ids), block))
        if not tiles:
            continue
        g = len(keys)
        keys.append(key)
        matrices.append(fm)
        missing.append(blocks)
        todo += [(g, i, j) for i, j in tiles]
    skipped = total_tiles - len(todo)
    k = study.pairs.top_k
    parts: list[dict[str, np.ndarray]] = []
    with Progress("pairs", len(todo), unit="tile", skipped=skipped,
                  stream=ctx.stream) as progress:
        if not todo:
            return {"tiles": 0, "skipped": total_tiles, "groups": 0}
        quiet_ray_data()
        refs = [ray.put(fm) for fm in matrices]
        with warnings.catch_warnings():
            # max_restarts=0 goes through map_batches' **ray_remote_args (deprecated in 2.60,
            # still honoured): a tile actor that dies fails the job, and the next launch redoes
            # only the missing tiles. With restarts on, Ray logs an error line about the
            # constructor's args.
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = _tile_dataset(todo, max(1, ctx.cpus // 2), refs, keys, store, block, k, metric)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append({c: batch[c] for c in ("matrix", "row", "nbr", "dist")})
            progress.update(len(np.unique(batch["tile"])))
    cat = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    for g, (key, fm) in enumerate(zip(keys, matrices, strict=True)):
        mask = cat["matrix"] == g
        rows, idx, dist = cat["row"][mask], cat["nbr"][mask], cat["dist"][mask]
        for b in sorted(missing[g]):
            r, best_i, best_d = merge_block(len(fm.X), b, block, k, rows, idx, dist)
            store.write_shard("neighbors", {**key.key, "block": b},
                              neighbor_rows(fm, b, r, best_i, best_d))
    return {"tiles": len(todo), "skipped": total_tiles - len(todo), "groups": len(keys)}


def quiet_ray_data() -> None:
    """No Ray Data progress bars or INFO lines: the stage prints its own progress."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _tile_dataset(todo: list[tuple[int, int, int]], pool_size: int, refs: list[Any],
                  keys: list[MatrixKey], store: Store, block: int, k: int, metric: str) -> Any:
    """The Ray Data pipeline: tile ids -> _TileWorker actors (pool of pool_size, 1 CPU each)."""
    import ray.data

    tiles = np.asarray(todo, dtype=np.int64)
    blocks = min(len(todo), 8 * pool_size)
    return ray.data.range(len(todo), override_num_blocks=blocks).map_batches(
        _TileWorker,
        fn_constructor_kwargs={"refs": refs, "matrices": keys, "tiles": tiles,
                               "store_root": str(store.root), "block": block, "k": k,
                               "metric": metric},
        batch_size=1,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        batch_format="numpy",
        max_restarts=0,
    )


STAGE = Stage(name="pairs", pending=pending, run=run_pairs, complete=lambda study, store: True)
