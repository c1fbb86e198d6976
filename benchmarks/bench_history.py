"""The cost of the per-epoch history: zoo-stage training with and without it, side by side.

Trains quickstart-like packs (jobs/quickstart.toml: digits pair-tasks, its MLP, CNN and GRU,
12 seeds per pack, its train settings with ``--epochs`` epochs for every arch) with
``train_pack(..., record_history=True)``, what the zoo stage runs, and ``record_history=False``.
The two alternate pack by pack, in an order that flips every repetition, so that a change of
machine load hits both alike; the load average is printed before and after. Each side is
timed in wall seconds and in this process's CPU seconds (``time.process_time``: less sensitive to
other processes taking the cores than wall time). Also times what the zoo adds per pack besides
training: building and writing the history shard.

    python benchmarks/bench_history.py [--reps 7] [--tasks 2] [--epochs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distsim.config import load_study
from distsim.pipeline.zoo import history_rows
from distsim.store import Store
from distsim.tasks import make_tasks
from distsim.train import train_pack

QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min), " \
           f"{os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks per arch (default 2)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as cpus_per_trial = 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study = load_study(QUICKSTART)
    tasks = make_tasks(study.data)
    packs = [p for p in study.packs() if p.task < args.tasks]
    configs = {a: dataclasses.replace(study.train_config(a), epochs=args.epochs)
               for a in study.arch_names}
    print(f"{len(packs)} packs ({', '.join(study.arch_names)} x {args.tasks} tasks, "
          f"{len(packs[0].seeds)} seeds, {args.epochs} epochs), {args.reps} repetitions; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("before:", load(), flush=True)

    def run(pack, record: bool) -> tuple[float, float, list]:
        """Wall and CPU seconds of training `pack`, and its results."""
        task = tasks[pack.task]
        arch = study.arch(pack.arch).with_task_shape(task.input_shape, task.num_classes)
        wall, cpu = time.perf_counter(), time.process_time()
        results = train_pack(task, arch, list(pack.seeds), configs[pack.arch],
                             init_seeds=list(study.init_seeds(pack)), record_history=record)
        return time.perf_counter() - wall, time.process_time() - cpu, results

    for pack in packs[:: args.tasks]:  # warm-up: one pack per arch, both ways
        run(pack, True), run(pack, False)
    # seconds[clock, arch, record]: (reps,) totals over the arch's packs
    seconds = {(c, a, r): np.zeros(args.reps) for c in ("wall", "cpu")
               for a in study.arch_names for r in (True, False)}
    for rep in range(args.reps):
        for i, pack in enumerate(packs):
            for record in ((True, False) if (rep + i) % 2 == 0 else (False, True)):
                wall, cpu, _ = run(pack, record)
                seconds["wall", pack.arch, record][rep] += wall
                seconds["cpu", pack.arch, record][rep] += cpu
    print("after: ", load())

    print("\n| clock | arch | with history (s) | without (s) | ratio "
          "| per rep: median (min..max) |")
    print("|---|---|---|---|---|---|")
    for clock in ("wall", "cpu"):
        for a in (*study.arch_names, "all"):
            archs = study.arch_names if a == "all" else (a,)
            on = np.sum([seconds[clock, x, True] for x in archs], axis=0)  # (reps,)
            off = np.sum([seconds[clock, x, False] for x in archs], axis=0)
            per_rep = on / off
            print(f"| {clock} | {a} | {on.sum():.2f} | {off.sum():.2f} "
                  f"| {on.sum() / off.sum():.3f} | {np.median(per_rep):.3f} "
                  f"({per_rep.min():.3f}..{per_rep.max():.3f}) |")

    _, _, results = run(packs[0], True)
    with tempfile.TemporaryDirectory() as folder:
        store, times = Store(folder), []
        for _ in range(20):
            start = time.perf_counter()
            store.write_shard("history", packs[0].key, history_rows(packs[0], results))
            times.append(time.perf_counter() - start)
    print(f"\nbuilding + writing one history shard ({len(packs[0].seeds) * args.epochs} rows): "
          f"median {1e3 * float(np.median(times)):.2f} ms over 20 writes")


if __name__ == "__main__":
    main()
