"""The Small CNN Zoo's weights table (Unterthiner et al.), the "weights-table" import layout.

``weights.npy`` (rows x parameters, float32), ``layout.csv`` (``varname,start_idx,end_idx,shape``,
TensorFlow's sorted variable order, shape a tuple literal) and ``metrics.csv[.gz]`` (row i
describes weights row i: ``config.*``, ``modeldir``, ``step``, accuracies, losses), as
google-research ``dnn_predict_accuracy/README.md`` describes them and AllanYangZhou/nfn
``experiments/data_utils.py`` reads them. A model is one ``modeldir`` (without that column: one
set of ``config.*`` values), an epoch its ``step``. The table is memory-mapped and parsed once
per process (keyed by the files' stat); a unit of work slices its rows in one read.
:mod:`distsim.zoo.sources` lists and reads it through :func:`list_table` and :func:`read_rows`.
"""

from __future__ import annotations

import ast
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from distsim.zoo.sources import (
    Checkpoint,
    Entry,
    SourceError,
    _first_line,
    _need_columns,
    _read_frame,
    _scalar,
    _sha,
    _stamp,
)

LAYOUT_COLUMNS = ("varname", "start_idx", "end_idx", "shape")


@dataclass(frozen=True)
class _Table:
    weights: np.ndarray  # (rows, parameters), memory-mapped
    layout: list[tuple[str, int, int, tuple[int, ...]]]  # varname, start, end, shape
    metrics: pl.DataFrame  # row i describes weights row i
    names: list[str]  # the model of each row
    stamp: str


def _table(base: Path) -> _Table:
    gz, csv = base / "metrics.csv.gz", base / "metrics.csv"
    files = [base / "weights.npy", base / "layout.csv", gz if gz.is_file() and not csv.is_file()
             else csv]
    for p in files:
        if not p.is_file():
            raise SourceError.at(p, "no such file (a weights-table zoo has weights.npy, "
                                 "layout.csv and metrics.csv or metrics.csv.gz)")
    return _load_table(*map(str, files), "+".join(_stamp(p) for p in files))


@functools.lru_cache(maxsize=4)
def _load_table(weights: str, layout: str, metrics: str, stamp: str) -> _Table:
    try:
        w = np.load(weights, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise SourceError.at(weights, f"cannot read it as .npy ({_first_line(exc)})") from exc
    if w.ndim != 2:
        raise SourceError.at(weights, f"must be (rows, parameters), has shape {w.shape}")
    lay = _read_frame(Path(layout))
    _need_columns(lay, Path(layout), LAYOUT_COLUMNS)
    rows = []
    for i, (name, start, end, shape_text) in enumerate(lay.select(LAYOUT_COLUMNS).iter_rows()):
        try:
            shape = tuple(int(s) for s in ast.literal_eval(str(shape_text)))
        except (ValueError, SyntaxError, TypeError) as exc:
            raise SourceError.at(layout, f"row {i + 1}: shape {shape_text!r} is not a tuple "
                                 "of ints") from exc
        if end - start != math.prod(shape) or start < 0 or end > w.shape[1]:
            raise SourceError.at(layout, f"row {i + 1} ({name}): columns {start}..{end} do not "
                                 f"hold shape {shape} within {w.shape[1]} parameters")
        rows.append((str(name), int(start), int(end), shape))
    df = _read_frame(Path(metrics))
    _need_columns(df, Path(metrics), ("step",))
    if df.height != w.shape[0]:
        raise SourceError.at(metrics, f"has {df.height} rows, weights.npy has {w.shape[0]}")
    if "modeldir" in df.columns:
        names = [str(x) for x in df["modeldir"].to_list()]
    else:  # one model per set of config.* values
        cfg = df.select([c for c in df.columns if c.startswith("config.")])
        names = ["config-" + _sha(json.dumps(r).encode())[:12] for r in cfg.iter_rows()]
    keys = list(zip(names, df["step"].to_list(), strict=True))
    if len(set(keys)) < len(keys):
        name, step = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise SourceError.at(metrics, f"model {name!r} has two rows of step {step}")
    return _Table(w, rows, df, names, stamp)


def list_table(base: Path) -> list[Entry]:
    """One entry per weights row: its model (modeldir or config), its step, its row."""
    table = _table(base)
    steps = table.metrics["step"].to_list()
    return [Entry(name, None if step is None else int(step), "weights.npy", i, table.stamp)
            for i, (name, step) in enumerate(zip(table.names, steps, strict=True))]


def read_row(base: Path, entry: Entry) -> Checkpoint:
    """One entry's checkpoint (SourceError for a row out of range)."""
    found = read_rows(base, [entry])[0]
    if isinstance(found, SourceError):
        raise found
    return found


def read_rows(base: Path, entries: list[Entry]) -> list[Checkpoint | SourceError]:
    """The checkpoints of weights-table entries: their rows in one slice of weights.npy, their
    metrics rows in one slice of metrics.csv (a row out of range: its SourceError)."""
    table = _table(base)
    n = table.weights.shape[0]
    wanted = [e.row for e in entries if e.row is not None and 0 <= e.row < n]
    block = np.asarray(table.weights[wanted]) if wanted else None  # (rows, parameters)
    metrics = table.metrics[wanted].to_dicts() if wanted else []
    out: list[Checkpoint | SourceError] = []
    k = 0
    for entry in entries:
        if entry.row is None or not 0 <= entry.row < n:
            out.append(SourceError.at(base / "weights.npy",
                                      f"row {entry.row} out of range ({n} rows)"))
            continue
        assert block is not None
        row = block[k]
        meta = {key: _scalar(v) for key, v in metrics[k].items()}
        k += 1
        meta["epoch"] = meta["step"]
        text = json.dumps(meta, sort_keys=True, default=str).encode()
        tensors = [(name, row[s:e].reshape(shape)) for name, s, e, shape in table.layout]
        out.append(Checkpoint(entry, tensors, meta, _sha(row.tobytes(), text), "tensorflow"))
    return out
