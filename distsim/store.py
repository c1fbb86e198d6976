"""The study store: a directory of hive-partitioned Parquet tables plus ``study.json``.

Layout (one directory per study; ``<k>=<v>`` folders are hive partitions)::

    <root>/study.json                                     resolved config + its hash
    <root>/_stages/<stage>.json                           a stage's "done" marker
    <root>/_<name>/                                       reserved for the pipeline (e.g. _tune)
    <root>/models/arch=mlp/task=3-pack=0.parquet          one shard per zoo trial
    <root>/weights/arch=mlp/task=3-pack=0.parquet
    <root>/features/arch=mlp/method=raw/layer=fc1/task=3-pack=0.parquet
    <root>/neighbors/arch=mlp/method=raw/layer=fc1/block=0.parquet
    <root>/pairs/arch=mlp/method=raw/layer=fc1/block_i=0-block_j=1.parquet
    <root>/tests/arch=mlp/method=raw/layer=fc1/protocol=closed-set.parquet

A shard's file name is deterministic from its key, so an idempotent stage asks
``store.has_shard(table, key)`` and skips finished work. Every shard is written to a hidden
temp name in its folder, fsynced, then ``os.replace``d into place: a crash leaves either the
old state or the whole new file, never half a file, and readers never see temp files.
Partition columns (the folders) are not stored inside the files; ``scan`` adds them back.

Tables and columns (``TABLES``; names are a public interface, changes are additive only):

- models    key (arch, task, pack): model_id, arch, task, task_name, pack, seed, trial_id,
            status (ok|diverged|failed), train_acc, test_acc, train_loss, test_loss,
            epochs, seconds, node, error
- weights   key (arch, task, pack): model_id, arch, task, pack, tensor, shape (list<int32>),
            values (list<float32>, the tensor flattened in C order)
- features  key (arch, method, layer, task, pack): model_id, arch, method, layer, task,
            pack, seed, dim, vector (list<float32>)
- neighbors key (arch, method, layer, block): model_id, arch, method, layer, block, task,
            rank (1 = nearest), neighbor_id, neighbor_task, distance, same_task
- pairs     key (arch, method, layer, block_i, block_j): distance summaries of one block
            of the all-pairs matrix: metric, intra_count, intra_sum, intra_sumsq,
            inter_count, inter_sum, inter_sumsq (mean intra = intra_sum / intra_count)
- tests     key (arch, method, layer, protocol): statistic (metric name), observed,
            chance, null_mean, null_sd, effect_size, p_value, permutations, n_models,
            n_tasks, seed, learner, extra (JSON text, e.g. {"cmc@1": ...}), seconds

Public API (stable; additions only):
    StoreError(RuntimeError)                     one-line user-facing message
    TABLES: dict[str, TableSpec]                 TableSpec(name, key, partition, schema)
    model_id(arch, task, seed) -> str            e.g. "mlp-t3-s36"
    Store(root)                                  root: local path (URIs: StoreError for now)
      .root: Path; .exists -> bool
      .check_study(study, fresh=False) -> "created"|"resumed"|"fresh"  (fresh deletes only
                                                 what the store owns: study.json, the tables,
                                                 "_"-prefixed folders, temp files)
      .read_study() -> dict | None               contents of study.json
      .write_shard(table, key, data) -> Path     data: pyarrow.Table | polars.DataFrame |
                                                 dict of columns | list of row dicts
      .has_shard(table, key) -> bool;  .shard_path(table, key) -> Path
      .shard_keys(table) -> list[dict]           keys of the shards present
      .scan(table) -> polars.LazyFrame           all shards (empty frame, right schema, if none)
      .write_weights(key, {model_id: state_dict}) -> Path
      .read_state_dicts(model_ids=None, *, arch=None, task=None, pack=None)
            -> dict[model_id, dict[tensor name, torch.Tensor]]
      .feature_matrix(arch, method, layer) -> FeatureMatrix(model_ids, tasks, seeds, X (N, D))
            rows sorted by (task, seed)
      .mark_stage(stage, **info); .stages() -> dict[stage, info]; .clear_table(table)
      .summary() -> polars.DataFrame             per arch: expected, ok, diverged, failed, ...

A multi-node Ray cluster needs a store path that every node can reach (NFS, EFS, a shared
disk): each trial writes its own shards from the node it runs on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["TABLES", "FeatureMatrix", "Store", "StoreError", "TableSpec", "model_id"]

STAGES = ("zoo", "features", "pairs", "tests")
STATUSES = ("ok", "diverged", "failed")
_VALUE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TMP_PREFIX = ".tmp-"
_MODEL_ID = re.compile(r"^(.+)-t(\d+)-s(\d+)$")


class StoreError(RuntimeError):
    """A store that cannot be used as asked (changed study, bad key, not a store): one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class TableSpec:
    """One table: its columns (schema), the key naming a shard, and the key's folder part."""

    name: str
    key: tuple[str, ...]
    partition: tuple[str, ...]
    schema: pa.Schema

    @property
    def file_schema(self) -> pa.Schema:
        """Columns stored inside a shard file (partition columns live in the folder names)."""
        return pa.schema([f for f in self.schema if f.name not in self.partition])


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


_S, _I32, _I64, _F32, _F64 = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64()
_BLOCK_KEY = ("arch", "method", "layer")

TABLES: dict[str, TableSpec] = {
    "models": TableSpec("models", ("arch", "task", "pack"), ("arch",), _schema(
        ("model_id", _S), ("arch", _S), ("task", _I32), ("task_name", _S), ("pack", _I32),
        ("seed", _I64), ("trial_id", _S), ("status", _S), ("train_acc", _F64), ("test_acc", _F64),
        ("train_loss", _F64), ("test_loss", _F64), ("epochs", _I32), ("seconds", _F64),
        ("node", _S), ("error", _S))),
    "weights": TableSpec("weights", ("arch", "task", "pack"), ("arch",), _schema(
        ("model_id", _S), ("arch", _S), ("task", _I32), ("pack", _I32), ("tensor", _S),
        ("shape", pa.list_(_I32)), ("values", pa.list_(_F32)))),
    "features": TableSpec("features", (*_BLOCK_KEY, "task", "pack"), _BLOCK_KEY, _schema(
        ("model_id", _S), ("arch", _S), ("method", _S), ("layer", _S), ("task", _I32),
        ("pack", _I32), ("seed", _I64), ("dim", _I32), ("vector", pa.list_(_F32)))),
    "neighbors": TableSpec("neighbors", (*_BLOCK_KEY, "block"), _BLOCK_KEY, _schema(
        ("model_id", _S), ("arch", _S), ("method", _S), ("layer", _S), ("block", _I32),
        ("task", _I32), ("rank", _I32), ("neighbor_id", _S), ("neighbor_task", _I32),
        ("distance", _F32), ("same_task", pa.bool_()))),
    "pairs": TableSpec("pairs", (*_BLOCK_KEY, "block_i", "block_j"), _BLOCK_KEY, _schema(
        ("arch", _S), ("method", _S), ("layer", _S), ("block_i", _I32), ("block_j", _I32),
        ("metric", _S), ("intra_count", _I64), ("intra_sum", _F64), ("intra_sumsq", _F64),
        ("inter_count", _I64), ("inter_sum", _F64), ("inter_sumsq", _F64))),
    "tests": TableSpec("tests", (*_BLOCK_KEY, "protocol"), _BLOCK_KEY, _schema(
        ("arch", _S), ("method", _S), ("layer", _S), ("protocol", _S), ("statistic", _S),
        ("observed", _F64), ("chance", _F64), ("null_mean", _F64), ("null_sd", _F64),
        ("effect_size", _F64), ("p_value", _F64), ("permutations", _I32), ("n_models", _I32),
        ("n_tasks", _I32), ("seed", _I64), ("learner", _S), ("extra", _S), ("seconds", _F64))),
}


def model_id(arch: str, task: int, seed: int) -> str:
    """The stable id of one model: ``f"{arch}-t{task}-s{seed}"`` (unique within a study)."""
    return f"{arch}-t{int(task)}-s{int(seed)}"


@dataclass(frozen=True, eq=False)
class FeatureMatrix:
    """Features of one (arch, method, layer): X (N, D) float32, rows sorted by (task, seed)."""

    model_ids: list[str]
    tasks: np.ndarray  # (N,) int64
    seeds: np.ndarray  # (N,) int64
    X: np.ndarray  # (N, D) float32


def _spec(table: str) -> TableSpec:
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    return TABLES[table]


def _polars_schema(schema: pa.Schema) -> dict[str, pl.DataType]:
    return dict(pl.from_arrow(schema.empty_table()).schema)


class Store:
    """A study's store at a local directory (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        text = str(root)
        if "://" in text:
            raise StoreError(
                f"study.store: object-store URIs are not supported yet ({text!r}); use a directory "
                "path, on a multi-node cluster one that every node mounts (NFS, EFS)"
            )
        self.root = Path(text).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {str(self.root)!r} is a file, not a directory")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def exists(self) -> bool:
        """True when root holds a study.json or any table folder."""
        return (self.root / "study.json").is_file() or any((self.root / t).is_dir() for t in TABLES)

    # ------------------------------------------------------------------ study identity
    def read_study(self) -> dict | None:
        """The contents of study.json ({hash, name, config, created}), or None when absent."""
        path = self.root / "study.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: unreadable study.json ({exc})") from None

    def check_study(self, study: Any, fresh: bool = False) -> str:
        """Bind this store to `study` (a config.Study): "created", "resumed" or "fresh".

        A store written by a study with a different hash is refused (StoreError naming the
        changed keys) unless fresh, which wipes the store first. A non-empty folder that is
        not a distsim store is never wiped.
        """
        held = self.read_study()
        if held is None and self.root.is_dir() and any(self.root.iterdir()) and not self.exists:
            raise StoreError(
                f"{str(self.root)!r} is a non-empty folder without study.json, not a distsim store; "
                "set study.store to a new or empty folder"
            )
        if fresh and self.root.exists():
            self._wipe()
            held = None
            outcome = "fresh"
        elif held is not None:
            if held.get("hash") != study.hash:
                raise StoreError(self._mismatch(held, study))
            self.clean_temp_files()
            return "resumed"
        else:
            outcome = "fresh" if fresh else "created"
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {
            "hash": study.hash,
            "name": study.name,
            "source": study.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": study.resolved(),
        }
        self._write_bytes(self.root / "study.json", json.dumps(doc, indent=2, sort_keys=True).encode())
        return outcome

    def _wipe(self) -> None:
        """Delete what the store owns (study.json, tables, "_"-prefixed folders such as _stages and
        the pipeline's _tune, temp files); anything else a user put in the folder stays."""
        for entry in self.root.iterdir():
            name = entry.name
            if name == "study.json" or name in TABLES or name.startswith(("_", _TMP_PREFIX, ".probe-")):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _mismatch(self, held: dict, study: Any) -> str:
        old, new = _flatten(held.get("config", {})), _flatten(study.resolved())
        ignore = ("study.store", "resources.")
        changed = [
            k for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>") and not k.startswith(ignore)
        ]
        shown = ", ".join(f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        what = f"changed: {shown}{more}" if changed else "the config differs"
        return (
            f"store {str(self.root)!r} holds study {held.get('name')!r} with config {str(held.get('hash'))[:12]}, "
            f"this study is {study.hash[:12]} ({what}); launch with --fresh to wipe the store, "
            "or set study.store to a new folder"
        )

    # ------------------------------------------------------------------ shards
    def shard_path(self, table: str, key: Mapping[str, Any]) -> Path:
        """Where the shard of `key` lives (deterministic; the key must name exactly spec.key)."""
        spec = _spec(table)
        if set(key) != set(spec.key):
            raise StoreError(f"{table}: a shard key has exactly {list(spec.key)}, got {sorted(key)}")
        parts = []
        for col in spec.key:
            value = key[col]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
                raise StoreError(f"{table}: key {col} must be a string or an int, got {value!r}")
            text = str(int(value)) if isinstance(value, (int, np.integer)) else value
            if not _VALUE.match(text):
                raise StoreError(f"{table}: key {col}={text!r} must match [A-Za-z0-9_.-]+")
            parts.append(f"{col}={text}")
        folders, leaf = parts[: len(spec.partition)], parts[len(spec.partition):]
        return self.root.joinpath(table, *folders, "-".join(leaf) + ".parquet")

    def has_shard(self, table: str, key: Mapping[str, Any]) -> bool:
        return self.shard_path(table, key).is_file()

    def shard_keys(self, table: str) -> list[dict[str, Any]]:
        """Keys of the shards present, parsed back from their paths (ints as int)."""
        spec = _spec(table)
        folder = self.root / table
        if not folder.is_dir():
            return []
        keys = []
        for path in sorted(folder.glob("/".join(["*"] * len(spec.partition) + ["*.parquet"]))):
            if path.name.startswith(_TMP_PREFIX):
                continue
            rel = path.relative_to(folder)
            leaf_cols = "|".join(re.escape(c) for c in spec.key[len(spec.partition):])
            items = [*rel.parts[:-1], *re.split(rf"-(?=(?:{leaf_cols})=)", rel.name[: -len(".parquet")])]
            key: dict[str, Any] = {}
            for item in items:
                col, _, value = item.partition("=")
                key[col] = int(value) if pa.types.is_integer(spec.schema.field(col).type) else value
            keys.append(key)
        return keys

    def write_shard(self, table: str, key: Mapping[str, Any], data: Any) -> Path:
        """Write one shard atomically (temp file + rename); replaces an existing shard of `key`.

        Key columns missing from `data` are filled with the key's value; present ones must
        equal it. Columns are cast to the table schema; unknown columns are an error.
        """
        spec = _spec(table)
        path = self.shard_path(table, key)
        t = self._to_table(spec, key, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{path.name}.partial"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(t.select(spec.file_schema.names), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def _to_table(self, spec: TableSpec, key: Mapping[str, Any], data: Any) -> pa.Table:
        if isinstance(data, pa.Table):
            t = data
        elif isinstance(data, pl.DataFrame):
            t = data.to_arrow()
        elif isinstance(data, Mapping):
            t = pa.table({k: list(v) if not isinstance(v, (np.ndarray, pa.Array)) else v for k, v in data.items()})
        elif isinstance(data, Sequence):
            t = pa.Table.from_pylist(list(data))
        else:
            raise StoreError(f"{spec.name}: data must be a pyarrow Table, polars DataFrame, dict or rows, "
                             f"got {type(data).__name__}")
        unknown = [c for c in t.column_names if c not in spec.schema.names]
        if unknown:
            raise StoreError(f"{spec.name}: unknown columns {unknown}; columns: {', '.join(spec.schema.names)}")
        n = t.num_rows
        columns = []
        for field in spec.schema:
            if field.name in key:
                value = key[field.name]
                if field.name in t.column_names:
                    got = set(t.column(field.name).to_pylist())
                    if got - {value}:
                        raise StoreError(f"{spec.name}: column {field.name} holds {sorted(got, key=str)} "
                                         f"but the shard key says {value!r}")
                columns.append(pa.array([value] * n, field.type))
            elif field.name in t.column_names:
                try:
                    columns.append(t.column(field.name).cast(field.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise StoreError(f"{spec.name}: column {field.name} cannot be {field.type} ({exc})") from None
            else:
                columns.append(pa.nulls(n, field.type))
        return pa.Table.from_arrays(columns, schema=spec.schema)

    def scan(self, table: str) -> pl.LazyFrame:
        """A lazy polars scan of all shards of `table`, columns in schema order.

        Filters on partition columns (arch, method, layer) prune files; others push down to
        Parquet row groups. With no shard yet: an empty frame with the table's schema.
        """
        spec = _spec(table)
        schema = _polars_schema(spec.schema)
        folder = self.root / table
        if not folder.is_dir() or not any(folder.rglob("*.parquet")):
            return pl.LazyFrame(schema=schema)
        pattern = str(folder) + "/" + "/".join(["*"] * len(spec.partition) + ["*.parquet"])
        lf = pl.scan_parquet(
            pattern,
            schema={c: t for c, t in schema.items() if c not in spec.partition},
            hive_partitioning=bool(spec.partition),
            hive_schema={c: schema[c] for c in spec.partition} or None,
            missing_columns="insert",  # shards written before a column was added read it as null
        )
        return lf.select(list(schema))

    def clear_table(self, table: str) -> None:
        """Remove every shard of `table` (to recompute a stage)."""
        _spec(table)
        shutil.rmtree(self.root / table, ignore_errors=True)

    def clean_temp_files(self, min_age_s: float = 3600.0) -> int:
        """Delete temp files left by writers that crashed more than min_age_s ago; returns the count."""
        count, now = 0, time.time()
        for table in TABLES:
            folder = self.root / table
            if folder.is_dir():
                for path in folder.rglob(f"{_TMP_PREFIX}*"):
                    if now - path.stat().st_mtime >= min_age_s:
                        path.unlink(missing_ok=True)
                        count += 1
        return count

    # ------------------------------------------------------------------ weights and features
    @staticmethod
    def weights_table(state_dicts: Mapping[str, Mapping[str, Any]]) -> pa.Table:
        """Rows (model_id, tensor, shape, values) of {model_id: state_dict}, tensors in dict order."""
        ids, names, shapes, flats = [], [], [], []
        for mid, sd in state_dicts.items():
            for name, tensor in sd.items():
                arr = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
                ids.append(mid)
                names.append(name)
                shapes.append(list(arr.shape))
                flats.append(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
        offsets = np.zeros(len(flats) + 1, dtype=np.int64)
        np.cumsum([f.size for f in flats], out=offsets[1:])
        flat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
        values = pa.LargeListArray.from_arrays(offsets, flat).cast(pa.list_(_F32))
        return pa.table({
            "model_id": pa.array(ids, _S),
            "tensor": pa.array(names, _S),
            "shape": pa.array(shapes, pa.list_(_I32)),
            "values": values,
        })

    def write_weights(self, key: Mapping[str, Any], state_dicts: Mapping[str, Mapping[str, Any]]) -> Path:
        """Write the weights shard of one trial key (arch, task, pack) from {model_id: state_dict}."""
        return self.write_shard("weights", key, self.weights_table(state_dicts))

    def read_state_dicts(
        self,
        model_ids: Sequence[str] | None = None,
        *,
        arch: str | None = None,
        task: int | None = None,
        pack: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """{model_id: {tensor name: torch.Tensor float32}} for the selected models, tensors in stored order.

        Reads only the shards that can hold them: the one of (arch, task, pack) when all
        three are given, else those of the (arch, task) pairs named by the model ids.
        """
        import torch

        columns = ["model_id", "tensor", "shape", "values"]
        files = self._weight_files(model_ids, arch, task, pack)
        if files is not None:
            parts = [pl.read_parquet(f, columns=["model_id", "task", "pack", *columns[1:]]) for f in files]
            lf = pl.concat(parts).lazy() if parts else pl.LazyFrame(schema=_polars_schema(TABLES["weights"].schema))
            lf = lf.filter(*[pl.col(c) == v for c, v in (("task", task), ("pack", pack)) if v is not None] or [True])
        else:
            lf = self.scan("weights")
            for col, value in (("arch", arch), ("task", task), ("pack", pack)):
                if value is not None:
                    lf = lf.filter(pl.col(col) == value)
        if model_ids is not None:
            lf = lf.filter(pl.col("model_id").is_in(list(model_ids)))
        df = lf.select(columns).collect()
        out: dict[str, dict[str, Any]] = {}
        if model_ids is not None:
            missing = sorted(set(model_ids) - set(df["model_id"].unique().to_list()))
            if missing:
                raise StoreError(f"weights: no weights for {len(missing)} models, e.g. {missing[:3]}")
            out = {mid: {} for mid in model_ids}
        arrow = df.to_arrow()
        values = arrow.column("values").combine_chunks()
        flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        offsets = values.offsets.to_numpy()
        for i, (mid, name, shape) in enumerate(zip(df["model_id"], df["tensor"], df["shape"], strict=True)):
            chunk = flat[offsets[i] - offsets[0]: offsets[i + 1] - offsets[0]]
            out.setdefault(mid, {})[name] = torch.from_numpy(chunk.reshape(list(shape)).copy())
        return out

    def _weight_files(self, model_ids: Sequence[str] | None, arch: str | None, task: int | None,
                      pack: int | None) -> list[Path] | None:
        """The weights shards that can hold the selection, or None when it needs a full scan."""
        if arch is not None and task is not None and pack is not None:
            path = self.shard_path("weights", {"arch": arch, "task": task, "pack": pack})
            return [path] if path.is_file() else []
        if model_ids is None:
            return None
        pairs = set()
        for mid in model_ids:
            m = _MODEL_ID.match(mid)
            if m is None or (arch is not None and m.group(1) != arch):
                return None  # not an id of model_id(): scan everything
            pairs.add((m.group(1), int(m.group(2))))
        files: list[Path] = []
        for a, t in sorted(pairs):
            if not _VALUE.match(a):
                return None
            files += sorted((self.root / "weights" / f"arch={a}").glob(f"task={t}-pack=*.parquet"))
        return files

    def feature_matrix(self, arch: str, method: str, layer: str) -> FeatureMatrix:
        """The features of one (arch, method, layer) as a dense (N, D) float32 matrix."""
        folder = self.shard_path("features", {"arch": arch, "method": method, "layer": layer, "task": 0, "pack": 0}).parent
        files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(_TMP_PREFIX))
        columns = ["model_id", "task", "seed", "vector"]
        df = (
            pl.concat([pl.read_parquet(f, columns=columns) for f in files]).sort("task", "seed", "model_id")
            if files else pl.DataFrame()
        )
        if df.height == 0:
            return FeatureMatrix([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        vec = df.get_column("vector").to_arrow()
        if isinstance(vec, pa.ChunkedArray):
            vec = vec.combine_chunks()
        lengths = vec.value_lengths().to_numpy(zero_copy_only=False)
        if (lengths != lengths[0]).any():
            raise StoreError(f"features {arch}/{method}/{layer}: vectors of different lengths {sorted(set(lengths.tolist()))}")
        X = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(df.height, int(lengths[0]))
        return FeatureMatrix(
            df["model_id"].to_list(),
            df["task"].to_numpy().astype(np.int64),
            df["seed"].to_numpy().astype(np.int64),
            X,
        )

    # ------------------------------------------------------------------ stages and status
    def mark_stage(self, stage: str, **info: Any) -> None:
        """Record that `stage` finished (info: any JSON-able facts, e.g. counts, seconds)."""
        if stage not in STAGES:
            raise StoreError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        doc = {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        self._write_bytes(self.root / "_stages" / f"{stage}.json", json.dumps(doc, sort_keys=True, default=str).encode())

    def stages(self) -> dict[str, dict]:
        """{stage: info} of the stages marked done, in pipeline order."""
        out = {}
        for stage in STAGES:
            path = self.root / "_stages" / f"{stage}.json"
            if path.is_file():
                out[stage] = json.loads(path.read_text())
        return out

    def summary(self) -> pl.DataFrame:
        """Per arch: models expected (from study.json), ok, diverged, failed, features, tests rows."""
        study = self.read_study() or {}
        cfg = study.get("config", {})
        expected = cfg.get("data", {}).get("num_tasks", 0) * cfg.get("train", {}).get("seeds_per_task", 0)
        archs = [a["name"] for a in cfg.get("arch", [])]
        counts = (
            self.scan("models").group_by("arch", "status").agg(pl.len().alias("n")).collect()
        )
        feats = self.scan("features").group_by("arch").agg(pl.len().alias("features")).collect()
        tests = self.scan("tests").group_by("arch").agg(pl.len().alias("tests")).collect()
        archs += sorted(set(counts["arch"].to_list()) - set(archs))
        rows = []
        for arch in archs:
            by = {s: 0 for s in STATUSES}
            for status, n in counts.filter(pl.col("arch") == arch).select("status", "n").iter_rows():
                by[status] = by.get(status, 0) + int(n)
            f = feats.filter(pl.col("arch") == arch)["features"]
            t = tests.filter(pl.col("arch") == arch)["tests"]
            rows.append({"arch": arch, "expected": expected, **{s: by[s] for s in STATUSES},
                         "features": int(f[0]) if len(f) else 0, "tests": int(t[0]) if len(t) else 0})
        schema = {"arch": pl.String, "expected": pl.Int64, "ok": pl.Int64, "diverged": pl.Int64,
                  "failed": pl.Int64, "features": pl.Int64, "tests": pl.Int64}
        return pl.DataFrame(rows, schema=schema)

    # ------------------------------------------------------------------ helpers
    def _write_bytes(self, path: Path, blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{path.name}"
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.epochs": 10, "arch[0].kind": "mlp", ...} of a nested resolved config."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out
