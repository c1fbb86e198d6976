"""The tests stage: HTT (closed-set, open-set) and PERMANOVA per feature matrix, on Ray tasks.

Each test's B permutations are cut into chunks of ``tests.chunk_size``. Chunk 0 is the full
statistic with its first null chunk (``htt(..., seed=s)`` / ``permanova(..., seed=s)``); chunk
c >= 1 draws its permutations from seed (s, c) with the same split (``htt_null_chunk(...,
seed=(s, c), split_seed=s)`` / ``permanova_null_chunk(..., seed=(s, c))``). The chunks run as
Ray tasks; their nulls concatenate into one null of B values and
p = (1 + #{null >= S}) / (1 + B) (``distsim.stats.p_value``). With one chunk the result equals
the single-process ``htt`` / ``permanova`` call exactly. One ``tests`` shard per
(arch, method, layer, protocol); tests already in the store are skipped.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from distsim.config import MatrixKey, Study
from distsim.errors import LaunchError
from distsim.pipeline.progress import Progress
from distsim.pipeline.stage import RunContext, Stage
from distsim.stats import (
    htt,
    htt_null_chunk,
    p_value,
    pairwise_distances,
    permanova,
    permanova_null_chunk,
)
from distsim.store import TABLES, Store

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


def permanova_head(D: np.ndarray, tasks: np.ndarray, permutations: int,
                   seed: int) -> dict[str, Any]:
    """Chunk 0 of PERMANOVA: the pseudo-F and the first null chunk."""
    r = permanova(D, tasks, permutations=permutations, seed=seed)
    return {"observed": r.statistic, "statistic": "pseudo-F", "chance": float("nan"),
            "null": r.null, "extra": {"n_groups": r.n_groups}}


def permanova_chunk(D: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                    chunk: int) -> np.ndarray:
    """Null chunk c >= 1 of PERMANOVA: permutations from seed (seed, c)."""
    return permanova_null_chunk(D, tasks, permutations, (seed, chunk))


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


def _stored_tests(store: Store) -> set[tuple[Any, ...]]:
    """(arch, method, layer, protocol) of every test in the store."""
    return {tuple(k[c] for c in TABLES["tests"].key) for k in store.shard_keys("tests")}


def pending(study: Study, store: Store) -> int:
    """Tests (feature matrix x protocol) missing from the store."""
    have = _stored_tests(store)
    return sum((m.arch, m.method, m.layer, p) not in have
               for m in study.matrices() for p in study_protocols(study))


def run_tests(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Run every pending test of every feature matrix as chunked Ray tasks; one shard per test."""
    import ray

    spec = study.tests
    have = _stored_tests(store)
    head_htt, chunk_htt = ray.remote(num_cpus=1)(htt_head), ray.remote(num_cpus=1)(htt_chunk)
    head_perm = ray.remote(num_cpus=1)(permanova_head)
    chunk_perm = ray.remote(num_cpus=1)(permanova_chunk)
    dist_task = ray.remote(num_cpus=1)(distance_matrix)
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
        meta = {"n_models": len(fm.model_ids), "n_tasks": int(len(np.unique(fm.tasks)))}
        d_ref = None
        for protocol in protocols:
            if protocol == PERMANOVA:
                B = spec.permanova_permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                if d_ref is None:
                    d_ref = dist_task.remote(x_ref, study.pairs.metric)
                head = head_perm.remote(d_ref, t_ref, sizes[0], spec.seed)
                rest = [chunk_perm.remote(d_ref, t_ref, b, spec.seed, c)
                        for c, b in enumerate(sizes[1:], 1)]
            else:
                B = spec.permutations
                sizes = chunk_sizes(B, spec.chunk_size)
                head = head_htt.remote(x_ref, t_ref, protocol, sizes[0], spec.seed, kwargs)
                rest = [chunk_htt.remote(x_ref, t_ref, protocol, b, spec.seed, c, kwargs)
                        for c, b in enumerate(sizes[1:], 1)]
            jobs[(matrix, protocol)] = {"head": head, "rest": rest, "B": B,
                                        "start": time.perf_counter(), **meta}
    n_chunks = sum(1 + len(j["rest"]) for j in jobs.values())
    progress = Progress("tests", n_chunks, unit="chunk", skipped=0, stream=ctx.stream)
    if n_tests > len(jobs):
        print(f"tests     {n_tests - len(jobs)} of {n_tests} tests already in store",
              file=progress.stream)
    owner = {}
    for key, job in jobs.items():
        for ref in [job["head"], *job["rest"]]:
            owner[ref] = key
    left = {key: 1 + len(job["rest"]) for key, job in jobs.items()}
    waiting = list(owner)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                key = owner[ref]
                left[key] -= 1
                progress.update(1)
                if left[key] == 0:
                    _write_test(store, study, key, jobs[key])
    finally:
        progress.close()
    return {"tests": len(jobs), "skipped": n_tests - len(jobs), "chunks": n_chunks}


def _write_test(store: Store, study: Study, key: tuple[MatrixKey, str],
                job: dict[str, Any]) -> None:
    import ray

    matrix, protocol = key
    try:
        head = ray.get(job["head"])
        nulls = ray.get(job["rest"])
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise LaunchError(f"tests: {matrix} {protocol}: {type(cause).__name__}: {cause}") from None
    row = combine(head, nulls, job["B"])
    row.update({"n_models": job["n_models"], "n_tasks": job["n_tasks"], "seed": study.tests.seed,
                "learner": study.tests.learner if protocol != PERMANOVA else None,
                "seconds": time.perf_counter() - job["start"]})
    store.write_shard("tests", {**matrix.key, "protocol": protocol}, [row])


STAGE = Stage(name="tests", pending=pending, run=run_tests, complete=lambda study, store: True)
