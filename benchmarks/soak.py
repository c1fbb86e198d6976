"""A kill-anywhere soak: a small study SIGKILLed (its whole process session) at random moments
of every stage, relaunched each time, then let finish; its tables against an uninterrupted
run's.

The study (4 synthetic tasks x 4 seeds of an MLP, one model per pack, chain-gram and raw at
every layer, pairs in blocks of 4, HTT and PERMANOVA with 9 permutations) runs with
``DISTSIM_FAULTS=slow=S`` (every unit sleeps S seconds first: a stage lasts long enough to be
hit; no unit fails). Each round starts ``distsim launch`` in a session of its own, waits for a
stage's progress line (or, one round in six, a random moment of the start) and a random
moment more (:func:`soak`), SIGKILLs every process of the session and checks none survives;
the stage hit is the last progress line's. After ``--kills`` kills the launch runs to the
end. Then:

* every table's rows against the reference run's (ids, counts, values: floats to 1e-6
  relative; trial ids, lineage fingerprints, nodes and times aside, since they name each
  launch's own trials), rows lost or duplicated by key;
* ``distsim verify`` on the store, and no temp file, lock or process of any round left.

    .venv/bin/python benchmarks/soak.py [--kills 30] [--slow 0.3] [--seed 0] [--work /tmp/soak]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _procs import DISTSIM, kill_session, launch_env  # noqa: E402  (the tests' helpers)

STAGES = ("zoo", "features", "pairs", "tests")
STUDY = """
[study]
name = "soak"
seed = 0
store = "{store}"

[data]
dataset = "synthetic"
num_tasks = 4
synthetic_samples = 60

[[arch]]
name = "mlp"
kind = "mlp"
widths = [8]

[train]
seeds_per_task = 4
seeds_per_trial = 1
epochs = 2
batch_size = 16

[features]
methods = ["chain-gram", "raw"]
layers = "all"

[tests]
permutations = 9
permanova_permutations = 9
chunk_size = 5

[pairs]
top_k = 3
block = 4
"""
# Row keys, and what must not depend on how a run went (trial ids, times, nodes, lineage aside)
KEYS = {"models": ["model_id"], "features": ["model_id", "method", "layer"],
        "pairs": ["method", "layer", "block_i", "block_j"],
        "neighbors": ["model_id", "method", "layer", "rank"],
        "tests": ["method", "layer", "protocol"]}
COMPARE = {
    "models": ["task", "pack", "seed", "status", "train_acc", "test_acc", "train_loss",
               "test_loss", "epochs"],
    "features": ["vector"],
    "pairs": ["intra_count", "intra_sum", "intra_sumsq", "inter_count", "inter_sum",
              "inter_sumsq"],
    "neighbors": ["neighbor_id", "distance"],
    "tests": ["observed", "chance", "null_mean", "null_sd", "p_value", "n_models", "null"],
}


def stage_of(log: Path) -> str:
    """The stage a launch was in: its last progress line's, or "start" before the first."""
    lines = [ln for ln in log.read_text().splitlines() if ln.split(" ", 1)[0] in STAGES]
    return lines[-1].split(" ", 1)[0] if lines else "start"


def launch(study: Path, log: Path, slow: float) -> subprocess.Popen[bytes]:
    with open(log, "w") as out:
        return subprocess.Popen([DISTSIM, "launch", str(study)], cwd=study.parent,
                                env=launch_env(**({"DISTSIM_FAULTS": f"slow={slow}"}
                                                  if slow else {})),
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def soak(work: Path, kills: int, slow: float, rng: random.Random) -> dict[str, object]:
    """Kill-and-relaunch rounds until `kills` kills, then a last launch to the end.

    A round targets the first stage that is not complete and has had fewer than kills / 4
    kills (or, one round in six, the start: a random moment before the first stage line).
    It waits for the target's progress line, then U(0, w) seconds, w = 0.5 s + 0.5 s per kill
    the stage had before (so even a slow unit gets done), and kills."""
    study = work / "soak.toml"
    store = work / "store"
    study.write_text(STUDY.format(store=store))
    hits: dict[str, int] = dict.fromkeys(("start", *STAGES), 0)
    survivors, killed_s, rounds = 0, 0.0, 0
    quota = -(-kills // len(STAGES))
    while sum(hits.values()) < kills:
        left = [s for s in STAGES if not (store / "_stages" / f"{s}.json").exists()]
        if not left:
            break
        target = next((s for s in left if hits[s] < quota), left[0])
        if rng.random() < 1 / 6:
            target = "start"
        rounds += 1
        log = work / f"round-{rounds}.log"
        t0 = time.monotonic()
        proc = launch(study, log, slow)
        delay = rng.uniform(0.5, 6.0) if target == "start" else rng.uniform(
            0, 0.5 + 0.5 * hits[target])
        seen = t0 if target == "start" else None  # when the target's line appeared
        while proc.poll() is None:
            if seen is None and any(ln.split(" ", 1)[0] == target
                                    for ln in log.read_text().splitlines()):
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= delay:
                break
            time.sleep(0.02)
        if proc.poll() is not None:  # it finished (or failed) before the kill
            print(f"round {rounds}: the launch ended by itself (exit {proc.returncode}) "
                  "before its kill", flush=True)
            if proc.returncode != 0:
                raise SystemExit(log.read_text()[-3000:])
            break
        stage = stage_of(log)
        survivors += len(kill_session(proc.pid))
        proc.wait()
        killed_s += time.monotonic() - t0
        hits[stage] += 1
        print(f"round {rounds}: killed in {stage} after {time.monotonic() - t0:.1f} s "
              f"(target {target})", flush=True)
    t0 = time.monotonic()
    last = launch(study, work / "final.log", 0.0)
    if last.wait() != 0:
        raise SystemExit((work / "final.log").read_text()[-3000:])
    survivors += len(kill_session(last.pid))  # Ray's processes end with the launch
    return {"hits": hits, "rounds": rounds, "killed_s": killed_s,
            "final_s": time.monotonic() - t0, "survivors": survivors}


def reference(work: Path) -> float:
    """The same study launched once, uninterrupted (its seconds)."""
    folder = work / "reference"
    folder.mkdir(parents=True)
    study = folder / "soak.toml"
    study.write_text(STUDY.format(store=folder / "store"))
    t0 = time.monotonic()
    proc = launch(study, folder / "launch.log", 0.0)
    if proc.wait() != 0:
        raise SystemExit((folder / "launch.log").read_text()[-3000:])
    kill_session(proc.pid)
    return time.monotonic() - t0


def compare(a: Path, b: Path) -> list[list[str]]:
    """Per table: rows in each, keys lost / extra / duplicated, values that differ."""
    sys.path.insert(0, str(ROOT))
    from distsim.store import Store

    rows = []
    for table, key in KEYS.items():
        x, y = (Store(p).scan(table).select(*key, *COMPARE[table]).collect().sort(key)
                for p in (a, b))
        dup = y.height - y.select(key).unique().height
        kx, ky = (set(map(tuple, f.select(key).rows())) for f in (x, y))
        differ = 0
        if x.height == y.height and kx == ky:
            for col in COMPARE[table]:
                u, v = x[col], y[col]
                if u.dtype.is_float():
                    same = np.allclose(u.to_numpy(), v.to_numpy(), rtol=1e-6, equal_nan=True)
                elif isinstance(u.dtype, pl.List):
                    same = all(np.allclose(p, q, rtol=1e-6) for p, q in
                               zip(u.to_list(), v.to_list(), strict=True))
                else:
                    same = u.equals(v)
                differ += not same
        rows.append([table, f"{x.height}", f"{y.height}", f"{len(kx - ky)}", f"{len(ky - kx)}",
                     f"{dup}", f"{differ}"])
    return rows


def leftovers(store: Path) -> list[str]:
    found = [str(p) for p in store.rglob(".tmp-*")]
    if (store / "_launch.lock").exists():
        found.append("_launch.lock")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--slow", type=float, default=0.3, help="seconds each unit sleeps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/soak")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"load average {os.getloadavg()[0]:.2f}; cores {os.cpu_count()}", flush=True)
    ref_s = reference(work)
    print(f"reference: {ref_s:.1f} s uninterrupted", flush=True)
    out = soak(work, args.kills, args.slow, random.Random(args.seed))
    hits = out["hits"]
    assert isinstance(hits, dict)
    verify = subprocess.run([DISTSIM, "verify", str(work / "store")], capture_output=True,
                            text=True)
    print("\n| kills | " + " | ".join(hits) + " | rounds | killed launches s | last launch s |")
    print("|---|" + "---|" * (len(hits) + 3))
    print(f"| {sum(hits.values())} | " + " | ".join(str(v) for v in hits.values())
          + f" | {out['rounds']} | {out['killed_s']:.0f} | {out['final_s']:.0f} |")
    print("\n| table | reference rows | soak rows | lost | extra | duplicated | "
          "columns differing |")
    print("|---|---|---|---|---|---|---|")
    rows = compare(work / "reference" / "store", work / "store")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    left = leftovers(work / "store")
    print(f"\nverify: {verify.stdout.strip() or verify.stderr.strip()}")
    print(f"left behind: {left or 'nothing'}; processes surviving a kill: {out['survivors']}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    sound = (verify.returncode == 0 and not left and out["survivors"] == 0
             and all(r[1] == r[2] and r[3:] == ["0"] * 4 for r in rows))
    print("soak: " + ("nothing lost, duplicated or left behind" if sound else "PROBLEMS above"))
    if not sound:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
