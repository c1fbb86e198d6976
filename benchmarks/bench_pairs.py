"""Where the pairs stage's time goes, against the GEMM bound measured in the same run.

Three parts, one run, printed as tables:

* ``tile``: one off-diagonal tile (block x block rows of synthetic float32 features of width
  D) in-process, one thread: the float32 GEMM X_I X_J^T (the bound), ``distance_block``,
  ``tile_summary`` (the intra/inter sums), the top-k lists of the rows and of the columns by
  the NumPy route the pairs stage used before (int64 keys of the block, ``argpartition`` of it
  and of its transpose) and by ``tile_topk`` (one numba pass), and ``compute_tile`` whole.
* ``stage``: the paper's MLP study on digits (45 pair-tasks x 100 seeds = 4,500 models,
  chain-gram and raw at fc1, fc2, out: feature widths 2,145 / 4,160 / 2,145 / 8,320 / 130 /
  8,450; block 1024, top_k 10), trained and featurized once into ``--work``.
* ``synthetic``: stores of ``--sizes`` models (45 tasks; default 20,000 and 100,000) with the
  zoo and features stages done and one synthetic chain-gram fc1 matrix of width ``--dim``
  (a task mean plus noise; block 2048, top_k 10), written once into ``--work``.

For each study the pairs stage runs alone (``distsim launch --stages pairs`` on a copy of the
store without its pairs and neighbours, the other files hard-linked) for this checkout and,
with ``--base REV``, for a git worktree of REV, side by side (the worktree is removed at the
end); the two stores' pairs and neighbours tables are compared value for value. The stage's
rate is N^2 x sum(D) flops (the distance GEMMs of all pairs) over its recorded seconds,
beside the float32 GEMM rate of this machine with every thread, measured in the same run; a
checkout that records them also gives its tasks' seconds by step (``cpu_seconds``). With
``--memory`` a thread samples the peak heap (RssAnon) of the driver, the segment tasks and
the block reads (it costs the stage a few per cent).

    .venv/bin/python benchmarks/bench_pairs.py [--parts tile stage synthetic] [--base a50c9e3]
        [--sizes 20000 100000] [--base-sizes 20000] [--work /tmp/bench_pairs] [--block 2048]
        [--dim 2145] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
STUDY = """
[study]
name = "bench-pairs"
seed = 0
store = "{store}"

[data]
dataset = "digits"
num_tasks = 45
pairing = "random"
test_fraction = 0.25

[[arch]]
name = "mlp"
kind = "mlp"
widths = [64, 64]

[train]
seeds_per_task = 100
seeds_per_trial = 25
epochs = 10
batch_size = 32
lr = 0.05
momentum = 0.9

[features]
methods = ["chain-gram", "raw"]
layers = "all"

[tests]
protocols = ["closed-set"]
permutations = 9
permanova_permutations = 9

[pairs]
top_k = 10
block = 1024
metric = "euclidean"
"""


def best_of(f: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of `repeat` calls of f(), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(n: int = 2048, d: int = 2145) -> float:
    """float32 GFLOP/s of one (n x d) (d x n) product with numpy's BLAS, as threaded as it is."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, d), dtype=np.float32)
    b = rng.standard_normal((n, d), dtype=np.float32)
    return 2 * n * n * d / best_of(lambda: a @ b.T, 5) / 1e9


def old_topk(block: np.ndarray, k: int, r0: int, c0: int) -> None:
    """The NumPy route the stage used before stats.neighbors: keys of the block and of its
    transpose, each partitioned."""
    from distsim.stats.neighbors import _keys, _select

    for blk, a, b in ((block, r0, c0), (block.T, c0, r0)):
        rows, cols = np.arange(a, a + blk.shape[0]), np.arange(b, b + blk.shape[1])
        keys = _keys(np.broadcast_to(cols, blk.shape), blk)
        keys[rows[:, None] == cols[None, :]] = np.iinfo(np.int64).max
        _select(keys, k)


def tile(block: int, dim: int, k: int = 10) -> list[list[str]]:
    from threadpoolctl import threadpool_limits

    from distsim import stats
    from distsim.pipeline.pairs import compute_tile, tile_summary

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * block, dim), dtype=np.float32)
    tasks = rng.integers(0, 45, 2 * block)
    a, b = x[:block], x[block:]
    with threadpool_limits(1):
        stats.tile_topk(np.ones((4, 4), np.float32), 2, 0, 4)  # compile (or load) the kernel
        d = stats.distance_block(a, b)
        times = {
            "GEMM X_I X_J^T (the bound)": best_of(lambda: a @ b.T),
            "distance_block": best_of(lambda: stats.distance_block(a, b)),
            "tile_summary": best_of(lambda: tile_summary(d, tasks[:block], tasks[block:], False)),
            "top-k, NumPy route (before)": best_of(lambda: old_topk(d, k, 0, block)),
            "top-k, tile_topk (now)": best_of(lambda: stats.tile_topk(d, k, 0, block)),
            "compute_tile (now)": best_of(lambda: compute_tile(x, tasks, 0, 1, block, k,
                                                               "euclidean")),
        }
    bound = times["GEMM X_I X_J^T (the bound)"]
    return [[name, f"{t:.4f}", f"{t / bound:.2f}"] for name, t in times.items()]


def prepare(work: Path) -> Path:
    """The study's store with zoo and features done (made once, kept in `work`)."""
    study = work / "study.toml"
    work.mkdir(parents=True, exist_ok=True)
    study.write_text(STUDY.format(store=work / "store"))
    subprocess.run([str(ROOT / ".venv/bin/distsim"), "launch", str(study),  # idempotent
                    "--stages", "zoo,features"], check=True)
    return study


def pairs_run(study: Path, repo: Path, label: str) -> dict[str, Any]:
    """The pairs stage's record (`_stages/pairs.json`: seconds, and cpu_seconds where the code
    records them) with the code of `repo`, on a copy of the study's store without pairs and
    neighbours (the other files hard-linked) beside it."""
    text = study.read_text()
    found = re.search(r'store = "(.*)"', text)
    assert found, f"{study} names no store"
    source = Path(found.group(1))
    store = source.parent / f"store-{label}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(source, store, ignore=shutil.ignore_patterns("pairs", "neighbors"),
                    copy_function=os.link)
    copy = study.parent / f"study-{label}.toml"
    copy.write_text(text.replace(str(source), str(store)))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "distsim.cli", "launch", str(copy),
                             "--stages", "pairs"], env=env, cwd=repo)
    sampler = HeapSampler(proc.pid)
    if MEMORY:
        sampler.start()
    if proc.wait() != 0:
        raise SystemExit(f"{label}: the launch failed ({proc.returncode})")
    wall = time.perf_counter() - start
    sampler.stop.set()
    if MEMORY:
        sampler.join()
    record = json.loads((store / "_stages" / "pairs.json").read_text())
    peaks = ", ".join(f"{role} {mb / 1024:.2f} GB" for role, mb in sorted(sampler.peaks.items()))
    print(f"  {label}: pairs stage {record['seconds']:.1f} s (launch wall {wall:.1f} s); "
          f"cpu seconds {record.get('cpu_seconds', '(not recorded)')}"
          + (f"; peak heap by role (RssAnon, sampled every 0.2 s): {peaks}" if MEMORY else ""),
          flush=True)
    return {**record, "store": store, "peaks": sampler.peaks}


MEMORY = False  # --memory: sample the processes' heap (it slows the stage down a little)


class HeapSampler(threading.Thread):
    """The peak anonymous memory (RssAnon: the heap; not the object store's shared pages a
    task maps, nor mapped files) of the launch's processes by role, every 0.2 s: the driver,
    a Ray worker while it runs a segment or reads a row block, or a Ray Data tile actor."""

    ROLES = {"_segment_task": "segment task", "_block_task": "block read",
             "TileWorker": "tile actor", "MapWorker": "tile actor"}

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peaks: dict[str, int] = {}  # role -> MiB

    def run(self) -> None:
        from bench_scale import _descendants, _status_kb

        while not self.stop.is_set():
            for p in {self.pid} | _descendants(self.pid):
                try:
                    title = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                role = "driver" if p == self.pid else next(
                    (r for key, r in self.ROLES.items() if key in title), None)
                if role is not None:
                    mib = _status_kb(p, "RssAnon") // 1024
                    self.peaks[role] = max(self.peaks.get(role, 0), mib)
            self.stop.wait(0.2)


def compare(study: Path, n: int, width: int, base: str | None,
            work: Path) -> tuple[list[list[str]], list[list[str]]]:
    """The pairs stage of `study` (n models, feature widths summing to `width`) for `base`
    (a git worktree of it, removed at the end) and this checkout, side by side: rate rows,
    breakdown rows; the two stores' tables compared."""
    flops = float(n) ** 2 * width
    rate = gemm_rate()
    runs = [("now", ROOT)]
    if base:
        tree = work / f"base-{base}"
        if not tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            base], check=True)
        runs.insert(0, (f"base {base}", tree))
    rows, parts, records = [], [], []
    try:
        for label, repo in runs:
            record = pairs_run(study, repo, label.replace(" ", "-"))
            records.append(record)
            rows.append(_rate_row(label, n, width, record["seconds"], flops, rate))
            cpu = record.get("cpu_seconds")
            if cpu:
                parts.append([label, f"{n}", *(f"{cpu.get(s, 0):.2f}" for s in STEPS),
                              f"{record['seconds']:.1f}"])
    finally:
        if base:  # the worktree goes, and git forgets it
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(work / f"base-{base}")], check=False)
    if len(records) == 2:
        same = same_tables(records[0]["store"], records[1]["store"])
        print(f"  pairs and neighbours tables equal, every column: {same}", flush=True)
    for record in records:
        shutil.rmtree(record["store"], ignore_errors=True)
    return rows, parts


def stage(work: Path, base: str | None) -> tuple[list[list[str]], list[list[str]]]:
    """The paper MLP study (4,500 models, six matrices)."""
    study = prepare(work)
    import distsim

    res = distsim.open(work / "store")
    n = res.models().height
    widths = [res.features("mlp", layer, method)[2].shape[1]
              for layer in res.study.feature_layers("mlp") for method in ("chain-gram", "raw")]
    return compare(study, n, sum(widths), base, work)


def synthetic(work: Path, n: int, dim: int) -> Path:
    """A store whose zoo and features stages are done, with synthetic chain-gram fc1 features
    (n models in 45 tasks, width `dim`: a task mean plus noise, float32), and its study file
    (block 2048, top_k 10); made once per (n, dim) and kept in `work`."""
    from distsim.config import load_study
    from distsim.store import Store, model_id

    seeds = -(-n // 45)
    folder = work / f"synthetic-{n}-{dim}"
    study_file = folder / "study.toml"
    text = (STUDY.format(store=folder / "store")
            .replace("seeds_per_task = 100", f"seeds_per_task = {seeds}")
            .replace('methods = ["chain-gram", "raw"]\nlayers = "all"',
                     'methods = ["chain-gram"]\nlayers = ["fc1"]')
            .replace("block = 1024", "block = 2048"))
    if (folder / "done").exists():
        return study_file
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    study_file.write_text(text)
    study = load_study(study_file)
    store = Store(study.store)
    store.bind(study, store.binding(study))
    rng = np.random.default_rng(0)
    means = rng.standard_normal((45, dim), dtype=np.float32)
    start = time.perf_counter()
    for p in study.packs():
        ids = [model_id(p.arch, p.task, s) for s in p.seeds]
        trial = f"synthetic-{p.task}-{p.pack}"
        store.write_shard("models", {"arch": p.arch, "task": p.task, "pack": p.pack}, [
            {"model_id": i, "seed": s, "status": "ok", "trial_id": trial}
            for i, s in zip(ids, p.seeds, strict=True)])
        X = 0.3 * means[p.task] + rng.standard_normal((len(ids), dim), dtype=np.float32)
        store.write_shard("features", {"arch": p.arch, "method": "chain-gram", "layer": "fc1",
                                       "task": p.task, "pack": p.pack}, {
            "model_id": ids, "seed": list(p.seeds), "dim": [dim] * len(ids),
            "vector": pa.ListArray.from_arrays(
                pa.array(np.arange(0, X.size + 1, dim, dtype=np.int32)), pa.array(X.ravel())),
            "trial_id": [trial] * len(ids)})
    print(f"  wrote a synthetic store of {45 * seeds} models, D = {dim}, in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    (folder / "done").touch()
    return study_file


STEPS = ("load", "distances", "sums", "topk", "merge", "driver")


def _rate_row(label: str, n: int, width: int, seconds: float, flops: float,
              rate: float) -> list[str]:
    achieved = flops / seconds / 1e9
    return [label, f"{n}", f"{width}", f"{seconds:.1f}", f"{achieved:.1f}", f"{rate:.0f}",
            f"{100 * achieved / rate:.1f}%"]


def same_tables(a: Path, b: Path) -> bool:
    """Whether two stores' pairs and neighbors tables hold the same rows (sorted by their
    keys; every value compared exactly)."""

    from distsim.store import Store

    for table, keys in (("pairs", ["arch", "layer", "method", "block_i", "block_j"]),
                        ("neighbors", ["arch", "layer", "method", "model_id", "rank"])):
        x, y = (Store(p).scan(table).collect().sort(keys) for p in (a, b))
        if x.height == 0 or not x.equals(y):
            return False
    return True


def show(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["tile", "stage", "synthetic"],
                        choices=["tile", "stage", "synthetic"])
    parser.add_argument("--base", default=None, help="a git revision to time beside this one")
    parser.add_argument("--work", default="/tmp/bench_pairs")
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2145)
    parser.add_argument("--sizes", nargs="+", type=int, default=[20000, 100000],
                        help="models of the synthetic studies")
    parser.add_argument("--base-sizes", nargs="+", type=int, default=None,
                        help="the synthetic sizes to time --base at too (default: all)")
    parser.add_argument("--memory", action="store_true",
                        help="sample each process's peak heap (slows the stage a little)")
    args = parser.parse_args()
    global MEMORY
    MEMORY = args.memory
    work = Path(args.work)
    print(f"load average {os.getloadavg()[0]:.2f}; cores {os.cpu_count()}", flush=True)
    rate_head = ["code", "N", "sum D", "pairs s", "GFLOP/s", "GEMM GFLOP/s", "of GEMM"]
    part_head = ["code", "N", *(f"{s} s" for s in STEPS), "stage s"]
    rates: list[list[str]] = []
    parts: list[list[str]] = []
    if "tile" in args.parts:
        print(f"\n## one tile: {args.block} x {args.block} rows, D = {args.dim}, one thread\n")
        show(["step", "seconds", "x GEMM"], tile(args.block, args.dim))
    if "stage" in args.parts:
        print("\n## the pairs stage, the paper's MLP study (digits)\n", flush=True)
        r, p = stage(work, args.base)
        rates, parts = rates + r, parts + p
    if "synthetic" in args.parts:
        for n in args.sizes:
            print(f"\n## the pairs stage, synthetic features, N = {n}, D = {args.dim}\n",
                  flush=True)
            study = synthetic(work, n, args.dim)
            models = 45 * -(-n // 45)
            base = args.base if args.base_sizes is None or n in args.base_sizes else None
            r, p = compare(study, models, args.dim, base, work)
            rates, parts = rates + r, parts + p
    if rates:
        print("\n## the stage's rate (flops: N^2 x sum D, the distance GEMMs of all pairs)\n")
        show(rate_head, rates)
    if parts:
        print("## where its time went: the tasks' seconds by step (summed over tasks) and the "
              "driver's\n")
        show(part_head, parts)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
