"""How distsim grows with the number of models: end to end, statistics alone, top-k neighbours.

Three parts, one run, printed tables and a log-log PNG (``--png``):

* ``e2e``: a ~10,000-model study with ``distsim launch`` (digits, 45 pair-tasks x 223 seeds,
  an MLP with one hidden layer of 16, chain-gram and raw at every layer, HTT closed-set and
  open-set with the lda learner and PERMANOVA, B = 199): wall time per stage (the store's
  ``_stages`` records) and the peak RSS of the driver and of the largest Ray worker (VmHWM of
  every process of the launch's session, sampled every second).
* ``stats``: synthetic features (D = 512, 50 groups, a small group effect) at N = 10k, 30k,
  100k: PERMANOVA with B = 999 by the features route (Euclidean), the tile route (cosine) and
  scikit-bio's ``permanova`` on the distance matrix where it fits in memory; HTT closed-set and
  open-set (lda, B = 199, the paper's 20 queries per held-out task). Every case runs in a
  fresh process (its own peak RSS); the growth exponent is the log-log slope over the sizes run.
* ``topk``: ``topk_neighbors`` (k = 10) of N = 100k synthetic models, block 2048, one process.

    .venv/bin/python benchmarks/bench_scale.py [--parts e2e stats topk] [--sizes 10000 30000
        100000] [--png /tmp/bench_scale.png] [--work /tmp/bench_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

D, GROUPS = 512, 50
ROOT = Path(__file__).resolve().parents[1]
STUDY = """
[study]
name = "scale-10k"
seed = 0
store = "{store}"

[data]
dataset = "digits"
num_tasks = 45
pairing = "random"

[[arch]]
name = "mlp"
kind = "mlp"
widths = [16]

[train]
seeds_per_task = 223
seeds_per_trial = 56
epochs = 5
batch_size = 32
lr = 0.05
momentum = 0.9
optimizer = "sgd"
device = "cpu"

[resources]
feature_actors = 2

[features]
methods = ["chain-gram", "raw"]
layers = "all"

[tests]
protocols = ["closed-set", "open-set"]
permutations = 199
permanova_permutations = 199
learner = "lda"
chunk_size = 50
n_query = 20

[pairs]
top_k = 10
block = 2048
"""


# ----------------------------------------------------------------------------- memory


def _status_kb(pid: int | str, field: str) -> int:
    """A /proc/<pid>/status field in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> set[int]:
    """Every live process below pid (Ray's raylet, workers and helpers of a launch)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class PeakSampler(threading.Thread):
    """Samples the peak RSS (VmHWM) of a process and of each of its descendants every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.peaks, self.names = pid, threading.Event(), {}, {}

    def run(self) -> None:
        while not self.stop.is_set():
            for p in {self.pid} | _descendants(self.pid):
                kb = _status_kb(p, "VmHWM")
                if kb > self.peaks.get(p, 0):
                    self.peaks[p] = kb
                    try:
                        with open(f"/proc/{p}/cmdline", "rb") as f:
                            self.names[p] = f.read().replace(b"\0", b" ")[:80].decode()
                    except OSError:
                        pass
            self.stop.wait(1.0)


# ----------------------------------------------------------------------------- e2e


def e2e(work: Path) -> list[list[str]]:
    """Launch the 10k-model study; rows: stage, wall s, then the memory peaks."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    toml = work / "scale-10k.toml"
    toml.write_text(STUDY.format(store=store))
    cmd = [str(Path(sys.executable).parent / "distsim"), "launch", str(toml)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}):\n{out[-3000:]}")
    (work / "e2e.log").write_text(out)
    rows = [["stage", "wall (s)", "units"]]
    for stage in ("zoo", "features", "pairs", "tests"):
        info = json.loads((store / "_stages" / f"{stage}.json").read_text())
        units = {k: v for k, v in info.items()
                 if k in ("trials", "packs", "tiles", "tests", "tasks")}
        rows.append([stage, f"{info['seconds']:.1f}", json.dumps(units)])
    rows.append(["launch (all, with Ray start and summary)", f"{wall:.1f}", ""])
    models = len(list((store / "models").rglob("*.parquet")))
    driver = sampler.peaks.get(proc.pid, 0) / 2**20
    workers = {p: kb for p, kb in sampler.peaks.items() if p != proc.pid}
    top = max(workers, key=lambda p: workers[p]) if workers else None
    rows.append(["peak RSS driver (GB)", f"{driver:.2f}", ""])
    if top is not None:
        rows.append(["peak RSS largest other process (GB)", f"{workers[top] / 2**20:.2f}",
                     sampler.names.get(top, "")[:60]])
    rows.append(["model shards", str(models), ""])
    return rows


# ----------------------------------------------------------------------------- stats


def synthetic(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, GROUPS, n)
    X = rng.standard_normal((n, D)).astype(np.float32)
    X[:, :4] += 0.05 * rng.standard_normal((GROUPS, 4)).astype(np.float32)[labels]
    X[:, 5] += 1.0  # off the origin, for cosine
    return X, labels


def case(name: str, n: int) -> dict[str, float]:
    """One measurement in this process -> wall seconds and the statistic."""
    from distsim.stats import (
        HTTOptions,
        htt,
        permanova_features,
        permanova_tiles,
        topk_neighbors,
    )

    X, labels = synthetic(n)
    permanova_tiles(X[:64], labels[:64] % 2, "cosine", permutations=3, tile=16)  # compile
    permanova_features(X[:64], labels[:64] % 2, permutations=3)
    t0 = time.perf_counter()
    if name == "permanova features":
        stat = permanova_features(X, labels, permutations=999, seed=0).statistic
    elif name == "permanova tiles (cosine)":
        stat = permanova_tiles(X, labels, "cosine", permutations=999, seed=0,
                               tile=2048).statistic
    elif name == "permanova scikit-bio":
        from scipy.spatial.distance import pdist
        from skbio import DistanceMatrix
        from skbio.stats.distance import permanova as skbio_permanova

        warm = DistanceMatrix(pdist(X[:64].astype(np.float64)), validate=False)
        skbio_permanova(warm, labels[:64] % 2, permutations=3)  # compile its numba kernels
        t0 = time.perf_counter()
        dm = DistanceMatrix(pdist(X.astype(np.float64)), validate=False)
        stat = float(skbio_permanova(dm, labels, permutations=999)["test statistic"])
    elif name.startswith("htt"):
        protocol = name.split()[1]
        stat = htt(X, labels, protocol, permutations=199, seed=0,
                   options=HTTOptions(learner="lda", n_query=20)).statistic
    elif name == "topk":
        topk_neighbors(X, k=10, block=2048)
        stat = float("nan")
    else:
        raise ValueError(name)
    return {"seconds": time.perf_counter() - t0, "statistic": float(stat),
            "peak_gb": _status_kb("self", "VmHWM") / 2**20}


def child(name: str, n: int, timeout: float) -> dict[str, float] | str:
    try:
        out = subprocess.run([sys.executable, __file__, "--child", name, str(n)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return "out of memory" if out.returncode == -9 or "MemoryError" in last else last[:60]
    return json.loads(out.stdout.strip().splitlines()[-1])


STATS_CASES = {  # name -> largest N it runs at (None: every size)
    "permanova features": None,
    "permanova tiles (cosine)": 30_000,
    "permanova scikit-bio": 10_000,
    "htt closed-set": None,
    "htt open-set": None,
}


def stats(sizes: list[int], timeout: float) -> tuple[list[list[str]], dict[str, list]]:
    rows = [["case", *[f"N={n:,}" for n in sizes], "exponent"]]
    curves: dict[str, list] = {}
    for name, limit in STATS_CASES.items():
        cells, pts = [], []
        for n in sizes:
            if limit is not None and n > limit:
                cells.append("not run")
                continue
            r = child(name, n, timeout)
            if isinstance(r, str):
                cells.append(r)
                continue
            cells.append(f"{r['seconds']:.1f} s / {r['peak_gb']:.2f} GB")
            pts.append((n, r["seconds"]))
            print(f"  {name} N={n}: {cells[-1]} (statistic {r['statistic']:.4g}, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
        exp = (np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
               if len(pts) > 1 else float("nan"))
        rows.append([name, *cells, f"{exp:.2f}"])
        curves[name] = pts
    return rows, curves


def plot(curves: dict[str, list], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("models N")
    ax.set_ylabel("wall (s)")
    ax.set_title(f"distsim statistics vs N (D = {D}, {GROUPS} groups)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def show(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["e2e", "stats", "topk"],
                    choices=["e2e", "stats", "topk"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 30_000, 100_000])
    ap.add_argument("--timeout", type=float, default=1200.0, help="per statistics case, s")
    ap.add_argument("--png", default="/tmp/bench_scale.png")
    ap.add_argument("--work", default="/tmp/bench_scale")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(case(args.child[0], int(args.child[1]))))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()} at start\n")
    if "e2e" in args.parts:
        print("end to end, ~10,000 models (distsim launch):")
        show(e2e(work))
    if "stats" in args.parts:
        print(f"statistics alone (D = {D}, {GROUPS} groups; wall / peak RSS per case):")
        rows, curves = stats(args.sizes, args.timeout)
        show(rows)
        plot(curves, args.png)
        print(f"log-log plot: {args.png}\n")
    if "topk" in args.parts:
        n = max(args.sizes)
        r = child("topk", n, args.timeout)
        text = r if isinstance(r, str) else f"{r['seconds']:.1f} s / {r['peak_gb']:.2f} GB"
        print(f"top-10 neighbours of N = {n:,} (one process, block 2048): {text}\n")
    print(f"load {os.getloadavg()} at end")


if __name__ == "__main__":
    main()
