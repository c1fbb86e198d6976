"""The table contract: every public table's columns, types and shard key, documented once.

Column names are a stable public interface (changes are additive only). The README's table
section is generated from :data:`TABLES` (``markdown_table()``) and a test keeps them equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

STATUSES = ("ok", "diverged", "failed")  # models.status
# a shard key's value becomes a folder/file name (":" for an interaction term, tests.factor)
KEY_VALUE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_MODEL_ID = re.compile(r"^(.+)-t(\d+)-[sm](\d+)(?:-e(\d+))?$")
_EPOCH_SUFFIX = re.compile(r"-e(\d+)$")


@dataclass(frozen=True)
class Column:
    """One column: name, Arrow type and an optional note shown in the README."""

    name: str
    type: pa.DataType
    note: str = ""


@dataclass(frozen=True)
class TableSpec:
    """One table: its columns, what one row is, the key naming a shard, and the key's folder
    part (hive partitions: the partition columns live in folder names, not in the files).
    ``optional`` key columns may be null: a null one is left out of the shard's file name, so
    the shards of a study (or a store written before the column) that never sets it keep
    their names. ``legacy`` columns were part of the key in an older layout and may still
    end a shard's name (pairs: ``block_j``, one shard per tile before distsim 0.7, one per
    block row since): such names are read, and written when a key gives the column; a shard
    whose name leaves it out holds rows with any value of it."""

    name: str
    row: str
    key: tuple[str, ...]
    partition: tuple[str, ...]
    columns: tuple[Column, ...]
    optional: tuple[str, ...] = ()
    legacy: tuple[str, ...] = ()

    @property
    def name_columns(self) -> tuple[str, ...]:
        """The columns a shard's name may give: the key, then the legacy ones."""
        return (*self.key, *self.legacy)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type) for c in self.columns])

    @property
    def file_schema(self) -> pa.Schema:
        """Columns stored inside a shard file (partition columns live in the folder names)."""
        return pa.schema([f for f in self.schema if f.name not in self.partition])


_S, _I32, _I64, _F32, _F64 = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64()
_MATRIX = ("arch", "method", "layer")  # the key of one feature matrix
_UPSTREAM = "fingerprint of the feature rows it was computed from (distsim.store.lineage)"
_EPOCH = ("epoch", pa.int32(), "the epoch of the checkpoints ([train] save_epochs); null in a "
                               "study that saves none")


def _cols(*spec: tuple[str, pa.DataType] | tuple[str, pa.DataType, str]) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in spec)


TABLES: dict[str, TableSpec] = {t.name: t for t in (
    TableSpec("models", "trained model", ("arch", "task", "pack"), ("arch",), _cols(
        ("model_id", _S), ("arch", _S), ("task", _I32), ("task_name", _S), ("pack", _I32),
        ("seed", _I64), ("trial_id", _S), ("status", _S, "ok/diverged/failed"),
        ("train_acc", _F64), ("test_acc", _F64), ("train_loss", _F64), ("test_loss", _F64),
        ("epochs", _I32), ("seconds", _F64), ("node", _S), ("error", _S),
        ("epoch", _I32, "the checkpoint's epoch (an imported zoo's, or a trained study's with "
                        "[train] save_epochs; null otherwise)"),
        ("source", _S, "an imported model's file, relative to zoo.path (#row: a row in it)"),
        ("source_hash", _S, "SHA-256 of the bytes imported"),
        ("source_stamp", _S, "size:mtime of the file when it was read"),
        ("source_meta", _S, "JSON: the source's metadata of the model (its config, metrics, "
                            "labels); `distsim query models` shows each key as a column"),
        ("factors", _S, "JSON: the [sweep] cell's train values (lr, weight_decay, ...) of a "
                        "trained model; `distsim query models` shows each as a column"))),
    TableSpec("weights", "model x tensor", ("arch", "task", "pack"), ("arch",), _cols(
        ("model_id", _S), ("arch", _S), ("task", _I32), ("pack", _I32), ("tensor", _S),
        ("shape", pa.list_(_I32), "list of int32"),
        ("values", pa.list_(_F32), "list of float32, C order"))),
    TableSpec("templates", "arch x tensor (the aligned method's template)", ("arch",), (),
              _cols(("arch", _S), ("tensor", _S), ("shape", pa.list_(_I32), "list of int32"),
                    ("values", pa.list_(_F32), "list of float32, C order"),
                    ("models", _S, "ids of the models it averages, comma-separated"),
                    ("iterations", _I32))),
    TableSpec("features", "model x method x layer", (*_MATRIX, "task", "pack"), _MATRIX, _cols(
        ("model_id", _S), ("arch", _S), ("method", _S), ("layer", _S), ("task", _I32),
        ("pack", _I32), ("seed", _I64), ("dim", _I32),
        ("vector", pa.list_(_F32), "list of float32"),
        ("trial_id", _S, "the training run of the weights it was computed from"))),
    TableSpec("neighbors", "model x rank", (*_MATRIX, "epoch", "block"), _MATRIX, _cols(
        ("model_id", _S), ("arch", _S), ("method", _S), ("layer", _S), ("block", _I32),
        ("task", _I32, "the model's group: its task, or its code of tests.group_by"),
        ("rank", _I32, "1 = nearest"), ("neighbor_id", _S),
        ("neighbor_task", _I32), ("distance", _F32), ("same_task", pa.bool_(), "same group"),
        ("upstream", _S, _UPSTREAM), _EPOCH), optional=("epoch",)),
    TableSpec("pairs", "tile (I, J) of the distance matrix (a shard: block row I)",
              (*_MATRIX, "epoch", "block_i"), _MATRIX, _cols(
        ("arch", _S), ("method", _S), ("layer", _S), ("block_i", _I32),
        ("block_j", _I32, "J >= I; a shard holds the tiles of its block row (before distsim "
                          "0.7 one tile, named with block_j, still read)"),
        ("metric", _S), ("intra_count", _I64), ("intra_sum", _F64), ("intra_sumsq", _F64),
        ("inter_count", _I64), ("inter_sum", _F64), ("inter_sumsq", _F64),
        ("upstream", _S, _UPSTREAM), _EPOCH), optional=("epoch",), legacy=("block_j",)),
    TableSpec("tests", "arch x layer x method x protocol (x factor x epoch)",
              (*_MATRIX, "protocol", "factor", "epoch"), _MATRIX, _cols(
        ("arch", _S), ("method", _S), ("layer", _S), ("protocol", _S), ("statistic", _S),
        ("observed", _F64), ("chance", _F64), ("null_mean", _F64), ("null_sd", _F64),
        ("effect_size", _F64), ("p_value", _F64), ("permutations", _I32), ("n_models", _I32),
        ("n_tasks", _I32), ("seed", _I64), ("learner", _S), ("extra", _S, "JSON"),
        ("seconds", _F64, "compute time of the test's permutation chunks or tiles, summed; "
                          "not its wall time, without the shared learner or PERMANOVA basis; "
                          "before distsim 0.2.1 the wall time from the stage's start, queue "
                          "included"),
        ("upstream", _S, _UPSTREAM),
        ("null", pa.list_(_F64), "the statistic under each of the permutations, in draw order; "
                                 "null in stores written before distsim 0.2"),
        ("factor", _S, "the models column whose groups the row tests ([tests] factors); null "
                       "in a study that tests one grouping (the task or tests.group_by)"),
        _EPOCH), optional=("factor", "epoch")),
    TableSpec("history", "model x epoch", ("arch", "task", "pack"), ("arch",), _cols(
        ("model_id", _S), ("arch", _S), ("task", _I32), ("pack", _I32), ("seed", _I64),
        ("epoch", _I32, "1 = after the first epoch"),
        ("train_loss", _F64, "mean over the epoch's mini-batches, as they were trained"),
        ("train_acc", _F64, "mean over the epoch's mini-batches, as they were trained"),
        ("test_loss", _F64, "on the task's test split after the epoch"),
        ("test_acc", _F64, "on the task's test split after the epoch"))),
)}


def model_id(arch: str, task: int, seed: int, epoch: int | None = None) -> str:
    """The stable id of one model: ``f"{arch}-t{task}-s{seed}"`` (unique within a study); in a
    study that saves checkpoints along training (``[train] save_epochs``) each checkpoint is a
    model, ``f"{arch}-t{task}-s{seed}-e{epoch}"``.

    >>> model_id("mlp", 3, 12), model_id("mlp", 3, 12, epoch=0)
    ('mlp-t3-s12', 'mlp-t3-s12-e0')
    """
    base = f"{arch}-t{int(task)}-s{int(seed)}"
    return base if epoch is None else f"{base}-e{int(epoch)}"


def model_epoch(mid: str) -> int | None:
    """The epoch of a checkpoint's id (:func:`model_id` with an epoch), else None.

    >>> model_epoch("mlp-t3-s12-e5"), model_epoch("mlp-t3-s12")
    (5, None)
    """
    m = _EPOCH_SUFFIX.search(mid)
    return None if m is None else int(m.group(1))


def parse_model_id(mid: str) -> tuple[str, int, int] | None:
    """(arch, task, seed) of an id made by :func:`model_id` (with or without an epoch), (arch,
    task, index) of an imported model's ``<arch>-t<task>-m<index>``
    (distsim.pipeline.imports), or None for any other string.

    >>> parse_model_id("mlp-t3-s12"), parse_model_id("cnn-t0-m7"), parse_model_id("x")
    (('mlp', 3, 12), ('cnn', 0, 7), None)
    """
    m = _MODEL_ID.match(mid)
    return None if m is None else (m.group(1), int(m.group(2)), int(m.group(3)))


def markdown_table() -> str:
    """The README's table of tables: one line per table (row meaning, columns with notes)."""
    lines = ["| table | one row per | columns |", "|---|---|---|"]
    for t in TABLES.values():
        cols = ", ".join(f"{c.name} ({c.note})" if c.note else c.name for c in t.columns)
        lines.append(f"| `{t.name}` | {t.row} | {cols} |")
    return "\n".join(lines)
