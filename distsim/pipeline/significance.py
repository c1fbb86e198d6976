"""The tests stage: HTT (closed-set, open-set) and PERMANOVA per feature matrix, on Ray tasks.

Each test's B permutations are cut into chunks of ``tests.chunk_size``. Chunk 0 is the full
statistic with its first null chunk (``htt(..., seed=s)`` / ``permanova(..., seed=s)``); chunk
c >= 1 draws its permutations from seed (s, c) with the same split (``htt_null_chunk(...,
seed=(s, c), split_seed=s)`` / ``permanova_null_chunk(..., seed=(s, c))``). The chunks run as
Ray tasks; their nulls concatenate into one null of B values and
p = (1 + #{null >= S}) / (1 + B) (``distsim.stats.p_value``). With one chunk the result equals
the single-process ``htt`` / ``permanova`` call exactly. PERMANOVA with the Euclidean metric
never builds the N x N distance matrix: it runs ``permanova_features`` on the features'
Euclidean basis (same permutations, same pseudo-F to 1e-9); other metrics use the matrix. One
``tests`` shard per (arch, method, layer, protocol); tests already in the store are skipped.
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
    euclidean_basis,
    htt,
    htt_null_chunk,
    p_value,
    pairwise_distances,
    permanova,
    permanova_features,
    permanova_null_chunk,
)
from distsim.store import Store, lineage

PERMANOVA = "permanova"


def study_protocols(study: Study) -> tuple[str, ...]:
    """The tests run per feature matrix: the HTT protocols, then PERMANOVA unless it has 0
    permutations."""
    return (*study.tests.protocols, *((PERMANOVA,) if study.tests.permanova_permutations else ()))


def chunk_sizes(permutations: int, chunk: int) -> list[int]:
    """Sizes of the permutation chunks: full chunks of `chunk`, then the remainder."""
    if permutations < 1 or chunk < 1:
        raise ValueError(f"need permutations >= 1 and chunk >= 1, got {permutations}, {chunk}")
    return [min(chunk, permutations - s) for s in range(0, permutations, chunk)]


def htt_head(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
             kwargs: dict[str, Any]) -> dict[str, Any]:
    """Chunk 0 of an HTT: the observed statistic, chance, extras and the first null chunk."""
    r = htt(X, tasks, protocol, permutations=permutations, seed=seed, **kwargs)
    return {"observed": r.statistic, "statistic": r.metric, "chance": r.chance, "null": r.null,
            "extra": {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str))}}


def htt_chunk(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
              chunk: int, kwargs: dict[str, Any]) -> np.ndarray:
    """Null chunk c >= 1 of an HTT: permutations from seed (seed, c), the split of `seed`."""
    return htt_null_chunk(X, tasks, protocol, permutations=permutations, seed=(seed, chunk),
                          split_seed=seed, **kwargs)


def permanova_head(data: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                   route: str) -> dict[str, Any]:
    """Chunk 0 of PERMANOVA: the pseudo-F and the first null chunk. `data` is the features'
    Euclidean basis (route "features": no N x N array) or the distance matrix ("matrix")."""
    test = permanova_features if route == "features" else permanova
    r = test(data, tasks, permutations=permutations, seed=seed)
    return {"observed": r.statistic, "statistic": "pseudo-F", "chance": float("nan"),
            "null": r.null, "extra": {"n_groups": r.n_groups, "route": route}}


def permanova_chunk(data: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                    chunk: int, route: str) -> np.ndarray:
    """Null chunk c >= 1 of PERMANOVA: permutations from seed (seed, c); `data` as in
    :func:`permanova_head`. Both routes draw the same permutations."""
    if route == "features":
        return permanova_features(data, tasks, permutations, (seed, chunk)).null
    return permanova_null_chunk(data, tasks, permutations, (seed, chunk))


def _chunk(unit: str, store_root: str, faults: dict[str, float], fn: Callable[..., Any],
           *args: Any) -> Any:
    """One chunk of a test as a Ray task: fn(*args), after the fault-injection hook."""
    maybe_fail("test", unit, store_root, faults)
    return fn(*args)


def distance_matrix(X: np.ndarray, metric: str) -> np.ndarray:
    """All-pairs distance matrix (N, N) float64 of the features X (N, D), for PERMANOVA."""
    return pairwise_distances(X, metric=metric).astype(np.float64)


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
            "p_value": p_value(observed, null), "permutations": permutations,
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
    """Run every pending test of every feature matrix as chunked Ray tasks; one shard per test."""
    import ray

    spec = study.tests
    have = _test_state(study, store)[0]
    task = ray.remote(num_cpus=1)(_chunk)  # a chunk that raises is resubmitted below
    dist_task = ray.remote(num_cpus=1)(distance_matrix)
    basis_task = ray.remote(num_cpus=1)(euclidean_basis)
    route = "features" if study.pairs.metric == "euclidean" else "matrix"
    root, fault_plan = str(store.root), plan()
    kwargs = spec.htt_kwargs()
    jobs: dict[tuple[MatrixKey, str], dict[str, Any]] = {}  # -> head ref, chunk refs, meta
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
        meta = {"n_models": len(fm.model_ids), "n_tasks": int(len(np.unique(fm.tasks))),
                "upstream": fm.upstream}
        d_ref = None
        for protocol in protocols:
            unit = f"{matrix}-{protocol}".replace("/", "-")

            calls: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []

            def submit(c: int, fn: Callable[..., Any], *args: Any, unit: str = unit,
                       calls: list[Any] = calls) -> Any:
                calls.append((f"{unit}-{c}", fn, args))
                return task.remote(f"{unit}-{c}", root, fault_plan, fn, *args)

            if protocol == PERMANOVA:
                B = spec.permanova_permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                if d_ref is None:  # Euclidean: the features' basis, no distance matrix
                    d_ref = (basis_task.remote(x_ref) if route == "features"
                             else dist_task.remote(x_ref, study.pairs.metric))
                refs = [submit(0, permanova_head, d_ref, t_ref, sizes[0], spec.seed, route)]
                refs += [submit(c, permanova_chunk, d_ref, t_ref, b, spec.seed, c, route)
                         for c, b in enumerate(sizes[1:], 1)]
            else:
                B = spec.permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                refs = [submit(0, htt_head, x_ref, t_ref, protocol, sizes[0], spec.seed, kwargs)]
                refs += [submit(c, htt_chunk, x_ref, t_ref, protocol, b, spec.seed, c, kwargs)
                         for c, b in enumerate(sizes[1:], 1)]
            jobs[(matrix, protocol)] = {"refs": refs, "calls": calls, "values": [None] * len(refs),
                                        "B": B, "start": time.perf_counter(), **meta}
    n_chunks = sum(len(j["refs"]) for j in jobs.values())
    progress = Progress("tests", n_chunks, unit="chunk", skipped=0, stream=ctx.stream)
    if n_tests > len(jobs):
        print(f"tests     {n_tests - len(jobs)} of {n_tests} tests already in store",
              file=progress.stream)
    owner = {ref: (key, i) for key, job in jobs.items() for i, ref in enumerate(job["refs"])}
    left = {key: len(job["refs"]) for key, job in jobs.items()}
    retries = Retries("tests", study.resources.max_failures, ctx.stream)
    failed: set[tuple[MatrixKey, str]] = set()  # tests with a chunk given up
    waiting = list(owner)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            key, i = owner.pop(ready[0])
            job = jobs[key]
            try:
                job["values"][i] = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                if key in failed:
                    continue
                name, fn, args = job["calls"][i]
                if retries.failed(f"chunk {name}", error_text(exc)):
                    ref = task.remote(name, root, fault_plan, fn, *args)
                    owner[ref] = (key, i)
                    waiting.append(ref)
                else:
                    failed.add(key)
                    progress.update(left.pop(key))
                continue
            if key in failed:
                continue
            left[key] -= 1
            progress.update(1)
            if left[key] == 0:
                _write_test(store, study, key, job)
    finally:
        progress.close()
    return {"tests": len(jobs), "skipped": n_tests - len(jobs), "chunks": n_chunks,
            **retries.outcome()}


def _write_test(store: Store, study: Study, key: tuple[MatrixKey, str],
                job: dict[str, Any]) -> None:
    """Combine a test's chunks (job["values"]: head, then nulls) into its tests shard."""
    matrix, protocol = key
    head, *nulls = job["values"]
    row = combine(head, nulls, job["B"])
    row.update({"n_models": job["n_models"], "n_tasks": job["n_tasks"], "seed": study.tests.seed,
                "upstream": job["upstream"],
                "learner": study.tests.learner if protocol != PERMANOVA else None,
                "seconds": time.perf_counter() - job["start"]})
    store.write_shard("tests", {**matrix.key, "protocol": protocol}, [row])


STAGE = Stage(name="tests", outputs=outputs, run=run_tests)
