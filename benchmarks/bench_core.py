"""Side-by-side timings of distsim.stats against its peers, printed as ratios (one run).

- all-pairs distances vs scipy.spatial.distance.cdist, and vs the machine's lower bound
  N^2 D / (float32 matmul FLOP/s measured here): a symmetric product needs N^2 D multiply-adds;
- PERMANOVA vs scikit-bio (default engine, and engine="numba" when that version has it),
  permutation generation included, same observed pseudo-F;
- hypothesis-training-testing rows from benchmarks/bench_core_htt.py when present.

Usage: python benchmarks/bench_core.py [--quick] [--sections distances permanova htt].
Timings on a shared machine are noisy: compare the ratios within one run; the load average is
printed at the start and the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist

from distsim.stats import pairwise_distances, permanova, upper_tiles

Row = tuple[str, ...]
SECTIONS = ("distances", "permanova", "htt")
HEADER: Row = ("case", "distsim s", "peer", "peer s", "peer/distsim", "note")


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, float, Any]:
    """Best wall time and best process CPU time (all threads) of `repeat` calls, last result.

    CPU time is less sensitive to other processes on a shared machine than wall time.
    """
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each function, run in turns so they share the machine's load."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu, _ = _timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def _max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    off = ~np.eye(len(ref), dtype=bool) if got.shape[0] == got.shape[1] else np.ones_like(ref, bool)
    return float((np.abs(got[off] - ref[off]) / ref[off]).max())


def bench_distances(n: int, d: int, rounds: int) -> list[Row]:
    """distsim vs cdist; and, in turns under the same load, vs the machine's float32 matmul rate
    (the bound N^2 D / FLOP/s) and vs the GEMMs of its own tiles (its overhead beyond BLAS)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    a = rng.standard_normal((2048, 4096), dtype=np.float32)
    b = rng.standard_normal((4096, 2048), dtype=np.float32)
    tiles = upper_tiles(n)

    def gemm_only() -> None:
        for i0, i1, j0, j1 in tiles:
            X[i0:i1] @ X[j0:j1].T

    pairwise_distances(X[:256])  # warm up
    a @ b
    best = _interleaved(
        {"matmul": lambda: a @ b, "ours": lambda: pairwise_distances(X), "tiles": gemm_only},
        rounds,
    )
    ours_s, ours_cpu = best["ours"]
    flops = 2.0 * 2048 * 2048 * 4096
    bound_s, bound_cpu = (n * n * d * t / flops for t in best["matmul"])
    gemm_s, gemm_cpu = best["tiles"]
    ours = pairwise_distances(X)
    scipy_s, scipy_cpu, ref = _timed(lambda: cdist(X, X))
    rows = [
        (
            f"distances euclidean N={n} D={d} float32",
            f"{ours_s:.3f}",
            "scipy cdist",
            f"{scipy_s:.2f}",
            f"{scipy_s / ours_s:.1f}x",
            f"CPU-time ratio {scipy_cpu / ours_cpu:.1f}x; max rel err {_max_rel(ours, ref):.1e}",
        ),
        (
            "  vs machine lower bound N^2*D/(f32 matmul FLOP/s)",
            f"{ours_s:.3f}",
            f"bound @ {flops / best['matmul'][0] / 1e9:.0f} GFLOP/s",
            f"{bound_s:.3f}",
            f"{bound_s / ours_s:.2f}x",
            f"distsim takes {ours_s / bound_s:.2f}x the bound "
            f"({ours_cpu / bound_cpu:.2f}x in CPU time)",
        ),
        (
            "  vs the GEMMs of its own upper-triangle tiles alone",
            f"{ours_s:.3f}",
            f"{len(tiles)} tile GEMMs",
            f"{gemm_s:.3f}",
            f"{gemm_s / ours_s:.2f}x",
            f"overhead beyond GEMM {ours_s / gemm_s:.2f}x ({ours_cpu / gemm_cpu:.2f}x in CPU time)",
        ),
    ]
    # near-duplicates: the plain float32 GEMM formula against distsim, same rows
    base = rng.standard_normal((200, d)).astype(np.float32) + 3.0
    step = rng.standard_normal((200, d)).astype(np.float32)
    step *= (
        1e-3 * np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(step, axis=1)[:, None]
    )
    Y = np.vstack([base, base + step]).astype(np.float32)
    ref = cdist(Y.astype(np.float64), Y.astype(np.float64))
    sq = np.einsum("ij,ij->i", Y, Y)
    naive = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * (Y @ Y.T), 0))
    ours = pairwise_distances(Y)
    rows.append(
        (
            f"near-duplicates (1e-3 of norm) N=400 D={d}: max rel err",
            f"{_max_rel(ours, ref):.1e}",
            "plain f32 GEMM formula",
            f"{_max_rel(naive.astype(np.float32), ref):.1e}",
            "",
            "errors, not seconds",
        )
    )
    return rows


def _numpy_gather_seconds(d2: np.ndarray, labels: np.ndarray, permutations: int) -> float:
    """Seconds of the same within-group gather in vectorized numpy (equal group sizes)."""
    rng = np.random.default_rng(0)
    n = len(labels)
    a = len(np.unique(labels))
    start = time.perf_counter()
    for lo in range(0, permutations, 25):
        b = min(25, permutations - lo)
        order = rng.permuted(np.broadcast_to(np.arange(n), (b, n)), axis=1).reshape(b, a, -1)
        d2[order[..., :, None], order[..., None, :]].sum(axis=(2, 3))
    return time.perf_counter() - start


def bench_permanova(n: int, groups: int, permutations: int) -> list[Row]:
    import skbio
    from skbio.stats.distance import permanova as skbio_permanova

    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, 20))
    D = cdist(X, X)
    labels = rng.permutation(np.repeat(np.arange(groups), n // groups))
    dm = skbio.DistanceMatrix(D)
    warm = np.repeat([0, 1], 10)
    permanova(D[:20, :20], warm, permutations=10)  # numba JIT / cache load
    ours_s, ours_cpu, ours = _timed(lambda: permanova(D, labels, permutations=permutations, seed=0))
    name = f"permanova N={n} {groups} groups B={permutations}"
    rows: list[Row] = []
    sk_s, sk_cpu, sk = _timed(lambda: skbio_permanova(dm, labels, permutations=permutations))
    rel = abs(ours.statistic / sk["test statistic"] - 1)
    rows.append(
        (
            name,
            f"{ours_s:.2f}",
            f"scikit-bio {skbio.__version__} default",
            f"{sk_s:.2f}",
            f"{sk_s / ours_s:.1f}x",
            f"CPU-time ratio {sk_cpu / ours_cpu:.1f}x; F rel diff {rel:.1e}; "
            f"p {ours.p_value:.4f} vs {sk['p-value']:.4f}",
        )
    )
    if "engine" in inspect.signature(skbio_permanova).parameters:
        skbio_permanova(skbio.DistanceMatrix(D[:20, :20]), warm, permutations=10, engine="numba")
        nb_s, nb_cpu, nb = _timed(
            lambda: skbio_permanova(dm, labels, permutations=permutations, engine="numba")
        )
        rel = abs(ours.statistic / nb["test statistic"] - 1)
        rows.append(
            (
                name,
                f"{ours_s:.2f}",
                'scikit-bio engine="numba"',
                f"{nb_s:.2f}",
                f"{nb_s / ours_s:.1f}x",
                f"CPU-time ratio {nb_cpu / ours_cpu:.1f}x; F rel diff {rel:.1e}",
            )
        )
    sample = min(permutations, 500)
    np_s = _numpy_gather_seconds(D * D, labels, sample) * permutations / sample
    rows.append(
        (
            name,
            f"{ours_s:.2f}",
            "same gather in numpy",
            f"{np_s:.2f}",
            f"{np_s / ours_s:.1f}x",
            f"numpy time scaled from {sample} permutations",
        )
    )
    gen_s, _, _ = _timed(
        lambda: np.random.default_rng(0).permuted(np.tile(labels, (permutations, 1)), axis=1)
    )
    rows.append(
        (
            "  Generator.permuted on tiled labels, generation only",
            "",
            f"{permutations} x {n}",
            f"{gen_s:.2f}",
            "",
            "distsim draws uniforms + numba Fisher-Yates instead",
        )
    )
    return rows


def htt_rows(quick: bool) -> list[Row]:
    path = Path(__file__).with_name("bench_core_htt.py")
    if not path.exists():
        return [("htt", "", "", "", "", "benchmarks/bench_core_htt.py not present")]
    spec = importlib.util.spec_from_file_location("bench_core_htt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_htt_bench(quick)


def print_table(rows: list[Row], flush: bool = False) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), flush=flush)


def main(quick: bool, sections: list[str]) -> None:
    load = os.getloadavg()
    print(
        f"cores {os.cpu_count()}, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    n, d = (1500, 1024) if quick else (5000, 4096)
    pn, groups, perms = (500, 10, 999) if quick else (2000, 20, 9999)
    if "distances" in sections:
        print_table([HEADER, *bench_distances(n, d, rounds=5 if quick else 3)], flush=True)
        print()
    if "permanova" in sections:
        print_table([HEADER, *bench_permanova(pn, groups, perms)], flush=True)
        print()
    if "htt" in sections:
        print_table(htt_rows(quick))
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which comparisons to run (default: all)",
    )
    args = parser.parse_args()
    main(args.quick, args.sections)
