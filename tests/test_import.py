"""Import studies end to end: a zoo distsim did not train, read through every stage.

Each foreign layout is written by its fixture writer (distsim.zoo.fixtures, from the published
layout descriptions), imported by `distsim launch`, and run through features, pairs, tests and
`distsim report`. The round trip (a trained study -> `distsim export` -> an import study)
must give the same features and tests. Bad sources are one line and exit 2, or a recorded
failed model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from _study import FINISHED_STUDY, study_toml
from typer.testing import CliRunner

import distsim
from distsim.cli import app
from distsim.config import load_study
from distsim.config.arch import ArchConfig
from distsim.errors import IncompleteError, LaunchError
from distsim.export import export_models
from distsim.pipeline.launch import run_study
from distsim.zoo import fixtures

CNN = ArchConfig(kind="cnn", channels=(4, 8), input_shape=(1, 8, 8), num_classes=2)
FAST = {"permutations": 19, "permanova_permutations": 49, "chunk_size": 20}


def _study(folder: Path, fmt: str, path: Path, arch: ArchConfig = CNN, *, zoo: dict | None = None,
           tests: dict | None = None, features: dict | None = None, name: str = "imp") -> Path:
    """An import study file in `folder` (store `folder/store`) over the zoo at `path`."""
    text = study_toml(
        {"study": {"name": name, "store": str(folder / "store")},
         "zoo": {"source": "import", "format": fmt, "path": str(path), **(zoo or {})},
         "arch": [{"kind": arch.kind, "channels": list(arch.channels),
                   "widths": list(arch.widths), "activation": arch.activation,
                   "input_shape": list(arch.input_shape), "num_classes": arch.num_classes}],
         "features": {"methods": ["chain-gram", "raw"], "layers": "all", **(features or {})},
         "tests": {"protocols": ["closed-set"], **FAST, **(tests or {})},
         "pairs": {"top_k": 3, "block": 16}})
    file = folder / f"{name}.toml"
    file.write_text(text)
    return file


def _launch(file: Path, **kwargs: Any) -> tuple[dict[str, Any], str]:
    out = io.StringIO()
    result = run_study(load_study(file), stream=out, **kwargs)
    return result, out.getvalue()


def test_a_model_zoos_folder_runs_every_stage_grouped_by_learning_rate(ray_session,
                                                                       tmp_path: Path) -> None:
    """Model Zoos layout, every epoch a row, tests grouped by the config's optim::lr; the
    metadata reaches `query models`, the report draws."""
    root = fixtures.write_model_zoos(tmp_path / "zoo", CNN, seeds=3, epochs=2)
    file = _study(tmp_path, "model-zoos", root, zoo={"epochs": "all", "pack_size": 7},
                  tests={"group_by": "optim::lr"})
    result, text = _launch(file)
    assert result["stages"]["zoo"]["packs"] == 3  # 6 models x 3 checkpoints, 7 per pack
    res = distsim.open(tmp_path / "store")
    models = res.models()
    assert models.height == 18 and set(models["status"]) == {"ok"}
    assert {"optim::lr", "model::nlin", "seed", "epoch"} <= set(models.columns)
    assert models.schema["optim::lr"] == pl.Float64 and sorted(set(models["epoch"])) == [0, 1, 2]
    assert models["trial_id"].str.contains(r"/checkpoint_00000\d/checkpoints@[0-9a-f]{16}$").all()
    assert all(json.loads(m)["optim::lr"] == lr for m, lr in
               zip(models["source_meta"], models["optim::lr"], strict=True))
    tests = res.tests()
    assert set(tests["protocol"]) == {"closed-set", "permanova", "permdisp"}
    assert (tests["n_tasks"] == 2).all() and (tests["n_models"] == 18).all()
    assert "groups by 'optim::lr'" in " ".join(text.split())
    runner = CliRunner()
    shown = runner.invoke(app, ["query", "models", str(tmp_path / "store"), "--format", "csv",
                                "--limit", "0"])
    assert shown.exit_code == 0 and "optim::lr" in shown.output.splitlines()[0]
    report = runner.invoke(app, ["report", str(tmp_path / "store"), "--out",
                                 str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "index.html").is_file()


@pytest.mark.slow  # a launch per test: the fast tier keeps model-zoos and the round trip
def test_a_weights_table_of_tanh_cnns_groups_by_epoch(ray_session, tmp_path: Path) -> None:
    """Small CNN Zoo layout (TensorFlow kernels, metrics.csv.gz), tanh CNNs, every step a row,
    tests grouped by epoch: each epoch's models form one group."""
    tanh = ArchConfig(kind="cnn", channels=(4, 8), activation="tanh", input_shape=(1, 8, 8),
                      num_classes=2)
    root = fixtures.write_weights_table(tmp_path / "table", tanh, seeds=3, epochs=3, gz=True)
    file = _study(tmp_path, "weights-table", root, tanh, zoo={"epochs": "all"},
                  tests={"group_by": "epoch", "protocols": ["closed-set", "open-set"]})
    _launch(file)
    res = distsim.open(tmp_path / "store")
    models = res.models()
    assert models.height == 24 and (models["status"] == "ok").all()
    assert models["source"].str.contains(r"^weights\.npy#\d+$").all()
    assert "step" in models.columns and (models["step"] == models["epoch"]).all()
    tests = res.tests()
    assert (tests["n_tasks"] == 4).all() and set(tests["protocol"]) >= {"closed-set", "open-set"}


@pytest.mark.slow  # a launch per test: the fast tier keeps model-zoos and the round trip
def test_a_state_dicts_folder_takes_its_labels_from_folder_names(ray_session,
                                                                 tmp_path: Path) -> None:
    root = fixtures.write_state_dicts(tmp_path / "inrs", CNN, labels=("a", "b"), per_label=5,
                                      manifest=None)
    file = _study(tmp_path, "state-dicts", root, zoo={"labels": "folder"},
                  tests={"group_by": "label"})
    _launch(file)
    res = distsim.open(tmp_path / "store")
    models = res.models()
    assert models.height == 10 and sorted(set(models["label"])) == ["a", "b"]
    assert (res.tests()["n_tasks"] == 2).all()


@pytest.fixture(scope="module")
def exported(finished_study: Path, tmp_path_factory) -> Path:
    """The finished study's models, as `distsim export` writes them (stacked per arch)."""
    out = tmp_path_factory.mktemp("export")
    export_models(finished_study.parent / "store", out)
    return out


def test_the_round_trip_gives_the_original_features_and_tests(ray_session, finished_study: Path,
                                                              exported: Path,
                                                              tmp_path: Path) -> None:
    """trained study -> export -> import study: the mlp's features equal the original's to
    1e-6, the tests table's statistics and nulls equal (same models, same order, same seeds)."""
    original = load_study(finished_study)
    mlp = original.arch("mlp")
    sections = {k: v for k, v in FINISHED_STUDY.items()
                if k in ("features", "tests", "pairs")}
    text = study_toml(
        {"study": {"name": "back", "store": str(tmp_path / "store")},
         "zoo": {"source": "import", "format": "distsim-export", "path": str(exported)},
         "arch": [{"name": "mlp", "kind": "mlp", "widths": list(mlp.widths),
                   "input_shape": list(mlp.input_shape), "num_classes": mlp.num_classes}],
         **sections})
    (tmp_path / "back.toml").write_text(text)
    _launch(tmp_path / "back.toml")
    before = distsim.open(finished_study.parent / "store")
    after = distsim.open(tmp_path / "store")
    worst = 0.0
    for layer in original.feature_layers("mlp"):
        for method in original.features.methods:
            ids0, tasks0, X0 = before.features("mlp", layer, method)
            ids1, tasks1, X1 = after.features("mlp", layer, method)
            assert ids0 == ids1 and (tasks0 == tasks1).all()
            worst = max(worst, float(np.abs(X0 - X1).max() / max(1e-12, np.abs(X0).max())))
    assert worst <= 1e-6
    keep = ["layer", "method", "protocol", "observed", "chance", "null_mean", "p_value",
            "n_models", "n_tasks"]
    t0 = before.tests().filter(pl.col("arch") == "mlp").select(keep).sort(keep[:3])
    t1 = after.tests().select(keep).sort(keep[:3])
    assert t0.height == t1.height > 0
    for col in keep:
        a, b = t0[col].to_list(), t1[col].to_list()
        if t0.schema[col].is_float():
            np.testing.assert_allclose(np.array(a, float), np.array(b, float), rtol=1e-6,
                                       atol=1e-9)
        else:
            assert a == b, col
    rows = after.models()
    assert rows["model_id"].to_list() == before.models().filter(
        pl.col("arch") == "mlp", pl.col("status") == "ok")["model_id"].to_list()
    assert rows["source"].str.contains(r"^mlp\.safetensors#\d+$").all()
    # export of the imported study writes the provenance back out
    again = export_models(tmp_path / "store", tmp_path / "again", model_ids=[rows["model_id"][0]])
    doc = json.loads(next(p for p in again if p.suffix == ".json").read_text())
    assert doc["imported_from"]["format"] == "distsim-export"
    assert doc["metrics"]["source_hash"] == rows["source_hash"][0]


def test_bad_sources_are_one_line_and_exit_2_with_nothing_written(tmp_path: Path) -> None:
    """A missing path, an unknown format, a shape mismatch, a malformed manifest: `distsim
    launch` says one line and exits 2 before the store exists."""
    root = fixtures.write_state_dicts(tmp_path / "sd", CNN, per_label=2, train=False)
    runner = CliRunner()
    cases = {
        "missing": (_study(tmp_path, "state-dicts", tmp_path / "nowhere", name="missing"),
                    "nowhere"),
        "mismatch": (_study(tmp_path, "state-dicts", root, name="mismatch", arch=ArchConfig(
            kind="cnn", channels=(4, 6), input_shape=(1, 8, 8), num_classes=2)),
            "has shape"),
    }
    other = fixtures.write_state_dicts(tmp_path / "sd2", CNN, per_label=2, train=False)
    (other / "manifest.csv").write_text("file,label\na.pt,x\n")
    cases["manifest"] = (_study(tmp_path, "state-dicts", other, name="manifest"), "'path'")
    bad_format = _study(tmp_path, "state-dicts", root, name="format")
    bad_format.write_text(bad_format.read_text().replace('"state-dicts"', '"onnx"'))
    cases["format"] = (bad_format, "zoo.format")
    for name, (file, needle) in cases.items():
        got = runner.invoke(app, ["launch", str(file)])
        assert got.exit_code == 2, (name, got.output)
        lines = [line for line in got.output.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (name, got.output)
        assert not (tmp_path / "store").exists(), name


def test_a_corrupt_checkpoint_is_a_failed_model_and_a_fixed_one_is_read_again(
        ray_session, tmp_path: Path) -> None:
    """One truncated checkpoint: one line, one failed models row, the launch stops before
    features (IncompleteError) unless --partial; rewritten, the next launch reads only its pack
    and the features of the other packs are kept. A file touched without a change keeps its
    trial_id (nothing downstream is redone)."""
    root = fixtures.write_model_zoos(tmp_path / "zoo", CNN, seeds=2, epochs=1, train=False)
    files = sorted(root.glob("*/checkpoint_*1/checkpoints"))
    victim = files[-1]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    file = _study(tmp_path, "model-zoos", root, zoo={"pack_size": 2},
                  tests={"protocols": [], "permanova_permutations": 0})
    with pytest.raises(IncompleteError, match="zoo"):
        _launch(file)
    models = pl.read_parquet(tmp_path / "store" / "models" / "**" / "*.parquet")
    failed = models.filter(pl.col("status") == "failed")
    assert failed.height == 1 and str(victim.relative_to(root)) == failed["source"][0]
    assert "\n" not in failed["error"][0]
    _launch(file, partial=True)  # the other models go on to features
    victim.write_bytes(good)
    result, _ = _launch(file)
    assert result["stages"]["zoo"]["packs"] == 1  # only the pack that held the fixed file
    assert result["stages"]["features"]["packs"] == 1
    stamp = os.stat(files[0]).st_mtime_ns
    os.utime(files[0], ns=(stamp + 10**9, stamp + 10**9))  # touched, not changed
    result, _ = _launch(file)
    assert result["stages"]["zoo"]["packs"] == 1 and result["stages"]["features"]["packs"] == 0


@pytest.mark.slow  # a launch per test: the fast tier keeps model-zoos and the round trip
def test_a_removed_checkpoint_drops_its_pack_and_features(ray_session, tmp_path: Path) -> None:
    root = fixtures.write_model_zoos(tmp_path / "zoo", CNN, seeds=2, epochs=1, train=False)
    file = _study(tmp_path, "model-zoos", root, zoo={"pack_size": 3},
                  tests={"protocols": [], "permanova_permutations": 0})
    _launch(file)
    last = sorted(p for p in root.iterdir() if p.is_dir())[-1]
    shutil.rmtree(last)
    _launch(file)
    res = distsim.open(tmp_path / "store")
    assert res.models().height == 3
    ids, _, _ = res.features("cnn", "out", "raw")
    assert len(ids) == 3


@pytest.mark.parametrize("fmt", ["model-zoos", "weights-table", "state-dicts", "distsim-export"])
def test_each_example_job_validates_on_the_fixture_its_comment_writes(fmt: str,
                                                                      tmp_path: Path) -> None:
    """jobs/import-<fmt>.toml, copied into a folder laid out like the repository, validates on
    the zoo that `python -m distsim.zoo.fixtures` (the command in its comment) writes there."""
    name = "export" if fmt == "distsim-export" else fmt
    job = Path(__file__).parents[1] / "jobs" / f"import-{name}.toml"
    command = next(line for line in job.read_text().splitlines() if "distsim.zoo.fixtures" in line)
    args = command.split("distsim.zoo.fixtures", 1)[1].split()
    assert args[:2] == [fmt, f"stores/fixtures/{fmt}"]
    (tmp_path / "jobs").mkdir()
    shutil.copy(job, tmp_path / "jobs" / job.name)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert fixtures.main([*args[:2], "--models", "8", "--epochs", "1", "--no-train"]) == 0
    finally:
        os.chdir(cwd)
    got = CliRunner().invoke(app, ["validate", str(tmp_path / "jobs" / job.name)])
    assert got.exit_code == 0, got.output
    assert f"({fmt}" in got.output and "zoo: " in got.output


def test_a_model_exported_twice_is_refused_naming_both_files(tmp_path: Path) -> None:
    mlp = ArchConfig(kind="mlp", widths=(6,), input_shape=(1, 8, 8), num_classes=2)
    fixtures.write_distsim_export(tmp_path / "ex", mlp, tasks=2, seeds=2, train=False)
    fixtures.write_distsim_export(tmp_path / "ex", mlp, tasks=2, seeds=2, train=False,
                                  stacked=True)
    got = CliRunner().invoke(app, ["validate", str(_study(tmp_path, "distsim-export",
                                                         tmp_path / "ex", mlp))])
    assert got.exit_code == 2 and "model 'mlp-t0-s0' is also in mlp-t0-s0.json" in got.output
    assert "mlp.json" in got.output and len(got.output.strip().splitlines()) == 1


@pytest.mark.slow  # two launches
def test_a_label_fixed_in_the_manifest_regroups_the_tests(ray_session, tmp_path: Path) -> None:
    """The lineage holds the metadata too: a relabelled model's features, and the tests that
    group by the label, are recomputed; the tests then see the new groups."""
    root = fixtures.write_state_dicts(tmp_path / "sd", CNN, labels=("a", "b"), per_label=4,
                                      train=False)
    file = _study(tmp_path, "state-dicts", root, tests={"group_by": "label",
                                                        "permanova_permutations": 19})
    _launch(file)
    manifest = pl.read_csv(root / "manifest.csv")
    moved = manifest.filter(pl.col("label") == "a")["path"][:2]
    manifest.with_columns(pl.when(pl.col("path").is_in(moved)).then(pl.lit("c"))
                          .otherwise(pl.col("label")).alias("label")).write_csv(
        root / "manifest.csv")
    result, _ = _launch(file)
    assert result["stages"]["features"]["packs"] == 1 and result["stages"]["tests"]["tests"] > 0
    moved_one = manifest.with_columns(pl.when(pl.col("path") == moved[0]).then(pl.lit("d"))
                                      .otherwise(pl.col("label")).alias("label"))
    moved_one.write_csv(tmp_path / "other.csv")  # a group of one model is refused in one line
    with pytest.raises(LaunchError, match="group 'd' of 'label' has 1 model"):
        (tmp_path / "single").mkdir()
        _launch(_study(tmp_path / "single", "state-dicts", root,
                       zoo={"manifest": "../other.csv"}, tests={"group_by": "label"}))
    res = distsim.open(tmp_path / "store")
    assert sorted(set(res.models()["label"])) == ["a", "b", "c"]
    assert (res.tests()["n_tasks"] == 3).all()
