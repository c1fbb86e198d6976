"""Foreign zoos of checkpoints: list and read the four source layouts an import study reads.

Each format lists its models cheaply (folders, file stats, small metadata files) as
:class:`Entry` rows and reads one as a :class:`Checkpoint` (tensors in stored order, flat
metadata, a digest of the bytes read); :mod:`distsim.zoo.mapping` maps the tensors.

- ``model-zoos`` (Schürholt et al.; ModelZoos/ModelZooDataset's loader
  ``code/checkpoints_to_datasets/dataset_base.py``): one Ray Tune trial folder per model
  (children of the root, or one level below), a torch state dict in
  ``<trial>/checkpoint_<epoch>/checkpoints`` (``checkpoint_<e>`` before the zero-padded
  ``checkpoint_<e:06d>``, the loader's order), ``result.json`` with one JSON line per iteration.
  An epoch's metadata: the result line whose ``training_iteration`` is the epoch (the loader
  asserts it; lines without it: line ``epoch - 1``, or ``epoch`` when ``checkpoint_0`` exists,
  its ``idx_offset`` rule) and that line's ``config`` (what it reads; else ``params.json``).
- ``weights-table`` (Unterthiner et al.'s Small CNN Zoo; google-research
  ``dnn_predict_accuracy/README.md``, ``layout.csv`` as AllanYangZhou/nfn
  ``experiments/data_utils.py`` reads it): ``weights.npy`` (rows x parameters, float32),
  ``layout.csv`` (``varname,start_idx,end_idx,shape``, TensorFlow's sorted variable order, so a
  layer's ``bias:0`` before its ``kernel:0``; shape a tuple literal), ``metrics.csv[.gz]`` (row i
  describes weights row i: ``config.*``, ``modeldir``, ``step``, accuracies, losses). A model is
  one ``modeldir`` (without that column: one set of ``config.*`` values), an epoch its ``step``
  (:mod:`distsim.zoo.weights_table`).
- ``state-dicts``: ``.pt`` (torch.save of a state dict) or ``.safetensors`` files, listed by a
  manifest (``manifest.csv`` / ``.parquet`` at the root, or the file ``manifest=`` names) with a
  ``path`` column (relative to the root) and label columns, or found recursively with
  ``labels="folder"`` (label: the file's folder name). A ``.safetensors`` file stores tensors
  sorted by dtype and name; they are read in torch's module order rebuilt from the names
  (module paths in natural order, ``weight`` before ``bias``, nn.GRU's ``weight_ih, weight_hh,
  bias_ih, bias_hh`` per layer).
- ``distsim-export``: what :mod:`distsim.export` writes, ``<stem>.safetensors`` and a
  ``<stem>.json`` sidecar, one model (``distsim-model/1``) or stacked ``[n_models, ...]``
  (``distsim-zoo/1``); tensors in the sidecar's ``tensors`` order.

Non-float tensors (``num_batches_tracked``) are left out, float16/bfloat16 read as float32.
Importing this module loads no torch or safetensors; reading such a file does.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import polars as pl

from distsim.errors import DistsimError

FORMATS = ("distsim-export", "model-zoos", "weights-table", "state-dicts")
MODEL_FORMAT, ZOO_FORMAT = "distsim-model/1", "distsim-zoo/1"  # distsim.export's sidecars
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


class SourceError(DistsimError):
    """A zoo that cannot be read as its format says: ``"zoo.path: <file>: <problem>"``."""

    @classmethod
    def at(cls, path: str | os.PathLike[str], problem: str, key: str = "zoo.path") -> SourceError:
        return cls(f"{key}: {path}: {problem}")


@dataclass(frozen=True)
class Entry:
    """One row-to-be of the models table: one checkpoint of one model of a foreign zoo.

    name: the model's name in its source (trial folder, file path, modeldir, model_id), unique
    per model; epoch: the checkpoint's epoch, None where the source keeps one state per model;
    file: the tensor file, relative to the root; row: its weights.npy row or stack index;
    stamp: ``size:mtime_ns`` of the file and of the metadata files read with it, joined by
    ``+``, at listing time; task, seed, model_id: the exported model's (distsim-export only).
    """

    name: str
    epoch: int | None
    file: str
    row: int | None
    stamp: str
    task: int = 0
    seed: int | None = None
    model_id: str | None = None


@dataclass
class Checkpoint:
    """One entry read: its tensors in stored order (names and dtypes as stored, float32 or
    float64), the source's flat metadata of it, the sha256 of the bytes read, and the tensors'
    layout ("torch", or "tensorflow" for weights-table)."""

    entry: Entry
    tensors: list[tuple[str, np.ndarray]]
    meta: dict[str, Any]
    digest: str
    layout: str


def list_entries(fmt: str, root: str | os.PathLike[str],
                 epochs: str | tuple[int, ...] = "last", *, manifest: str | None = None,
                 labels: str | None = None) -> list[Entry]:
    """Every entry of the zoo at `root`, sorted by name then epoch.

    epochs: "last" (each model's highest epoch), "all", or a tuple of epochs every model must
    have. Lists folders, stats files and reads only metadata files (manifest, sidecars,
    metrics.csv, layout.csv). SourceError (one line) for an unknown format, a missing root, no
    model, a malformed manifest or table, or a model lacking a requested epoch.
    """
    base = _root(fmt, root)
    if fmt == "model-zoos":
        found = _list_model_zoos(base)
    elif fmt == "weights-table":
        from distsim.zoo.weights_table import list_table  # imports this module

        found = list_table(base)
    elif fmt == "state-dicts":
        found = _list_state_dicts(base, _manifest_path(base, manifest, labels), labels)
    else:
        found = _list_export(base)
    if not found:
        raise SourceError.at(base, f"no model found in the {fmt} layout")
    return _select(found, epochs, base)


def read_entry(fmt: str, root: str | os.PathLike[str], entry: Entry,
               manifest: str | None = None, labels: str | None = None) -> Checkpoint:
    """The tensors and metadata of one listed entry. SourceError naming the file for an
    unreadable or corrupt file. Parsed tables and sidecars are cached per process, keyed by
    path and stat."""
    base = _root(fmt, root)
    path = base / entry.file
    if not path.is_file():
        raise SourceError.at(path, "no such file (listed, since removed?)")
    if fmt == "model-zoos":
        data, tensors = _read_tensor_file(path)
        meta = _zoo_meta(path.parent.parent, entry.epoch)
        return Checkpoint(entry, tensors, meta, _sha(data), "torch")
    if fmt == "weights-table":
        from distsim.zoo.weights_table import read_row

        return read_row(base, entry)
    if fmt == "state-dicts":
        data, tensors = _read_tensor_file(path)
        mpath = _manifest_path(base, manifest, labels)
        if mpath is not None:
            rows = _manifest(str(base), str(mpath), _stamp(mpath))
            if entry.file not in rows:
                raise SourceError.at(mpath, f"no longer lists {entry.file!r}")
            meta = dict(rows[entry.file])
        else:
            meta = {"label": path.parent.name} if labels == "folder" else {}
        return Checkpoint(entry, tensors, meta, _sha(data), "torch")
    return _read_export(base, path, entry)


def read_entries(fmt: str, root: str | os.PathLike[str], entries: list[Entry],
                 manifest: str | None = None,
                 labels: str | None = None) -> list[Checkpoint | SourceError]:
    """:func:`read_entry` of each entry, in order, an unreadable one's SourceError in its place:
    what one unit of work reads. A weights table's rows are sliced in one read."""
    if fmt == "weights-table":
        from distsim.zoo.weights_table import read_rows

        return read_rows(_root(fmt, root), entries)
    out: list[Checkpoint | SourceError] = []
    for entry in entries:
        try:
            out.append(read_entry(fmt, root, entry, manifest, labels))
        except SourceError as exc:
            out.append(exc)
    return out


def _root(fmt: str, root: str | os.PathLike[str]) -> Path:
    if fmt not in FORMATS:
        raise SourceError(f"zoo.format: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    base = Path(root)
    if not base.is_dir():
        raise SourceError.at(base, "no such folder")
    return base


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _sha(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _scalar(v: Any) -> Any:
    """A JSON scalar of a metadata value: lists (and tuples, arrays) JSON-encoded."""
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(list(v), default=str) if isinstance(v, (list, tuple)) else str(v)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened with ``::`` between keys; values made JSON scalars."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}::{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, Mapping) else {key: _scalar(v)})
    return out


def _select(found: list[Entry], epochs: str | tuple[int, ...], base: Path) -> list[Entry]:
    """The entries the epochs option keeps, sorted by name then epoch."""
    found = sorted(found, key=lambda e: (e.name, -1 if e.epoch is None else e.epoch))
    if epochs == "all":
        return found
    by_name: dict[str, list[Entry]] = {}
    for e in found:
        by_name.setdefault(e.name, []).append(e)
    if epochs == "last":
        return [group[-1] for group in by_name.values()]
    if not isinstance(epochs, (tuple, list)) or not all(isinstance(e, int) for e in epochs):
        raise SourceError(f"zoo.epochs: must be 'last', 'all' or a tuple of epochs, got {epochs!r}")
    kept = []
    for name, group in by_name.items():
        have = {e.epoch: e for e in group}
        missing = [e for e in epochs if e not in have]
        if missing:
            has = ", ".join(str(e) for e in have if e is not None) or "none (one state per model)"
            raise SourceError(f"zoo.epochs: {base}: model {name!r} has no checkpoint of epoch "
                              f"{', '.join(map(str, missing))} (its epochs: {has})")
        kept += [have[e] for e in sorted(set(epochs))]
    return kept


def _read_tensor_file(path: Path) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    """The bytes of a .safetensors file or a torch state dict file, and its float tensors."""
    data = _read_bytes(path)
    if path.suffix == ".safetensors":
        arrays = _safetensors(data, path)
        return data, [(n, _as_float(arrays[n])) for n in _torch_order(arrays)
                      if arrays[n].dtype.kind == "f"]
    import torch  # only a torch file loads torch

    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # zip, pickle and format errors all mean "not a state dict file"
        raise SourceError.at(path, f"cannot read it as a torch state dict ({_first_line(exc)})"
                             ) from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError.at(path, f"holds a {type(obj).__name__}, not a state dict "
                             "(a mapping of names to tensors)")
    return data, [(str(k), (v if v.dtype == torch.float64 else v.float()).detach().numpy())
                  for k, v in obj.items() if v.is_floating_point()]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceError.at(path, f"cannot read it ({exc.strerror})") from exc


def _json(path: Path) -> Any:
    try:
        return json.loads(_read_bytes(path))
    except ValueError as exc:  # also a bad UTF-8 encoding
        raise SourceError.at(path, f"is not JSON ({_first_line(exc)})") from exc


def _safetensors(data: bytes, path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file's bytes, by name (safetensors' numpy loader)."""
    from safetensors.numpy import load  # only a safetensors file loads safetensors

    try:
        return load(data)
    except Exception as exc:  # SafetensorError (header, offsets) or an unsupported dtype
        raise SourceError.at(path, f"not a safetensors file ({_first_line(exc)})") from exc


def _as_float(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _torch_order(names: Iterable[str]) -> list[str]:
    """Names in torch's module order, rebuilt: modules in natural order of their path, then
    weight, bias, nn.GRU's weight_ih/hh, bias_ih/hh per layer, then the rest."""
    rank = {"weight": 0, "bias": 1, "weight_ih": 0, "weight_hh": 1, "bias_ih": 2, "bias_hh": 3}

    def key(name: str) -> tuple[Any, ...]:
        module, _, leaf = name.rpartition(".")
        m = re.fullmatch(r"(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?", leaf)
        if m:
            return (_natural(module), int(m.group(2)), bool(m.group(3)), rank[m.group(1)], "")
        return (_natural(module), -1, False, rank.get(leaf, 9), _natural(leaf))
    return sorted(names, key=key)


def _checkpoints(folder: Path) -> dict[int, str]:
    """epoch -> checkpoint folder name holding a ``checkpoints`` file (``checkpoint_<e>``
    preferred over a zero-padded one, the published loader's order)."""
    found: dict[int, str] = {}
    for item in os.scandir(folder):
        m = _CHECKPOINT.match(item.name)
        if m and os.path.isfile(os.path.join(item.path, "checkpoints")):
            epoch = int(m.group(1))
            if epoch not in found or item.name == f"checkpoint_{epoch}":
                found[epoch] = item.name
    return found


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_model_zoos(base: Path) -> list[Entry]:
    entries = []
    for child in _subfolders(base):
        trials = [child] if _checkpoints(child) else _subfolders(child)  # one level below
        for trial in trials:
            ckpts = _checkpoints(trial)
            name = trial.relative_to(base).as_posix()
            meta = [_stamp(trial / f) for f in ("result.json", "params.json")
                    if (trial / f).is_file()]
            for epoch, folder in ckpts.items():
                file = f"{name}/{folder}/checkpoints"
                stamp = "+".join([_stamp(base / file), *meta])
                entries.append(Entry(name, epoch, file, None, stamp))
    return entries


@functools.lru_cache(maxsize=16)
def _json_lines(path: str, stamp: str) -> list[dict[str, Any]]:
    text = _read_bytes(Path(path)).decode("utf-8", "replace").splitlines()
    try:
        return [json.loads(x) for x in text if x.strip()]
    except ValueError as exc:
        raise SourceError.at(path, f"holds a line that is not JSON ({_first_line(exc)})") from exc


def _zoo_meta(trial: Path, epoch: int | None) -> dict[str, Any]:
    """The metrics and config of a trial's epoch (see the module docstring), plus ``epoch``."""
    assert epoch is not None  # every model-zoos entry has an epoch
    result, params = trial / "result.json", trial / "params.json"
    line: dict[str, Any] | None = {}
    if result.is_file():
        lines = _json_lines(str(result), _stamp(result))
        if all("training_iteration" in x for x in lines):  # Ray Tune writes it on every line
            line = next((x for x in lines if x["training_iteration"] == epoch), None)
        else:  # the loader's idx_offset: line epoch - 1, or epoch when checkpoint_0 exists
            i = epoch - (0 if 0 in _checkpoints(trial) else 1)
            line = lines[i] if 0 <= i < len(lines) else None
        if line is None:
            raise SourceError.at(result, f"has no line for epoch {epoch} ({len(lines)} lines)")
    line = line or {}
    config = line.get("config")
    if not isinstance(config, Mapping) and params.is_file():
        config = _json(params)
    metrics = {k: v for k, v in line.items() if k != "config"}
    return {**_flat(metrics), **_flat(config if isinstance(config, Mapping) else {}),
            "epoch": epoch}


def _read_frame(path: Path) -> pl.DataFrame:
    """A CSV (gzipped or not) or Parquet file as a frame."""
    data, kind = _read_bytes(path), "Parquet" if path.suffix == ".parquet" else "CSV"
    try:
        if kind == "Parquet":
            return pl.read_parquet(io.BytesIO(data))
        data = gzip.decompress(data) if path.suffix == ".gz" else data
        return pl.read_csv(io.BytesIO(data), infer_schema_length=None)
    except Exception as exc:  # gzip, encoding, CSV and Parquet errors
        raise SourceError.at(path, f"cannot read it as {kind} ({_first_line(exc)})") from exc


def _need_columns(df: pl.DataFrame, path: Path, columns: Iterable[str]) -> None:
    for col in columns:
        if col not in df.columns:
            raise SourceError.at(path, f"no column {col!r} (columns: {', '.join(df.columns)})")


def _manifest_path(base: Path, manifest: str | None, labels: str | None) -> Path | None:
    if labels not in (None, "folder"):
        raise SourceError(f"zoo.labels: must be 'folder' or unset, got {labels!r}")
    if labels and manifest:
        raise SourceError("zoo.labels: give zoo.manifest or zoo.labels, not both")
    if manifest is not None:
        if not (base / manifest).is_file():
            raise SourceError.at(base / manifest, "no such manifest file")
        return base / manifest
    found = [base / n for n in ("manifest.csv", "manifest.parquet") if (base / n).is_file()]
    return found[0] if found and labels is None else None


@functools.lru_cache(maxsize=4)
def _manifest(root: str, path: str, stamp: str) -> dict[str, dict[str, Any]]:
    """file (relative to the root) -> its row's other columns."""
    p = Path(path)
    df = _read_frame(p)
    _need_columns(df, p, ("path",))
    rows: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(df.iter_rows(named=True)):
        if row["path"] is None or not str(row["path"]).strip():
            raise SourceError.at(p, f"row {i + 1} has an empty path")
        file = PurePosixPath(*PurePosixPath(str(row.pop("path"))).parts).as_posix()  # ./a//b
        if file in rows:
            raise SourceError.at(p, f"row {i + 1}: path {file!r} is listed twice")
        if not (Path(root) / file).is_file():
            raise SourceError.at(p, f"row {i + 1} names {file!r}, which does not exist under "
                                 f"{root}")
        rows[file] = {k: _scalar(v) for k, v in row.items()}
    return rows


def _list_state_dicts(base: Path, manifest: Path | None, labels: str | None) -> list[Entry]:
    if manifest is not None:
        mstamp = _stamp(manifest)
        return [Entry(f, None, f, None, f"{_stamp(base / f)}+{mstamp}")
                for f in _manifest(str(base), str(manifest), mstamp)]
    files = sorted(p for ext in ("pt", "safetensors") for p in base.rglob(f"*.{ext}"))
    loose = [p for p in files if labels == "folder" and p.parent == base]
    if loose:
        raise SourceError.at(loose[0], "is not inside a label folder (labels = 'folder' reads "
                             "<root>/<label>/<file>)")
    return [Entry(p.relative_to(base).as_posix(), None, p.relative_to(base).as_posix(), None,
                  _stamp(p)) for p in files]


@functools.lru_cache(maxsize=16)
def _sidecar(path: str, stamp: str) -> dict[str, Any]:
    doc = _json(Path(path))
    return doc if isinstance(doc, dict) else {}


def _list_export(base: Path) -> list[Entry]:
    entries: list[Entry] = []
    seen: dict[str, Path] = {}
    for side in sorted(base.glob("*.json")):
        doc = _sidecar(str(side), _stamp(side))
        if doc.get("format") not in (MODEL_FORMAT, ZOO_FORMAT):
            continue  # not a distsim sidecar
        weights = base / str(doc.get("weights", ""))
        if not weights.is_file():
            raise SourceError.at(side, f"names weights {doc.get('weights')!r}, which does not "
                                 "exist")
        stamp = f"{_stamp(weights)}+{_stamp(side)}"
        stacked = doc["format"] == ZOO_FORMAT
        rows = doc.get("models", []) if stacked else [doc.get("metrics", {})]
        for i, row in enumerate(rows):
            mid = str(row.get("model_id"))
            if mid in seen:
                raise SourceError.at(side, f"model {mid!r} is also in {seen[mid].name}")
            seen[mid] = side
            epoch, seed = row.get("epochs"), row.get("seed")
            entries.append(Entry(mid, epoch and int(epoch), weights.name, i if stacked else None,
                                 stamp, int(row.get("task", 0)), seed and int(seed), mid))
    return entries


def _read_export(base: Path, path: Path, entry: Entry) -> Checkpoint:
    side = path.with_suffix(".json")
    doc = _sidecar(str(side), _stamp(side))
    names = list(doc.get("tensors", {}))
    if entry.row is None:
        data = _read_bytes(path)
        arrays, row = _safetensors(data, path), doc.get("metrics", {})
    else:
        models = doc.get("models", [])
        if not 0 <= entry.row < len(models):
            raise SourceError.at(side, f"row {entry.row} out of range ({len(models)} models)")
        arrays, row = _stacked_row(path, names, entry.row), models[entry.row]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SourceError.at(path, f"lacks tensor {missing[0]!r} that {side.name} lists")
    tensors = [(n, _as_float(arrays[n])) for n in names]
    digest = _sha(data if entry.row is None else b"".join(n.encode() + a.tobytes()
                                                          for n, a in tensors))
    return Checkpoint(entry, tensors, {**_flat(row), "epoch": row.get("epochs")}, digest, "torch")


def _stacked_row(path: Path, names: list[str], row: int) -> dict[str, np.ndarray]:
    """Row `row` of each stacked tensor of a safetensors file (read by slices, not whole)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            have = set(f.keys())
            return {n: np.asarray(f.get_slice(n)[row]) for n in names if n in have}
    except Exception as exc:  # SafetensorError, or a row past the stack
        raise SourceError.at(path, f"cannot read row {row} ({_first_line(exc)})") from exc
