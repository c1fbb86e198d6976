"""Does the input-side sketch keep the task signal? Digits pair-tasks, chain-gram at every layer.

10 digit pair-tasks x 20 seeds (distsim.zoo.train.train_pack, default TrainConfig, distinct inits),
chain-gram features of each layer of an MLP (and optionally a CNN): the full feature, the output
projection to dim = m(m+1)/2 (sketch="output"), and the input sketch S^T G S of width m
(sketch="input", dim = m(m+1)/2) for several sketch seeds. Score: nearest-centroid accuracy
(as benchmarks/paper_digits.nearest_centroid: first half of each task's seeds as centroids,
z-scored Euclidean; chance 1/tasks), plus the CPU seconds to featurize the whole zoo.
``--upsample K`` blows each 8x8 digit up to 8K x 8K (pixel blocks) so that the Gram side P+1 is
large next to m, as for CIFAR (3073 vs m = 90).

    .venv/bin/python benchmarks/input_sketch_digits.py --cache /tmp/distsim_zoo
    .venv/bin/python benchmarks/input_sketch_digits.py --cache /tmp/distsim_zoo --upsample 3 \
        --widths 16,24,48
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_digits import train_zoo  # noqa: E402

from distsim.config.data import DataConfig  # noqa: E402
from distsim.config.training import TrainConfig  # noqa: E402
from distsim.weights.features import feature_layers, weight_features_batch  # noqa: E402
from distsim.zoo.tasks import digits, make_tasks  # noqa: E402


def nearest_centroid(x: np.ndarray, labels: np.ndarray, seeds_per_task: int) -> float:
    """paper_digits.nearest_centroid with distances by |a|^2 + |b|^2 - 2ab (no (N, C, D) tensor)."""
    position = np.arange(len(labels)) % seeds_per_task
    train = position < seeds_per_task // 2
    x = x.astype(np.float64)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
    z = (x - mu) / sd
    classes = np.unique(labels)
    centroids = np.stack([z[train & (labels == c)].mean(0) for c in classes])
    q = z[~train]
    d = (q**2).sum(1)[:, None] + (centroids**2).sum(1)[None] - 2 * q @ centroids.T
    return float((classes[d.argmin(1)] == labels[~train]).mean())


def upsampled_digits(k: int, folder: Path) -> DataConfig:
    """DataConfig of the digits pair-tasks with every image blown up k times (an .npz in folder)."""
    x, y = digits()
    path = folder / f"digits_x{k}.npz"
    np.savez(path, X=np.kron(x, np.ones((1, 1, k, k), dtype=np.float32)), y=y)
    return DataConfig(dataset="npz", path=str(path), num_tasks=10, seed=0)


def timed(states: list, arch, **kw) -> tuple[np.ndarray, float]:
    """(chain-gram features of the zoo, CPU seconds to compute them)."""
    t = time.process_time()
    x = weight_features_batch(states, arch, "chain-gram", **kw)
    return x, time.process_time() - t


def row(
    layer: str, name: str, runs: list[tuple[np.ndarray, float]], labels: np.ndarray, seeds: int
) -> None:
    nc = [nearest_centroid(x, labels, seeds) for x, _ in runs]
    cpu = float(np.mean([t for _, t in runs]))
    print(f"| {layer:6} | {name:28} | {runs[0][0].shape[1]:6d} | {np.mean(nc):7.3f} "
          f"| {min(nc):6.3f} | {max(nc):6.3f} | {cpu:6.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="mlp")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--widths", default="8,16,20,24", help="sketch widths m")
    parser.add_argument(
        "--sketch-seeds", type=int, default=5, help="sketch seeds per width (mean, min, max)"
    )
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep trained zoos in")
    parser.add_argument(
        "--upsample", type=int, default=1, help="blow the 8x8 digits up this many times"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.upsample > 1:
        data = upsampled_digits(args.upsample, Path(tempfile.mkdtemp()))
        data = DataConfig(dataset="npz", path=data.path, num_tasks=args.tasks, seed=0)
        args.cache = args.cache / f"x{args.upsample}" if args.cache else None
    else:
        data = DataConfig(dataset="digits", num_tasks=args.tasks, seed=0)
    tasks = make_tasks(data)
    widths = [int(w) for w in args.widths.split(",")]
    print(f"digits: {args.tasks} pair-tasks x {args.seeds} seeds; NC chance {1 / args.tasks:.2f}; "
          f"sketch seeds 0..{args.sketch_seeds - 1} (mean [min, max])")
    for kind in args.archs.split(","):
        arch, states, labels, accs = train_zoo(
            kind, tasks, args.seeds, "distinct", TrainConfig(), args.cache
        )
        print(f"\n## {kind} {arch.input_shape}: {len(states)} models, "
              f"test accuracy mean {accs.mean():.3f}")
        header = (
            f"| {'layer':6} | {'feature':28} | {'D':>6} | {'NC mean':>7} | {'NC min':>6} "
            f"| {'NC max':>6} | {'CPU s':>6} |"
        )
        print(header)
        print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")

        for layer in feature_layers(arch):
            row(layer, "full", [timed(states, arch, layer=layer)], labels, args.seeds)
            for m in widths:
                dim = m * (m + 1) // 2
                seeds = range(args.sketch_seeds)
                runs = [timed(states, arch, layer=layer, dim=dim, seed=s) for s in seeds]
                row(layer, f"output projection dim={dim}", runs, labels, args.seeds)
                runs = [
                    timed(states, arch, layer=layer, dim=dim, seed=s, sketch="input")
                    for s in seeds
                ]
                row(layer, f"input sketch m={m} (dim={dim})", runs, labels, args.seeds)


if __name__ == "__main__":
    main()
