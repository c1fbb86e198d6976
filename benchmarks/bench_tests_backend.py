"""The numpy and torch backends side by side (distsim.stats.backend), on what runs on torch:
the distance tiles of the pairs stage and of PERMANOVA's tile route, HTT's fits, and the
permutation nulls of PERMANOVA's and PERMDISP's features routes.

For each row, one process, the same inputs for both backends, each timed as the best of
``--repeat`` runs after a warm-up (torch's on its device: a CUDA GPU when there is one, else
this CPU), and the largest relative difference between their results:

* ``pairs tile``: ``distance_block`` of one off-diagonal tile (block x block rows of features
  of width D: a task mean plus noise, as trained features cluster), and ``block_tile`` whole
  (distances, the tile's sums, its rows' and columns' top-k; on torch's CPU device only the
  distances run on torch), and ``tiles_torch.tile_parts`` (all of it on the device: what
  ``block_tile`` runs on a GPU) against numpy's ``block_tile``.
* ``PERMANOVA tile``: ``permanova_tile`` of one tile on the cosine metric with B + 1
  labellings (the tile route's unit, B = 199).

* ``HTT``: ``htt_null_chunk`` of ``--perms`` permutations with a shared fit
  (``htt_prepare``, not timed: computed once per test), per protocol and learner, on N
  features of width D in 45 tasks, reported as seconds per 100 permutations (best of
  ``--repeat`` after a warm-up, as the tiles).
* ``PERMANOVA features``: ``permanova_features`` with B = 199 permutations on the same N
  features' Euclidean basis (computed once per test by the tests stage, not timed here), per
  100 permutations; ``PERMDISP features``: ``permdisp_features`` whole (its centroid
  distances, then a null of B = 999, O(N) each).
* ``float64 GEMMs alone``: the two products HTT's lda repeats per chunk, numpy's BLAS
  against torch's, which set how the HTT rows compare on a CPU.

N: ``--sizes``, each size one set of HTT and features rows (the paper's digits study has
4,500 models; its MLP's chain-gram fc1 has D = 2,145; 10,000 and 100,000 are synthetic).

    .venv/bin/python benchmarks/bench_tests_backend.py [--blocks 512 1024 2048] [--dim 2145]
        [--repeat 3] [--threads 0] [--sizes 4500 10000 100000] [--perms 20]
        [--htt-learners lda softmax]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distsim.stats.backend import device


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
    from distsim.stats.tiles_torch import tile_parts

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
        "pairs tile: whole, all on the device": lambda be: (block_tile if be == "numpy"
                                                            else tile_parts)(
            a, b, task[:block], task[block:], 0, block, 10, "euclidean")[3],
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


def htt_rows(X: np.ndarray, task: np.ndarray, perms: int, learners: list[str], repeat: int
             ) -> list[tuple[str, int, float, float, float]]:
    """(unit, n, numpy s per 100 permutations, torch s per 100, max rel. diff of the nulls)."""
    from distsim.stats import HTTOptions, htt_null_chunk, htt_prepare

    n = len(X)
    rows = []
    for learner in learners:
        for protocol in ("closed-set", "open-set"):
            fit = htt_prepare(X, task, protocol, 0, options=HTTOptions(learner=learner))
            times, nulls = {}, {}
            for be in ("numpy", "torch"):
                how = HTTOptions(learner=learner, backend=be)
                t, nulls[be] = best(functools.partial(
                    htt_null_chunk, X, task, protocol, perms, (0, 1), options=how,
                    split_seed=0, fit=fit), repeat)
                times[be] = 100 * t / perms
            rows.append((f"HTT {protocol} {learner}, per 100 permutations", n, times["numpy"],
                         times["torch"], rel(nulls["torch"], nulls["numpy"])))
    return rows


def features_rows(X: np.ndarray, task: np.ndarray, perms: int, repeat: int
                  ) -> list[tuple[str, int, float, float, float]]:
    """(unit, n, numpy s per 100 permutations, torch s per 100, max rel. diff of the nulls)
    of PERMANOVA's (on the Euclidean basis) and PERMDISP's features routes."""
    import torch

    from distsim.stats import euclidean_basis, permanova_features, permdisp_features

    Y = euclidean_basis(X)
    rows = []
    for what, test, data, b in (
            ("PERMANOVA features (B = 199), per 100 permutations", permanova_features, Y, 199),
            ("PERMDISP features, whole test (B = 999)", permdisp_features, X, 999)):
        times, nulls = {}, {}
        for be in ("numpy", "torch"):
            t, nulls[be] = best(functools.partial(
                lambda be, test, data, b: test(data, task, b, 0, backend=be).null,
                be, test, data, b), repeat)
            times[be] = 100 * t / b if test is permanova_features else t
        rows.append((what, len(X), times["numpy"], times["torch"],
                     rel(nulls["torch"], nulls["numpy"])))
    # the two GEMMs HTT's lda repeats per chunk, alone: beta = F^T L (the basis F (n, D)
    # against a chunk's labels L (n, 20 x 45)) and the embedding F beta; numpy's BLAS against
    # torch's (what sets the ratio of the HTT rows on a CPU)
    rng = np.random.default_rng(0)
    n = int(0.6 * len(X))
    F, L = rng.normal(size=(n, X.shape[1])), rng.normal(size=(n, 900))
    dev_F, dev_L = (torch.from_numpy(a).to(device()) for a in (F, L))
    t_np, out_np = best(lambda: F @ (F.T @ L), repeat)
    t_th, out_th = best(lambda: (dev_F @ (dev_F.T @ dev_L)).cpu().numpy(), repeat)
    rows.append(("float64 GEMMs F (F^T L), F (0.6 N x D), L (0.6 N x 900), alone", len(X),
                 t_np, t_th, rel(out_th, out_np)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="*", default=[512, 1024, 2048],
                        help="tile sizes of the tile rows; none: no tile rows")
    parser.add_argument("--dim", type=int, default=2145)  # the paper MLP's chain-gram fc1
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="BLAS and torch threads "
                        "(0: leave them as they are)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[4500],
                        help="models (N) of the HTT and features rows; none: no such rows")
    parser.add_argument("--perms", type=int, default=20)
    parser.add_argument("--htt-learners", nargs="*", default=["lda", "softmax"],
                        choices=["lda", "softmax"], help="none: no HTT rows")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    dev = device()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({os.cpu_count()})"
    print(f"torch {torch.__version__} on {name}; torch threads {torch.get_num_threads()}; "
          f"D = {args.dim}; best of {args.repeat}")
    print(f"\n| unit | block or N | numpy (s) | torch {dev.type} (s) | numpy / torch "
          "| max rel. diff |")
    print("|---|---|---|---|---|---|")

    def show(rows: list[tuple[str, int, float, float, float]]) -> None:  # as they come
        for what, block, t_np, t_th, diff in rows:
            print(f"| {what} | {block} | {t_np:.4f} | {t_th:.4f} | {t_np / t_th:.2f} "
                  f"| {diff:.1e} |", flush=True)

    for block in args.blocks:
        show(block_rows(block, args.dim, args.repeat))
    for n in args.sizes:
        X, task = features(n, args.dim)
        X = X.astype(np.float64)
        show(features_rows(X, task, args.perms, args.repeat))
        show(htt_rows(X, task, args.perms, args.htt_learners, args.repeat))
        del X
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
