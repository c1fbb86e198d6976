"""Models per second of an import study's zoo stage vs reading the same files in a plain loop.

Two foreign zoos of the 8x8 CNN ``ArchConfig(kind="cnn", channels=(4, 8), input_shape=(1, 8,
8), num_classes=2)`` (402 parameters), written once by ``distsim.zoo.fixtures`` with
``train=False`` and cached under ``--work`` (their writing time is printed, not measured):

* ``model-zoos``: ``--models-zoo`` checkpoints (default 10,000), as models x 4 checkpoints
  (epochs 1..4, ``start=1``: no checkpoint_0), one ``torch.save`` file each.
* ``weights-table``: ``--table-rows`` rows (default 30,000), as models x 3 steps (0, 1, 2) of
  one ``weights.npy``.

For each zoo, side by side in one run (``--repeat`` times, alternating which goes first; the
median is reported):

* **loop**: one fresh Python process reads every checkpoint the simplest way without distsim
  and keeps the state dicts in a list. model-zoos: ``json`` of each trial's ``result.json``
  (the line of each epoch) and ``torch.load(path, weights_only=True)`` of each ``checkpoints``
  file. weights-table: ``np.load("weights.npy")``, ``layout.csv`` and ``metrics.csv`` with the
  csv module, each row sliced per layout.csv, kernels transposed to torch order (and the
  Dense after the flatten reordered from channels-last), copied into torch tensors. Timed
  from the first file read to the last tensor (interpreter start and imports excluded); its
  peak RSS is its own ``ru_maxrss``.
* **serial**: the import's own work (list, plan, ``read_pack`` of every pack) in one process
  without Ray: what Ray's parallel packs are measured against.
* **import**: the zoo stage alone of an import study (``epochs = "all"``, default pack_size)
  on a fresh store, run in a fresh Python process by ``distsim.pipeline.launch.run_study(...,
  stages=("zoo",))`` (what ``distsim launch STUDY --stages zoo`` calls), a local Ray of all
  CPUs. Models/s uses the stage's own seconds (listing, Ray tasks, store writes; Ray start
  excluded); "wall" is the whole process (interpreter, imports, Ray start and stop). Driver
  RSS: that process's ``ru_maxrss`` (Ray workers are other processes); largest worker: the
  stage's ``worker_rss_mb``.

ratio = import models/s (stage seconds) / loop models/s: >= 1 means the import is not slower.

    .venv/bin/python benchmarks/bench_import.py [--quick] [--models-zoo N] [--table-rows N]
        [--repeat R] [--work /tmp/bench_import] [--only model-zoos|weights-table]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EPOCHS_ZOO, STEPS_TABLE = 4, 3  # checkpoints per model-zoos model, rows per table model
STUDY = """
[study]
name = "bench-import-{fmt}"
store = "{store}"

[zoo]
source = "import"
format = "{fmt}"
path = "{path}"
epochs = "all"

[[arch]]
name = "cnn"
kind = "cnn"
channels = [4, 8]
input_shape = [1, 8, 8]
num_classes = 2

[features]
methods = ["raw"]
layers = "last"

[tests]
protocols = ["closed-set"]
permutations = 19
permanova_permutations = 19
"""


def arch() -> Any:
    from distsim.config.arch import ArchConfig

    return ArchConfig(kind="cnn", channels=(4, 8), input_shape=(1, 8, 8), num_classes=2)


# ----------------------------------------------------------------------------- zoos


def generate(fmt: str, n: int, work: Path) -> tuple[Path, float]:
    """The zoo of `n` checkpoints in `fmt` under `work` (written unless cached), and the
    seconds its writing took now (0 when cached)."""
    from distsim.zoo import fixtures

    per = EPOCHS_ZOO if fmt == "model-zoos" else STEPS_TABLE
    models = math.ceil(n / per)
    out = work / f"{fmt}-{models}x{per}"
    root = out / fixtures.EXPERIMENT if fmt == "model-zoos" else out
    if (out / "done").is_file():
        return root, 0.0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    half = math.ceil(models / 2)  # the grid is 2 learning rates x seeds
    if fmt == "model-zoos":
        root = fixtures.write_model_zoos(out, arch(), seeds=half, epochs=EPOCHS_ZOO, start=1,
                                         train=False, models=models)
    else:
        root = fixtures.write_weights_table(out, arch(), seeds=half, epochs=STEPS_TABLE - 1,
                                            train=False, models=models)
    (out / "done").write_text("")
    return root, time.perf_counter() - t0


def size_mb(folder: Path) -> tuple[float, float, int]:
    """(apparent MB, allocated MB, files) of everything under `folder`."""
    apparent = allocated = files = 0
    for base, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(base, name))
            apparent, allocated, files = apparent + st.st_size, allocated + st.st_blocks * 512, \
                files + 1
    return apparent / 2**20, allocated / 2**20, files


# ----------------------------------------------------------------------------- children


def loop_model_zoos(root: Path) -> list[tuple[dict[str, Any], Any]]:
    """Every checkpoint of a Model-Zoos folder in memory, the plain way: (state, result line)."""
    import torch

    kept = []
    for trial in sorted(p for p in root.iterdir() if p.is_dir()):
        with open(trial / "result.json") as f:
            lines = {x["training_iteration"]: x for x in map(json.loads, f) if x}
        for ck in sorted(trial.glob("checkpoint_*")):
            state = torch.load(ck / "checkpoints", weights_only=True)
            kept.append((state, lines.get(int(ck.name.split("_")[1]))))
    return kept


def loop_weights_table(root: Path) -> list[tuple[dict[str, Any], Any]]:
    """Every row of a weights table as a torch state dict, the plain way: (state, metrics)."""
    import csv

    import numpy as np
    import torch

    weights = np.load(root / "weights.npy")
    with open(root / "layout.csv") as f:
        layout = [(r["varname"], int(r["start_idx"]), int(r["end_idx"]),
                   tuple(int(s) for s in r["shape"].strip("()").split(",") if s.strip()))
                  for r in csv.DictReader(f)]
    with open(root / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    # torch order: per layer the kernel, then the bias (TensorFlow sorts bias:0 first)
    order = sorted(layout, key=lambda v: (v[0].rsplit("/", 1)[0], v[0].endswith("bias:0")))
    kept = []
    for row, meta in zip(weights, metrics, strict=True):
        state, first_dense = {}, True
        for name, start, end, shape in order:
            w = row[start:end].reshape(shape)
            if w.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
                w = w.transpose(3, 2, 0, 1)
            elif w.ndim == 2:  # (in, out) -> (out, in), the first one's inputs (H, W, C) -> CHW
                w = w.T
                if first_dense:
                    w = w.reshape(len(w), 2, 2, 8).transpose(0, 3, 1, 2).reshape(len(w), -1)
                    first_dense = False
            state[name] = torch.from_numpy(np.ascontiguousarray(w))
        kept.append((state, meta))
    return kept


def child_loop(fmt: str, root: str) -> None:
    import resource

    import numpy  # noqa: F401  imports before the clock, as the import's workers have them
    import torch  # noqa: F401

    t0 = time.perf_counter()
    n = len((loop_model_zoos if fmt == "model-zoos" else loop_weights_table)(Path(root)))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"models": n, "seconds": seconds, "rss_mb": rss}))


def child_import(study_file: str) -> None:
    import io
    import resource

    from distsim.config import load_study
    from distsim.pipeline.launch import run_study

    log = io.StringIO()
    result = run_study(load_study(study_file), stages=("zoo",), stream=log)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"zoo": result["stages"]["zoo"], "rss_mb": rss}))


def child_serial(study_file: str) -> None:
    """The import's own work (list, plan, read_pack of every pack: read, map, hash, write the
    shards) in this one process, without Ray: the same work as the stage, serially."""
    import dataclasses
    import resource

    import torch  # noqa: F401  imported before the clock, as for the loop

    from distsim.config import load_study
    from distsim.pipeline.imports import plan, read_pack, source_entries

    study = load_study(study_file)
    store = Path(study.store).with_name(Path(study.store).name + "-serial")
    shutil.rmtree(store, ignore_errors=True)
    study = dataclasses.replace(study, store=str(store))
    t0 = time.perf_counter()
    packs = plan(study, source_entries(study))
    n = sum(read_pack(study, ip)["ok"] for ip in packs)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(store, ignore_errors=True)
    print(json.dumps({"models": n, "seconds": seconds, "rss_mb": rss}))


def run_child(*args: str) -> tuple[dict[str, Any], float]:
    """A child of this script (its JSON line) and the wall seconds of the whole process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


# ----------------------------------------------------------------------------- measure


def measure_loop(fmt: str, root: Path) -> dict[str, Any]:
    before = os.getloadavg()[0]
    out, wall = run_child("loop", fmt, str(root))
    return {**out, "wall": wall, "load": (before, os.getloadavg()[0])}


def measure_import(fmt: str, root: Path, work: Path) -> dict[str, Any]:
    import polars as pl

    store = work / f"store-{fmt}"
    shutil.rmtree(store, ignore_errors=True)
    study = work / f"study-{fmt}.toml"
    study.write_text(STUDY.format(fmt=fmt, store=store, path=root))
    before = os.getloadavg()[0]
    out, wall = run_child("import", str(study))
    load = (before, os.getloadavg()[0])
    zoo = out["zoo"]
    marker = json.loads((store / "_stages" / "zoo.json").read_text())
    rows = pl.scan_parquet(store / "models" / "**" / "*.parquet").select(pl.len()).collect()
    return {"models": zoo["models"], "seconds": zoo["seconds"], "marker_s": marker["seconds"],
            "rss_mb": out["rss_mb"], "worker_mb": zoo["worker_rss_mb"], "packs": zoo["packs"],
            "failed": zoo.get("failed_models", 0), "rows": rows.item(),
            "store_mb": size_mb(store)[0], "wall": wall, "load": load}


def measure_serial(fmt: str, work: Path) -> dict[str, Any]:
    """child_serial on the study file measure_import wrote."""
    before = os.getloadavg()[0]
    out, wall = run_child("serial", str(work / f"study-{fmt}.toml"))
    return {**out, "wall": wall, "load": (before, os.getloadavg()[0])}


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(fmt: str, n: int, zoo: tuple[float, float, int], loops: list[dict[str, Any]],
          imports: list[dict[str, Any]], serials: list[dict[str, Any]]) -> None:
    lm, im = loops[0]["models"], imports[0]["models"]
    l_s, i_s = med(loops, "seconds"), med(imports, "seconds")
    l_w, i_w = med(loops, "wall"), med(imports, "wall")
    rate_l, rate_i = lm / l_s, im / i_s
    def load(runs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{r['load'][0]:.1f}->{r['load'][1]:.1f}" for r in runs)

    print(f"\n### {fmt}: {n} checkpoints, zoo {zoo[0]:.1f} MB ({zoo[1]:.1f} MB allocated, "
          f"{zoo[2]} files)\n")
    print("| | models | seconds | models/s | wall s (process) | driver/loop RSS MB | "
          "largest worker RSS MB | store MB | models rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| plain loop | {lm} | {l_s:.2f} | {rate_l:,.0f} | {l_w:.1f} | "
          f"{med(loops, 'rss_mb'):.0f} | - | - | - |")
    print(f"| distsim import | {im} | {i_s:.2f} | {rate_i:,.0f} | {i_w:.1f} | "
          f"{med(imports, 'rss_mb'):.0f} | {med(imports, 'worker_mb'):.0f} | "
          f"{med(imports, 'store_mb'):.1f} | {imports[0]['rows']} |")
    s_s = med(serials, "seconds")
    print(f"| distsim's work, one process, no Ray | {serials[0]['models']} | {s_s:.2f} | "
          f"{serials[0]['models'] / s_s:,.0f} | {med(serials, 'wall'):.1f} | "
          f"{med(serials, 'rss_mb'):.0f} | - | - | - |")
    print(f"\nratio import/serial: {rate_i / (serials[0]['models'] / s_s):.2f}; "
          f"ratio import/loop: {rate_i / rate_l:.2f} (stage seconds), "
          f"{l_w / i_w:.2f} (whole processes); packs {imports[0]['packs']}, failed models "
          f"{imports[0]['failed']}; load (1 min) before->after each run: loop {load(loops)}; "
          f"import {load(imports)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-zoo", type=int, default=10_000,
                        help="model-zoos checkpoints (models x 4 epochs; default 10000)")
    parser.add_argument("--table-rows", type=int, default=30_000,
                        help="weights-table rows (models x 3 steps; default 30000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (median)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_import"))
    parser.add_argument("--quick", action="store_true", help="1000 and 3000, a smoke run")
    parser.add_argument("--only", choices=("model-zoos", "weights-table"), default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"loop": child_loop, "import": child_import, "serial": child_serial}[kind](*rest)
        return
    if args.quick:
        args.models_zoo, args.table_rows = 1000, 3000
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()} at start; work folder {args.work}")
    sizes = {"model-zoos": args.models_zoo, "weights-table": args.table_rows}
    for fmt, n in sizes.items():
        if args.only and fmt != args.only:
            continue
        root, gen = generate(fmt, n, args.work)
        zoo = size_mb(root)
        print(f"{fmt}: {root} " + (f"written in {gen:.1f} s" if gen else "(cached)"),
              flush=True)
        loops, imports, serials = [], [], []
        for r in range(args.repeat):  # alternate which side goes first
            for side in (("loop", "import", "serial") if r % 2 == 0
                         else ("serial", "import", "loop")):
                if side == "loop":
                    loops.append(measure_loop(fmt, root))
                elif side == "import":
                    imports.append(measure_import(fmt, root, args.work))
                else:
                    serials.append(measure_serial(fmt, args.work))
        table(fmt, n, zoo, loops, imports, serials)
    print("\nCompared: one Python process reading every checkpoint into torch tensors (plain "
          "loop) vs the zoo stage of an import study on a local Ray of all CPUs (listing, "
          "reading, mapping, hashing, weights and models shards written) vs that same work "
          "(list, plan, read_pack per pack) in one process without Ray.")
    print(f"load {os.getloadavg()} at end")


if __name__ == "__main__":
    main()
