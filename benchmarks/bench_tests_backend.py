"""The numpy and torch backends side by side (distsim.stats.backend), on what runs on torch so
far: the distance tiles of the pairs stage and of PERMANOVA's tile route, and HTT's fits.

For each row, one process, the same inputs for both backends, each timed as the best of
``--repeat`` runs after a warm-up (torch's on its device: a CUDA GPU when there is one, else
this CPU), and the largest relative difference between their results:

* ``pairs tile``: ``distance_block`` of one off-diagonal tile (block x block rows of features
  of width D: a task mean plus noise, as trained features cluster), and ``block_tile`` whole
  (distances, the tile's sums, its rows' and columns' top-k).
* ``PERMANOVA tile``: ``permanova_tile`` of one tile on the cosine metric with B + 1
  labellings (the tile route's unit, B = 199).

* ``HTT``: ``htt_null_chunk`` of ``--perms`` permutations with a shared fit
  (``htt_prepare``, not timed: computed once per test), per protocol and learner, on
  ``--htt-n`` features of width D in 45 tasks (the paper's digits study: 4,500 models;
  chain-gram fc1 has D = 2,145), reported as seconds per 100 permutations.

PERMANOVA's and PERMDISP's Euclidean routes run numpy whatever the backend; they have no row.

    .venv/bin/python benchmarks/bench_tests_backend.py [--blocks 512 1024 2048] [--dim 2145]
        [--repeat 3] [--threads 0] [--htt-n 4500] [--perms 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def features(n: int, d: int, tasks: int = 45, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 rows: a task mean plus noise, and their tasks (n,)."""
    rng = np.random.default_rng(seed)
    task = rng.integers(tasks, size=n)
    means = rng.normal(size=(tasks, d)).astype(np.float32)
    return (means[task] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)), task


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    out = fn()  # warm-up: numba's compile, torch's first kernels
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def block_rows(block: int, dim: int, repeat: int) -> list[tuple[str, int, float, float, float]]:
    """(unit, block, numpy s, torch s, max relative difference) of each unit at this block."""
    from distsim.pipeline.pairs import block_tile
    from distsim.stats import distance_block, distance_frame, permanova_groups
    from distsim.stats.permanova_tiled import permanova_tile

    X, task = features(2 * block, dim)
    a, b = X[:block], X[block:]
    codes, sizes = permanova_groups(task)
    rng = np.random.default_rng(1)
    labels = np.stack([codes, *(rng.permutation(codes) for _ in range(199))], axis=1)
    units: dict[str, Callable[[str], Any]] = {
        "pairs tile: distances": functools.partial(
            lambda be, frame: distance_block(a, b, "euclidean", frame=frame, backend=be),
            frame=distance_frame(X)),
        "pairs tile: whole": lambda be: block_tile(
            a, b, task[:block], task[block:], 0, block, 10, "euclidean", backend=be)[3],
        "PERMANOVA tile (cosine, B = 199)": functools.partial(
            lambda be, frame: permanova_tile(X, frame, (0, block, block, 2 * block), "cosine",
                                             sizes, labels, backend=be)[0],
            frame=distance_frame(X, "cosine")),
    }
    rows = []
    for what, unit in units.items():
        t_np, out_np = best(functools.partial(unit, "numpy"), repeat)
        t_th, out_th = best(functools.partial(unit, "torch"), repeat)
        rows.append((what, block, t_np, t_th, rel(out_th, out_np)))
    return rows


def htt_rows(n: int, dim: int, perms: int) -> list[tuple[str, int, float, float, float]]:
    """(unit, n, numpy s per 100 permutations, torch s per 100, max rel. diff of the nulls)."""
    from distsim.stats import HTTOptions, htt_null_chunk, htt_prepare

    X, task = features(n, dim)
    X = X.astype(np.float64)
    rows = []
    for learner in ("lda", "softmax"):
        for protocol in ("closed-set", "open-set"):
            fit = htt_prepare(X, task, protocol, 0, options=HTTOptions(learner=learner))
            times, nulls = {}, {}
            for be in ("numpy", "torch"):
                how = HTTOptions(learner=learner, backend=be)
                t, nulls[be] = best(functools.partial(
                    htt_null_chunk, X, task, protocol, perms, (0, 1), options=how,
                    split_seed=0, fit=fit), 1)
                times[be] = 100 * t / perms
            rows.append((f"HTT {protocol} {learner}, per 100 permutations", n, times["numpy"],
                         times["torch"], rel(nulls["torch"], nulls["numpy"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dim", type=int, default=2145)  # the paper MLP's chain-gram fc1
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="BLAS and torch threads "
                        "(0: leave them as they are)")
    parser.add_argument("--htt-n", type=int, default=4500, help="models of the HTT rows "
                        "(0: no HTT rows)")
    parser.add_argument("--perms", type=int, default=20)
    args = parser.parse_args()
    import torch

    from distsim.stats.backend import device

    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    dev = device()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({os.cpu_count()})"
    print(f"torch {torch.__version__} on {name}; torch threads {torch.get_num_threads()}; "
          f"D = {args.dim}; best of {args.repeat}")
    rows = [row for block in args.blocks for row in block_rows(block, args.dim, args.repeat)]
    if args.htt_n:
        rows += htt_rows(args.htt_n, args.dim, args.perms)
    print(f"\n| unit | block or N | numpy (s) | torch {dev.type} (s) | numpy / torch "
          "| max rel. diff |")
    print("|---|---|---|---|---|---|")
    for what, block, t_np, t_th, diff in rows:
        print(f"| {what} | {block} | {t_np:.4f} | {t_th:.4f} | {t_np / t_th:.2f} | {diff:.1e} |")
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
