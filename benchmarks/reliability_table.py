"""The fault table of issue 8, measured: each fault or bad input applied to a small study
through the `distsim` command as a user would, with its exit code, the time to the error,
the last line printed, and what the store lost (files that existed before and are gone or
changed after: must be none).

    .venv/bin/python benchmarks/reliability_table.py [--out table.md]

About 5 minutes on 2 cores. Uses only processes it starts (new sessions, killed by session);
mounts a small tmpfs for the full-disk rows where it may (as root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTSIM = str(Path(sys.executable).with_name("distsim"))
STUDY = """
[study]
name = "faults"
store = "store"
[data]
dataset = "synthetic"
num_tasks = 4
synthetic_samples = 60
[[arch]]
kind = "mlp"
widths = [8]
[train]
seeds_per_task = 4
seeds_per_trial = 1
epochs = 2
batch_size = 16
{train_extra}
[resources]
max_failures = 2
{resources}
[tests]
permutations = 9
permanova_permutations = 9
chunk_size = 5
[pairs]
top_k = 3
block = 4
"""


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return out


def files(store: Path) -> dict[str, tuple[int, int]]:
    if not store.is_dir():
        return {}
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in store.rglob("*")
            if p.is_file() and "_tune" not in p.parts and p.name != "_launch.lock"}


def lost(before: dict, after: dict) -> str:
    gone = [k for k in before if k not in after]
    changed = [k for k in before if k in after and after[k] != before[k]]
    return "nothing" if not gone and not changed else f"{len(gone)} gone, {len(changed)} changed"


def study_dir(base: Path, name: str, train_extra: str = "", resources: str = "") -> Path:
    folder = base / name
    folder.mkdir()
    (folder / "study.toml").write_text(STUDY.format(train_extra=train_extra, resources=resources))
    return folder


def run(folder: Path, *args: str, **kw: str) -> tuple[int, float, str]:
    t0 = time.monotonic()
    p = subprocess.run([DISTSIM, *args], cwd=folder, env=env(**kw), capture_output=True,
                       text=True, timeout=600)
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return p.returncode, time.monotonic() - t0, lines[-1] if lines else ""


def interrupt(folder: Path, stage: str, sig: int, twice: bool) -> tuple[int, float, str, str]:
    """Launch with slow units, send `sig` to the process group once `stage` started."""
    log = folder / f"{stage}.log"
    proc = subprocess.Popen([DISTSIM, "launch", "study.toml"], cwd=folder,
                            env=env(DISTSIM_FAULTS="slow=1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    models = folder / "store" / "models" / "arch=mlp"
    while f"{stage:<9} 0/" not in log.read_text() or (
            stage == "zoo" and len(list(models.glob("*.parquet"))) < 3):
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    time.sleep(0.5)
    before = files(folder / "store")
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    if twice:
        time.sleep(0.3)
        os.killpg(proc.pid, sig)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    if "Traceback" in text or "SIGTERM received" in text:
        last += " [TRACEBACK PRINTED]"
    return rc, took, last, lost(before, files(folder / "store"))


def disk_rows(base: Path, done: Path, add: Callable[[str, int, float, str, str], None]) -> None:
    """The disk and study.json faults (issue 26): a full filesystem (a tmpfs, where this user
    may mount one), an injected I/O error, and an unreadable study.json."""
    small = base / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode == 0:
        try:
            full = study_dir(small, "full")
            rc, took, last = run(full, "launch", "study.toml")
            add("launch on a 256 KB filesystem", rc, took, last, "nothing (store not created)"
                if not (full / "store").exists() else "store written!")
            rc, took, last = run(full, "launch", "study.toml", "--no-space-check")
            add("the same with `--no-space-check`", rc, took, last, "nothing")
            before = files(full / "store")
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
            rc, took, last = run(full, "launch", "study.toml")
            add("relaunch after growing it to 64 MB", rc, took, last,
                lost(before, files(full / "store")))
            subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
            rc, took, last = run(full, "launch", "study.toml", "--fresh", "--yes")
            add("`launch --fresh` on the same, remounted read-only", rc, took, last, "nothing")
        finally:
            subprocess.run(["umount", "-l", str(small)], check=False)
    eio = study_dir(base, "eio")
    rc, took, last = run(eio, "launch", "study.toml", DISTSIM_FAULTS="tile=0.2,errno=5")
    add("EIO in a pairs tile (`DISTSIM_FAULTS=tile=0.2,errno=5`)", rc, took, last, "nothing")
    before = files(eio / "store")
    rc, took, last = run(eio, "launch", "study.toml")
    add("relaunch without the fault", rc, took, last, lost(before, files(eio / "store")))
    broken = base / "broken"
    shutil.copytree(done.parent, broken)
    (broken / "store" / "study.json").write_text('{"hash": "3f2a')
    before = files(broken / "store")
    for what, args in (("`query tests`", ("query", "tests", "store")),
                       ("`report`", ("report", "store", "--out", str(base / "report"))),
                       ("`status`", ("status", "store")),
                       ("`launch` of the store's own study", ("launch", "study.toml"))):
        rc, took, last = run(broken, *args)
        add(f"{what} with study.json cut short", rc, took, last,
            lost(before, files(broken / "store")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="distsim-faults-"))
    rows: list[tuple[str, str, int, float, str]] = []

    def add(what: str, rc: int, took: float, last: str, lost_: str) -> None:
        rows.append((what, last[:160], rc, took, lost_))
        print(f"{what}: exit {rc} in {took:.1f} s; {lost_}; {last[:160]}", flush=True)

    try:
        # interrupts: one study, stopped in each stage in turn
        chain = study_dir(base, "chain")
        for stage, sig, twice in (("zoo", signal.SIGINT, True), ("features", signal.SIGTERM, False),
                                  ("pairs", signal.SIGINT, False), ("tests", signal.SIGINT, False)):
            rc, took, last, lost_ = interrupt(chain, stage, sig, twice)
            name = signal.Signals(sig).name + (" twice" if twice else "")
            add(f"{name} during {stage}", rc, took, last, lost_)
        rc, took, last = run(chain, "launch", "study.toml")
        add("relaunch after the 4 interrupts", rc, took, last, "nothing")
        done = chain / "store"

        # a finished store, then faults against it
        before = files(done)
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{port.getsockname()[1]}"
        port.close()
        rc, took, last = run(chain, "launch", "study.toml", "--fresh", "--yes", "--address",
                             address)
        add("`launch --fresh --address HOST:PORT`, nobody there", rc, took, last,
            lost(before, files(done)))

        busy = study_dir(base, "busy")
        log = busy / "holder.log"
        holder = subprocess.Popen([DISTSIM, "launch", "study.toml"],
                                  cwd=busy, env=env(DISTSIM_FAULTS="slow=1"),
                                  stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        while "zoo       0/" not in log.read_text():
            time.sleep(0.05)
        rc, took, last = run(busy, "launch", "study.toml")
        add("a second launch of a running study", rc, took, last, "nothing (the first goes on)")
        os.killpg(holder.pid, signal.SIGINT)
        holder.wait(timeout=120)

        for name, extra, res in (
            ("`device = \"cuda\"`, no GPU", "device = \"cuda\"", "gpus_per_trial = 1"),
            ("`cpus_per_trial = 64` on 2 CPUs", "", "cpus_per_trial = 64"),
        ):
            folder = study_dir(base, name.split("`")[1].split()[0], extra, res)
            rc, took, last = run(folder, "launch", "study.toml")
            add(name, rc, took, last, "nothing (store not created)"
                if not files(folder / "store") else "store written!")

        for name, text in (
            ("validate `num_tasks = 1000` on digits",
             STUDY.replace('dataset = "synthetic"', 'dataset = "digits"').replace(
                 "num_tasks = 4", "num_tasks = 1000")),
            ("validate a store path that is a file", STUDY.replace('store = "store"',
                                                                  'store = "afile"')),
            ("validate a missing npz", STUDY.replace('dataset = "synthetic"',
                                                     'dataset = "npz"\npath = "none.npz"')),
            ("validate open-set with 2 tasks", STUDY.replace("num_tasks = 4", "num_tasks = 2")),
        ):
            folder = base / name.replace(" ", "_").replace("`", "")
            folder.mkdir()
            (folder / "study.toml").write_text(text.format(train_extra="", resources=""))
            (folder / "afile").write_text("x")
            rc, took, last = run(folder, "validate", "study.toml")
            add(name, rc, took, last, "nothing")

        for sql in ("SELECT * FROM read_csv('/etc/os-release')", "DELETE FROM models",
                    "DROP TABLE models", "CREATE TABLE t AS SELECT * FROM models"):
            rc, took, last = run(chain, "query", "sql", "store", sql)
            add(f"`query sql \"{sql}\"`", rc, took, last, lost(before, files(done)))
        rc, took, last = run(chain, "query", "models", "store", "--arch", "transformer")
        add("`query models --arch transformer`", rc, took, last, "nothing")

        sys_folder = study_dir(base, "systematic")
        rc, took, last = run(sys_folder, "launch", "study.toml",
                             DISTSIM_FAULTS="trial=1,times=9")
        add("every trial fails (`DISTSIM_FAULTS=trial=1`)", rc, took, last, "nothing")
        ten = study_dir(base, "ten")
        rc, took, last = run(ten, "launch", "study.toml",
                             DISTSIM_FAULTS="trial=0.1,feature=0.1,tile=0.1,test=0.1,seed=3")
        add("10% of trials, feature packs, tiles, test chunks fail once", rc, took, last,
            "nothing")
        rc, took, last = run(ten, "verify", "store")
        add("verify after the faulty launch", rc, took, last, "nothing")

        damaged = base / "damaged"
        shutil.copytree(done, damaged / "store")
        shard = sorted((damaged / "store" / "models").rglob("*.parquet"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        (damaged / "store" / "tests" / ".tmp-1-x-y.parquet.partial").write_text("x")
        rc, took, last = run(damaged, "verify", "store")
        add("verify a store with a truncated shard and a temp file", rc, took, last, "nothing")
        disk_rows(base, done, add)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    table = ["| fault or bad input | exit | time to the end (s) | last line | lost |",
             "|---|---|---|---|---|"]
    table += [f"| {w} | {rc} | {t:.1f} | {last.replace('|', '/')} | {lo} |"
              for w, last, rc, t, lo in rows]
    table.append(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
