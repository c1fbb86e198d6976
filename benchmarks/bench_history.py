"""The cost of the per-epoch history: zoo-stage training with and without it, side by side.

Trains quickstart-like packs (jobs/quickstart.toml: digits pair-tasks, its MLP, CNN and GRU,
12 seeds per pack, its train settings with ``--epochs`` epochs for every arch) three ways:
``off`` (``train_pack(..., record_history=False)``), ``history`` (what the zoo stage runs by
default: the train columns every epoch, the test columns of the last) and ``history+test``
(``[train] test_history = true``: the test split evaluated after every epoch). The three
alternate pack by pack, in an order that rotates every repetition, so that a change of machine
load hits all alike; the load average is printed before and after. Each side is
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
from distsim.zoo.tasks import make_tasks
from distsim.zoo.train import train_pack

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

    modes = ("off", "history", "history+test")

    def run(pack, mode: str) -> tuple[float, float, list]:
        """Wall and CPU seconds of training `pack` one way, and its results."""
        task = tasks[pack.task]
        arch = study.arch(pack.arch).with_task_shape(task.input_shape, task.num_classes)
        cfg = dataclasses.replace(configs[pack.arch], test_history=mode == "history+test")
        wall, cpu = time.perf_counter(), time.process_time()
        results = train_pack(task, arch, list(pack.seeds), cfg,
                             init_seeds=list(study.init_seeds(pack)), record_history=mode != "off")
        return time.perf_counter() - wall, time.process_time() - cpu, results

    for pack in packs[:: args.tasks]:  # warm-up: one pack per arch, every way
        for mode in modes:
            run(pack, mode)
    # seconds[clock, arch, mode]: (reps,) totals over the arch's packs
    seconds = {(c, a, m): np.zeros(args.reps) for c in ("wall", "cpu")
               for a in study.arch_names for m in modes}
    for rep in range(args.reps):
        for i, pack in enumerate(packs):
            shift = (rep + i) % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                wall, cpu, _ = run(pack, mode)
                seconds["wall", pack.arch, mode][rep] += wall
                seconds["cpu", pack.arch, mode][rep] += cpu
    print("after: ", load())

    print("\n| clock | arch | off (s) | history (s) | ratio, median per rep (min..max) "
          "| history+test (s) | ratio, median per rep (min..max) |")
    print("|---|---|---|---|---|---|---|")
    for clock in ("wall", "cpu"):
        for a in (*study.arch_names, "all"):
            archs = study.arch_names if a == "all" else (a,)
            total = {m: np.sum([seconds[clock, x, m] for x in archs], axis=0) for m in modes}
            cells = []
            for m in modes[1:]:
                per_rep = total[m] / total["off"]
                cells.append(f"{total[m].sum():.2f} | {total[m].sum() / total['off'].sum():.3f}, "
                             f"{np.median(per_rep):.3f} ({per_rep.min():.3f}..{per_rep.max():.3f})")
            print(f"| {clock} | {a} | {total['off'].sum():.2f} | {' | '.join(cells)} |")

    _, _, results = run(packs[0], "history")
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
