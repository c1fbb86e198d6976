"""Kill `distsim launch` (SIGKILL) in the middle of the zoo stage of a sweep and of an import,
launch again: every model once, the packs that had finished untouched (as tests/test_resume.py
checks for a plain study)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
from _procs import DISTSIM, kill_when, launch_env
from _study import study_toml

from distsim.config.arch import ArchConfig
from distsim.store import Store
from distsim.zoo import fixtures

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]



def _kill_mid_zoo_then_resume(folder: Path, expected: int) -> tuple[pl.DataFrame, str]:
    """Launch, SIGKILL once 4 models shards exist, launch again; (models, second stderr)."""
    models_dir = folder / "store" / "models"
    kill_when([DISTSIM, "launch", "study.toml"], folder, folder / "first.log",
              lambda: models_dir.is_dir() and len(list(models_dir.rglob("*.parquet"))) >= 4)
    done = {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.parquet")
            if not p.name.startswith(".tmp")}
    assert 4 <= len(done), f"killed too early: {len(done)} shards"
    second = subprocess.run([DISTSIM, "launch", "study.toml"], cwd=folder, env=launch_env(),
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done, "a finished pack was redone"
    models = Store(folder / "store").scan("models").collect()
    assert models.height == models["model_id"].n_unique() == expected
    assert (models["status"] == "ok").all()
    assert not list((folder / "store").rglob(".tmp-*")), "a temp file survived"
    return models, second.stderr


def test_a_sweep_killed_mid_zoo_resumes(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(study_toml(
        data={"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 80},
        arch=[{"kind": "mlp", "widths": [16]}],
        train={"seeds_per_task": 3, "seeds_per_trial": 1, "epochs": 10, "batch_size": 16},
        sweep={"lr": [0.02, 0.2]},
        tests={"permutations": 9, "permanova_permutations": 9, "chunk_size": 5},
        pairs={"top_k": 3, "block": 8}))
    models, _ = _kill_mid_zoo_then_resume(tmp_path, 4 * 2 * 3)
    counts = models.with_columns(models["factors"].str.json_decode().struct.field("lr"))
    assert sorted(counts.group_by("task", "lr").len()["len"].to_list()) == [3] * 8


def test_an_import_killed_mid_zoo_resumes(tmp_path: Path) -> None:
    cnn = ArchConfig(kind="cnn", channels=(4, 8), input_shape=(1, 8, 8), num_classes=2)
    root = fixtures.write_model_zoos(tmp_path / "zoo", cnn, seeds=100, epochs=1, train=False)
    (tmp_path / "study.toml").write_text(study_toml(
        {"study": {"name": "imp", "store": "store"},
         "zoo": {"source": "import", "format": "model-zoos", "path": str(root),
                 "epochs": "all", "pack_size": 2},
         "arch": [{"kind": "cnn", "channels": [4, 8], "input_shape": [1, 8, 8],
                   "num_classes": 2}],
         "features": {"methods": ["raw"], "layers": "last"},
         "tests": {"protocols": [], "permanova_permutations": 0}}))
    _, stderr = _kill_mid_zoo_then_resume(tmp_path, 200 * 2)
    assert "already in store" in stderr
