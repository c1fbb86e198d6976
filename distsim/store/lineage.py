"""Lineage: which upstream rows every output was computed from, and whether they still are.

A features row records the ``trial_id`` of the models row (the training run) it was computed
from. A pairs tile, a neighbors block and a test record ``upstream``: the fingerprint of the
feature rows of their matrix, each row named ``model_id@trial_id``. An output whose record
differs from what the store holds now is *stale* (a failed pack was retrained, models were
added): the pipeline recomputes it, ``distsim status`` and ``distsim verify`` report it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from distsim.store.shards import ShardStore
from distsim.store.tables import model_epoch

PackKey = tuple[str, int, int]  # (arch, task, pack)
FeatureKey = tuple[str, str, str, int, int]  # (arch, method, layer, task, pack)
MatrixId = tuple[str, str, str, int | None]  # (arch, method, layer, epoch)


def token(model_id: str, trial_id: str | None) -> str:
    """One upstream row: ``model_id@trial_id`` (the model and the training run that made it)."""
    return f"{model_id}@{trial_id}"


def fingerprint(tokens: Iterable[str]) -> str:
    """16 hex digits of the SHA-256 of the sorted, distinct tokens (order-free, one per row)."""
    text = "\n".join(sorted(set(tokens)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_tokens(store: ShardStore) -> dict[PackKey, frozenset[str]]:
    """Tokens of the ``ok`` models of every pack with a models shard (empty for a pack whose
    models all diverged or failed): what that pack's features must be computed from."""
    df = store.scan("models").select("arch", "task", "pack", "model_id", "trial_id",
                                     "status").collect()
    out: dict[PackKey, set[str]] = {}
    for arch, task, pack, mid, trial, status in df.iter_rows():
        rows = out.setdefault((arch, task, pack), set())
        if status == "ok":
            rows.add(token(mid, trial))
    return {k: frozenset(v) for k, v in out.items()}


_SWEEP: ContextVar[dict[Path, dict[FeatureKey, frozenset[str]]] | None] = ContextVar(
    "_SWEEP", default=None)


@contextmanager
def one_read() -> Iterator[None]:
    """Inside the block, :func:`feature_tokens` scans each store's features table once: for a
    read-only sweep over several stages' outputs (the features, pairs and tests stages each
    need it; at 180,000 feature rows one scan takes seconds). Nothing may write features
    inside the block."""
    token_ = _SWEEP.set({})
    try:
        yield
    finally:
        _SWEEP.reset(token_)


def feature_tokens(store: ShardStore) -> dict[FeatureKey, frozenset[str]]:
    """Tokens of the rows of every features shard present (empty set for an empty shard)."""
    memo = _SWEEP.get()
    if memo is not None and store.root in memo:
        return memo[store.root]
    out = _scan_feature_tokens(store)
    if memo is not None:
        memo[store.root] = out
    return out


def _scan_feature_tokens(store: ShardStore) -> dict[FeatureKey, frozenset[str]]:
    cols = ("arch", "method", "layer", "task", "pack")
    out: dict[FeatureKey, set[str]] = {
        (k["arch"], k["method"], k["layer"], k["task"], k["pack"]): set()
        for k in store.shard_keys("features")
    }
    df = store.scan("features").select(*cols, "model_id", "trial_id").collect()
    for arch, method, layer, task, pack, mid, trial in df.iter_rows():
        out.setdefault((arch, method, layer, task, pack), set()).add(token(mid, trial))
    return {k: frozenset(v) for k, v in out.items()}


def shard_tokens(path: Path) -> frozenset[str]:
    """Tokens of the rows of one features shard file (trial None when it records none)."""
    names = pq.read_schema(path).names
    df = pl.read_parquet(path, columns=[c for c in ("model_id", "trial_id") if c in names])
    trials = df["trial_id"] if "trial_id" in names else [None] * df.height
    return frozenset(map(token, df["model_id"], trials))


def matrix_rows(store: ShardStore) -> dict[MatrixId, frozenset[str]]:
    """Tokens of the feature rows of every feature matrix in the store, by (arch, method,
    layer, None) (every row) and, where rows are checkpoints of [train] save_epochs (ids
    ending ``-e<epoch>``), by (arch, method, layer, epoch) too."""
    out: dict[MatrixId, set[str]] = {}
    for (arch, method, layer, _, _), rows in feature_tokens(store).items():
        out.setdefault((arch, method, layer, None), set()).update(rows)
        for row in rows:
            epoch = model_epoch(row.rsplit("@", 1)[0])
            if epoch is not None:
                out.setdefault((arch, method, layer, epoch), set()).add(row)
    return {k: frozenset(v) for k, v in out.items()}


def recorded(store: ShardStore, table: str) -> dict[tuple[object, ...], set[str | None]]:
    """{row key (the table's key, then its legacy columns: a pairs tile (.., block_i,
    block_j)): the ``upstream`` values its rows record} of a pairs, neighbors or tests table
    (None where a row records none: written before lineage; an empty shard records None
    under its name's key)."""
    key = list(store.spec(table).name_columns)
    df = store.scan(table).select(*key, "upstream").unique().collect()
    out: dict[tuple[object, ...], set[str | None]] = {}
    for row in df.iter_rows():
        out.setdefault(tuple(row[:-1]), set()).add(row[-1])
    legacy = store.spec(table).legacy
    for path, k in zip(store.shard_files(table), store.shard_keys(table), strict=True):
        name = tuple(k[c] for c in key)
        if name in out:
            continue
        if any(k[c] is None for c in legacy) and pq.read_metadata(path).num_rows:
            continue  # named without its legacy column: its rows gave their keys above
        out[name] = {None}  # an empty shard records nothing: never fresh
    return out


def fresh(values: set[str | None], expected: str) -> bool:
    """True when a shard's rows all record `expected` as their upstream."""
    return values == {expected}

