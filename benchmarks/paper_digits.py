"""The paper's finding at digits scale (arXiv 2208.04369): solutions of one task cluster.

10 digit pair-tasks x 20 seeds for each of MLP, CNN and RNN (distsim.zoo.train.train_pack with its
default TrainConfig), features at every layer with ``chain-gram`` and ``raw``, then:

- NC: nearest-centroid accuracy (first half of each task's seeds as centroids, second half
  classified, Euclidean on z-scored features): a quick learning-free check of each layer;
- closed-set HTT (accuracy, chance 1/tasks) and open-set HTT (mAP, CMC@1) with the LDA learner;
- PERMANOVA pseudo-F on the Euclidean distance matrix of the features.

Expected: chain-gram far above chance with p at its floor 1/(1+B), raw much weaker.

Seeding: ``distinct`` (default) gives every solution its own init, seed = task_index * seeds +
i; ``shared`` uses seeds 0..S-1 for every task, so solution i of every task starts from the same
init. With shared inits, raw weights of one seed stay closer across tasks than within a task,
and a per-task random train/test split puts a held-out model's same-init siblings into the
*other* tasks' training sets: raw closed-set accuracy then falls below chance (measured: 0.000).

    .venv/bin/python benchmarks/paper_digits.py            # full run
    .venv/bin/python benchmarks/paper_digits.py --quick    # 6 tasks x 10 seeds, fewer permutations
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import TrainConfig
from distsim.stats import htt, pairwise_distances, permanova
from distsim.weights.features import METHODS, feature_layers, weight_features_batch
from distsim.zoo.tasks import make_tasks
from distsim.zoo.train import train_pack


def train_zoo(
    kind: str, tasks, n_seeds: int, seeding: str, train_config: TrainConfig, cache: Path | None
):
    """(arch config sized for the tasks, list of state dicts, (N,) task ids, (N,) test accs)."""
    path = cache / f"paper_digits_{kind}_{len(tasks)}x{n_seeds}_{seeding}.pt" if cache else None
    if path is not None and path.exists():
        states, labels, accs = torch.load(path)
        arch = ArchConfig(kind=kind).with_task_shape(tasks[0].input_shape, tasks[0].num_classes)
        return arch, states, np.array(labels), np.array(accs)
    states, labels, accs = [], [], []
    for i, task in enumerate(tasks):
        offset = i * n_seeds if seeding == "distinct" else 0
        seeds = list(range(offset, offset + n_seeds))
        for result in train_pack(task, ArchConfig(kind=kind), seeds, train_config):
            states.append(result.state_dict)
            labels.append(task.task_id)
            accs.append(result.test_acc)
    arch = ArchConfig(kind=kind).with_task_shape(tasks[0].input_shape, tasks[0].num_classes)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((states, labels, accs), path)
    return arch, states, np.array(labels), np.array(accs)


def nearest_centroid(x: np.ndarray, labels: np.ndarray, seeds_per_task: int) -> float:
    """Held-out accuracy of the nearest task centroid (first half of each task's seeds train)."""
    position = np.arange(len(labels)) % seeds_per_task
    train = position < seeds_per_task // 2
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
    z = (x - mu) / sd
    classes = np.unique(labels)
    centroids = np.stack([z[train & (labels == c)].mean(0) for c in classes])
    d = ((z[~train, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == labels[~train]).mean())


def evaluate(
    x: np.ndarray, labels: np.ndarray, seeds_per_task: int, b_htt: int, b_perm: int
) -> dict:
    closed = htt(x, labels, "closed-set", permutations=b_htt, seed=0)
    opened = htt(x, labels, "open-set", permutations=b_htt, seed=0)
    dist = pairwise_distances(x).astype(np.float64)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    perm = permanova(dist, labels, permutations=b_perm, seed=0)
    return {
        "nc": nearest_centroid(x, labels, seeds_per_task),
        "closed": closed,
        "open": opened,
        "perm": perm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="6 tasks x 10 seeds, 99 permutations")
    parser.add_argument("--archs", default="mlp,cnn,rnn")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--htt-permutations", type=int, default=None)
    parser.add_argument("--permanova-permutations", type=int, default=None)
    parser.add_argument("--seeding", choices=("distinct", "shared"), default="distinct")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep trained zoos in")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_tasks = args.tasks or (6 if args.quick else 10)
    n_seeds = args.seeds or (10 if args.quick else 20)
    b_htt = args.htt_permutations or (99 if args.quick else 199)
    b_perm = args.permanova_permutations or (99 if args.quick else 999)
    tasks = make_tasks(DataConfig(dataset="digits", num_tasks=n_tasks, seed=0))
    train_config = TrainConfig()
    print(f"digits: {n_tasks} pair-tasks ({', '.join(t.name for t in tasks)}) x {n_seeds} seeds "
          f"({args.seeding} inits); {train_config}")
    print(f"HTT: learner lda, B={b_htt} (p floor {1 / (1 + b_htt):.4f}); "
          f"PERMANOVA: B={b_perm} (p floor {1 / (1 + b_perm):.4f})")
    start = time.perf_counter()
    for kind in args.archs.split(","):
        t0 = time.perf_counter()
        arch, states, labels, accs = train_zoo(
            kind, tasks, n_seeds, args.seeding, train_config, args.cache
        )
        t_train = time.perf_counter() - t0
        print(f"\n## {kind}: {len(states)} models, test accuracy mean {accs.mean():.3f} "
              f"(min {accs.min():.3f}), trained in {t_train:.1f} s")
        header = (
            f"| {'layer':8} | {'method':10} | {'D':>5} | {'NC':>5} | {'closed acc':>10} "
            f"| {'chance':>6} | {'p':>6} | {'open mAP':>8} | {'CMC@1':>5} | {'chance':>6} "
            f"| {'p':>6} | {'PERMANOVA F':>11} | {'p':>6} |"
        )
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for layer in feature_layers(arch):
            for method in METHODS:
                x = weight_features_batch(states, arch, method, layer)
                r = evaluate(x, labels, n_seeds, b_htt, b_perm)
                c, o, p = r["closed"], r["open"], r["perm"]
                cmc1 = o.extra.get("cmc@1", float("nan"))
                print(
                    f"| {layer:8} | {method:10} | {x.shape[1]:5d} | {r['nc']:5.2f} "
                    f"| {c.statistic:10.3f} | {c.chance:6.3f} | {c.p_value:6.4f} "
                    f"| {o.statistic:8.3f} | {cmc1:5.2f} | {o.chance:6.3f} "
                    f"| {o.p_value:6.4f} | {p.statistic:11.2f} | {p.p_value:6.4f} |",
                    flush=True,
                )
        print(f"({kind}: {time.perf_counter() - t0:.1f} s including training)")
    print(f"\nwall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
