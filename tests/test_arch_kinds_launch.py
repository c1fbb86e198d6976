"""A study of each new architecture kind (``resnet``, ``transformer``) end to end: the Tune zoo
(packed, with checkpoints), every feature method at every layer, pairs, tests, the report,
``load_model`` (its predictions give the stored test accuracy) and ``distsim export`` read back
by an import study (the same features)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from _study import study_toml

import distsim
from distsim.config import load_study
from distsim.export import export_models
from distsim.pipeline.launch import run_study
from distsim.report import write_report
from distsim.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

ARCHS = [{"name": "resnet", "kind": "resnet", "channels": [3, 4]},
         {"name": "transformer", "kind": "transformer", "d_model": 4, "heads": 2, "depth": 1,
          "hidden": 6, "pooling": "mean"}]
METHODS = ["chain-gram", "gram", "raw", "aligned", "cka"]
TESTS = {"permutations": 9, "permanova_permutations": 9, "chunk_size": 5}


@pytest.fixture(scope="module")
def launched(ray_session, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kinds")
    (folder / "kinds.toml").write_text(study_toml(
        study={"name": "kinds", "store": "store"},
        data={"dataset": "digits", "num_tasks": 4},
        arch=ARCHS,
        train={"seeds_per_task": 4, "seeds_per_trial": 4, "epochs": 2, "batch_size": 32,
               "lr": 0.05, "momentum": 0.9, "save_epochs": [0],
               "transformer": {"optimizer": "adam", "lr": 0.003, "momentum": 0.0}},
        features={"methods": METHODS, "layers": "all", "template_models": 6},
        tests=TESTS, pairs={"top_k": 2, "block": 8}))
    run_study(load_study(folder / "kinds.toml"), stream=io.StringIO())
    return folder


def test_every_model_layer_method_and_epoch_has_its_tests(launched: Path) -> None:
    res = distsim.open(launched / "store")
    models = res.models()
    assert models.height == 2 * 4 * 4 * 2  # archs x tasks x seeds x epochs (0 and 2)
    assert (models["status"] == "ok").all()
    tests = res.tests().filter(pl.col("protocol") == "closed-set")
    for arch in ("resnet", "transformer"):
        layers = res.study.feature_layers(arch)
        got = tests.filter(pl.col("arch") == arch).select("layer", "method", "epoch").unique()
        assert got.height == len(layers) * len(METHODS) * 2, arch
        for layer in layers:
            for method in METHODS:
                ids, _, X = res.features(arch, layer, method, epoch=2)
                assert len(ids) == 16 and np.isfinite(X).all() and X.std(axis=0).max() > 0
    assert write_report(Store(launched / "store")).is_file()


@pytest.mark.parametrize("arch", ["resnet", "transformer"])
def test_a_loaded_model_gives_its_stored_test_accuracy(launched: Path, arch: str) -> None:
    res = distsim.open(launched / "store")
    row = res.models().filter(pl.col("arch") == arch, pl.col("epoch") == 2).row(0, named=True)
    net, task = res.load_model(row["model_id"]), res.task(row["task"])
    with torch.no_grad():
        hits = net(torch.as_tensor(task.x_test)).argmax(1).numpy() == task.y_test
    assert float(hits.mean()) == pytest.approx(row["test_acc"], abs=1e-9)
    assert not net.training  # eval mode: a ResNet's BatchNorm on its running statistics


def test_an_exported_resnet_imports_with_the_same_features(launched: Path,
                                                           tmp_path: Path) -> None:
    export_models(launched / "store", tmp_path / "export", arch="resnet")
    res = distsim.open(launched / "store")
    arch = res.arch_config("resnet", 0)
    (tmp_path / "back.toml").write_text(study_toml(
        study={"name": "back", "store": "store"}, data=None, train=None,
        zoo={"source": "import", "format": "distsim-export", "path": str(tmp_path / "export")},
        arch=[{"name": "resnet", "kind": "resnet", "channels": list(arch.channels),
               "input_shape": list(arch.input_shape), "num_classes": arch.num_classes}],
        features={"methods": ["chain-gram", "gram", "raw"], "layers": "all"},
        tests=TESTS, pairs={"top_k": 2, "block": 8}))
    run_study(load_study(tmp_path / "back.toml"), stream=io.StringIO())
    after = distsim.open(tmp_path / "store")
    for layer in res.study.feature_layers("resnet"):
        for method in ("chain-gram", "gram", "raw"):  # (aligned: its template is the study's)
            ids0, _, X0 = res.features("resnet", layer, method, epoch=2)
            ids1, _, X1 = after.features("resnet", layer, method)
            order = [ids1.index(f"{i}") for i in ids0]
            np.testing.assert_allclose(X1[order], X0, rtol=1e-5, atol=1e-6 * np.abs(X0).max())
