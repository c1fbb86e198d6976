"""export_models: safetensors + JSON sidecars of a tiny 3-arch zoo (mlp, cnn, rnn: the session's
finished store, tests/conftest.py `finished_study`) that rebuild the models with safetensors and
distsim.zoo.models alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

import distsim
from distsim.config.arch import ArchConfig
from distsim.errors import StoreError
from distsim.export import export_models
from distsim.results import Results
from distsim.zoo.models import build

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

ARCHS = ("mlp", "cnn", "rnn")


@pytest.fixture(scope="module")
def res(finished_study: Path) -> Results:
    """The shared finished store: 4 synthetic tasks x 3 seeds of a tiny mlp, cnn and rnn (read
    only; a test that changes it copies it first)."""
    return distsim.open(finished_study)


def _rebuild(folder: Path, stem: str) -> tuple[torch.nn.Module, dict]:
    """The model of <stem>.json / <stem>.safetensors, by safetensors and distsim.zoo.models
    alone."""
    doc = json.loads((folder / f"{stem}.json").read_text())
    net = build(ArchConfig(**doc["arch"]))
    net.load_state_dict(load_file(folder / doc["weights"]))
    return net.eval(), doc


@pytest.mark.parametrize("arch", ARCHS)
def test_one_file_per_model_rebuilds_the_same_predictions(res: Results, arch: str,
                                                          tmp_path: Path) -> None:
    ids = [f"{arch}-t0-s1", f"{arch}-t1-s3", f"{arch}-t1-s5"]
    written = export_models(res, tmp_path, model_ids=ids)
    assert written == [tmp_path / f"{m}.{ext}" for m in ids for ext in ("safetensors", "json")]
    for mid in ids:
        net, doc = _rebuild(tmp_path, mid)
        row = res.model(mid)
        task = res.task(row["task"])
        want = res.load_model(mid)
        x = torch.from_numpy(task.x_test)
        with torch.no_grad():
            assert torch.equal(net(x), want(x))
        shapes = {k: list(v.shape) for k, v in want.state_dict().items()}
        assert doc["tensors"] == shapes and list(doc["tensors"]) == list(shapes)  # in order
        assert set(load_file(tmp_path / f"{mid}.safetensors")) == set(shapes)
        assert doc["model_id"] == mid and doc["metrics"]["test_acc"] == row["test_acc"]
        assert doc["metrics"]["status"] == "ok" and doc["metrics"]["seed"] == row["seed"]
        assert doc["task"] == {"id": task.task_id, "name": task.name,
                               "classes": list(task.classes), "input_shape": [1, 8, 8],
                               "num_classes": 2}
        assert doc["study"] == {"name": "three", "hash": res.study.hash} == {
            "name": "three", "hash": res.config_hash}
        assert doc["distsim_version"] == distsim.__version__
        assert doc["arch"]["kind"] == arch and doc["arch"]["name"] == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stacked_arch_holds_every_ok_model_in_order(res: Results, arch: str,
                                                      tmp_path: Path) -> None:
    written = export_models(res.store, tmp_path, arch=arch)
    assert written == [tmp_path / f"{arch}.safetensors", tmp_path / f"{arch}.json"]
    doc = json.loads(written[1].read_text())
    stacked = load_file(written[0])
    ids = doc["model_ids"]
    assert ids == [f"{arch}-t{t}-s{s}" for t in range(4) for s in range(3 * t, 3 * t + 3)]
    assert [m["model_id"] for m in doc["models"]] == ids
    assert doc["tensors"] == {k: list(v.shape) for k, v in stacked.items()}
    assert [t["id"] for t in doc["tasks"]] == [0, 1, 2, 3]
    net = build(ArchConfig(**doc["arch"]))
    assert set(stacked) == set(net.state_dict())
    for i, mid in enumerate(ids):
        want = res.load_model(mid).state_dict()
        assert all(torch.equal(stacked[k][i], want[k]) for k in want)
        assert doc["models"][i]["test_acc"] == res.model(mid)["test_acc"]
    net.load_state_dict({k: v[4] for k, v in stacked.items()})
    x = torch.from_numpy(res.task(1).x_test)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), res.load_model(ids[4])(x))


def test_no_selection_stacks_every_arch(res: Results, tmp_path: Path) -> None:
    written = export_models(str(res.store.root), tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{a}.{ext}" for a in ARCHS for ext in ("safetensors", "json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_failed_models_are_left_out_of_the_stack_and_refused_by_id(res: Results,
                                                                   tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(res.store.root, copy)
    other = distsim.open(copy)
    nan = float("nan")
    other.store.write_shard("models", {"arch": "mlp", "task": 1, "pack": 1}, {
        "model_id": ["mlp-t1-s9"], "task_name": ["synthetic:1"], "seed": [9],
        "trial_id": ["x"], "status": ["failed"], "train_acc": [nan], "test_acc": [nan],
        "train_loss": [nan], "test_loss": [nan], "epochs": [0], "seconds": [nan],
        "node": [None], "error": ["boom"]})
    assert other.models().filter(pl.col("status") == "failed").height == 1  # type: ignore
    doc = json.loads(export_models(other, tmp_path / "out", arch="mlp")[1].read_text())
    assert "mlp-t1-s9" not in doc["model_ids"] and len(doc["model_ids"]) == 12
    with pytest.raises(StoreError, match="mlp-t1-s9: its training failed"):
        export_models(other, tmp_path / "out", model_ids=["mlp-t1-s9"])


def test_bad_selections_are_store_errors(res: Results, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not both"):
        export_models(res, tmp_path, model_ids=["mlp-t0-s0"], arch="mlp")
    with pytest.raises(StoreError, match="the study has archs mlp, cnn, rnn"):
        export_models(res, tmp_path, arch="gru")
    with pytest.raises(StoreError, match="'mlp-t7-s0': no such model"):
        export_models(res, tmp_path, model_ids=["mlp-t0-s0", "mlp-t7-s0"])
    assert not list(tmp_path.iterdir())  # nothing written before the selection is checked


def test_sidecars_are_strict_json(res: Results, tmp_path: Path) -> None:
    for path in export_models(res, tmp_path, model_ids=["rnn-t1-s4"], arch=None):
        if path.suffix == ".json":
            doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
            assert np.isfinite(doc["metrics"]["seconds"])


def test_the_export_command_writes_what_export_models_writes(res: Results, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distsim.cli import app

    runner = CliRunner()
    root = str(res.store.root)
    one = runner.invoke(app, ["export", root, "--model", "mlp-t0-s1", "--model", "cnn-t1-s3",
                              "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "cnn-t1-s3.json", "cnn-t1-s3.safetensors", "mlp-t0-s1.json", "mlp-t0-s1.safetensors"]
    net, _ = _rebuild(tmp_path / "one", "cnn-t1-s3")
    x = torch.from_numpy(res.task(1).x_test)
    with torch.no_grad():
        assert torch.equal(net(x), res.load_model("cnn-t1-s3")(x))
    zoo = runner.invoke(app, ["export", root, "--arch", "rnn", "--out", str(tmp_path / "zoo")])
    assert zoo.exit_code == 0, zoo.output
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["rnn.json",
                                                                    "rnn.safetensors"]
    for args in (["--out", str(tmp_path / "x")],  # neither --model nor --arch
                 ["--model", "mlp-t0-s1", "--arch", "mlp", "--out", str(tmp_path / "x")],
                 ["--model", "mlp-t9-s9", "--out", str(tmp_path / "x")]):
        bad = runner.invoke(app, ["export", root, *args])
        assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and (
            len(bad.stderr.splitlines()) == 1), bad.stderr
    assert not (tmp_path / "x").exists()
