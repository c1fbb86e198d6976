"""Codecs between Arrow columns and arrays: torch weights <-> weights rows, features -> a matrix;
store rows -> JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from distsim.errors import StoreError
from distsim.store.lineage import fingerprint, token

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class FeatureMatrix:
    """Features of one (arch, method, layer): X (N, D) float32, rows sorted by (task, seed)."""

    model_ids: list[str]
    tasks: np.ndarray  # (N,) int64
    seeds: np.ndarray  # (N,) int64
    X: np.ndarray  # (N, D) float32
    upstream: str = ""  # fingerprint of its rows (model_id@trial_id), see distsim.store.lineage


def weights_table(state_dicts: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """Rows (model_id, tensor, shape, values) of {model_id: state_dict}, tensors in dict order;
    values are the tensor flattened in C order as float32."""
    arrays = [(mid, name, t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))
              for mid, sd in state_dicts.items() for name, t in sd.items()]
    sizes = np.array([a.size for _, _, a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = (np.concatenate([np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
                            for _, _, a in arrays]) if arrays else np.zeros(0, np.float32))
    values = pa.LargeListArray.from_arrays(offsets, flat).cast(pa.list_(pa.float32()))
    return pa.table({
        "model_id": pa.array([mid for mid, _, _ in arrays], pa.string()),
        "tensor": pa.array([name for _, name, _ in arrays], pa.string()),
        "shape": pa.array([a.shape for _, _, a in arrays], pa.list_(pa.int32())),
        "values": values,
    })


def state_dicts(df: pl.DataFrame) -> dict[str, dict[str, torch.Tensor]]:
    """{model_id: {tensor: float32 tensor}} of weights rows (model_id, tensor, shape, values),
    in row order (the inverse of :func:`weights_table`)."""
    import torch  # here, not at the top: `distsim query` and `status` never need torch

    out: dict[str, dict[str, torch.Tensor]] = {}
    values = df.to_arrow().column("values").combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = values.offsets.to_numpy()
    rows = zip(df["model_id"], df["tensor"], df["shape"], strict=True)
    for i, (mid, name, shape) in enumerate(rows):
        chunk = flat[offsets[i] - offsets[0]: offsets[i + 1] - offsets[0]]
        out.setdefault(mid, {})[name] = torch.from_numpy(chunk.reshape(list(shape)).copy())
    return out


def feature_matrix(df: pl.DataFrame, what: str) -> FeatureMatrix:
    """The FeatureMatrix of features rows (model_id, task, seed, vector, trial_id), sorted by
    (task, seed, model_id); `what` names the matrix in errors (vectors of different lengths)."""
    if df.height == 0:
        return FeatureMatrix([], np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros((0, 0), np.float32), fingerprint([]))
    # sort the small columns and gather the vectors once in that order, or not at all when
    # they are in order (sorting the frame would move every vector)
    order = df.select(pl.arg_sort_by("task", "seed", "model_id")).to_series().to_numpy()
    in_order = bool((order == np.arange(df.height)).all())
    X = dense(df, what)  # a read-only view of the Arrow buffer
    X = (X.copy() if in_order else X[order]).astype(np.float32, copy=False)
    df = df.select("model_id", "task", "seed", "trial_id")
    df = df if in_order else df[order]
    return FeatureMatrix(
        df["model_id"].to_list(),
        df["task"].to_numpy().astype(np.int64),
        df["seed"].to_numpy().astype(np.int64),
        X,
        fingerprint(token(m, t) for m, t in zip(df["model_id"], df["trial_id"], strict=True)),
    )


def dense(df: pl.DataFrame, what: str) -> np.ndarray:
    """The ``vector`` column of features rows as an (n, D) array, in the rows' order (a view
    of the Arrow buffer where it can be: read-only); StoreError naming `what` when the
    vectors differ in length."""
    vec = df.get_column("vector").to_arrow()
    if isinstance(vec, pa.ChunkedArray):
        vec = vec.combine_chunks()
    lengths = vec.value_lengths().to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise StoreError(f"features {what}: vectors of different lengths "
                         f"{sorted(set(lengths.tolist()))}")
    return vec.flatten().to_numpy(zero_copy_only=False).reshape(df.height, int(lengths[0]))


def json_safe(v: Any) -> Any:
    """A JSON-safe value of a store cell or row: NaN and infinities become None, tuples lists
    (nested lists, tuples and dicts element-wise; dict keys strings)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    return v
