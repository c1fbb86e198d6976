"""The sketch table: CountSketch output projection vs the dense Gaussian and the input sketch.

For each feature (method x layer) of trained zoos, the Pearson correlation between the pairwise
Euclidean distances of the sketched features and those of the full features, at equal dim, and
the seconds per model the sketch costs:

- ``gaussian``: the legacy dense projection R (D x dim, N(0, 1/dim)), generated per call as a
  feature actor does (caches cleared; at CIFAR sizes R never fits the cache anyway);
- ``input``: the Gaussian input sketch S^T G S (chain-gram only, m = sketch_width(dim)); its
  seconds are the whole feature's (it replaces the chain map and the Gram);
- ``countsketch``: the new default, hashes generated per call too (first call per process).

``full s`` is the unsketched feature's cost per model (the output sketches come on top of it).
Sections: (1) digits 8x8 (P+1 = 65), MLP and CNN, 10 tasks x 20 seeds, sketch seeds 0..4; (2)
CIFAR input size (P+1 = 3073): digits upsampled to 3 x 32 x 32 (x4 pixel blocks, per-channel
gains and a fixed noise), MLP 10 x 3 and CNN 10 x 2 models (default ArchConfig widths; CNN 5
epochs; CNN layers conv2 and out only, as conv1's full Gram costs minutes for the zoo and
section 3 times it), sketch seeds 0..2; the Gaussian with every seed where D x dim <= 1.5e8
random numbers, with seed 0 alone on the hidden Grams at dim 105 (5e8), else not run (hours);
(3) cost
at the sizes of jobs/cifar100-gpu.toml (mlp [512, 256], cnn [32, 64, 128] + [256]; random init,
as the cost does not depend on the values): 25 raw vectors of D = 1.6M, the triangle of a 3073
x 3073 Gram (D = 4.7M), and the whole chain-gram feature at dim 4096. There the Gaussian is
timed on its first 16384 rows of R and extrapolated linearly in D (it is a stream of
independent row blocks: generation and GEMM both scale with D), as marked. One thread
throughout; the machine's load average (2 CPUs, shared) is printed beside each timing. (4) The
Gaussian and the CountSketch over 40 sketch seeds on a few features (mean r and its standard
error), to tell a real gap from the seed-to-seed spread of the few seeds above.

    .venv/bin/python benchmarks/bench_sketch.py --cache /tmp/distsim_sketch_zoo
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_digits import train_zoo  # noqa: E402

import distsim.weights.projection as projection_module  # noqa: E402
from distsim.config.arch import ArchConfig  # noqa: E402
from distsim.config.data import DataConfig  # noqa: E402
from distsim.config.training import TrainConfig  # noqa: E402
from distsim.weights.features import feature_layers, weight_features_batch  # noqa: E402
from distsim.weights.projection import count_sketch, gaussian_project  # noqa: E402
from distsim.zoo.models import build  # noqa: E402
from distsim.zoo.tasks import digits, make_tasks  # noqa: E402

PACK = 25  # models per pack in jobs/cifar100-gpu.toml
GAUSS_NUMBERS = 1.5e8  # run the Gaussian with every seed up to this many random numbers (D x dim)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def cold() -> None:
    """Forget every cached random map, so a timing includes generating it."""
    projection_module._cached_projection.cache_clear()
    projection_module._cached_hashes.cache_clear()
    projection_module._cached_sketch.cache_clear()


def timed(f: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    cold()
    t = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t


def pdist(x: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """Condensed Euclidean distances of the rows of x, float64 on centred column blocks."""
    n = x.shape[0]
    g = np.zeros((n, n))
    for start in range(0, x.shape[1], block):
        b = x[:, start : start + block].astype(np.float64)
        b -= b.mean(0)
        g += b @ b.T
    d = np.diag(g)
    i, j = np.triu_indices(n, 1)
    return np.sqrt(np.maximum(d[i] + d[j] - 2 * g[i, j], 0.0))


def corr(d_full: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(d_full, pdist(y))[0, 1])


HEADER = (
    f"| {'arch':4} | {'feature':14} | {'D':>8} | {'dim':>5} | {'gaussian r':>10} "
    f"| {'input r':>10} | {'countsk. r':>10} | {'full s':>8} | {'gauss. s':>9} "
    f"| {'input s':>8} | {'countsk. s':>10} | {'load':>5} |"
)


def fmt_r(rs: list[float]) -> str:
    if not rs:
        return "—"
    return f"{np.mean(rs):.3f}" if len(rs) == 1 else f"{np.mean(rs):.3f}/{min(rs):.2f}"


def fmt_s(s: float | None, mark: str = "") -> str:
    return "—" if s is None else f"{s:.2g}{mark}"


def table(title: str) -> None:
    print(f"\n## {title}", flush=True)
    print("r: mean/min over sketch seeds (one value: one seed); s: seconds per model")
    print(HEADER)
    print("|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|", flush=True)


def zoo_rows(
    kind: str,
    arch: ArchConfig,
    states: list,
    dims: tuple[int, ...],
    seeds: range,
    layers: tuple[str, ...] | None = None,
    gauss_once: tuple[str, ...] = (),
) -> None:
    """One table row per (method, layer, dim < D) of a trained zoo. The Gaussian runs with every
    sketch seed where D x dim <= GAUSS_NUMBERS, with seed 0 only on the chain-gram layers in
    ``gauss_once`` (up to 6e8 random numbers), else not at all."""
    n = len(states)
    for layer in layers or feature_layers(arch):
        for method in ("chain-gram", "raw"):
            x, t_full = timed(weight_features_batch, states, arch, method, layer)
            d_full = pdist(x)
            for dim in dims:
                if dim >= x.shape[1]:
                    continue
                numbers = x.shape[1] * dim
                once = method == "chain-gram" and layer in gauss_once and numbers <= 6e8
                g, i, c = [], [], []
                tg = ti = tc = None
                for s in seeds if numbers <= GAUSS_NUMBERS else range(1) if once else ():
                    y, tg = timed(gaussian_project, x, dim, s)
                    g.append(corr(d_full, y))
                if method == "chain-gram":
                    for s in seeds:
                        y, ti = timed(weight_features_batch, states, arch, method, layer,
                                      dim=dim, seed=s, sketch="input")
                        i.append(corr(d_full, y))
                for s in seeds:
                    y, tc = timed(count_sketch, x, dim, s)
                    c.append(corr(d_full, y))
                print(f"| {kind:4} | {method[:5] + ' ' + layer:14} | {x.shape[1]:8d} | {dim:5d} "
                      f"| {fmt_r(g):>10} | {fmt_r(i):>10} | {fmt_r(c):>10} "
                      f"| {t_full / n:8.2g} | {fmt_s(tg and tg / n):>9} "
                      f"| {fmt_s(ti and ti / n):>8} | {fmt_s(tc and tc / n):>10} | {load():>5} |",
                      flush=True)


def cifar_like_digits(folder: Path, num_tasks: int) -> DataConfig:
    """Digits at CIFAR's input size: 3 x 32 x 32 (x4 pixel blocks, channel gains 1, 0.8, 0.6,
    plus a fixed N(0, 0.05) noise so that the channels are not collinear)."""
    x, y = digits()
    big = np.kron(x, np.ones((1, 1, 4, 4), dtype=np.float32))
    rgb = big * np.array([1.0, 0.8, 0.6], dtype=np.float32)[None, :, None, None]
    rgb += 0.05 * np.random.default_rng(0).standard_normal(rgb.shape).astype(np.float32)
    path = folder / "digits_rgb32.npz"
    np.savez(path, X=rgb, y=y)
    return DataConfig(dataset="npz", path=str(path), num_tasks=num_tasks, seed=0)


def gaussian_extrapolated(x: np.ndarray, dim: int, rows: int) -> float:
    """Seconds of gaussian_project on all of x's columns, from its first ``rows`` (whole
    generation blocks) scaled by D / rows."""
    _, t = timed(gaussian_project, x[:, :rows], dim, 0)
    return t * x.shape[1] / rows


def cost_rows(dim: int) -> None:
    """Seconds per model at the sizes of jobs/cifar100-gpu.toml."""
    rng = np.random.default_rng(0)
    print(f"\n## cost at jobs/cifar100-gpu.toml sizes, dim {dim}: seconds per model in a call "
          "on K models (the Gaussian's generation is paid per call; * = extrapolated from its "
          "first 16384 rows); whole feature: chain map + Gram (+ sketch), or M S for input")
    head = (f"| {'what':52} | {'D':>8} | {'K':>3} | {'gaussian':>9} | {'input':>7} "
            f"| {'countsk.':>8} | {'full':>7} | {'load':>5} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", flush=True)

    def row(what: str, d: int, k: int, tg: float | None, ti: float | None, tc: float | None,
            tf: float | None, mark: str = "*") -> None:
        print(f"| {what:52} | {d:8d} | {k:3d} | {fmt_s(tg, mark):>9} | {fmt_s(ti):>7} "
              f"| {fmt_s(tc):>8} | {fmt_s(tf):>7} | {load():>5} |", flush=True)

    for what, d, k in (("raw mlp fc1 [512]: 3072 x 512 + 512", 3072 * 512 + 512, PACK),
                       ("Gram triangle 3073 x 3073", 3073 * 3074 // 2, PACK)):
        x = rng.standard_normal((k, d), dtype=np.float32)
        tg = gaussian_extrapolated(x, dim, 16384)
        _, tc = timed(count_sketch, x, dim, 0)
        t = time.perf_counter()
        count_sketch(x, dim, 0)  # hashes cached: the cost of a later pack in the same actor
        tc_warm = time.perf_counter() - t
        row(what, d, k, tg / k, None, tc / k, None)
        row(what + " (hashes cached)", d, k, None, None, tc_warm / k, None)
        del x

    mlp = ArchConfig(kind="mlp", widths=(512, 256)).with_task_shape((3, 32, 32), 2)
    cnn = ArchConfig(kind="cnn", channels=(32, 64, 128), head_widths=(256,)).with_task_shape(
        (3, 32, 32), 2)
    for cfg, layer, k, full in ((mlp, "fc1", 2, True), (mlp, "fc2", 2, False),
                                (cnn, "conv1", 1, False), (cnn, "conv2", 1, False),
                                (cnn, "conv3", 1, False), (cnn, "fc1", 2, True)):
        states = []
        for s in range(k):
            torch.manual_seed(s)
            states.append(build(cfg).state_dict())
        tf = timed(weight_features_batch, states, cfg, "chain-gram", layer)[1] if full else None
        _, tc = timed(weight_features_batch, states, cfg, "chain-gram", layer, dim=dim)
        _, ti = timed(weight_features_batch, states, cfg, "chain-gram", layer, dim=dim,
                      sketch="input")
        row(f"chain-gram {cfg.kind} {layer}: whole feature", 3073 * 3074 // 2, k, None, ti / k,
            tc / k, tf and tf / k)


def seed_rows(cache: Path | None, seeds: range) -> None:
    """Gaussian vs CountSketch r over many sketch seeds (mean +- standard error)."""
    print(f"\n## Gaussian vs CountSketch over {len(seeds)} sketch seeds: r mean +- s.e.")
    head = f"| {'features':28} | {'D':>5} | {'dim':>4} | {'gaussian r':>15} | {'countsk. r':>15} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", flush=True)
    tasks = make_tasks(DataConfig(dataset="digits", num_tasks=10, seed=0))
    cases = []
    for kind, method, layer in (("mlp", "chain-gram", "fc1"), ("mlp", "raw", "fc1"),
                                ("cnn", "raw", "conv2"), ("cnn", "raw", "out")):
        arch, states, _, _ = train_zoo(kind, tasks, 20, "distinct", TrainConfig(), cache)
        x = weight_features_batch(states, arch, method, layer)
        cases.append((f"digits {kind} {method} {layer}", x))
    tasks = make_tasks(cifar_like_digits(Path(tempfile.mkdtemp()), 10))
    arch, states, _, _ = train_zoo("mlp", tasks, 3, "distinct", TrainConfig(epochs=20),
                                   cache / "rgb32" if cache else None)
    for method, layer in (("raw", "fc1"), ("chain-gram", "out")):
        x = weight_features_batch(states, arch, method, layer)
        cases.append((f"rgb32 mlp {method} {layer}", x))
    for name, x in cases:
        d = pdist(x)
        for dim in (105, 465):
            g = [corr(d, gaussian_project(x, dim, s)) for s in seeds]
            c = [corr(d, count_sketch(x, dim, s)) for s in seeds]
            se = np.sqrt(len(seeds))
            print(f"| {name:28} | {x.shape[1]:5d} | {dim:4d} "
                  f"| {np.mean(g):.4f} +- {np.std(g) / se:.4f} "
                  f"| {np.mean(c):.4f} +- {np.std(c) / se:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep trained zoos in")
    parser.add_argument("--parts", default="digits,cifar,cost,seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"bench_sketch: 1 thread, load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    parts = args.parts.split(",")
    count_sketch(np.ones((1, 2)), 1)  # numba compile (cached on disk) out of the timings
    if "digits" in parts:
        tasks = make_tasks(DataConfig(dataset="digits", num_tasks=10, seed=0))
        for kind in ("mlp", "cnn"):
            arch, states, _, accs = train_zoo(kind, tasks, 20, "distinct", TrainConfig(),
                                              args.cache)
            table(f"digits {kind} {arch.input_shape}: {len(states)} models (10 tasks x 20 "
                  f"seeds), test accuracy {accs.mean():.3f}")
            zoo_rows(kind, arch, states, (105, 465), range(5))
    if "cifar" in parts:
        tasks = make_tasks(cifar_like_digits(Path(tempfile.mkdtemp()), 10))
        cache = args.cache / "rgb32" if args.cache else None
        for kind, seeds, epochs, layers, once in (("mlp", 3, 20, None, ("fc1", "fc2")),
                                                  ("cnn", 2, 5, ("conv2", "out"), ("conv2",))):
            t = time.perf_counter()
            arch, states, _, accs = train_zoo(kind, tasks, seeds, "distinct",
                                              TrainConfig(epochs=epochs), cache)
            table(f"CIFAR input size, digits upsampled to {arch.input_shape}: {kind}, "
                  f"{len(states)} models (10 tasks x {seeds} seeds, {epochs} epochs, test "
                  f"accuracy {accs.mean():.3f}, zoo {time.perf_counter() - t:.0f} s)")
            zoo_rows(kind, arch, states, (105, 4096), range(3), layers, once)
    if "cost" in parts:
        cost_rows(4096)
    if "seeds" in parts:
        seed_rows(args.cache, range(40))
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
