"""Pairs stage: all-pairs distances of each feature matrix as a Ray Data job over blocks (I, J).

For every group (arch, method, layer) the (N, D) feature matrix is cut into row blocks of
``pairs.block`` rows; tile (I, J), I <= J, computes the distance block with
``distsim.stats.distances.distance_block``, writes its intra-task / inter-task distance sums
as one ``pairs`` shard, and returns the partial top-k neighbours of the rows of I (and of J,
from the transposed block). The driver merges the partials of each row block with
``merge_topk`` and writes one ``neighbors`` shard per block. Ray Data has no cross join, so the
dataset is the list of tile ids (``ray.data.range``); each matrix is ``ray.put`` once and a
callable class fetches it (see DESIGN.md, Ray notes). Tiles whose outputs are in the store
are skipped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from distsim.config import Study
from distsim.pipeline import LaunchError
from distsim.pipeline.progress import Progress
from distsim.store import FeatureMatrix, Store


@dataclass(frozen=True)
class Group:
    """One feature matrix of the study: (arch, method, layer)."""

    arch: str
    method: str
    layer: str

    @property
    def key(self) -> dict[str, str]:
        return {"arch": self.arch, "method": self.method, "layer": self.layer}


def study_groups(study: Study) -> list[Group]:
    """Every (arch, method, layer) of the study, in arch, layer, method order."""
    return [
        Group(arch, method, layer)
        for arch in study.arch_names
        for layer in study.feature_layers(arch)
        for method in study.features.methods
    ]


def tile_plan(n: int, block: int) -> list[tuple[int, int]]:
    """Upper-triangle tiles (I, J), I <= J, of an n x n matrix cut in blocks of `block` rows."""
    if n < 0 or block < 1:
        raise ValueError(f"need n >= 0 and block >= 1, got n={n}, block={block}")
    nb = math.ceil(n / block)
    return [(i, j) for i in range(nb) for j in range(i, nb)]


def pending_tiles(store: Store, group: Group, n: int, block: int) -> tuple[list[tuple[int, int]], set[int]]:
    """Tiles to compute and row blocks whose neighbours are missing, for one group.

    A tile is needed when its pairs shard is missing or when it touches a row block whose
    neighbors shard is missing (a block's top-k needs every tile of its row and column).
    """
    tiles = tile_plan(n, block)
    nb = math.ceil(n / block)
    mine = [k for k in store.shard_keys("pairs") if all(k[c] == v for c, v in group.key.items())]
    have_pairs = {(k["block_i"], k["block_j"]) for k in mine}
    have_nbrs = {k["block"] for k in store.shard_keys("neighbors") if all(k[c] == v for c, v in group.key.items())}
    missing = set(range(nb)) - have_nbrs
    todo = [t for t in tiles if t not in have_pairs or t[0] in missing or t[1] in missing]
    return todo, missing


def tile_summary(D: np.ndarray, tasks_i: np.ndarray, tasks_j: np.ndarray, diagonal: bool) -> dict[str, Any]:
    """Intra-task and inter-task distance count, sum and sum of squares of one block (float64).

    D (n_I, n_J); a diagonal block counts each unordered pair once (strict upper triangle).
    """
    same = tasks_i[:, None] == tasks_j[None, :]
    keep = np.triu(np.ones(D.shape, dtype=bool), k=1) if diagonal else np.ones(D.shape, dtype=bool)
    d = D.astype(np.float64)
    intra, inter = d[same & keep], d[~same & keep]
    return {
        "intra_count": int(intra.size), "intra_sum": float(intra.sum()), "intra_sumsq": float((intra**2).sum()),
        "inter_count": int(inter.size), "inter_sum": float(inter.sum()), "inter_sumsq": float((inter**2).sum()),
    }


def compute_tile(X: np.ndarray, tasks: np.ndarray, i: int, j: int, block: int, k: int, metric: str):
    """One tile (I=i, J=j): its summary dict and partial top-k (rows, indices (r, k), distances (r, k))."""
    from distsim.stats.distances import block_topk, distance_block

    si, sj = slice(i * block, min((i + 1) * block, len(X))), slice(j * block, min((j + 1) * block, len(X)))
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
    """Ray Data callable class: fetches the feature matrices lazily (one ray.get per group)."""

    def __init__(self, refs: list, groups: list[Group], tiles: np.ndarray, store_root: str,
                 block: int, k: int, metric: str) -> None:
        self.refs, self.groups, self.tiles = refs, groups, tiles
        self.store = Store(store_root)
        self.block, self.k, self.metric = block, k, metric
        self._cached: tuple[int, Any] | None = None

    def _matrix(self, g: int) -> FeatureMatrix:
        import ray

        if self._cached is None or self._cached[0] != g:
            self._cached = (g, ray.get(self.refs[g]))
        return self._cached[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"tile": [], "group": [], "row": [], "nbr": [], "dist": []}
        for t in batch["id"]:
            g, i, j = (int(v) for v in self.tiles[int(t)])
            fm = self._matrix(g)
            summary, rows, idx, dist = compute_tile(fm.X, fm.tasks, i, j, self.block, self.k, self.metric)
            key = {**self.groups[g].key, "block_i": i, "block_j": j}
            self.store.write_shard("pairs", key, [{"metric": self.metric, **summary}])
            out["tile"].append(np.full(len(rows), int(t)))
            out["group"].append(np.full(len(rows), g))
            out["row"].append(rows)
            out["nbr"].append(idx)
            out["dist"].append(dist)
        return {c: np.concatenate(v) for c, v in out.items()}


def neighbor_rows(fm: FeatureMatrix, block: int, rows: np.ndarray, idx: np.ndarray, dist: np.ndarray) -> list[dict]:
    """Rows of one neighbors shard: for each model, its neighbours by rank (padding dropped)."""
    out = []
    for r, nbrs, ds in zip(rows, idx, dist, strict=True):
        for rank, (n, d) in enumerate(zip(nbrs, ds, strict=True), start=1):
            if n < 0:
                break
            out.append({
                "model_id": fm.model_ids[r], "block": block, "task": int(fm.tasks[r]), "rank": rank,
                "neighbor_id": fm.model_ids[n], "neighbor_task": int(fm.tasks[n]),
                "distance": float(d), "same_task": bool(fm.tasks[r] == fm.tasks[n]),
            })
    return out


def _merge_block(fm: FeatureMatrix, b: int, block: int, k: int, rows, idx, dist):
    """Merge the partial top-k lists of row block b (every tile of its row and column)."""
    from distsim.stats.distances import merge_topk

    lo, hi = b * block, min((b + 1) * block, len(fm.X))
    sel = (rows >= lo) & (rows < hi)
    order = np.argsort(rows[sel], kind="stable")
    r, i, d = rows[sel][order], idx[sel][order], dist[sel][order]
    parts = math.ceil(len(fm.X) / block)
    if len(r) != (hi - lo) * parts:
        raise RuntimeError(f"pairs: block {b} got {len(r)} partial rows, expected {(hi - lo) * parts}")
    n = hi - lo
    best_i, best_d = merge_topk([i.reshape(n, parts * k)], [d.reshape(n, parts * k)], k)
    return np.arange(lo, hi), best_i, best_d


def run_pairs(study: Study, store: Store, stream=None, pool_size: int = 1) -> dict[str, Any]:
    """Compute the pending tiles of every group with one Ray Data job; write pairs and neighbors."""
    import ray
    import ray.data

    groups, matrices, todo, missing = [], [], [], []
    total_tiles = 0
    block, metric = study.pairs.block, study.pairs.metric
    for group in study_groups(study):
        fm = store.feature_matrix(group.arch, group.method, group.layer)
        if len(fm.model_ids) < 2:
            raise LaunchError(
                f"pairs: {group.arch}/{group.method}/{group.layer} has {len(fm.model_ids)} feature rows "
                "in the store; run the features stage first (it needs at least 2 ok models)"
            )
        tiles, blocks = pending_tiles(store, group, len(fm.model_ids), block)
        total_tiles += len(tile_plan(len(fm.model_ids), block))
        if not tiles:
            continue
        g = len(groups)
        groups.append(group)
        matrices.append(fm)
        missing.append(blocks)
        todo += [(g, i, j) for i, j in tiles]
    progress = Progress("pairs", len(todo), unit="tile", skipped=total_tiles - len(todo), stream=stream)
    if not todo:
        progress.close()
        return {"tiles": 0, "skipped": total_tiles, "groups": 0}
    k = study.pairs.top_k
    quiet_ray_data()
    refs = [ray.put(fm) for fm in matrices]
    with warnings.catch_warnings():
        # max_restarts=0 goes through map_batches' **ray_remote_args (deprecated in 2.60, still
        # honoured): a tile actor that dies fails the job, and the next launch redoes only the
        # missing tiles. With restarts on, Ray logs an error line about the constructor's args.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _tile_dataset(todo, pool_size, refs, groups, store, block, k, metric)
    parts: list[dict[str, np.ndarray]] = []
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append({c: batch[c] for c in ("group", "row", "nbr", "dist")})
            progress.update(len(np.unique(batch["tile"])))
    finally:
        progress.close()
    cat = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    for g, (group, fm) in enumerate(zip(groups, matrices, strict=True)):
        mask = cat["group"] == g
        rows, idx, dist = cat["row"][mask], cat["nbr"][mask], cat["dist"][mask]
        for b in sorted(missing[g]):
            r, best_i, best_d = _merge_block(fm, b, block, k, rows, idx, dist)
            store.write_shard("neighbors", {**group.key, "block": b}, neighbor_rows(fm, b, r, best_i, best_d))
    return {"tiles": len(todo), "skipped": total_tiles - len(todo), "groups": len(groups)}


def quiet_ray_data() -> None:
    """No Ray Data progress bars or INFO lines: the stage prints its own progress."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _tile_dataset(todo, pool_size, refs, groups, store, block, k, metric):
    """The Ray Data pipeline: tile ids -> _TileWorker actors (pool of pool_size, 1 CPU each)."""
    import ray.data

    tiles = np.asarray(todo, dtype=np.int64)
    return ray.data.range(len(todo), override_num_blocks=min(len(todo), 8 * pool_size)).map_batches(
        _TileWorker,
        fn_constructor_kwargs={"refs": refs, "groups": groups, "tiles": tiles, "store_root": str(store.root),
                               "block": block, "k": k, "metric": metric},
        batch_size=1,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        batch_format="numpy",
        max_restarts=0,
    )
