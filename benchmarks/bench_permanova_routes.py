"""PERMANOVA's two routes side by side on synthetic features (D = 512, 50 groups, B = 999):
the distance-matrix route (`permanova(pairwise_distances(X))`, what the tests stage did before)
and the Euclidean route without the matrix (`permanova_features(X)`). Each measurement runs in
a fresh process, so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_permanova_routes.py [--sizes 5000 10000 20000 30000 100000]
                                                          [--matrix-up-to 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

D, GROUPS, B = 512, 50, 999


def measure(route: str, n: int) -> dict[str, float]:
    """Run one route at size n in this process: wall seconds, pseudo-F, p."""
    from distsim.stats import pairwise_distances, permanova, permanova_features

    rng = np.random.default_rng(0)
    labels = rng.integers(0, GROUPS, n)
    X = rng.standard_normal((n, D)).astype(np.float32)
    X[:, 0] += 0.05 * labels  # a small group effect
    t0 = time.perf_counter()
    if route == "features":
        r = permanova_features(X, labels, permutations=B, seed=0)
    else:
        r = permanova(pairwise_distances(X).astype(np.float64), labels, permutations=B, seed=0)
    return {"seconds": time.perf_counter() - t0, "F": r.statistic, "p": r.p_value}


def child(route: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", route, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 30000,
                                                                 100000])
    parser.add_argument("--matrix-up-to", type=int, default=20000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child[0], int(args.child[1]))
        result["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    print(f"D = {D}, {GROUPS} groups, B = {B}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}")
    print("| N | features route (s) | peak RSS (GB) | matrix route (s) | peak RSS (GB) | "
          "matrix / features | F (features) | F rel. diff | p both |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        f = child("features", n)
        m = child("matrix", n) if n <= args.matrix_up_to else None
        if m is None:
            print(f"| {n:,} | {f['seconds']:.1f} | {f['rss_gb']:.2f} | - | - | - | "
                  f"{f['F']:.4f} | - | {f['p']:.3f} |", flush=True)
            continue
        rel = abs(f["F"] - m["F"]) / m["F"]
        print(f"| {n:,} | {f['seconds']:.1f} | {f['rss_gb']:.2f} | {m['seconds']:.1f} | "
              f"{m['rss_gb']:.2f} | {m['seconds'] / f['seconds']:.1f}x | {f['F']:.4f} | "
              f"{rel:.1e} | {f['p']:.3f} / {m['p']:.3f} |", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
