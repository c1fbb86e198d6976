"""The tests stage: HTT (closed-set, open-set) and PERMANOVA per feature matrix, on Ray tasks.

Each test's B permutations are cut into chunks of ``tests.chunk_size``. Chunk 0 is the full
statistic with its first null chunk (``htt(..., seed=s)`` / ``permanova(..., seed=s)``); chunk
c >= 1 draws its permutations from seed (s, c) with the same split (``htt_null_chunk(...,
seed=(s, c), split_seed=s)`` / ``permanova_null_chunk(..., seed=(s, c))``). The chunks run as
Ray tasks; their nulls concatenate into one null of B values and
p = (1 + #{null >= S}) / (1 + B) (``distsim.stats.p_value``). With one chunk the result equals
the single-process ``htt`` / ``permanova`` call exactly. An HTT's learner basis (``htt_prepare``:
the training rows' basis, (n + m) x r with r <= min(n, D), from the D x D Gram when n > D so
that no n x n array exists) is computed once per test by one task and shared by its chunks
through the object store. One ``tests`` shard per (arch, method, layer, protocol); tests
already in the store are skipped. A row's ``seconds`` is the compute time of its chunks (or
tiles), summed: all tests are queued at the stage's start, so their wall times would measure
the queue.

PERMANOVA's R^2 (SS_between / SS_total) is in the row's extra. PERMDISP (metric euclidean only)
runs beside it: the distances of the models to their task's centroid, compared across tasks by an
ANOVA F with residual permutations (``permdisp_features`` on the features' Euclidean basis, which
PERMANOVA shares; one task, O(N) per permutation), so a reader can tell a difference of location
(PERMANOVA) from a difference of spread.

PERMANOVA never builds the N x N distance matrix; its route is recorded in the row's extra:

* ``"features"`` (metric euclidean): ``permanova_features`` on the features' Euclidean basis,
  one task per permutation chunk.
* ``"tiles"`` (any other metric): s_T and each labelling's s_W are sums over pairs, so they
  split over the upper tiles of the distance matrix (``upper_tiles(N, pairs.block)``). The
  labellings are drawn once per chunk, from seed s / (s, c) exactly as ``permanova`` /
  ``permanova_null_chunk`` draw them (``permanova_labels``: (N, b_c) int32 each, N (B + 1)
  int32 in all, in the object store and read zero-copy). One task per tile computes its
  distances (``distance_block`` in the matrix's shared ``distance_frame``: bit for bit those
  of ``pairwise_distances(X, metric, block=pairs.block)``) and returns its shares for all
  B + 1 labellings (``permanova_tile``); the driver adds them as they arrive (``TileSums``,
  O(B) held, order-free) and forms the pseudo-F. A worker holds one tile of distances and
  the tile's rows of the labels; the result is ``permanova`` on that matrix with the same
  seeds (pseudo-F to ~1e-13, the same p).

The tile tasks live here rather than in the pairs stage, although the pairs tiles see every
distance once too. They recompute the tile's distances (one GEMM, about 2 D t^2 flops for a
t x t tile) beside the permutation sums (about B t^2 / a gathers and B (t + a) bucket
writes); at N = 5,000, D = 512, B = 999, a = 50 the distances were 1.5 s of the tile route's
6.3 s (benchmarks/bench_permanova_routes.py, 2 shared cores), so fusing would save about a
quarter of PERMANOVA's time. It would instead tie the pairs stage to the tests' permutations:
a change of ``tests.seed``, ``permanova_permutations`` or ``chunk_size`` would redo the pairs
stage, the pairs stage would need the labels (N x B) before its tiles run and would have to
store B + 1 sums per tile and test (or hold them until every tile is in), and its
skip-what-is-stored resumption would track the tests' state too. Kept apart, each stage
stays resumable and retried on its own units.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distsim.config import MatrixKey, Study
from distsim.errors import LaunchError
from distsim.pipeline.faults import maybe_fail, plan
from distsim.pipeline.progress import Progress, Retries
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.zoo import error_text
from distsim.stats import (
    TileSums,
    distance_frame,
    euclidean_basis,
    htt,
    htt_null_chunk,
    htt_prepare,
    p_value,
    permanova_features,
    permanova_groups,
    permanova_labels,
    permanova_tile,
    permdisp_features,
    r_squared,
    tile_pseudo_f,
    upper_tiles,
)
from distsim.stats.linear_embedding import Fit
from distsim.store import Store, lineage

PERMANOVA = "permanova"
PERMDISP = "permdisp"


def study_protocols(study: Study) -> tuple[str, ...]:
    """The tests run per feature matrix: the HTT protocols, then PERMANOVA unless it has 0
    permutations, with PERMDISP beside it when the metric is Euclidean (its features route;
    another metric would need the N x N matrix's principal coordinates). With train.shared_init
    only the HTT protocols, restricted to init-seed strata: PERMANOVA's and PERMDISP's
    permutations are not restricted to strata, so their null would not hold there."""
    if not study.tests.permanova_permutations or study.train.shared_init:
        return study.tests.protocols
    spread = (PERMDISP,) if study.pairs.metric == "euclidean" else ()
    return (*study.tests.protocols, PERMANOVA, *spread)


def chunk_sizes(permutations: int, chunk: int) -> list[int]:
    """Sizes of the permutation chunks: full chunks of `chunk`, then the remainder."""
    if permutations < 1 or chunk < 1:
        raise ValueError(f"need permutations >= 1 and chunk >= 1, got {permutations}, {chunk}")
    return [min(chunk, permutations - s) for s in range(0, permutations, chunk)]


def htt_fit(X: np.ndarray, tasks: np.ndarray, protocol: str, seed: int,
            kwargs: dict[str, Any]) -> Fit:
    """The learner's label-independent part for the split of `seed` (``htt_prepare``): computed
    once per test, shared by its chunks through the object store."""
    return htt_prepare(X, tasks, protocol, seed, **{k: v for k, v in kwargs.items() if k != "k"})


def htt_head(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
             kwargs: dict[str, Any], fit: Fit | None = None) -> dict[str, Any]:
    """Chunk 0 of an HTT: the observed statistic, chance, extras and the first null chunk."""
    r = htt(X, tasks, protocol, permutations=permutations, seed=seed, fit=fit, **kwargs)
    return {"observed": r.statistic, "statistic": r.metric, "chance": r.chance, "null": r.null,
            "extra": {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str))}}


def htt_chunk(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
              chunk: int, kwargs: dict[str, Any], fit: Fit | None = None) -> np.ndarray:
    """Null chunk c >= 1 of an HTT: permutations from seed (seed, c), the split of `seed`."""
    return htt_null_chunk(X, tasks, protocol, permutations=permutations, seed=(seed, chunk),
                          split_seed=seed, fit=fit, **kwargs)


def permanova_head(Y: np.ndarray, tasks: np.ndarray, permutations: int,
                   seed: int) -> dict[str, Any]:
    """Chunk 0 of PERMANOVA's features route: the pseudo-F and the first null chunk of
    ``permanova_features`` on the features' Euclidean basis Y (no N x N array)."""
    r = permanova_features(Y, tasks, permutations=permutations, seed=seed)
    return {"observed": r.statistic, "statistic": "pseudo-F", "chance": float("nan"),
            "null": r.null, "extra": {"n_groups": r.n_groups, "route": "features", "r2": r.r2}}


def permdisp_test(Y: np.ndarray, tasks: np.ndarray, permutations: int,
                  seed: int) -> dict[str, Any]:
    """PERMDISP (distances to the task centroids, ``permdisp_features``) on the features'
    Euclidean basis Y, all B permutations in one task (O(N) each): whether the tasks' spreads
    differ, which PERMANOVA alone cannot tell from a difference of location."""
    r = permdisp_features(Y, tasks, permutations=permutations, seed=seed)
    spread = r.extra["dispersion"]
    return {"observed": r.statistic, "statistic": "F", "chance": float("nan"), "null": r.null,
            "extra": {"n_groups": r.n_groups, "route": "features", "test": "centroid",
                      "r2": r.r2, "dispersion_min": float(min(spread.values())),
                      "dispersion_max": float(max(spread.values()))}}


def permanova_chunk(Y: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                    chunk: int) -> np.ndarray:
    """Null chunk c >= 1 of PERMANOVA's features route: permutations from seed (seed, c), the
    ones ``permanova_null_chunk`` draws."""
    return permanova_features(Y, tasks, permutations, (seed, chunk)).null


def chunk_labels(tasks: np.ndarray, permutations: int, seed: int, chunk: int) -> np.ndarray:
    """The labellings of chunk c of PERMANOVA's tiles route, (N, b_c) int32: seed s for chunk 0
    (with the observed labels first), (s, c) after, as ``permanova`` /
    ``permanova_null_chunk`` draw them."""
    if chunk == 0:
        return permanova_labels(tasks, permutations, seed, observed=True)
    return permanova_labels(tasks, permutations, (seed, chunk))


def tiles_head(sums: TileSums, sizes: np.ndarray, n_tiles: int) -> dict[str, Any]:
    """The head of a tiles-route PERMANOVA from its tiles' summed shares: the observed pseudo-F
    and the whole null (the labellings of all chunks, in order)."""
    f = tile_pseudo_f(*sums.sums(), sizes)
    r2 = r_squared(float(f[0]), int(sizes.sum()), len(sizes))
    return {"observed": float(f[0]), "statistic": "pseudo-F", "chance": float("nan"),
            "null": f[1:], "extra": {"n_groups": len(sizes), "route": "tiles",
                                     "tiles": n_tiles, "r2": r2}}


def _chunk(unit: str, store_root: str, faults: dict[str, float], fn: Callable[..., Any],
           *args: Any) -> tuple[Any, float]:
    """One unit of a test (a permutation chunk, or a tile of PERMANOVA's tiles route) as a Ray
    task: (fn(*args), the seconds it took), after the fault-injection hook."""
    maybe_fail("test", unit, store_root, faults)
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def combine(head: dict[str, Any], nulls: list[np.ndarray], permutations: int) -> dict[str, Any]:
    """One test row from chunk 0 and the other chunks' nulls: null summary, effect size, p."""
    null = np.concatenate([head["null"], *nulls]).astype(np.float64)
    if len(null) != permutations:
        raise RuntimeError(f"tests: combined null has {len(null)} values, expected {permutations}")
    observed = float(head["observed"])
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if len(null) > 1 else 0.0
    if sd > 0:
        effect = (observed - mean) / sd
    else:
        effect = float(np.sign(observed - mean) * np.inf) if observed != mean else 0.0
    return {"statistic": head["statistic"], "observed": observed, "chance": float(head["chance"]),
            "null_mean": mean, "null_sd": sd, "effect_size": effect,
            # a null with no finite value (PERMDISP with no spread within tasks) tests nothing
            "p_value": p_value(observed, null) if np.isfinite(null).any() else float("nan"),
            "permutations": permutations, "null": null.tolist(),
            "extra": json.dumps(head["extra"], sort_keys=True)}


def _test_state(study: Study, store: Store) -> tuple[set[tuple[str, ...]], int]:
    """(tests (arch, method, layer, protocol) stored and computed from their matrix's feature
    rows now, how many stored tests are stale)."""
    rows, recorded = lineage.matrix_rows(store), lineage.recorded(store, "tests")
    fresh: set[tuple[str, ...]] = set()
    stale = 0
    for m in study.matrices():
        upstream = lineage.fingerprint(rows.get((m.arch, m.method, m.layer), frozenset()))
        for p in study_protocols(study):
            held = recorded.get((m.arch, m.method, m.layer, p))
            if held is not None and lineage.fresh(held, upstream):
                fresh.add((m.arch, m.method, m.layer, p))
            else:
                stale += held is not None
    return fresh, stale


def outputs(study: Study, store: Store) -> Outputs:
    """Tests (feature matrix x protocol) stored and computed from their matrix now."""
    fresh, stale = _test_state(study, store)
    return Outputs("tests", len(study.matrices()) * len(study_protocols(study)), len(fresh),
                   stale=stale)


def run_tests(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Run every pending test of every feature matrix as Ray tasks (permutation chunks, or
    tiles for PERMANOVA on a non-Euclidean metric); one shard per test."""
    import ray

    spec = study.tests
    metric = study.pairs.metric
    have = _test_state(study, store)[0]
    task = ray.remote(num_cpus=1)(_chunk)  # a unit that raises is resubmitted below
    basis_task = ray.remote(num_cpus=1)(euclidean_basis)
    fit_task = ray.remote(num_cpus=1)(htt_fit)
    frame_task = ray.remote(num_cpus=1)(distance_frame)
    labels_task = ray.remote(num_cpus=1)(chunk_labels)
    root, fault_plan = str(store.root), plan()
    kwargs = spec.htt_kwargs()
    jobs: dict[tuple[MatrixKey, str], dict[str, Any]] = {}  # -> refs, calls, values, meta
    n_tests = 0
    for matrix in study.matrices():
        protocols = list(study_protocols(study))
        n_tests += len(protocols)
        protocols = [p for p in protocols
                     if (matrix.arch, matrix.method, matrix.layer, p) not in have]
        if not protocols:
            continue
        fm = store.feature_matrix(matrix.arch, matrix.method, matrix.layer)
        if len(fm.model_ids) < 4:
            raise LaunchError(
                f"tests: {matrix} has {len(fm.model_ids)} feature rows in the store; run the zoo "
                "and features stages first"
            )
        x_ref, t_ref = ray.put(fm.X), ray.put(fm.tasks)
        htt_kw = dict(kwargs)
        if study.train.shared_init:  # split and permute within init-seed strata (htt_split)
            htt_kw["strata"] = study.model_index(fm.seeds, fm.tasks)
        bases: list[Any] = []  # the Euclidean basis, made once for PERMANOVA and PERMDISP

        def basis(x: Any, bases: list[Any] = bases) -> Any:
            if not bases:
                bases.append(basis_task.remote(x))
            return bases[0]

        meta = {"n_models": len(fm.model_ids), "n_tasks": int(len(np.unique(fm.tasks))),
                "upstream": fm.upstream}
        for protocol in protocols:
            unit = f"{matrix}-{protocol}".replace("/", "-")

            calls: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []

            def submit(part: str, fn: Callable[..., Any], *args: Any, unit: str = unit,
                       calls: list[Any] = calls) -> Any:
                calls.append((f"{unit}-{part}", fn, args))
                return task.remote(f"{unit}-{part}", root, fault_plan, fn, *args)

            job: dict[str, Any] = {}
            if protocol == PERMDISP:
                B = spec.permanova_permutations
                y_ref = basis(x_ref)
                refs = [submit("0", permdisp_test, y_ref, t_ref, B, spec.seed)]
            elif protocol == PERMANOVA and metric == "euclidean":  # the features' basis
                B = spec.permanova_permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                y_ref = basis(x_ref)
                refs = [submit("0", permanova_head, y_ref, t_ref, sizes[0], spec.seed)]
                refs += [submit(str(c), permanova_chunk, y_ref, t_ref, b, spec.seed, c)
                         for c, b in enumerate(sizes[1:], 1)]
            elif protocol == PERMANOVA:  # any metric: tiles of the distance matrix
                B = spec.permanova_permutations
                groups = permanova_groups(fm.tasks)[1]
                frame_ref = frame_task.remote(x_ref, metric)
                label_refs = [labels_task.remote(t_ref, b, spec.seed, c)
                              for c, b in enumerate(chunk_sizes(B, spec.chunk_size))]
                tiles = upper_tiles(len(fm.model_ids), study.pairs.block)
                refs = [submit(f"tile{t[0]}-{t[2]}", permanova_tile, x_ref, frame_ref, t,
                               metric, groups, *label_refs) for t in tiles]
                job = {"sums": TileSums(B + 1), "groups": groups}
            else:
                B = spec.permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                fit_ref = fit_task.remote(x_ref, t_ref, protocol, spec.seed, htt_kw)
                refs = [submit("0", htt_head, x_ref, t_ref, protocol, sizes[0], spec.seed,
                               htt_kw, fit_ref)]
                refs += [submit(str(c), htt_chunk, x_ref, t_ref, protocol, b, spec.seed, c,
                                htt_kw, fit_ref) for c, b in enumerate(sizes[1:], 1)]
            jobs[(matrix, protocol)] = {"refs": refs, "calls": calls, "values": [None] * len(refs),
                                        "B": B, "seconds": 0.0, **meta, **job}
    n_units = sum(len(j["refs"]) for j in jobs.values())
    progress = Progress("tests", n_units, unit="task", skipped=0, stream=ctx.stream)
    if n_tests > len(jobs):
        print(f"tests     {n_tests - len(jobs)} of {n_tests} tests already in store",
              file=progress.stream)
    owner = {ref: (key, i) for key, job in jobs.items() for i, ref in enumerate(job["refs"])}
    left = {key: len(job["refs"]) for key, job in jobs.items()}
    retries = Retries("tests", study.resources.max_failures, ctx.stream)
    failed: set[tuple[MatrixKey, str]] = set()  # tests with a unit given up
    waiting = list(owner)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            key, i = owner.pop(ready[0])
            job = jobs[key]
            try:
                value, seconds = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                if key in failed:
                    continue
                name, fn, args = job["calls"][i]
                kind = "tile" if "sums" in job else "chunk"
                if retries.failed(f"{kind} {name}", error_text(exc)):
                    ref = task.remote(name, root, fault_plan, fn, *args)
                    owner[ref] = (key, i)
                    waiting.append(ref)
                else:
                    failed.add(key)
                    progress.update(left.pop(key))
                continue
            if key in failed:
                continue
            if "sums" in job:  # a tile's shares: added now, never all held
                job["sums"].add(*value)
            else:
                job["values"][i] = value
            job["seconds"] += seconds
            left[key] -= 1
            progress.update(1)
            if left[key] == 0:
                if "sums" in job:
                    job["values"] = [tiles_head(job["sums"], job["groups"], len(job["refs"]))]
                _write_test(store, study, key, job)
    finally:
        progress.close()
    return {"tests": len(jobs), "skipped": n_tests - len(jobs), "tasks": n_units,
            **retries.outcome()}


def _write_test(store: Store, study: Study, key: tuple[MatrixKey, str],
                job: dict[str, Any]) -> None:
    """Combine a test's chunks (job["values"]: head, then nulls) into its tests shard."""
    matrix, protocol = key
    head, *nulls = job["values"]
    row = combine(head, nulls, job["B"])
    row.update({"n_models": job["n_models"], "n_tasks": job["n_tasks"], "seed": study.tests.seed,
                "upstream": job["upstream"],
                "learner": study.tests.learner if protocol in study.tests.protocols else None,
                "seconds": job["seconds"]})
    store.write_shard("tests", {**matrix.key, "protocol": protocol}, [row])


STAGE = Stage(name="tests", outputs=outputs, run=run_tests)
