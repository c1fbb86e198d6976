"""Kill `distsim launch` (SIGKILL) in the middle of the zoo stage, launch again: the study
completes with exactly tasks x seeds models, none duplicated, none retrained; a third launch
of the finished study runs nothing and changes nothing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from _procs import DISTSIM, kill_when, launch_env

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

TASKS, SEEDS = 4, 6

# The study's sections, for the `study_toml` fixture; its store is "store" beside the study file.
SECTIONS = {
    "study": {"name": "resume", "store": "store"},
    "data": {"dataset": "synthetic", "num_tasks": TASKS, "synthetic_samples": 80},
    "arch": [{"kind": "mlp", "widths": [16]}],
    "train": {"seeds_per_task": SEEDS, "seeds_per_trial": 1, "epochs": 10, "batch_size": 16},
    "tests": {"permutations": 9, "permanova_permutations": 9, "chunk_size": 5},
    "pairs": {"top_k": 3, "block": 8},
}


def _files(store: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (mtime_ns, size)} of every table and marker file (Tune's folder aside)."""
    return {
        str(p.relative_to(store)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in store.rglob("*") if p.is_file() and "_tune" not in p.parts
    }


def test_sigkill_mid_zoo_then_resume_then_noop(tmp_path: Path, study_toml) -> None:
    (tmp_path / "study.toml").write_text(study_toml(**SECTIONS))
    store = tmp_path / "store"
    models_dir = store / "models" / "arch=mlp"
    kill_when([DISTSIM, "launch", "study.toml"], tmp_path, tmp_path / "first.log",
              lambda: models_dir.is_dir() and len(list(models_dir.glob("*.parquet"))) >= 6,
              poll=0.05)
    finished = sorted(p.name for p in models_dir.glob("*.parquet"))
    assert 6 <= len(finished) < TASKS * SEEDS, f"killed too late: {len(finished)} packs done"
    before = _files(store)
    kept = {k: v for k, v in before.items()
            if k.startswith(("models/", "weights/")) and k.split("/")[-1] in finished}
    assert len(kept) == 2 * len(finished)

    second = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=tmp_path, env=launch_env(),
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"({len(finished)} already in store)" in second.stderr
    print(f"killed with {len(finished)} of {TASKS * SEEDS} packs stored; relaunch: "
          + next(line for line in second.stderr.splitlines() if "already in store" in line))

    import polars as pl

    from distsim.store import Store

    models = Store(store).scan("models").collect()
    assert models.height == TASKS * SEEDS
    assert models["model_id"].n_unique() == TASKS * SEEDS
    assert sorted(models.group_by("task").len()["len"].to_list()) == [SEEDS] * TASKS
    assert (models["status"] == "ok").all()
    after = _files(store)
    assert {k: after[k] for k in kept} == kept, (
        "a pack that had finished was trained or written again")
    assert not list(store.rglob(".tmp-*")), "a temp file survived"
    tests = Store(store).scan("tests").collect()
    assert tests.height > 0 and tests.filter(pl.col("p_value").is_null()).height == 0

    t0 = time.monotonic()
    third = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=tmp_path, env=launch_env(),
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "nothing to run" in third.stderr
    assert _files(store) == after, "a launch of a finished study changed the store"
    print(f"no-op launch: {time.monotonic() - t0:.1f} s")
