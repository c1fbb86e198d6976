"""The Parquet store: schemas, atomic and idempotent shards, empty scans, study binding."""

from __future__ import annotations

import os
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import parse_study
from distsim.config.arch import ArchConfig
from distsim.store import TABLES, Store, StoreError, model_id
from distsim.zoo.models import build

# The study the store is bound to, written by the `study_toml` fixture: study_toml(STUDY, ...)
# merges changes into it. Its own store folder is never used (each Store gets its root).
STUDY = {
    "study": {"name": "s", "store": "unused"},
    "data": {"dataset": "synthetic", "num_tasks": 2},
    "arch": [{"kind": "mlp", "widths": [4]}],
    "train": {"seeds_per_task": 3, "epochs": 1},
}

KEY = {"arch": "mlp", "task": 1, "pack": 0}


def model_rows(task=1, seeds=(0, 1, 2), status="ok"):
    return [
        {"model_id": model_id("mlp", task, s), "seed": s, "status": status,
         "test_acc": 0.5 + s / 10, "trial_id": f"arch=mlp/task={task}/pack=0", "node": "node-a"}
        for s in seeds
    ]


def shard_files(store: Store, table: str) -> list[str]:
    files = (store.root / table).rglob("*")
    return sorted(str(p.relative_to(store.root)) for p in files if p.is_file())


# ----------------------------------------------------------------------------- scans and schema


@pytest.mark.parametrize("table", list(TABLES))
def test_empty_scan_has_the_table_schema(tmp_path, table):
    df = Store(tmp_path / "none").scan(table).collect()
    assert df.height == 0
    assert df.columns == TABLES[table].schema.names
    assert df.schema == pl.from_arrow(TABLES[table].schema.empty_table()).schema


def test_public_column_names_are_stable():
    assert TABLES["models"].schema.names == [
        "model_id", "arch", "task", "task_name", "pack", "seed", "trial_id", "status", "train_acc",
        "test_acc", "train_loss", "test_loss", "epochs", "seconds", "node", "error",
        "epoch", "source", "source_hash", "source_stamp", "source_meta", "factors"]  # 0.4
    assert TABLES["weights"].schema.names == [
        "model_id", "arch", "task", "pack", "tensor", "shape", "values"]
    assert {"model_id", "arch", "layer", "method", "dim", "vector"} <= set(
        TABLES["features"].schema.names)
    assert {"arch", "layer", "method", "protocol", "statistic", "observed", "chance", "null_mean",
            "null_sd", "p_value", "permutations", "n_models", "n_tasks", "seed"} <= set(
        TABLES["tests"].schema.names)


def test_write_then_scan_fills_key_columns_and_casts(tmp_path):
    store = Store(tmp_path)
    path = store.write_shard("models", KEY, model_rows())
    assert path == tmp_path / "models" / "arch=mlp" / "task=1-pack=0.parquet"
    assert "arch" not in pq.read_schema(path).names  # a partition column lives in the folder name
    df = store.scan("models").collect()
    assert df.columns == TABLES["models"].schema.names
    assert df["arch"].to_list() == ["mlp"] * 3 and df["task"].to_list() == [1] * 3
    assert df["pack"].to_list() == [0] * 3 and df["train_acc"].null_count() == 3
    assert df.schema["task"] == pl.Int32 and df.schema["seed"] == pl.Int64
    # filters on partition and file columns
    assert store.scan("models").filter(pl.col("arch") == "cnn").collect().height == 0
    assert store.scan("models").filter(pl.col("seed") >= 1).collect().height == 2


def test_shards_from_before_a_column_was_added_read_it_as_null(tmp_path):
    store = Store(tmp_path)
    store.write_shard("models", KEY, model_rows())
    old = store.shard_path("models", {**KEY, "task": 0})
    table = pq.read_table(store.shard_path("models", KEY)).drop_columns(["error", "node"])
    task = table.schema.get_field_index("task")
    table = table.set_column(task, "task", pa.array([0] * 3, pa.int32()))
    pq.write_table(table, old)  # as an older distsim would have written it
    df = store.scan("models").collect()
    assert df.height == 6 and df.columns == TABLES["models"].schema.names
    assert df.filter(pl.col("task") == 1)["node"].to_list() == ["node-a"] * 3
    assert df["error"].null_count() == 6


def test_writing_a_shard_again_replaces_it(tmp_path):
    store = Store(tmp_path)
    assert not store.has_shard("models", KEY)
    store.write_shard("models", KEY, model_rows())
    assert store.has_shard("models", KEY)
    store.write_shard("models", KEY, model_rows(status="diverged"))
    assert shard_files(store, "models") == ["models/arch=mlp/task=1-pack=0.parquet"]
    df = store.scan("models").collect()
    assert df.height == 3 and set(df["status"]) == {"diverged"}
    store.write_shard("models", {**KEY, "task": 0}, model_rows(task=0))
    assert store.scan("models").collect().height == 6
    assert store.shard_keys("models") == [{"arch": "mlp", "task": 0, "pack": 0}, KEY]


def test_a_crash_while_writing_leaves_no_file_and_keeps_the_old_shard(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_shard("models", KEY, model_rows())

    def crash(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk gone")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.write_shard("models", KEY, model_rows(status="failed"))
    with pytest.raises(OSError):
        store.write_shard("models", {**KEY, "task": 5}, model_rows(task=5))
    monkeypatch.undo()
    assert shard_files(store, "models") == ["models/arch=mlp/task=1-pack=0.parquet"]
    assert set(store.scan("models").collect()["status"]) == {"ok"}
    assert not store.has_shard("models", {**KEY, "task": 5})


def test_scans_ignore_temp_files_of_a_killed_writer_and_old_ones_get_cleaned(tmp_path):
    store = Store(tmp_path)
    store.write_shard("models", KEY, model_rows())
    leftover = tmp_path / "models" / "arch=mlp" / ".tmp-123-abc-task=2-pack=0.parquet.partial"
    leftover.write_bytes(b"PAR1 junk")
    assert store.scan("models").collect().height == 3
    assert not store.has_shard("models", {**KEY, "task": 2})
    assert store.shard_keys("models") == [KEY]
    assert store.clean_temp_files() == 0  # too fresh: maybe a live writer
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert store.clean_temp_files() == 1 and not leftover.exists()


def test_temp_files_of_an_ended_writer_on_this_host_get_cleaned_at_once(tmp_path):
    """A SIGKILLed launch leaves its workers' temp files; the relaunch removes them without
    waiting an hour, and keeps those of a live writer or of another host's."""
    import subprocess
    import sys

    from distsim.store.shards import temp_path

    store = Store(tmp_path)
    folder = tmp_path / "weights" / "arch=mlp"
    folder.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from distsim.store.shards import temp_path; "
            "temp_path(Path(sys.argv[1]), 'task=1-pack=0.parquet').write_bytes(b'PAR1')")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    (dead,) = folder.iterdir()
    live = temp_path(folder, "task=2-pack=0.parquet")  # this process: alive
    live.write_bytes(b"PAR1")
    other = folder / f".tmp-{os.getpid()}-00000000-{'a' * 32}-task=3-pack=0.parquet.partial"
    other.write_bytes(b"PAR1")  # a writer on another node (or an unknown host): wait for it
    assert store.clean_temp_files() == 1
    assert not dead.exists() and live.exists() and other.exists()


def test_bad_keys_and_columns_are_store_errors(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match=r"exactly \['arch', 'task', 'pack'\]"):
        store.write_shard("models", {"arch": "mlp", "task": 1}, model_rows())
    with pytest.raises(StoreError, match=r"must match"):
        store.write_shard("models", {**KEY, "arch": "m/l"}, model_rows())
    with pytest.raises(StoreError, match="unknown columns \\['colour'\\]"):
        store.write_shard("models", KEY, [{**r, "colour": 1} for r in model_rows()])
    with pytest.raises(StoreError, match="shard key says 1"):
        store.write_shard("models", KEY, [{**r, "task": 2} for r in model_rows()])
    with pytest.raises(StoreError, match="cannot be int64"):
        store.write_shard("models", KEY, [{**r, "seed": "seven"} for r in model_rows()])
    with pytest.raises(StoreError, match="unknown table 'model'"):
        store.scan("model")
    with pytest.raises(StoreError, match="not supported yet"):
        Store("s3://bucket/store")


NAME_CHARS = "abcXYZ0189_."


@settings(max_examples=20, deadline=None)
@given(
    arch=st.text(NAME_CHARS, min_size=1, max_size=8),
    method=st.sampled_from(["chain-gram", "raw"]),
    layer=st.text(NAME_CHARS + "-", min_size=1, max_size=6),
    task=st.integers(0, 10**6),
    pack=st.integers(0, 999),
)
def test_shard_keys_round_trip_through_paths(tmp_path_factory, arch, method, layer, task, pack):
    store = Store(tmp_path_factory.mktemp("keys"))
    key = {"arch": arch, "method": method, "layer": layer, "task": task, "pack": pack}
    path = store.shard_path("features", key)
    assert path == store.shard_path("features", dict(reversed(list(key.items()))))  # order-free
    path.parent.mkdir(parents=True)
    path.touch()
    assert store.shard_keys("features") == [key]


def test_shard_keys_where_lists_only_the_selected_partitions(tmp_path):
    store = Store(tmp_path)
    keys = [{"arch": a, "method": m, "layer": "fc1", "block": b}
            for a in ("cnn", "mlp") for m in ("chain-gram", "raw") for b in (0, 1)]
    for key in keys:
        store.write_shard("neighbors", key, [])
    mine = {"arch": "mlp", "method": "raw", "layer": "fc1"}
    none = {"epoch": None}  # an optional key column left out of the name reads back as None
    assert store.shard_keys("neighbors", mine) == [{**mine, "block": 0, **none},
                                                   {**mine, "block": 1, **none}]
    assert store.shard_keys("neighbors", {"arch": "cnn"}) == [{**k, **none} for k in keys[:4]]
    assert store.shard_keys("neighbors", {"arch": "rnn"}) == []
    with pytest.raises(StoreError, match="selected by"):
        store.shard_keys("neighbors", {"block": 0})  # not a partition column
    with pytest.raises(StoreError, match="must match"):
        store.shard_files("neighbors", {"arch": "../x"})


def test_shard_keys_with_dashes_in_leaf_values(tmp_path):
    store = Store(tmp_path)
    for protocol in ("closed-set", "open-set"):
        key = {"arch": "mlp", "method": "chain-gram", "layer": "fc1", "protocol": protocol}
        store.write_shard(
            "tests", key, {"statistic": ["accuracy"], "observed": [0.9], "p_value": [0.01]})
    assert [k["protocol"] for k in store.shard_keys("tests")] == ["closed-set", "open-set"]
    df = store.scan("tests").collect()
    assert df["protocol"].to_list() == ["closed-set", "open-set"]
    assert df["method"].to_list() == ["chain-gram"] * 2


# ----------------------------------------------------------------------------- weights, features


def test_state_dicts_round_trip_bit_exactly(tmp_path):
    store = Store(tmp_path)
    cfg = ArchConfig(kind="cnn", channels=(2, 3))
    nets = {}
    for seed in (4, 5):
        torch.manual_seed(seed)
        nets[model_id("cnn", 1, seed)] = build(cfg)
    key = {"arch": "cnn", "task": 1, "pack": 0}
    store.write_weights(key, {mid: net.state_dict() for mid, net in nets.items()})
    rows = store.scan("weights").collect()
    assert rows.height == 2 * len(nets["cnn-t1-s4"].state_dict())
    assert rows["shape"][0].to_list() == [2, 1, 3, 3]
    back = store.read_state_dicts(arch="cnn", task=1)
    assert list(back) == list(nets)
    for mid, net in nets.items():
        assert list(back[mid]) == list(net.state_dict())
        for name, tensor in net.state_dict().items():
            assert back[mid][name].dtype == torch.float32 and torch.equal(back[mid][name], tensor)
        fresh = build(cfg)
        fresh.load_state_dict(back[mid])
    assert list(store.read_state_dicts(["cnn-t1-s5"])) == ["cnn-t1-s5"]
    with pytest.raises(StoreError, match="no weights for 1 models"):
        store.read_state_dicts(["cnn-t1-s5", "cnn-t1-s99"])


def test_read_state_dicts_finds_models_across_shards_and_odd_ids(tmp_path):
    store = Store(tmp_path)
    sds = {}
    shards = (("big-mlp", 1, 0), ("big-mlp", 1, 1), ("big-mlp", 2, 0), ("mlp", 1, 0))
    for arch, task, pack in shards:
        weights = {"w": torch.full((2,), float(task + pack))}
        batch = {model_id(arch, task, 10 * task + pack): weights}
        store.write_weights({"arch": arch, "task": task, "pack": pack}, batch)
        sds.update(batch)
    store.write_weights({"arch": "mlp", "task": 3, "pack": 0}, {"custom-id": {"w": torch.ones(1)}})
    wanted = ["big-mlp-t2-s20", "big-mlp-t1-s11", "mlp-t1-s10"]
    back = store.read_state_dicts(wanted)
    assert list(back) == wanted
    assert all(torch.equal(back[m]["w"], sds[m]["w"]) for m in wanted)
    # custom-id does not name its shard: a full scan
    assert list(store.read_state_dicts(["custom-id", "mlp-t1-s10"])) == ["custom-id", "mlp-t1-s10"]
    assert list(store.read_state_dicts(arch="big-mlp", task=1, pack=1)) == ["big-mlp-t1-s11"]
    assert store.read_state_dicts(arch="big-mlp", task=7, pack=0) == {}


def test_feature_matrix_is_sorted_by_task_and_seed(tmp_path):
    store = Store(tmp_path)
    assert store.feature_matrix("mlp", "raw", "fc1").X.shape == (0, 0)
    rng = np.random.default_rng(0)
    expected = {}
    for task in (1, 0):
        seeds = [task * 10 + s for s in (2, 0, 1)]
        vecs = rng.standard_normal((3, 4)).astype(np.float32)
        expected.update({(task, s): v for s, v in zip(seeds, vecs, strict=True)})
        key = {"arch": "mlp", "method": "raw", "layer": "fc1", "task": task, "pack": 0}
        store.write_shard("features", key, {
            "model_id": [model_id("mlp", task, s) for s in seeds], "seed": seeds, "dim": [4] * 3,
            "vector": list(vecs)})
    other = {"arch": "mlp", "method": "chain-gram", "layer": "fc1", "task": 0, "pack": 0}
    store.write_shard(
        "features", other, {"model_id": ["x"], "seed": [0], "dim": [2], "vector": [[1.0, 2.0]]})
    fm = store.feature_matrix("mlp", "raw", "fc1")
    assert fm.X.shape == (6, 4) and fm.X.dtype == np.float32
    assert fm.tasks.tolist() == [0, 0, 0, 1, 1, 1] and fm.seeds.tolist() == [0, 1, 2, 10, 11, 12]
    for row, (t, s) in enumerate(zip(fm.tasks, fm.seeds, strict=True)):
        np.testing.assert_array_equal(fm.X[row], expected[(t, s)])
    assert fm.model_ids[0] == "mlp-t0-s0"


def test_one_read_scans_the_features_once_inside_the_block_and_afresh_after(tmp_path,
                                                                            monkeypatch):
    from distsim.store import lineage

    store = Store(tmp_path)

    def write(task: int) -> None:
        key = {"arch": "mlp", "method": "raw", "layer": "fc1", "task": task, "pack": 0}
        store.write_shard("features", key, {"model_id": [model_id("mlp", task, 0)], "seed": [0],
                                            "dim": [1], "vector": [[1.0]], "trial_id": ["a"]})

    write(0)
    scans = []
    real_scan = store.scan
    monkeypatch.setattr(store, "scan", lambda table: scans.append(table) or real_scan(table))
    with lineage.one_read():
        first = lineage.feature_tokens(store)
        assert lineage.feature_tokens(store) is first and scans == ["features"]
        assert lineage.matrix_rows(store) == {("mlp", "raw", "fc1", None): {"mlp-t0-s0@a"}}
        assert scans == ["features"]
    write(1)  # outside the block every call reads the store as it is now
    assert set(lineage.feature_tokens(store)) == {("mlp", "raw", "fc1", 0, 0),
                                                  ("mlp", "raw", "fc1", 1, 0)}
    assert scans == ["features", "features"]


# ----------------------------------------------------------------------------- study binding


def test_check_study_creates_resumes_and_refuses_a_changed_study(tmp_path, study_toml):
    store = Store(tmp_path / "st")
    study = parse_study(study_toml(STUDY))
    assert store.check_study(study) == "created"
    assert store.read_study()["hash"] == study.hash
    store.write_shard("models", KEY, model_rows())
    assert store.check_study(study) == "resumed"
    moved = parse_study(
        study_toml(STUDY, study={"store": "/elsewhere"}, resources={"cpus_per_trial": 2}))
    assert store.check_study(moved) == "resumed"  # where it runs is not what it computes
    changed = parse_study(study_toml(STUDY, train={"epochs": 2}))
    with pytest.raises(StoreError) as info:
        store.check_study(changed)
    msg = str(info.value)
    assert "train.epochs (1 -> 2)" in msg and "--fresh" in msg and "\n" not in msg
    assert store.scan("models").collect().height == 3  # refused: nothing touched
    (store.root / "_tune").mkdir()
    (store.root / "_tune" / "experiment.json").write_text("{}")
    (store.root / "notes.txt").write_text("mine")
    assert store.check_study(changed, fresh=True) == "fresh"
    assert store.scan("models").collect().height == 0 and store.stages() == {}
    assert store.read_study()["hash"] == changed.hash
    # a user's file stays
    assert sorted(p.name for p in store.root.iterdir()) == ["notes.txt", "study.json"]


def test_check_study_never_wipes_a_folder_that_is_not_a_store(tmp_path, study_toml):
    (tmp_path / "thesis.tex").write_text("precious")
    store = Store(tmp_path)
    for fresh in (False, True):
        with pytest.raises(StoreError, match="not a distsim store"):
            store.check_study(parse_study(study_toml(STUDY)), fresh=fresh)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    with pytest.raises(StoreError, match="is a file"):
        Store(tmp_path / "thesis.tex")


def test_stages_and_summary(tmp_path, study_toml):
    store = Store(tmp_path)
    store.check_study(parse_study(study_toml(STUDY)))
    assert store.stages() == {}
    rows = model_rows(seeds=(0, 1)) + model_rows(seeds=(2,), status="diverged")
    store.write_shard("models", KEY, rows)
    store.mark_stage("zoo", models=3)
    assert list(store.stages()) == ["zoo"] and store.stages()["zoo"]["models"] == 3
    with pytest.raises(StoreError, match="must match"):  # a marker's name is a file name
        store.mark_stage("../zoo")
    row = store.summary().row(0, named=True)
    assert row == {"arch": "mlp", "expected": 6, "ok": 2, "diverged": 1, "failed": 0,
                   "train_acc": None, "test_acc": pytest.approx(0.55),  # mean of the ok models'
                   "features": 0, "tests": 0}


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=2), inner, max_size=3),
    max_leaves=10))
def test_json_safe_writes_strict_json(value: object) -> None:
    """Any nest of store cells becomes strict JSON (no NaN/inf tokens: they become null); a
    float cell reads back exactly, or as null when it was not finite."""
    import json

    from distsim.store.codecs import json_safe

    text = json.dumps(json_safe(value), allow_nan=False)
    back = json.loads(text)
    if isinstance(value, float):
        assert back == (value if np.isfinite(value) else None)


def test_optional_key_columns_name_a_shard_only_when_set(tmp_path):
    """tests.factor and tests.epoch are optional key columns: left out (or None) they are not
    in the file name (a study without factors or saved epochs keeps its shard names); set, they
    are, and each reads back from the name and the rows."""
    store = Store(tmp_path)
    base = {"arch": "mlp", "method": "raw", "layer": "fc1", "protocol": "permanova"}
    plain = store.write_shard("tests", base, [{"p_value": 0.5}])
    assert plain.name == "protocol=permanova.parquet"
    assert store.shard_path("tests", {**base, "factor": None, "epoch": None}) == plain
    both = store.write_shard("tests", {**base, "factor": "lr", "epoch": 5}, [{"p_value": 0.1}])
    assert both.name == "protocol=permanova-factor=lr-epoch=5.parquet"
    epoch_only = store.write_shard("tests", {**base, "epoch": 0}, [{"p_value": 0.2}])
    assert epoch_only.name == "protocol=permanova-epoch=0.parquet"
    keys = sorted(store.shard_keys("tests"), key=str)
    assert {(k["factor"], k["epoch"]) for k in keys} == {(None, None), ("lr", 5), (None, 0)}
    rows = store.scan("tests").select("factor", "epoch", "p_value").collect().sort("p_value")
    assert rows.rows() == [("lr", 5, 0.1), (None, 0, 0.2), (None, None, 0.5)]
    with pytest.raises(StoreError, match="leaves it out"):
        store.write_shard("tests", base, [{"factor": "lr"}])
    from distsim.store.verify import verify_store
    assert not [line for line in verify_store(store) if "tests" in line and "lineage" not in line]
