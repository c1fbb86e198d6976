"""`distsim.store.verify`: a sound store verifies clean; each kind of damage gives its lines.

The store is built without Ray: shards written through `Store.write_shard` with consistent
lineage (features rows carry their model's trial_id, outputs the fingerprint of their matrix's
feature rows), bound to a study by `Store.check_study`. It is built once per module and copied
for each test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from _study import study_toml

from distsim.config import parse_study
from distsim.errors import StoreError
from distsim.store import Store, lineage, model_id
from distsim.store.verify import (
    NO_LINEAGE,
    STALE_FEATURES,
    STALE_OUTPUT,
    TEMP_ELSEWHERE,
    TEMP_IN_TABLE,
    verify_store,
)

MODELS0 = "models/arch=mlp/task=0-pack=0.parquet"
WEIGHTS0 = "weights/arch=mlp/task=0-pack=0.parquet"
RAW = "arch=mlp/method=raw/layer=fc1"
FEATURES0 = f"features/{RAW}/task=0-pack=0.parquet"
PAIRS = f"pairs/{RAW}/block_i=0-block_j=0.parquet"
NEIGHBORS = f"neighbors/{RAW}/block=0.parquet"
TESTS = f"tests/{RAW}/protocol=closed-set.parquet"
OUTPUTS = [PAIRS, NEIGHBORS, TESTS, f"tests/{RAW}/protocol=open-set.parquet"]


def _build(root: Path) -> None:
    """A finished store of the default study (2 packs, 4 matrices, 2 protocols)."""
    study = parse_study(study_toml(study={"name": "verify", "store": "unused"}))
    store = Store(root)
    store.check_study(study)
    for p in study.packs():
        key = {"arch": p.arch, "task": p.task, "pack": p.pack}
        ids = [model_id(p.arch, p.task, s) for s in p.seeds]
        trial = f"trial-{p.task}-{p.pack}"
        n = len(ids)
        store.write_shard("models", key, [
            {"model_id": i, "seed": s, "status": "ok", "trial_id": trial, "test_acc": 0.9}
            for i, s in zip(ids, p.seeds, strict=True)])
        store.write_shard("weights", key, {"model_id": ids, "tensor": ["fc1.weight"] * n,
                                           "shape": [[2]] * n, "values": [[0.5, 1.0]] * n})
        for m in study.matrices():
            store.write_shard("features", {**m.partition, "task": p.task, "pack": p.pack}, {
                "model_id": ids, "seed": list(p.seeds), "dim": [2] * n,
                "vector": [[float(s), 1.0] for s in p.seeds], "trial_id": [trial] * n})
    rows = lineage.matrix_rows(store)
    for m in study.matrices():
        up = lineage.fingerprint(rows[m.id])
        store.write_shard("pairs", {**m.key, "block_i": 0, "block_j": 0},
                          [{"metric": "euclidean", "intra_count": 6, "upstream": up}])
        ids = sorted(t.split("@")[0] for t in rows[m.id])
        store.write_shard("neighbors", {**m.key, "block": 0}, [
            {"model_id": i, "task": int(i.split("-t")[1].split("-")[0]), "rank": 1,
             "neighbor_id": ids[(k + 1) % len(ids)], "distance": 1.0, "upstream": up}
            for k, i in enumerate(ids)])
        for protocol in study.tests.protocols:
            store.write_shard("tests", {**m.key, "protocol": protocol},
                              [{"statistic": "accuracy", "observed": 0.9, "permutations": 99,
                                "upstream": up}])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "store"
    _build(root)
    return root


@pytest.fixture
def store(template, tmp_path):
    shutil.copytree(template, tmp_path / "store")
    return Store(tmp_path / "store")


def _rewrite(store: Store, rel: str, change) -> None:
    """Replace the shard file `rel` by change(its Arrow table), written as is (no checks)."""
    path = store.root / rel
    pq.write_table(change(pq.read_table(path, partitioning=None)), path)


def _set(t: pa.Table, column: str, value, type_=None) -> pa.Table:
    i = t.schema.get_field_index(column)
    field = t.schema.field(i) if type_ is None else pa.field(column, type_)
    return t.set_column(i, field, pa.array([value] * t.num_rows, field.type))


# ----------------------------------------------------------------------------- sound


def test_sound_store_has_no_problem(store):
    assert len(store.shard_files("features")) == 8
    assert verify_store(store) == []


def test_a_running_launch_and_own_folders_are_fine(store):
    (store.root / "_launch.lock").write_text("{}")
    (store.root / "_tune" / "trial").mkdir(parents=True)
    (store.root / "_faults").mkdir()
    store.mark_stage("zoo")
    assert verify_store(store) == []


def test_an_empty_folder_is_sound_and_a_missing_one_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert verify_store(Store(tmp_path / "empty")) == []
    with pytest.raises(StoreError, match="does not exist"):
        verify_store(Store(tmp_path / "nowhere"))


def test_verify_imports_neither_torch_nor_ray():
    code = ("import sys, distsim.store.verify; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("rel", [MODELS0, WEIGHTS0, FEATURES0, PAIRS, NEIGHBORS, TESTS])
def test_truncated_shard_is_unreadable_and_only_that(store, rel):
    path = store.root / rel
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    problems = verify_store(store)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{rel}: unreadable shard (")
    assert "\n" not in problems[0]


def test_leftover_temp_files(store):
    (store.root / "models" / "arch=mlp" / ".tmp-123-abc-x.parquet.partial").write_bytes(b"x")
    (store.root / ".tmp-123-abc-probe.partial").write_text("distsim")
    assert verify_store(store) == [
        f".tmp-123-abc-probe.partial: {TEMP_ELSEWHERE}",
        f"models/arch=mlp/.tmp-123-abc-x.parquet.partial: {TEMP_IN_TABLE}",
    ]


@pytest.mark.parametrize("rel", [
    "models/arch=mlp/notes.txt",
    "models/notes.txt",
    "models/arch=mlp/task=0.parquet",
    "models/arch=mlp/pack=0-task=0.parquet",
    "models/arch=mlp/task=00-pack=0.parquet",
    "models/arch=mlp/task=x-pack=0.parquet",
    "models/task=0-pack=0.parquet",
    "features/arch=mlp/method=raw/task=0-pack=0.parquet",
])
def test_not_a_shard_name(store, rel):
    shutil.copy(store.root / MODELS0, store.root / rel)
    table = rel.split("/")[0]
    assert verify_store(store) == [f"{rel}: not a {table} shard name"]


def test_unexpected_folders_and_entries(store):
    (store.root / "models" / "kind=mlp").mkdir()
    (store.root / "models" / "arch=mlp" / "old").mkdir()
    (store.root / "model").mkdir()
    (store.root / "README").write_text("mine")
    problems = verify_store(store)
    assert [p.split(":")[0] for p in problems] == [
        "README", "model", "models/arch=mlp/old", "models/kind=mlp"]
    assert "expected arch=<value>" in problems[3]


def test_study_json_missing_or_damaged(store):
    path = store.root / "study.json"
    path.write_text("{not json")
    assert verify_store(store)[0].startswith("study.json: not valid JSON (")
    path.write_text(json.dumps({"name": "x"}))
    assert verify_store(store) == ['study.json: no "hash" (not written by distsim)']
    path.unlink()
    assert [p.split(":")[0] for p in verify_store(store)] == ["study.json"]


# ----------------------------------------------------------------------------- contents


def test_copied_shard_mismatches_its_name_and_duplicates_model_ids(store):
    copy = "models/arch=mlp/task=0-pack=5.parquet"
    shutil.copy(store.root / MODELS0, store.root / copy)
    ids = "mlp-t0-s0, mlp-t0-s1, mlp-t0-s2"
    assert verify_store(store) == [
        f"{MODELS0}: duplicate model_id {ids} (also in {copy})",
        f"{copy}: duplicate model_id {ids} (also in {MODELS0})",
        f"{copy}: rows say pack=0 but the name says pack=5",
    ]


def test_rows_repeated_in_one_shard(store):
    _rewrite(store, WEIGHTS0, lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    _rewrite(store, PAIRS, lambda t: pa.concat_tables([t, t]))
    assert verify_store(store) == [
        f"{PAIRS}: duplicate arch/method/layer/epoch/block_i/block_j mlp/raw/fc1/null/0/0 "
        "(repeated in this shard)",
        f"{PAIRS}: holds 2 rows, a pairs shard named with block_j holds exactly one",
        f"{WEIGHTS0}: duplicate model_id/tensor mlp-t0-s0/fc1.weight (repeated in this shard)",
    ]


def test_pairs_shards_of_a_block_row_and_of_the_old_tile_layout(store):
    """A block row's shard (distsim >= 0.7) holds its tiles; an old one-tile shard still reads;
    a tile held by both, or a row shard with no rows, is a problem."""
    row = f"pairs/{RAW}/block_i=0.parquet"
    _rewrite(store, PAIRS, lambda t: t)  # the old layout's shard of tile (0, 0) is sound
    assert verify_store(store) == []
    two = pq.read_table(store.root / PAIRS)
    two = pa.concat_tables([two, two.set_column(two.schema.get_field_index("block_j"),
                                                "block_j", pa.array([1], pa.int32()))])
    pq.write_table(two, store.root / row)
    (store.root / PAIRS).unlink()
    assert verify_store(store) == []  # tiles (0, 0) and (0, 1) in the row's shard
    keys = store.shard_keys("pairs", {"method": "raw", "layer": "fc1"})
    assert [(k["block_i"], k["block_j"]) for k in keys] == [(0, None)]
    pq.write_table(two.slice(0, 1), store.root / PAIRS)
    assert verify_store(store) == [
        f"{p}: duplicate arch/method/layer/epoch/block_i/block_j mlp/raw/fc1/null/0/0 "
        f"(also in {q})" for p, q in ((PAIRS, row), (row, PAIRS))]
    (store.root / PAIRS).unlink()
    pq.write_table(two.slice(0, 0), store.root / row)
    assert verify_store(store) == [f"{row}: holds no rows (relaunch recomputes)"]


def test_wrong_missing_and_extra_columns(store):
    _rewrite(store, TESTS, lambda t: _set(t, "permutations", 99, pa.int64()))
    _rewrite(store, FEATURES0, lambda t: t.drop_columns(["dim"]))
    _rewrite(store, MODELS0, lambda t: t.append_column("arch", pa.array(["mlp"] * t.num_rows)))
    assert verify_store(store) == [
        f"{FEATURES0}: missing column dim",
        f"{MODELS0}: unexpected column arch (it lives in the folder name)",
        f"{TESTS}: column permutations is int64, the tests table says int32",
    ]


def test_mistyped_needed_column_leaves_the_shard_out_of_the_row_checks(store):
    _rewrite(store, WEIGHTS0, lambda t: _set(t, "tensor", 7, pa.int32()))
    assert verify_store(store) == [
        f"{WEIGHTS0}: column tensor is int32, the weights table says string"]


def test_unknown_status(store):
    _rewrite(store, MODELS0, lambda t: _set(t, "status", "done"))
    problems = verify_store(store)
    assert f"{MODELS0}: status 'done' not one of ok, diverged, failed" in problems
    # no ok models in the pack now: its features are orphans
    assert all(p.startswith((MODELS0, "features/")) for p in problems)


def test_orphan_weights_and_features(store):
    (store.root / "models" / "arch=mlp" / "task=1-pack=0.parquet").unlink()
    ids = "mlp-t1-s3, mlp-t1-s4, mlp-t1-s5"
    problems = verify_store(store)
    assert problems[-1] == (f"weights/arch=mlp/task=1-pack=0.parquet: orphan weights: no "
                            f"models row for model_id {ids}")
    features = [p for p in problems if p.startswith("features/")]
    assert len(features) == 4 and len(problems) == 5
    assert all(p.endswith(f"task=1-pack=0.parquet: orphan features: no ok models row for "
                          f"model_id {ids}") for p in features)


# ----------------------------------------------------------------------------- lineage


def test_stale_test_row(store):
    _rewrite(store, TESTS, lambda t: _set(t, "upstream", "0" * 16))
    assert verify_store(store) == [f"{TESTS}: {STALE_OUTPUT}"]


def test_retrained_pack_makes_its_features_stale(store):
    _rewrite(store, MODELS0, lambda t: _set(t, "trial_id", "trial-0-0-retrained"))
    problems = verify_store(store)
    assert len(problems) == 4  # one per matrix; the feature rows are unchanged: outputs fresh
    assert all(p.startswith("features/") and p.endswith(f"task=0-pack=0.parquet: "
                                                        f"{STALE_FEATURES}") for p in problems)


def test_features_from_another_run_make_them_and_their_outputs_stale(store):
    _rewrite(store, FEATURES0, lambda t: _set(t, "trial_id", "other"))
    assert verify_store(store) == sorted(
        [f"{FEATURES0}: {STALE_FEATURES}"] + [f"{rel}: {STALE_OUTPUT}" for rel in OUTPUTS])


def test_features_of_a_model_that_is_no_longer_ok(store):
    _rewrite(store, MODELS0, lambda t: t.set_column(
        t.schema.get_field_index("status"), "status",
        pc.if_else(pc.equal(t["model_id"], "mlp-t0-s0"), "diverged", t["status"])))
    problems = verify_store(store)
    assert len(problems) == 4
    assert all(p.endswith("orphan features: no ok models row for model_id mlp-t0-s0")
               for p in problems)


def test_missing_lineage(store):
    _rewrite(store, PAIRS, lambda t: t.drop_columns(["upstream"]))  # written before lineage
    _rewrite(store, TESTS, lambda t: _set(t, "upstream", None))
    assert verify_store(store) == [f"{PAIRS}: {NO_LINEAGE}", f"{TESTS}: {NO_LINEAGE}"]


def test_features_without_lineage(store):
    _rewrite(store, FEATURES0, lambda t: t.drop_columns(["trial_id"]))
    # its rows are model_id@None now: the matrix's outputs were computed from other rows
    assert verify_store(store) == sorted(
        [f"{FEATURES0}: {NO_LINEAGE}"] + [f"{rel}: {STALE_OUTPUT}" for rel in OUTPUTS])
