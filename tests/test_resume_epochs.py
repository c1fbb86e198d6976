"""Kill `distsim launch` (SIGKILL, its whole session) once in each stage of a sweep that tests
several factors along training (``[tests] factors``, ``[train] save_epochs``), launching again
after each kill: the finished store holds every model, feature row and test once, verifies,
and its tests equal an uninterrupted run's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _procs import DISTSIM, kill_when, launch_env
from _study import study_toml

from distsim.store import Store
from distsim.store.verify import verify_store

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

STUDY = study_toml(
    data={"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 60},
    arch=[{"kind": "mlp", "widths": [8]}],
    train={"seeds_per_task": 3, "seeds_per_trial": 1, "epochs": 3, "batch_size": 16,
           "save_epochs": [0, 1]},
    sweep={"lr": [0.02, 0.2]},
    features={"methods": ["chain-gram"], "layers": "last"},
    tests={"factors": ["task", "lr"], "protocols": ["closed-set"], "permutations": 9,
           "permanova_permutations": 9, "chunk_size": 3},
    pairs={"top_k": 3, "block": 8})
# the stages in order, each with the table whose first shard says it has begun
STAGES = (("zoo", "models"), ("features", "features"), ("pairs", "pairs"), ("tests", "tests"))
TESTS_KEY = ["method", "layer", "protocol", "factor", "epoch"]


def _shards(store: Path, table: str) -> int:
    folder = store / table
    return len([p for p in folder.rglob("*.parquet") if not p.name.startswith(".tmp")]
               ) if folder.is_dir() else 0


def _kill_in(folder: Path, table: str) -> None:
    """Launch (every unit slowed by 0.3 s), SIGKILL its session once `table` has a shard."""
    kill_when([DISTSIM, "launch", "study.toml"], folder, folder / f"{table}.log",
              lambda: _shards(folder / "store", table) >= 1,
              env=launch_env(DISTSIM_FAULTS="slow=0.3"), timeout=200)


def _launch(folder: Path) -> None:
    done = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=folder, env=launch_env(),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


def test_killed_once_in_every_stage_it_finishes_as_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, killed):
        folder.mkdir()
        (folder / "study.toml").write_text(STUDY)
    _launch(reference)
    whole = Store(reference / "store")
    totals = {table: _shards(reference / "store", table) for _, table in STAGES}
    for stage, table in STAGES:
        _kill_in(killed, table)
        held = _shards(killed / "store", table)
        assert 1 <= held < totals[table], f"the kill missed the {stage} stage ({held} shards)"
    _launch(killed)
    store = Store(killed / "store")
    assert verify_store(store) == []
    assert not list((killed / "store").rglob(".tmp-*")), "a temp file survived"

    models = store.scan("models").collect()
    assert models.height == models["model_id"].n_unique() == 4 * 2 * 3 * 3  # x 3 epochs
    assert sorted(models["epoch"].unique().to_list()) == [0, 1, 3]
    features = store.scan("features").collect()
    assert features.height == features["model_id"].n_unique() == models.height

    want = whole.scan("tests").collect().sort(TESTS_KEY)
    got = store.scan("tests").collect().sort(TESTS_KEY)
    assert got.select(TESTS_KEY).equals(want.select(TESTS_KEY))
    # 3 epochs x (closed-set of task and of lr, PERMANOVA's two terms, PERMDISP of each)
    assert got.height == 3 * 6
    assert got["p_value"].to_list() == want["p_value"].to_list()
    np.testing.assert_allclose(got["observed"].to_numpy(), want["observed"].to_numpy(),
                               rtol=1e-9)
    assert (got.filter(pl.col("protocol") == "permanova")["extra"]
            .str.contains('"by": "terms"').all())
