"""Stopping a launch from outside, as a user would from a terminal or a scheduler: Ctrl-C or
SIGTERM in each stage ends the whole launch with one line and exit 130 / 143, nothing
downstream runs, nothing is half-written, no Ray process stays; a second launch of a running
study exits 2 at once naming the holder; ``--fresh`` with a bad address deletes nothing; a
relaunch finishes the study and ``distsim verify`` finds it sound."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import kill_session, session_pids
from _study import study_toml

from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

DISTSIM = str(Path(sys.executable).with_name("distsim"))
SECTIONS = {
    "study": {"name": "interrupt", "store": "store"},
    "data": {"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 60},
    "arch": [{"kind": "mlp", "widths": [8]}],
    "train": {"seeds_per_task": 2, "seeds_per_trial": 1, "epochs": 2, "batch_size": 16},
    "tests": {"permutations": 9, "permanova_permutations": 9, "chunk_size": 5},
    "pairs": {"top_k": 2, "block": 4},
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return env


def _start(cwd: Path, log: Path, *args: str, slow: float = 0.0) -> subprocess.Popen:
    env = _env(DISTSIM_FAULTS=f"slow={slow}") if slow else _env()
    return subprocess.Popen([DISTSIM, "launch", "study.toml", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"launch ended before {text!r}: {log.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {timeout} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen, sig: int, group: bool, twice: bool = False) -> tuple[int, float]:
    """Send `sig` (to the launch's whole process group, as a terminal does, when `group`;
    again 0.3 s later when `twice`: after the first is handled (the driver is back in Python
    every units.WAIT_S = 0.1 s; two signals before that are one), before the stop ends (it
    shuts Ray down: about 2 s here; a signal after the launch ended tests nothing)); wait for
    the launch to end: (exit code, seconds)."""
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    if twice:
        time.sleep(0.3)
        (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
    return rc, time.monotonic() - t0


def test_interrupt_each_stage_then_resume(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(study_toml(**SECTIONS))
    store = Store(tmp_path / "store")
    stages = ["zoo", "features", "pairs", "tests"]
    report = []
    for n, stage in enumerate(stages):
        log = tmp_path / f"{stage}.log"
        proc = _start(tmp_path, log, slow=1.0)
        _wait_for(log, f"{stage:<9} 0/", proc)
        if stage == "zoo":  # a second launch of the same study while this one runs
            second = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=tmp_path, env=_env(),
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"in use by another launch (pid {proc.pid} on host" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        time.sleep(0.5)
        sig = signal.SIGTERM if stage == "features" else signal.SIGINT
        rc, took = _stop(proc, sig, group=stage != "features", twice=stage == "pairs")
        text = log.read_text()
        assert rc == 128 + sig, text
        last = text.strip().splitlines()[-1]
        assert last.startswith(f"distsim: interrupted by {sig.name} during {stage} after"), text
        assert "the same launch again resumes" in last
        assert "Traceback" not in text and "SIGTERM received" not in text, text
        if stage == "pairs":  # the second Ctrl-C, while the launch stops
            assert "SIGINT again: already stopping" in text
        assert took < 30, f"stopping took {took:.1f} s"
        assert not session_pids(proc.pid), "a process of the launch survived it"
        assert not list(store.root.rglob(".tmp-*")), "a temp file was left"
        assert not (store.root / "_launch.lock").exists(), "the lock was not released"
        marked = set(store.stages())
        assert marked == set(stages[:n]), f"stages marked done: {marked}"  # nothing downstream
        note = json.loads((store.root / "_stages" / "unfinished" / f"{stage}.json").read_text())
        assert note["runs"] == 1 and note["seconds"] > 0, note  # the stopped run's time is kept
        report.append(f"{stage}: exit {rc} in {took:.1f} s; {last.split('; ')[1]}")
    print("\n".join(report))

    final = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    verify = subprocess.run([DISTSIM, "verify", "store"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    models = store.scan("models").collect()
    assert models.height == 8 and models["model_id"].n_unique() == 8
    assert store.scan("tests").collect().height == 16  # 4 matrices x (2 HTT, PERMANOVA, PERMDISP)
    for stage, info in store.stages().items():  # each stage: its stopped run, then the last one
        assert info["runs"] == 2 and info["seconds_all_runs"] > info["seconds"], (stage, info)
    assert not list(store.root.glob("_stages/unfinished/*.json")), "a note was left behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fresh_with_a_bad_address_deletes_nothing(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(study_toml(**SECTIONS))
    store = Store(tmp_path / "store")
    store.write_shard("models", {"arch": "mlp", "task": 0, "pack": 0},
                      [{"model_id": "mlp-t0-s0", "seed": 0, "status": "ok"}])
    (tmp_path / "store" / "study.json").write_text('{"hash": "other", "name": "old"}')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    t0 = time.monotonic()
    proc = subprocess.run([DISTSIM, "launch", "study.toml", "--fresh", "--yes", "--address",
                           f"127.0.0.1:{_free_port()}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: cannot join the Ray cluster at "
                                                   "'127.0.0.1:")
    assert len(proc.stderr.splitlines()) == 2, proc.stderr  # the study line, then the error
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    print(f"--fresh with a bad address: exit 2 in {time.monotonic() - t0:.1f} s, nothing deleted")
