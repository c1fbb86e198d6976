"""The pairs stage: all-pairs distances of each feature matrix, a Ray Data job over tiles (I, J).

For every feature matrix (arch, method, layer) the (N, D) feature matrix is cut into row blocks of
``pairs.block`` rows; tile (I, J), I <= J, computes the distance block with
``distsim.stats.distances.distance_block``, writes its intra-task / inter-task distance sums
as one ``pairs`` shard, and returns the partial top-k neighbours of the rows of I (and of J,
from the transposed block). The driver merges the partials into each row block's running
top-k as tiles arrive (:class:`BlockMerges`, O(N k) numbers held, never every partial list) and
writes a block's ``neighbors`` shard once all its tiles are in. Ray Data has no cross join, so the
dataset is the list of tile ids (``ray.data.range``); each matrix is ``ray.put`` once and a
callable class fetches it. Tiles whose outputs are in the store are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from distsim import stats  # lazy: numba loads when a tile is computed, not for `status`
from distsim.config import MatrixKey, Study
from distsim.errors import IncompleteError, LaunchError
from distsim.pipeline.faults import maybe_fail, plan
from distsim.pipeline.groups import labelled_models, study_groups
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.units import Units, error_text
from distsim.store import FeatureMatrix, Store, lineage


def tile_plan(n: int, block: int) -> list[tuple[int, int]]:
    """Upper-triangle tiles (I, J), I <= J, of an n x n matrix cut in blocks of `block` rows."""
    if n < 0 or block < 1:
        raise ValueError(f"need n >= 0 and block >= 1, got n={n}, block={block}")
    nb = math.ceil(n / block)
    return [(i, j) for i in range(nb) for j in range(i, nb)]


@dataclass(frozen=True)
class MatrixWork:
    """What the pairs stage owes one feature matrix of n rows (fingerprint `upstream`)."""

    tiles: list[tuple[int, int]]  # tiles to compute
    blocks: set[int]  # row blocks whose neighbors shard to write
    stale: bool  # some stored shard was computed from other feature rows: all are redone


def matrix_work(study: Study, matrix: MatrixKey, n: int, upstream: str,
                recorded: dict[str, dict[tuple[Any, ...], set[str | None]]]) -> MatrixWork:
    """The tiles and neighbour blocks of one feature matrix still to compute.

    A tile is needed when its pairs shard is missing or when it touches a row block whose
    neighbors shard is missing (a block's top-k needs every tile of its row and column); all
    of them when any stored shard of the matrix records another upstream than `upstream`.
    `recorded`: {"pairs": ..., "neighbors": ...} of :func:`distsim.store.lineage.recorded`.
    """
    block = study.pairs.block
    tiles = tile_plan(n, block)
    nb = math.ceil(n / block)
    this = matrix.id  # (arch, method, layer, epoch): the key's first four columns
    mine = {t: {k[4:]: v for k, v in rec.items() if k[:4] == this} for t, rec in recorded.items()}
    stale = any(not lineage.fresh(v, upstream) for rec in mine.values() for v in rec.values())
    if stale:
        return MatrixWork(tiles, set(range(nb)), True)
    have_pairs = set(mine["pairs"])
    missing = set(range(nb)) - {b for (b,) in mine["neighbors"]}
    todo = [t for t in tiles if t not in have_pairs or t[0] in missing or t[1] in missing]
    return MatrixWork(todo, missing, False)


def _recorded(store: Store) -> dict[str, dict[tuple[Any, ...], set[str | None]]]:
    return {t: lineage.recorded(store, t) for t in ("pairs", "neighbors")}


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
    D = stats.distance_block(X[si], None if diagonal else X[sj], metric)
    summary = tile_summary(D, tasks[si], tasks[sj], diagonal)
    rows_i = np.arange(si.start, si.stop)
    if diagonal:
        idx, dist = stats.block_topk(D, k, si.start, sj.start)
        return summary, rows_i, idx, dist
    (idx, dist), (idx_j, dist_j) = stats.tile_topk(D, k, si.start, sj.start)  # one pass
    rows = np.concatenate([rows_i, np.arange(sj.start, sj.stop)])
    return summary, rows, np.concatenate([idx, idx_j]), np.concatenate([dist, dist_j])


class _TileWorker:
    """Ray Data callable class: fetches the feature matrices lazily (one ray.get per matrix)."""

    def __init__(self, refs: list[Any], matrices: list[MatrixKey], tiles: np.ndarray,
                 store_root: str, block: int, k: int, metric: str,
                 faults: dict[str, float]) -> None:
        self.refs, self.matrices, self.tiles, self.faults = refs, matrices, tiles, faults
        self.store = Store(store_root)
        self.block, self.k, self.metric = block, k, metric
        self._cached: tuple[int, FeatureMatrix] | None = None

    def _matrix(self, g: int) -> FeatureMatrix:
        import ray

        if self._cached is None or self._cached[0] != g:
            self._cached = (g, ray.get(self.refs[g]))
        return self._cached[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute and store each tile of the batch; a tile that fails returns one row with
        row -1 and its error (the driver retries it), the others one row per partial top-k."""
        out: dict[str, list[np.ndarray]] = {c: [] for c in ("tile", "matrix", "row", "nbr",
                                                            "dist", "error")}
        for t in batch["id"]:
            g, i, j = (int(v) for v in self.tiles[int(t)])
            try:
                fm = self._matrix(g)
                maybe_fail("tile", f"{self.matrices[g]}-{i}-{j}".replace("/", "-"),
                           self.store.root, self.faults)
                summary, rows, idx, dist = compute_tile(fm.X, fm.tasks, i, j, self.block,
                                                        self.k, self.metric)
                key = {**self.matrices[g].key, "block_i": i, "block_j": j}
                self.store.write_shard("pairs", key, [{"metric": self.metric, **summary,
                                                       "upstream": fm.upstream}])
                error = ""
            except Exception as exc:  # reported to the driver, which retries the tile
                rows, idx = np.array([-1]), np.full((1, self.k), -1, np.int64)
                dist, error = np.full((1, self.k), np.inf, np.float32), error_text(exc)
            out["tile"].append(np.full(len(rows), int(t)))
            out["matrix"].append(np.full(len(rows), g))
            out["row"].append(rows)
            out["nbr"].append(idx)
            out["dist"].append(dist)
            out["error"].append(np.full(len(rows), error, dtype=object))
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


class BlockMerges:
    """Top-k neighbours of the row blocks of one n-row matrix, built tile by tile.

    Each tile's partial lists are merged into a running best (m, k) of each block they touch
    as they arrive, so the driver holds O(N k) numbers rather than every tile's partial lists
    (O(N^2 k / block)). A block is complete once all ceil(n / block) tiles of its row and
    column arrived; only the `blocks` asked for are kept.
    """

    def __init__(self, n: int, block: int, k: int, blocks: set[int]) -> None:
        self.n, self.block, self.k, self.blocks = n, block, k, blocks
        self.parts = math.ceil(n / block)  # tiles touching each block
        self.best: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.seen: dict[int, int] = {}

    def add(self, rows: np.ndarray, idx: np.ndarray, dist: np.ndarray
            ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Merge one tile's partial lists (rows (r,), idx (r, k), dist (r, k)); returns the
        blocks it completed as (block, rows (m,), idx (m, k), dist (m, k))."""
        done = []
        of = rows // self.block
        for b in (int(v) for v in np.unique(of)):
            if b not in self.blocks:
                continue
            lo, hi = b * self.block, min((b + 1) * self.block, self.n)
            if b not in self.best:
                self.best[b] = (np.full((hi - lo, self.k), -1, np.int64),
                                np.full((hi - lo, self.k), np.inf, np.float32))
            best_i, best_d = self.best[b]
            sel = of == b
            local = rows[sel] - lo
            best_i[local], best_d[local] = stats.merge_topk([best_i[local], idx[sel]],
                                                      [best_d[local], dist[sel]], self.k)
            self.seen[b] = self.seen.get(b, 0) + 1
            if self.seen[b] == self.parts:
                done.append((b, np.arange(lo, hi), *self.best.pop(b)))
        return done


def outputs(study: Study, store: Store) -> Outputs:
    """Feature matrices whose tiles and neighbour blocks are all stored, computed from the
    matrix's feature rows now (a matrix with fewer than 2 rows is not done)."""
    rows, recorded = lineage.matrix_rows(store), _recorded(store)
    done = stale = 0
    for m in study.matrices():
        tokens = rows.get(m.id, frozenset())
        work = matrix_work(study, m, len(tokens), lineage.fingerprint(tokens), recorded)
        done += len(tokens) >= 2 and not work.tiles and not work.blocks
        stale += work.stale
    return Outputs("matrices", len(study.matrices()), done, stale=stale)


def run_pairs(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Compute the pending tiles of every feature matrix with Ray Data jobs (a pool of a tile
    actor per CPU of the cluster); write pairs and neighbors.

    A tile that fails is computed again in the next round, up to ``resources.max_failures``
    times; a tile that still fails is left pending (with the neighbour blocks it touches) and
    counted as failed, with the first cause. The shards of a stale matrix are deleted first.
    """
    import ray

    keys: list[MatrixKey] = []
    matrices: list[FeatureMatrix] = []
    missing: list[set[int]] = []
    todo: list[tuple[int, int, int]] = []
    total_tiles = 0
    block, metric = study.pairs.block, study.pairs.metric
    recorded = _recorded(store)
    rows = lineage.matrix_rows(store)  # decide from the lineage; load only matrices with work
    models = labelled_models(study, store)  # tests.group_by's column, read once
    for key in study.matrices():
        tokens = rows.get(key.id, frozenset())
        if len(tokens) < 2:
            raise LaunchError(
                f"pairs: {key} has {len(tokens)} feature rows in the store; run the "
                "features stage first (it needs at least 2 ok models)"
            )
        work = matrix_work(study, key, len(tokens), lineage.fingerprint(tokens), recorded)
        total_tiles += len(tile_plan(len(tokens), block))
        if work.stale:  # computed from other feature rows: none of its shards can be reused
            for table in ("pairs", "neighbors"):
                for held in store.shard_keys(table, key.partition):
                    if held["epoch"] == key.epoch:
                        store.shard_path(table, held).unlink(missing_ok=True)
        if not work.tiles:
            continue
        fm = store.feature_matrix(key.arch, key.method, key.layer, key.epoch)
        # intra/inter and same_task by the groups the tests compare (tests.group_by)
        fm = dataclasses.replace(fm, tasks=study_groups(study, models, fm.model_ids, fm.tasks,
                                                         []))
        g = len(keys)
        keys.append(key)
        matrices.append(fm)
        missing.append(work.blocks)
        todo += [(g, i, j) for i, j in work.tiles]
    k = study.pairs.top_k
    merges = [BlockMerges(len(fm.X), block, k, blocks)
              for fm, blocks in zip(matrices, missing, strict=True)]
    with Units("pairs", todo, label=lambda t: f"tile {keys[t[0]]} ({t[1]}, {t[2]})",
               max_failures=study.resources.max_failures, stream=ctx.stream, noun="tile",
               skipped=total_tiles - len(todo)) as units:
        if not todo:
            return {"tiles": 0, "skipped": total_tiles, "groups": 0, "failed": 0}
        quiet_ray_data()
        refs = [ray.put(fm) for fm in matrices]
        for round_tiles in units.rounds():  # the tiles that failed in a round make the next
            with warnings.catch_warnings():
                # max_restarts=0 goes through map_batches' **ray_remote_args (deprecated in
                # 2.60, still honoured): a tile actor that dies fails the job. With restarts
                # on, Ray logs an error line about the constructor's args.
                warnings.simplefilter("ignore", DeprecationWarning)
                ds = _tile_dataset(round_tiles, max(1, ctx.cpus), refs, keys, store, block,
                                   k, metric)
            errors: dict[int, str] = {}
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    ok = batch["error"] == ""
                    done = np.unique(batch["tile"][ok])
                    for t in done:
                        sel = batch["tile"] == t
                        g = int(batch["matrix"][sel][0])
                        for b, r, best_i, best_d in merges[g].add(
                                batch["row"][sel], batch["nbr"][sel], batch["dist"][sel]):
                            store.write_shard("neighbors", {**keys[g].key, "block": b}, [
                                {**row, "upstream": matrices[g].upstream}
                                for row in neighbor_rows(matrices[g], b, r, best_i, best_d)])
                    bad = batch["tile"][~ok].tolist()
                    errors.update(zip(bad, batch["error"][~ok], strict=True))
                    units.done(*(round_tiles[int(t)] for t in done))
            except ray.exceptions.RayError as exc:
                raise IncompleteError(
                    f"pairs: the Ray Data job failed ({error_text(exc)[:300]}); the tiles it "
                    "finished are stored and a relaunch computes the rest") from None
            # a tile given up never completes its blocks: their neighbors stay pending
            for t, error in errors.items():
                units.failed(round_tiles[t], error)
    return {"tiles": len(todo), "skipped": total_tiles - len(todo), "groups": len(keys),
            **units.outcome()}


def quiet_ray_data() -> None:
    """No Ray Data progress bars or INFO lines: the stage prints its own progress."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _tile_dataset(todo: list[tuple[int, int, int]], pool_size: int, refs: list[Any],
                  keys: list[MatrixKey], store: Store, block: int, k: int, metric: str) -> Any:
    """The Ray Data pipeline: tile ids -> _TileWorker actors (pool of pool_size, 1 CPU each).

    The ids are a materialized dataset (from_items), not a read (range): a read's tasks need
    a CPU of their own, so a pool of every CPU waited for them forever (measured: a 2-CPU
    launch hung), and the pool had to be half the CPUs."""
    import ray.data

    tiles = np.asarray(todo, dtype=np.int64)
    blocks = min(len(todo), 8 * pool_size)
    ids = ray.data.from_items([{"id": t} for t in range(len(todo))], override_num_blocks=blocks)
    return ids.map_batches(
        _TileWorker,
        fn_constructor_kwargs={"refs": refs, "matrices": keys, "tiles": tiles,
                               "store_root": str(store.root), "block": block, "k": k,
                               "metric": metric, "faults": plan()},
        batch_size=1,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        batch_format="numpy",
        max_restarts=0,
    )


STAGE = Stage(name="pairs", outputs=outputs, run=run_pairs)
