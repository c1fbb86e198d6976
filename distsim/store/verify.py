"""Check a store against the table contract: every shard readable and well-formed, no
duplicate keys, no leftover temp files, lineage fresh.

:func:`verify_store` returns every problem as one line ``"<path>: <problem>"`` (the path
relative to the store root, ``/``-separated), sorted; ``[]`` for a sound store. It reads each
shard's footer (schema, row count) and then only the columns the checks need, with one polars
scan per table, so it stays linear in the number of shards; it never imports torch or Ray.

A store is sound when:

1. every entry is one distsim writes: ``study.json``, ``_launch.lock`` (a launch may be
   running: not a problem), its own folders (``_stages``, ``_tune``, ``_faults``) and the table
   folders, which hold only ``<col>=<value>`` partition folders and shard files named from the
   table's key (``models/arch=mlp/task=3-pack=0.parquet``); no temporary file (``.tmp-*``) of
   a crashed writer is left anywhere;
2. every shard is a readable Parquet file whose columns and types are the table's
   ``file_schema`` (only the lineage columns added later, ``features.trial_id`` and
   ``upstream``, may be missing: that is reported as "no lineage"), whose key columns stored in
   the file equal the key in its name, and whose ``models.status`` values are known;
3. no key is held twice (a model id in the models table; (model_id, tensor) of weights;
   (model_id, method, layer) of features; (model_id, method, layer, rank) of neighbors; a
   tile (block_i, block_j) of a pairs matrix; a tests shard, and an old-layout pairs shard
   named with its block_j, hold exactly one row; no pairs or neighbors shard is empty), and
   no weights or features row belongs to a model the models table lacks (weights: no models
   row; features: no ``ok`` models row);
4. lineage is fresh (:mod:`distsim.store.lineage`): every features shard holds the ``ok``
   models of its pack as they are now (``model_id@trial_id``), and every pairs, neighbors and
   tests shard records the fingerprint of its matrix's feature rows now;
5. ``study.json`` (required once the store holds a table) is JSON with a ``"hash"``.

Rows of a shard that cannot be read (or whose needed columns have another type) are left out
of checks 3 and 4; the checks those rows would decide are skipped rather than guessed (no
orphans when a models shard is unreadable; no lineage verdict for the outputs of a matrix
with an unreadable features shard).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from distsim.errors import StoreError
from distsim.store.lineage import fingerprint, fresh
from distsim.store.lock import LOCK_NAME
from distsim.store.shards import TEMP_PREFIX, ShardStore, polars_schema
from distsim.store.study import OWN_FOLDERS
from distsim.store.tables import KEY_VALUE, STATUSES, TABLES, TableSpec, model_epoch

# Columns added to the contract after stores were written: a shard may lack them (no lineage).
LINEAGE_COLUMNS = {"features": "trial_id", "neighbors": "upstream", "pairs": "upstream",
                   "tests": "upstream"}
# Columns added later that a shard may lack without harm (a scan reads them as null).
ADDED_COLUMNS = {"tests": ("null", "factor", "epoch"), "pairs": ("epoch",),
                 "neighbors": ("epoch",)}
# Columns the checks read, besides the key columns stored in the files.
_NEEDED = {"models": ("model_id", "trial_id", "status"), "weights": ("model_id", "tensor"),
           "features": ("model_id", "trial_id"), "neighbors": ("model_id", "rank", "upstream"),
           "pairs": ("upstream",), "tests": ("upstream",), "templates": ("tensor",),
           "history": ("model_id", "epoch")}
# Keys unique over a whole table (partition columns come from the folder names).
_UNIQUE = {"models": ("model_id",), "weights": ("model_id", "tensor"),
           "templates": ("arch", "tensor"), "features": ("model_id", "method", "layer"),
           "neighbors": ("model_id", "method", "layer", "rank"), "history": ("model_id", "epoch"),
           "pairs": ("arch", "method", "layer", "epoch", "block_i", "block_j")}
_MATRIX = ("arch", "method", "layer")

TEMP_IN_TABLE = ("leftover temporary file (a writer crashed; a relaunch removes it, at once when "
                 "its writer ran on that machine, else after an hour; or delete it)")
TEMP_ELSEWHERE = ("leftover temporary file (a writer crashed, or a launch is running; a relaunch "
                  "removes it, at once when its writer ran on that machine, else after an hour; "
                  "or delete it once no launch runs)")
NO_LINEAGE = "no lineage (written before lineage was recorded); relaunch recomputes"
STALE_FEATURES = ("stale features: computed from other models than the pack holds now "
                  "(relaunch recomputes)")
STALE_OUTPUT = "stale: computed from other feature rows than the store holds now"
_SHOWN = 5  # keys named in one line before "and N more"
_SYMLINK = "symlink (a store holds plain files and folders; not followed)"
# splits a shard file name into its key items, as ShardStore.shard_keys does
_LEAF_SPLIT = {t.name: re.compile("-(?=(?:{})=)".format(
    "|".join(re.escape(c) for c in t.name_columns[len(t.partition):]))) for t in TABLES.values()}
_INT_KEYS = {t.name: {c for c in t.name_columns if pa.types.is_integer(t.schema.field(c).type)}
             for t in TABLES.values()}  # key columns read back as int


@dataclass
class _Shard:
    """One file with a shard name: its path, relative path and key (parsed from the name)."""

    path: Path
    rel: str
    key: dict[str, Any]
    rows: int = -1  # from the footer; -1 while unread
    usable: bool = False  # readable, and the columns the checks need have the table's types


class _Problems:
    """Problems as (relative path, text); sorted, distinct lines at the end."""

    def __init__(self) -> None:
        self.items: set[tuple[str, str]] = set()

    def add(self, rel: str, text: str) -> None:
        rel = rel if rel.isprintable() else ascii(rel)[1:-1]  # one line, whatever the name
        self.items.add((rel, " ".join(text.split())))

    def lines(self) -> list[str]:
        return [f"{rel}: {text}" for rel, text in sorted(self.items)]


def verify_store(store: ShardStore) -> list[str]:
    """Every problem of the store at ``store.root`` as one line ``"<path relative to the root>:
    <problem>"``, sorted; ``[]`` when the store is sound (see the module docstring for what is
    checked). A folder that does not exist is a StoreError (nothing to verify)."""
    root = store.root
    if not root.is_dir():
        raise StoreError(f"store {str(root)!r} does not exist; nothing to verify")
    out = _Problems()
    shards: dict[str, list[_Shard]] = {t: [] for t in TABLES}
    _walk_root(store, out, shards)
    _check_study(root, out, any(shards.values()) or any((root / t).is_dir() for t in TABLES))
    frames = {t: _read_table(store, t, shards[t], out) for t in TABLES}
    for table in TABLES:
        _check_rows(table, shards[table], frames[table], out)
    for table, cols in _UNIQUE.items():
        _check_unique(table, frames[table], cols, out)
    _check_orphans(shards, frames, out)
    _check_lineage(shards, frames, out)
    return out.lines()


# ---------------------------------------------------------------------------- files and names
def _walk_root(store: ShardStore, out: _Problems, shards: dict[str, list[_Shard]]) -> None:
    root = store.root
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(TEMP_PREFIX):
            out.add(name, TEMP_ELSEWHERE)
        elif name in ("study.json", LOCK_NAME):
            continue  # study.json: _check_study; the lock: a launch may be running
        elif entry.is_symlink():
            out.add(name, _SYMLINK)
        elif name in OWN_FOLDERS and entry.is_dir():
            for here, _, files in os.walk(entry):  # temp files of its atomic writes
                for f in files:
                    if f.startswith(TEMP_PREFIX):
                        out.add(_rel(root, Path(here) / f), TEMP_ELSEWHERE)
        elif name in TABLES:
            if entry.is_dir():
                _walk_table(store, name, out, shards[name])
            else:
                out.add(name, f"not a folder (the {name} table is a folder of shards)")
        else:
            what = "folder" if entry.is_dir() else "file"
            out.add(name, f"unexpected {what} (not part of a distsim store; tables: "
                          f"{', '.join(TABLES)})")


def _walk_table(store: ShardStore, table: str, out: _Problems, shards: list[_Shard]) -> None:
    """Partition folders down to the shard files of `table`; anything else is a problem."""
    _walk_level(store.root, TABLES[table], table, [], out, shards)


def _walk_level(root: Path, spec: TableSpec, rel: str, parts: list[str], out: _Problems,
                shards: list[_Shard]) -> None:
    """The entries of the folder `rel` (its partition folder names `parts` so far)."""
    level, table = len(parts), spec.name
    try:
        entries = sorted(os.scandir(root / rel), key=lambda e: e.name)
    except OSError as exc:
        out.add(rel, f"unreadable folder ({exc.strerror or exc})")
        return
    for e in entries:
        here = f"{rel}/{e.name}"
        if e.name.startswith(TEMP_PREFIX):
            out.add(here, TEMP_IN_TABLE)
        elif e.is_symlink():
            out.add(here, _SYMLINK)
        elif e.is_dir(follow_symlinks=False):
            if level >= len(spec.partition):
                out.add(here, f"unexpected folder in the {table} table (its shards are files "
                              "here)")
            elif _key([spec.partition[level]], [e.name], spec) is None:
                out.add(here, f"unexpected folder in the {table} table (expected "
                              f"{spec.partition[level]}=<value>)")
            else:
                _walk_level(root, spec, here, [*parts, e.name], out, shards)
        else:
            key = _shard_key(spec, parts, e.name) if level == len(spec.partition) else None
            if key is None:
                out.add(here, f"not a {table} shard name")
            else:
                shards.append(_Shard(Path(e.path), here, key))


def _shard_key(spec: TableSpec, parts: list[str], name: str) -> dict[str, Any] | None:
    """The key of the shard file `name` in the partition folders `parts`, when it is the name
    :meth:`ShardStore.shard_path` gives that key (else None)."""
    if not name.endswith(".parquet"):
        return None
    stem = name[: -len(".parquet")]
    leaf = _LEAF_SPLIT[spec.name].split(stem)
    key = _key(spec.name_columns, [*parts, *leaf], spec)
    return key if key is not None and "-".join(leaf) == stem else None


def _key(cols: Iterable[str], items: list[str], spec: TableSpec) -> dict[str, Any] | None:
    """{col: value} of the ``col=value`` items, one per column in order (an optional or legacy
    key column may be absent: None), each value as ``shard_path`` writes it (matching KEY_VALUE;
    ints in canonical form), else None."""
    key: dict[str, Any] = {}
    rest = list(items)
    for col in cols:
        name, eq, value = rest[0].partition("=") if rest else ("", "", "")
        if name != col and col in (*spec.optional, *spec.legacy):
            key[col] = None
            continue
        if name != col or not eq or not KEY_VALUE.match(value):
            return None
        rest.pop(0)
        if col in _INT_KEYS[spec.name]:
            try:
                key[col] = int(value)
            except ValueError:
                return None
            if str(key[col]) != value:
                return None
        else:
            key[col] = value
    return None if rest else key


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------- study.json
def _check_study(root: Path, out: _Problems, has_tables: bool) -> None:
    path = root / "study.json"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        out.add("study.json", "not a plain file")
        return
    if not path.exists():
        if has_tables:
            out.add("study.json", "missing (a store's tables belong to the study it names; "
                                  "`distsim launch` writes it)")
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        out.add("study.json", f"not valid JSON ({_first_line(exc)}); `distsim launch "
                              "STUDY.toml` rewrites it when every stored shard matches that study")
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("hash"), str) or not doc["hash"]:
        out.add("study.json", 'no "hash" (not written by distsim)')


# ---------------------------------------------------------------------------- shards
def _canon(t: pa.DataType) -> str:
    """A type as the contract sees it (string = large string, list = large list)."""
    if pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_canon(t.value_type)}>"
    return str(t)


def _needed(table: str) -> list[str]:
    """Columns the checks read from the files of `table`: the key columns stored in them, then
    those of _NEEDED."""
    spec = TABLES[table]
    cols = [c for c in spec.name_columns if c not in spec.partition]
    return cols + [c for c in _NEEDED[table] if c not in cols]


_FILE_SCHEMA = {t: spec.file_schema for t, spec in TABLES.items()}
_FILE_TYPES = {t: {f.name: _canon(f.type) for f in schema}  # {column: type as the contract
               for t, schema in _FILE_SCHEMA.items()}  # sees it} of each table's files
_NEEDED_COLS = {t: frozenset(_needed(t)) for t in TABLES}


def _check_schema(table: str, shard: _Shard, schema: pa.Schema, out: _Problems) -> bool:
    """Report columns missing, extra or of another type; True when the needed ones are fine."""
    if schema.equals(_FILE_SCHEMA[table], check_metadata=False):
        return True  # the usual case, at C++ speed
    spec, want, needed = TABLES[table], _FILE_TYPES[table], _NEEDED_COLS[table]
    got = {f.name: _canon(f.type) for f in schema}
    usable = True
    for name, type_ in want.items():
        if name not in got:
            if name in ADDED_COLUMNS.get(table, ()):
                continue
            if LINEAGE_COLUMNS.get(table) != name:  # no lineage: reported by the lineage check
                out.add(shard.rel, f"missing column {name}")
                usable = usable and name not in needed
        elif got[name] != type_:
            out.add(shard.rel, f"column {name} is {got[name]}, the {table} table says {type_}")
            usable = usable and name not in needed
    for name in got:
        if name not in want:
            where = " (it lives in the folder name)" if name in spec.partition else ""
            out.add(shard.rel, f"unexpected column {name}{where}")
    return usable


def _read_table(store: ShardStore, table: str, shards: list[_Shard],
                out: _Problems) -> pl.DataFrame:
    """The needed columns of every usable shard of `table`, with ``_rel`` (the shard's path)
    and the partition columns (from the folder names)."""
    spec = TABLES[table]
    for shard in shards:
        try:
            meta = pq.read_metadata(shard.path)
            schema = meta.schema.to_arrow_schema()
        except Exception as exc:  # any damage: a truncated file, not Parquet at all
            out.add(shard.rel, f"unreadable shard ({_first_line(exc)})")
            continue
        shard.rows = meta.num_rows
        shard.usable = _check_schema(table, shard, schema, out)
    types = polars_schema(spec.schema)
    needed = {c: types[c] for c in _needed(table)}
    usable = [s for s in shards if s.usable]
    try:
        data = _scan([s.path for s in usable], needed)
    except Exception:  # a file whose footer reads but whose data does not: find it
        parts = []
        for s in usable:
            try:
                parts.append(_scan([s.path], needed))
            except Exception as exc:
                out.add(s.rel, f"unreadable shard ({_first_line(exc)})")
                s.usable = False
        data = pl.concat(parts) if parts else _scan([], needed)
    names = pl.DataFrame(
        {"_file": [str(s.path) for s in usable], "_rel": [s.rel for s in usable],
         **{c: [s.key[c] for s in usable] for c in spec.partition}},
        schema={"_file": pl.String, "_rel": pl.String, **{c: types[c] for c in spec.partition}},
    )
    return data.join(names, on="_file", how="left").drop("_file")


def _scan(paths: list[Path], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    if not paths:
        return pl.DataFrame(schema={**schema, "_file": pl.String})
    return pl.scan_parquet(
        [str(p) for p in paths], schema=schema, missing_columns="insert", extra_columns="ignore",
        include_file_paths="_file", glob=False, hive_partitioning=False,
    ).collect()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------- rows
def _check_rows(table: str, shards: list[_Shard], df: pl.DataFrame, out: _Problems) -> None:
    """Key columns stored in the files equal the names' keys; statuses; rows per shard."""
    spec = TABLES[table]
    by_rel = {s.rel: s for s in shards}
    for col in (c for c in spec.name_columns if c not in spec.partition):
        given = [s for s in shards if s.usable and (col not in spec.legacy
                                                    or s.key[col] is not None)]
        named = pl.DataFrame({"_rel": [s.rel for s in given],
                              "_named": [s.key[col] for s in given]},
                             schema={"_rel": pl.String, "_named": df.schema[col]})
        bad = (df.select("_rel", col).join(named, on="_rel")
               .filter(pl.col(col).ne_missing(pl.col("_named")))
               .group_by("_rel").agg(pl.col(col).unique()))
        for rel, values in bad.iter_rows():
            said = ", ".join(f"{col}={_text(v)}" for v in sorted(values, key=str))
            out.add(rel, f"rows say {said} but the name says {col}={by_rel[rel].key[col]}")
    if table == "models":
        bad = (df.filter(~pl.col("status").is_in(STATUSES) | pl.col("status").is_null())
               .group_by("_rel").agg(pl.col("status").unique()))
        for rel, values in bad.iter_rows():
            shown = ", ".join(sorted(repr(v) if v is not None else "null" for v in values))
            out.add(rel, f"status {shown} not one of {', '.join(STATUSES)}")
    for s in shards:
        if s.rows < 0:
            continue
        one_row = table == "tests" or (table == "pairs" and s.key["block_j"] is not None)
        if one_row and s.rows != 1:
            what = "a tests shard" if table == "tests" else "a pairs shard named with block_j"
            out.add(s.rel, f"holds {s.rows} rows, {what} holds exactly one")
        elif table in ("pairs", "neighbors") and s.rows == 0:
            out.add(s.rel, "holds no rows (relaunch recomputes)")


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def _check_unique(table: str, df: pl.DataFrame, cols: tuple[str, ...], out: _Problems) -> None:
    """A key held more than once: one line per shard holding it, naming the other shards."""
    counts = df.group_by([*cols, "_rel"]).agg(pl.len().alias("_n"))
    dup = counts.filter(pl.col("_n").sum().over(list(cols)) > 1)
    if dup.height == 0:
        return
    holders: dict[tuple[Any, ...], list[tuple[str, int]]] = defaultdict(list)
    for row in dup.iter_rows():
        holders[tuple(row[: len(cols)])].append((row[-2], row[-1]))
    lines: dict[tuple[str, tuple[str, ...], bool], list[str]] = defaultdict(list)
    for key, where in holders.items():
        for rel, n in where:
            others = tuple(sorted(r for r, _ in where if r != rel))
            lines[(rel, others, n > 1)].append("/".join(_text(v) for v in key))
    what = "/".join(cols)
    for (rel, others, within), keys in lines.items():
        places = (["repeated in this shard"] if within else []) + (
            [f"also in {', '.join(others)}"] if others else [])
        out.add(rel, f"duplicate {what} {_listed(keys)} ({'; '.join(places)})")


def _listed(values: Iterable[str]) -> str:
    items = sorted(values)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _check_orphans(shards: dict[str, list[_Shard]], frames: dict[str, pl.DataFrame],
                   out: _Problems) -> None:
    """Weights of a model without a models row, features of one without an ``ok`` row
    (skipped when some models shard cannot be read: its rows are unknown)."""
    if any(not s.usable for s in shards["models"]):
        return
    models = frames["models"]
    for table, known, what in (
        ("weights", models["model_id"], "no models row"),
        ("history", models["model_id"], "no models row"),
        ("features", models.filter(pl.col("status") == "ok")["model_id"], "no ok models row"),
    ):
        bad = (frames[table].filter(~pl.col("model_id").is_in(known.implode()))
               .group_by("_rel").agg(pl.col("model_id").unique()))
        for rel, ids in bad.iter_rows():
            out.add(rel, f"orphan {table}: {what} for model_id "
                         f"{_listed(_text(i) for i in ids)}")


# ---------------------------------------------------------------------------- lineage
def _with_tokens(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with ``_token``: ``model_id@trial_id`` (a null as "None"), what
    :func:`distsim.store.lineage.token` makes of each row, in one polars expression."""
    return df.with_columns(_token=pl.concat_str(
        pl.col("model_id").fill_null("None"), pl.lit("@"), pl.col("trial_id").fill_null("None")))


def _check_lineage(shards: dict[str, list[_Shard]], frames: dict[str, pl.DataFrame],
                   out: _Problems) -> None:
    """Features computed from their pack's ok models now; outputs from their matrix now."""
    models = _with_tokens(frames["models"])
    pack_cols = ["arch", "task", "pack"]
    packs: dict[tuple[Any, ...], frozenset[str]] = {
        tuple(row[:3]): frozenset(t for t in row[3] if t is not None)
        for row in models.group_by(pack_cols).agg(
            pl.when(pl.col("status") == "ok").then(pl.col("_token")).unique()).iter_rows()
    }
    unknown_packs = {tuple(s.key[c] for c in pack_cols) for s in shards["models"]
                     if not s.usable}
    features = _with_tokens(frames["features"])
    per_shard = {rel: (frozenset(tokens), nulls) for rel, tokens, nulls in features.group_by(
        "_rel").agg(pl.col("_token").unique(), pl.col("trial_id").null_count()).iter_rows()}
    orphans = {rel for rel, text in out.items if text.startswith("orphan features")}
    for s in shards["features"]:
        pack = tuple(s.key[c] for c in pack_cols)
        if not s.usable or pack in unknown_packs or s.rel in orphans:
            continue
        tokens, nulls = per_shard.get(s.rel, (frozenset(), 0))
        if nulls:
            out.add(s.rel, NO_LINEAGE)
        elif tokens != packs.get(pack, frozenset()):
            out.add(s.rel, STALE_FEATURES)
    upstream: dict[tuple[Any, ...], str] = {}  # (arch, method, layer, epoch): fingerprint
    for row in features.group_by(_MATRIX).agg(pl.col("_token").unique()).iter_rows():
        key, tokens = tuple(row[:3]), row[3]
        upstream[(*key, None)] = fingerprint(tokens)
        by_epoch: dict[int, list[str]] = {}  # [train] save_epochs: each epoch's checkpoints
        for t in tokens:
            epoch = model_epoch(t.rsplit("@", 1)[0])
            if epoch is not None:
                by_epoch.setdefault(epoch, []).append(t)
        upstream.update({(*key, e): fingerprint(ts) for e, ts in by_epoch.items()})
    unknown = {tuple(s.key[c] for c in _MATRIX) for s in shards["features"] if not s.usable}
    for table in ("pairs", "neighbors", "tests"):
        held = {rel: set(values) for rel, values in frames[table].group_by("_rel").agg(
            pl.col("upstream").unique()).iter_rows()}
        for s in shards[table]:
            matrix = tuple(s.key[c] for c in _MATRIX)
            if not s.usable or s.rel not in held or matrix in unknown:
                continue  # unreadable, or empty (reported by _check_rows)
            values = held[s.rel]
            if None in values:
                out.add(s.rel, NO_LINEAGE)
            elif not fresh(values, upstream.get((*matrix, s.key.get("epoch")),
                                                fingerprint([]))):
                out.add(s.rel, STALE_OUTPUT)
