"""PERMANOVA's routes side by side on synthetic features (D = 512, 50 groups, B = 999): the
distance-matrix route (`permanova(pairwise_distances(X))`), the Euclidean route without the
matrix (`permanova_features(X)`, euclidean only) and the tile route (`permanova_tiles(X)`, any
metric: one tile of distances at a time, what the tests stage runs as Ray tasks for metrics
other than euclidean). Each measurement runs in a fresh process, so its peak RSS (VmHWM) is
its own; the tile route also times a pass that only computes its tiles' distances, to split
its time into distances and permutation sums.

    .venv/bin/python benchmarks/bench_permanova_routes.py [--sizes 5000 10000 20000 30000 100000]
        [--metric euclidean|cosine] [--routes features matrix tiles] [--matrix-up-to 20000]
        [--tile 512]

e.g. the cosine comparison: --metric cosine --routes matrix tiles --sizes 2000 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

D, GROUPS, B = 512, 50, 999


def _peak_gb() -> float:
    """Peak resident memory of this process (VmHWM), GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(route: str, n: int, metric: str, tile: int) -> dict[str, float]:
    """Run one route at size n in this process: wall seconds, pseudo-F, p."""
    from distsim.stats import (
        distance_block,
        distance_frame,
        pairwise_distances,
        permanova,
        permanova_features,
        permanova_tiles,
        upper_tiles,
    )

    rng = np.random.default_rng(0)
    labels = rng.integers(0, GROUPS, n)
    X = rng.standard_normal((n, D)).astype(np.float32)
    X[:, 0] += 0.05 * labels  # a small group effect
    X[:, 1] += 1.0  # off the origin, for cosine
    permanova_tiles(X[:64], labels[:64] % 2, metric, permutations=3, tile=16)  # compile numba
    permanova(pairwise_distances(X[:64], metric=metric), labels[:64] % 2, permutations=3)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if route == "none":  # the baseline: imports, data and compiled kernels only
        return {"seconds": 0.0, "F": float("nan"), "p": float("nan")}
    if route == "features":
        r = permanova_features(X, labels, permutations=B, seed=0)
    elif route == "tiles":
        r = permanova_tiles(X, labels, metric, permutations=B, seed=0, tile=tile)
    else:
        r = permanova(pairwise_distances(X, metric=metric).astype(np.float64), labels,
                      permutations=B, seed=0)
    out.update(seconds=time.perf_counter() - t0, F=r.statistic, p=r.p_value)
    if route == "tiles":
        t0 = time.perf_counter()
        frame = distance_frame(X, metric)
        for i0, i1, j0, j1 in upper_tiles(n, tile):
            distance_block(X[i0:i1], None if i0 == j0 else X[j0:j1], metric, frame=frame)
        out["distances_seconds"] = time.perf_counter() - t0
    return out


def child(route: str, n: int, metric: str, tile: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", route, str(n), metric, str(tile)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 30000,
                                                                 100000])
    parser.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    parser.add_argument("--routes", nargs="+", choices=["features", "matrix", "tiles"],
                        default=["features", "matrix"])
    parser.add_argument("--matrix-up-to", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=512, help="tile rows (pairs.block)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        route, n, metric, tile = args.child
        result = measure(route, int(n), metric, int(tile))
        result["rss_gb"] = _peak_gb()
        print(json.dumps(result))
        return
    if args.metric != "euclidean" and "features" in args.routes:
        parser.error("the features route is euclidean only")
    print(f"D = {D}, {GROUPS} groups, B = {B}, metric {args.metric}, tiles of {args.tile}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    base = child("none", 64, args.metric, args.tile)["rss_gb"]
    print(f"baseline peak RSS (interpreter, imports, compiled kernels): {base:.2f} GB")
    print("| N | route | wall (s) | of which distances (s) | peak RSS (GB) | F | "
          "F rel. diff to first route | p | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        first: dict[str, float] | None = None
        for route in args.routes:
            if route == "matrix" and n > args.matrix_up_to:
                print(f"| {n:,} | matrix | - | - | - | - | - | - | - |", flush=True)
                continue
            r = child(route, n, args.metric, args.tile)
            first = first or r
            rel = abs(r["F"] - first["F"]) / abs(first["F"])
            dist = f"{r['distances_seconds']:.1f}" if "distances_seconds" in r else "-"
            print(f"| {n:,} | {route} | {r['seconds']:.1f} | {dist} | {r['rss_gb']:.2f} | "
                  f"{r['F']:.6f} | {rel:.1e} | {r['p']:.3f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
