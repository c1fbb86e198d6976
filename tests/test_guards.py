"""The launch's guards without Ray: the store lock (one launch per store, stale takeover,
never deletes outside the store), the signal guard, the fresh wipe (only what distsim
wrote, never through a symlink), the fault-injection knob."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _study import study_toml

from distsim.config import parse_study
from distsim.errors import StoreError
from distsim.pipeline import faults
from distsim.pipeline.signals import Interrupted, StopOnSignals
from distsim.store import Store
from distsim.store.lock import LOCK_NAME, StoreLock


def test_a_second_lock_names_the_holder_and_the_first_is_released(tmp_path: Path) -> None:
    with StoreLock(tmp_path, io.StringIO()):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(StoreError, match=rf"in use by another launch \(pid {os.getpid()} on "
                                             rf"host '{socket.gethostname()}', since "):
            StoreLock(tmp_path, io.StringIO()).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_dead_launchs_lock_is_taken_over_with_a_notice(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": "then"}))
    out = io.StringIO()
    with StoreLock(tmp_path, out):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the launch lock of pid {dead} (started then)" in out.getvalue()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path: Path) -> None:
    # this very process, but a different start time: the holder died and its pid was reused
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "process_start": "1", "started": "x"}))
    with StoreLock(tmp_path, io.StringIO()):
        pass


def test_another_hosts_lock_is_never_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(StoreError, match=rf"pid 1 on host 'elsewhere', since t\); wait for it to "
                                         rf"end or stop it; if no launch is running there, "
                                         rf"delete '{tmp_path / LOCK_NAME}'"):
        StoreLock(tmp_path, io.StringIO()).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def test_a_lock_that_is_a_symlink_is_neither_followed_nor_deleted_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999}))
    store = tmp_path / "store"
    store.mkdir()
    (store / LOCK_NAME).symlink_to(outside)
    with pytest.raises(StoreError, match="unknown launch"):
        StoreLock(store, io.StringIO()).acquire()
    assert outside.exists() and (store / LOCK_NAME).is_symlink()


def test_the_first_signal_interrupts_and_later_ones_are_ignored() -> None:
    out = io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, StopOnSignals(out) as guard:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: raises here
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # while stopping: noted, not raised
    assert caught.value.exit_code == 143 and guard.signum == signal.SIGTERM
    assert "SIGINT again: already stopping" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_fresh_wipes_only_what_distsim_wrote(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.parquet").write_text("not a shard")
    study = parse_study(study_toml(study={"name": "w", "store": str(tmp_path / "s")}))
    store = Store(study.store)
    store.check_study(study)
    store.write_shard("models", {"arch": "mlp", "task": 0, "pack": 0},
                      [{"model_id": "mlp-t0-s0", "seed": 0, "status": "ok"}])
    store.mark_stage("zoo")
    (store.root / "models" / "arch=mlp" / "notes.txt").write_text("mine")
    (store.root / "models" / "link").symlink_to(outside)
    (store.root / "README.txt").write_text("mine too")
    (store.root / ".tmp-1-x-a.parquet.partial").write_text("crashed writer")
    (store.root / LOCK_NAME).write_text("{}")
    assert store.check_study(study, fresh=True) == "fresh"
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == sorted(["outside", "outside/precious.parquet", "s", f"s/{LOCK_NAME}",
                           "s/README.txt", "s/models", "s/models/arch=mlp",
                           "s/models/arch=mlp/notes.txt", "s/models/link", "s/study.json"])


def test_the_fault_knob_is_parsed_strictly_and_chooses_by_seed() -> None:
    assert faults.plan("") == {}
    assert faults.plan("trial=0.1, tile=1,seed=3,times=2,slow=0.5") == {
        "trial": 0.1, "tile": 1.0, "seed": 3.0, "times": 2.0, "slow": 0.5}
    for bad in ("trial=2", "gpu=0.1", "seed=1.5", "trial"):
        with pytest.raises(ValueError, match=f"DISTSIM_FAULTS: '{bad}' is not"):
            faults.plan(bad)
    units = [f"u{i}" for i in range(2000)]
    share = sum(faults.chosen("tile", u, {"tile": 0.1, "seed": 1}) for u in units) / len(units)
    assert 0.08 < share < 0.12
    assert [faults.chosen("tile", u, {"tile": 0.1, "seed": 1}) for u in units] == [
        faults.chosen("tile", u, {"tile": 0.1, "seed": 1}) for u in units]
    assert not any(faults.chosen("trial", u, {"tile": 1.0}) for u in units)
