"""The pairs stage: all-pairs distances of each feature matrix, Ray tasks over runs of tiles.

Each (N, D) feature matrix (arch, method, layer, epoch) is cut into row blocks of
``pairs.block`` rows; tile (I, J), I <= J, computes the distance block with
``distsim.stats.distances.distance_block``, its intra-group / inter-group distance sums
(:func:`tile_summary`) and the partial top-k neighbours of the rows of I and of J, in one pass
(:func:`distsim.stats.tile_topk`). A unit of work is a segment: a run of tiles of one block
row (:func:`row_segments`), so a task reads block I once for all its tiles and merges their
lists of I itself; there are a few per CPU. One task per row block reads its rows from the
store into the object store (``Store.feature_rows``; the driver holds the matrix's index, its
ids and shards, not its vectors), and a segment task gets the blocks it needs without a copy:
no process holds a whole matrix, and a node fetches only the blocks its segments use. No Ray
Data: its start-up and per-tile batches cost more than a 4,500-model stage's tiles
(benchmarks/bench_pairs.py).

The driver merges the partial lists into each row block's running top-k as segments arrive
(:class:`BlockMerges`, O(N k) numbers held) and writes a block's ``neighbors`` shard once all
its tiles are in, and a block row's ``pairs`` shard (one row per tile) once all of its tiles
are: 2 N / block files per matrix. Tiles whose outputs are in the store are skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from distsim import stats  # lazy: numba loads when a tile is computed, not for `status`
from distsim.config import MatrixKey, Study
from distsim.errors import IncompleteError, LaunchError
from distsim.pipeline.faults import maybe_fail, plan
from distsim.pipeline.groups import labelled_models, study_groups
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.units import Units, error_text, run_refs
from distsim.stats.backend import device, resolve
from distsim.store import Store, lineage


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
    rows: set[int]  # block rows whose pairs shard to write
    blocks: set[int]  # row blocks whose neighbors shard to write
    stale: bool  # some stored shard was computed from other feature rows: all are redone


def matrix_work(study: Study, matrix: MatrixKey, n: int, upstream: str,
                recorded: dict[str, dict[tuple[Any, ...], set[str | None]]]) -> MatrixWork:
    """The tiles, pairs rows and neighbour blocks of one feature matrix still to compute.

    A block row's pairs shard is missing when any of its tiles (i, j >= i) is not recorded
    (an old-layout store records one per tile); a tile is needed when its row is missing or
    when it touches a row block whose neighbors shard is missing (a block's top-k needs every
    tile of its row and column); all of them when any stored shard of the matrix records
    another upstream than `upstream`. `recorded`: {"pairs": ..., "neighbors": ...} of
    :func:`distsim.store.lineage.recorded`.
    """
    block = study.pairs.block
    tiles = tile_plan(n, block)
    nb = math.ceil(n / block)
    this = matrix.id  # (arch, method, layer, epoch): the key's first four columns
    mine = {t: {k[4:]: v for k, v in rec.items() if k[:4] == this} for t, rec in recorded.items()}
    stale = any(not lineage.fresh(v, upstream) for rec in mine.values() for v in rec.values())
    if stale:
        return MatrixWork(tiles, set(range(nb)), set(range(nb)), True)
    have = set(mine["pairs"])
    rows = {i for i, j in tiles if (i, j) not in have}
    missing = set(range(nb)) - {b for (b,) in mine["neighbors"]}
    todo = [t for t in tiles if t[0] in rows or t[0] in missing or t[1] in missing]
    return MatrixWork(todo, rows, missing, False)


def _recorded(store: Store) -> dict[str, dict[tuple[Any, ...], set[str | None]]]:
    return {t: lineage.recorded(store, t) for t in ("pairs", "neighbors")}


def tile_summary(D: np.ndarray, tasks_i: np.ndarray, tasks_j: np.ndarray,
                 diagonal: bool) -> dict[str, Any]:
    """Intra-task and inter-task distance count, sum and sum of squares of one block (float64).

    D (n_I, n_J); a diagonal block counts each unordered pair once (strict upper triangle).
    """
    same = tasks_i[:, None] == tasks_j[None, :]
    other = ~same
    if diagonal:
        upper = np.triu(np.ones(D.shape, dtype=bool), k=1)
        same &= upper
        other &= upper
    intra, inter = D[same].astype(np.float64), D[other].astype(np.float64)  # row-major order
    return {
        "intra_count": int(intra.size), "intra_sum": float(intra.sum()),
        "intra_sumsq": float((intra**2).sum()),
        "inter_count": int(inter.size), "inter_sum": float(inter.sum()),
        "inter_sumsq": float((inter**2).sum()),
    }


TilePart = tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]


def compute_tile(X: np.ndarray, tasks: np.ndarray, i: int, j: int, block: int, k: int,
                 metric: str, seconds: dict[str, float] | None = None) -> TilePart:
    """One tile (I=i, J=j) of X (N, D): its summary dict and partial top-k
    (rows (r,), neighbour indices (r, k), distances (r, k)). `seconds`, when given, gains
    the time of each step ("distances", "sums", "topk")."""
    n = len(X)
    si = slice(i * block, min((i + 1) * block, n))
    sj = slice(j * block, min((j + 1) * block, n))
    return block_tile(X[si], None if i == j else X[sj], tasks[si], tasks[sj], si.start,
                      sj.start, k, metric, seconds)


def block_tile(X_i: np.ndarray, X_j: np.ndarray | None, groups_i: np.ndarray,
               groups_j: np.ndarray, start_i: int, start_j: int, k: int, metric: str,
               seconds: dict[str, float] | None = None, backend: str = "numpy") -> TilePart:
    """:func:`compute_tile` of the row blocks themselves: X_i (n_I, D) and X_j (n_J, D), or
    None for a diagonal tile, whose rows start at the global indices start_i / start_j.
    ``backend`` (distsim.stats.backend): "torch" on a GPU computes the distances, their sums
    and the top-k lists there (distsim.stats.tiles_torch); on torch's CPU device only the
    distances run on torch, the sums and lists staying numpy's and numba's (on this project's
    2-core VM torch.topk over the lists' keys took 1.7-6 times numba's scan, tiles of
    512-2,048 rows)."""
    backend = resolve(backend)
    if backend == "torch" and device().type != "cpu":
        from distsim.stats.tiles_torch import tile_parts

        return tile_parts(X_i, X_j, groups_i, groups_j, start_i, start_j, k, metric, seconds)
    t0 = time.perf_counter()
    D = stats.distance_block(X_i, X_j, metric, backend=backend)
    t1 = time.perf_counter()
    summary = tile_summary(D, groups_i, groups_j, X_j is None)
    t2 = time.perf_counter()
    rows = np.arange(start_i, start_i + len(X_i))
    if X_j is None:
        idx, dist = stats.block_topk(D, k, start_i, start_j)
    else:
        (idx, dist), (idx_j, dist_j) = stats.tile_topk(D, k, start_i, start_j)  # one pass
        rows = np.concatenate([rows, np.arange(start_j, start_j + len(X_j))])
        idx, dist = np.concatenate([idx, idx_j]), np.concatenate([dist, dist_j])
    if seconds is not None:
        for step, t in (("distances", t1 - t0), ("sums", t2 - t1),
                        ("topk", time.perf_counter() - t2)):
            seconds[step] = seconds.get(step, 0.0) + t
    return summary, rows, idx, dist


Segment = tuple[int, int, tuple[int, ...]]  # (matrix, block row i, its blocks j >= i)


def row_segments(todo: dict[int, list[tuple[int, int]]], cpus: int,
                 per_cpu: int = 4) -> list[Segment]:
    """The units of work: runs of tiles (i, j) of one block row, at most L tiles each, where
    L = ceil(tiles / (per_cpu * cpus)), so there are about per_cpu units per CPU or more (a
    unit reads block I once for all its tiles). `todo`: {matrix: its tiles}. Ordered by
    matrix, then longest first (so the short ones fill the end)."""
    total = sum(len(t) for t in todo.values())
    size = max(1, math.ceil(total / (per_cpu * max(1, cpus))))
    out: list[Segment] = []
    for g in sorted(todo):
        rows: dict[int, list[int]] = {}
        for i, j in sorted(todo[g]):
            rows.setdefault(i, []).append(j)
        mine = [(g, i, tuple(js[a:a + size])) for i, js in rows.items()
                for a in range(0, len(js), size)]
        out += sorted(mine, key=lambda s: (-len(s[2]), s[1], s[2][0]))
    return out


@dataclass(frozen=True)
class SegmentParts:
    """What one segment (block row i, blocks js) gives the driver: each tile's summary, the
    top-k lists of the rows of I over all its tiles (merged), and those of the rows of each
    J != I (rows (r,), neighbour indices (r, k), distances (r, k))."""

    summaries: list[dict[str, Any]]  # one per j, in order, with its block_j
    rows_i: tuple[np.ndarray, np.ndarray, np.ndarray]
    columns: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # (j, rows, idx, dist)
    seconds: dict[str, float]  # compute_tile's steps, summed; "merge": the lists of I


def segment_parts(blocks: Mapping[int, np.ndarray], groups: np.ndarray, i: int,
                  js: tuple[int, ...], block: int, k: int, metric: str,
                  before_tile: Any = None, backend: str = "numpy") -> SegmentParts:
    """The tiles (i, j) for j in js, each as :func:`compute_tile`, from the row blocks they
    need (``blocks[b]``: rows b * block... of the matrix, (n_b, D)) and the groups (N,) of
    every row; the rows of I keep their lists merged across them. ``before_tile(j)``: called
    before each tile (the fault hook)."""
    summaries, idx_i, dist_i, columns = [], [], [], []
    seconds: dict[str, float] = {}
    X_i = blocks[i]
    m = len(X_i)
    rows_i = np.arange(i * block, i * block + m)
    for j in js:
        if before_tile is not None:
            before_tile(j)
        X_j = None if j == i else blocks[j]
        n_j = m if X_j is None else len(X_j)
        summary, rows, idx, dist = block_tile(
            X_i, X_j, groups[i * block:i * block + m], groups[j * block:j * block + n_j],
            i * block, j * block, k, metric, seconds, backend)
        summaries.append({"block_j": j, **summary})
        idx_i.append(idx[:m])  # block_tile's rows: those of I, then those of J (off-diagonal)
        dist_i.append(dist[:m])
        if X_j is not None:
            columns.append((j, rows[m:], idx[m:], dist[m:]))
    t0 = time.perf_counter()
    best_i, best_d = stats.merge_topk(idx_i, dist_i, k) if len(js) > 1 else (idx_i[0], dist_i[0])
    seconds["merge"] = time.perf_counter() - t0
    return SegmentParts(summaries, (rows_i, best_i, best_d), columns, seconds)


def _segment_task(groups: np.ndarray, label: str, i: int, js: tuple[int, ...], block: int,
                  k: int, how: tuple[str, str], store_root: str, faults: dict[str, float],
                  X_i: np.ndarray, *X_js: np.ndarray) -> SegmentParts:
    """A Ray task: one segment, from the row blocks I and each J != I of js, in order (they
    and the groups arrive from the object store without a copy). how: (metric, backend), the
    backend ([pairs] backend) resolved here, on the worker."""
    others = iter(X_js)
    blocks = {i: X_i, **{j: next(others) for j in js if j != i}}
    metric, backend = how
    return segment_parts(blocks, groups, i, js, block, k, metric, lambda j: maybe_fail(
        "tile", f"{label}-{i}-{j}", store_root, faults), resolve(backend))


def _block_task(store_root: str, files: list[str], model_ids: list[str]
                ) -> tuple[np.ndarray, float]:
    """A Ray task: the rows of one row block (model_ids, in order) read from the features
    shards `files` that hold them, and the seconds it took."""
    start = time.perf_counter()
    X = Store(store_root).feature_rows(files, model_ids)
    return X, time.perf_counter() - start


def neighbor_rows(model_ids: list[str], groups: np.ndarray, upstream: str, rows: np.ndarray,
                  idx: np.ndarray, dist: np.ndarray) -> dict[str, Any]:
    """The columns of one neighbors shard: each model's neighbours by rank, nearest first
    (padding, index -1, dropped). rows (m,), idx (m, k), dist (m, k)."""
    m, k = idx.shape
    keep = (idx >= 0).ravel()
    r = np.repeat(rows, k)[keep]
    n = idx.ravel()[keep]
    ids = np.asarray(model_ids, dtype=object)
    return {
        "model_id": pa.array(ids[r], pa.string()), "task": groups[r],
        "rank": np.tile(np.arange(1, k + 1), m)[keep], "neighbor_id": pa.array(ids[n], pa.string()),
        "neighbor_task": groups[n], "distance": dist.ravel()[keep],
        "same_task": groups[r] == groups[n], "upstream": pa.array([upstream] * len(r), pa.string()),
    }


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

    def add(self, rows: np.ndarray, idx: np.ndarray, dist: np.ndarray, tiles: int = 1
            ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Merge partial lists of `tiles` tiles (rows (r,), idx (r, k), dist (r, k); the rows
        of one block when tiles > 1); returns the blocks it completed as (block, rows (m,),
        idx (m, k), dist (m, k))."""
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
            self.seen[b] = self.seen.get(b, 0) + tiles
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


@dataclass
class _Matrix:
    """The driver's state of one feature matrix with work in this run."""

    key: MatrixKey
    upstream: str  # the fingerprint of its feature rows (matrix_work judged the store by it)
    work: MatrixWork
    merges: BlockMerges
    left: int = 0  # its segments not yet done
    unsent: int = 0  # its segments not yet submitted
    summaries: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # row: {j: ..}
    index: Any = None  # its feature_index (model ids, files), read when first needed
    meta: tuple[list[str], np.ndarray, Any] | None = None  # ids, groups, the groups' ref
    blocks: dict[int, Any] = field(default_factory=dict)  # row block -> (X ref, seconds ref)


def run_pairs(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Compute the pending tiles of every feature matrix as Ray tasks, one per segment (a run
    of tiles of one block row, :func:`row_segments`); write pairs (one shard per block row)
    and neighbors (one per row block) from the driver as rows and blocks complete.

    The driver reads a matrix's index (ids and shards, no vectors) when its first segment is
    due; one task per row block reads its rows into the object store (the next matrix's when
    this one's last segments are sent), and a segment task gets the blocks it needs without a
    copy: no process holds the whole matrix. A segment that fails is computed again, up to
    ``resources.max_failures`` times (a block whose read failed is read again); one that
    still fails is left pending (with the rows and blocks it touches) and counted as failed,
    with the first cause. The shards of a stale matrix are deleted first. Returns counts and
    ``cpu_seconds``: the tasks' seconds by step (load: the blocks' reads; distances, sums,
    topk; merge: a segment's lists of I), summed, and the driver's (index reads, merges and
    shard writes).
    """
    import ray

    block, metric, k = study.pairs.block, study.pairs.metric, study.pairs.top_k
    recorded = _recorded(store)
    rows = lineage.matrix_rows(store)  # decide from the lineage; read only matrices with work
    mats: list[_Matrix] = []
    total_tiles = 0
    for key in study.matrices():
        tokens = rows.get(key.id, frozenset())
        if len(tokens) < 2:
            raise LaunchError(
                f"pairs: {key} has {len(tokens)} feature rows in the store; run the "
                "features stage first (it needs at least 2 ok models)"
            )
        upstream = lineage.fingerprint(tokens)
        work = matrix_work(study, key, len(tokens), upstream, recorded)
        total_tiles += len(tile_plan(len(tokens), block))
        if work.stale:  # computed from other feature rows: none of its shards can be reused
            for table in ("pairs", "neighbors"):
                for held in store.shard_keys(table, key.partition):
                    if held["epoch"] == key.epoch:
                        store.shard_path(table, held).unlink(missing_ok=True)
        if work.tiles:
            mats.append(_Matrix(key, upstream, work,
                                BlockMerges(len(tokens), block, k, work.blocks)))
    # smallest first: the first segments start as soon as the first (quick) reads are done
    mats.sort(key=lambda m: len(m.work.tiles) * _width(store, m.key))
    segments = row_segments({g: m.work.tiles for g, m in enumerate(mats)}, ctx.cpus)
    for g, _, _ in segments:
        mats[g].left += 1
        mats[g].unsent += 1
    tiles = sum(len(m.work.tiles) for m in mats)
    outcome = {"tiles": tiles, "skipped": total_tiles - tiles, "groups": len(mats),
               "segments": len(segments)}
    with Units("pairs", segments, label=lambda s: f"tiles {mats[s[0]].key} ({s[1]}, "
               f"{s[2][0]}..{s[2][-1]})", max_failures=study.resources.max_failures,
               stream=ctx.stream, noun="tile", skipped=total_tiles - tiles,
               size=lambda s: len(s[2])) as units:
        if not segments:
            return {**outcome, "failed": 0}
        read = ray.remote(num_cpus=1, max_retries=0)(_block_task).options(num_returns=2)
        gpus = study.resources.gpus_per_test  # a GPU share per segment, for backend torch
        task = ray.remote(num_cpus=1, max_retries=0)(_segment_task).options(num_gpus=gpus)
        models, faults, root = labelled_models(study, store), plan(), str(store.root)
        spent = {"load": 0.0, "driver": 0.0}  # task seconds by step, and the driver's

        def prepared(g: int) -> _Matrix:
            """Matrix g with its index, ids and groups (read once, on the driver)."""
            m = mats[g]
            if m.meta is None:
                start = time.perf_counter()
                key = m.key
                m.index = store.feature_index(key.arch, key.method, key.layer, key.epoch)
                ids = m.index["model_id"].to_list()
                # intra/inter and same_task by the groups the tests compare (tests.group_by)
                groups = study_groups(study, models, ids,
                                      m.index["task"].to_numpy().astype(np.int64), [])
                m.meta = (ids, groups, ray.put(groups))
                spent["driver"] += time.perf_counter() - start
            return m

        def block_ref(g: int, b: int) -> Any:
            """The ref of matrix g's row block b, its read submitted once (again after it
            failed)."""
            m = prepared(g)
            if b not in m.blocks:
                part = m.index[b * block:(b + 1) * block]
                m.blocks[b] = read.remote(root, part["file"].unique().to_list(),
                                          part["model_id"].to_list())
            return m.blocks[b][0]

        def submit(seg: Segment) -> Any:
            g, i, js = seg
            m = prepared(g)
            for b in sorted({i, *js}):  # the blocks this and the other segments need
                block_ref(g, b)
            m.unsent -= 1
            if m.unsent == 0 and g + 1 < len(mats):  # its last: the next matrix's reads
                for b in range(mats[g + 1].merges.parts):
                    block_ref(g + 1, b)
            assert m.meta is not None
            label = str(m.key).replace("/", "-")
            return task.remote(m.meta[2], label, i, js, block, k,
                               (metric, study.pairs.backend), root, faults, block_ref(g, i),
                               *(block_ref(g, j) for j in js if j != i))

        def settle(seg: Segment, error: BaseException | None) -> None:
            g, i, js = seg
            if error is None:
                return
            m = mats[g]
            for b in {i, *js}:  # a block whose read failed is read again by the next attempt
                if b in m.blocks and _failed(m.blocks[b][0]):
                    del m.blocks[b]

        def on_done(seg: Segment, parts: SegmentParts) -> None:
            m = mats[seg[0]]
            start = time.perf_counter()
            _collect(store, m, seg, parts, metric)
            spent["driver"] += time.perf_counter() - start
            for step, t in parts.seconds.items():
                spent[step] = spent.get(step, 0.0) + t
            m.left -= 1
            if m.left == 0:  # its blocks leave the object store
                spent["load"] += sum(ray.get([s for _, s in m.blocks.values()]))
                m.blocks, m.index, m.meta = {}, None, None

        try:
            run_refs(units, submit, on_done, slots=max(1, ctx.cpus), settle=settle)
        except ray.exceptions.RayError as exc:
            raise IncompleteError(
                f"pairs: the Ray job failed ({error_text(exc)[:300]}); the block rows and "
                "blocks it finished are stored and a relaunch computes the rest") from None
    steps = ("load", "distances", "sums", "topk", "merge", "driver")
    return {**outcome, **units.outcome(),
            "cpu_seconds": {s: round(spent.get(s, 0.0), 2) for s in steps}}


def _width(store: Store, key: MatrixKey) -> int:
    """The feature width D of a matrix, from one row of its first features shard."""
    import pyarrow.parquet as pq

    files = store.shard_files("features", key.partition)
    return int(pq.read_table(files[0], columns=["dim"])["dim"][0].as_py()) if files else 0


def _failed(ref: Any) -> bool:
    """Whether the task of `ref` finished with an error (False while it runs)."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        return False
    try:
        ray.get(ref)
    except ray.exceptions.RayError:
        return True
    return False


def _collect(store: Store, m: _Matrix, seg: Segment, parts: SegmentParts, metric: str) -> None:
    """Take a segment's parts into its matrix's state; write the pairs shard of a block row
    and the neighbors shard of a block once all their tiles are in."""
    assert m.meta is not None
    ids, groups, _ = m.meta
    upstream = m.upstream
    _, i, js = seg
    key = m.key
    if i in m.work.rows:
        row = m.summaries.setdefault(i, {})
        row.update({s["block_j"]: s for s in parts.summaries})
        if len(row) == m.merges.parts - i:  # every tile (i, j >= i)
            for held in store.shard_keys("pairs", key.partition):  # an old layout's tiles
                if held["epoch"] == key.epoch and held["block_i"] == i:
                    store.shard_path("pairs", held).unlink(missing_ok=True)
            store.write_shard("pairs", {**key.key, "block_i": i}, [
                {"metric": metric, **row[j], "upstream": upstream} for j in sorted(row)])
            del m.summaries[i]
    done = m.merges.add(*parts.rows_i, tiles=len(js))
    for _, r, idx, dist in parts.columns:
        done += m.merges.add(r, idx, dist)
    for b, r, best_i, best_d in done:
        store.write_shard("neighbors", {**key.key, "block": b},
                          neighbor_rows(ids, groups, upstream, r, best_i, best_d))


STAGE = Stage(name="pairs", outputs=outputs, run=run_pairs)
