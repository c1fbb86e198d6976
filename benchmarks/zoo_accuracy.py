"""Are the zoo's solutions good? Test accuracy of MLP, CNN and RNN on 10 digits pair-tasks.

Trains ``--seeds`` seeds per task (one pack per task) with the DEFAULT_TRAIN settings of each
architecture and prints mean / min test accuracy and the training time. Target: >= 95% mean.

    python benchmarks/zoo_accuracy.py [--tasks 10] [--seeds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.config.training import DEFAULT_TRAIN
from distsim.zoo.tasks import make_tasks
from distsim.zoo.train import train_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = make_tasks(DataConfig(dataset="digits", num_tasks=args.tasks, seed=0))
    print(f"{len(tasks)} tasks: {', '.join(t.name for t in tasks)}; {args.seeds} seeds each; "
          f"threads {torch.get_num_threads()}")
    print()
    print("| arch | epochs | lr   | mean test acc | min test acc | worst task    "
          "| diverged | train s |")
    print("|------|--------|------|---------------|--------------|---------------|----------|---------|")
    for kind in ("mlp", "cnn", "rnn"):
        cfg = DEFAULT_TRAIN[kind]
        start = time.perf_counter()
        acc, per_task, diverged = [], {}, 0
        for task in tasks:
            results = train_pack(task, ArchConfig(kind=kind), list(range(args.seeds)), cfg)
            acc += [r.test_acc for r in results]
            per_task[task.name] = np.mean([r.test_acc for r in results])
            diverged += sum(r.status != "ok" for r in results)
        seconds = time.perf_counter() - start
        worst = min(per_task, key=per_task.get)
        print(f"| {kind:4} | {cfg.epochs:6} | {cfg.lr:<4} | {100 * np.mean(acc):12.2f}% | "
              f"{100 * np.min(acc):11.2f}% | {worst:13} | {diverged:8} | {seconds:7.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
