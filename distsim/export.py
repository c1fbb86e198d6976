"""Export trained models as safetensors plus a JSON sidecar, to use them without distsim's store.

One model: ``<out>/<model_id>.safetensors`` (keys: the state_dict keys of
``distsim.zoo.models.build(ArchConfig(**json["arch"]))``) and ``<out>/<model_id>.json``.
A whole arch, model-zoo style: ``<out>/<arch>.safetensors`` with every key's tensors stacked
``[n_models, ...]`` and ``<out>/<arch>.json`` listing the model ids in stack order.
Rebuilding needs only torch, safetensors and ``distsim.zoo.models``::

    meta = json.load(open("mlp-t0-s0.json"))
    net = build(ArchConfig(**meta["arch"]))
    net.load_state_dict(safetensors.torch.load_file("mlp-t0-s0.safetensors"))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import polars as pl

from distsim.errors import StoreError
from distsim.results import Results
from distsim.results import open as open_results
from distsim.store import Store
from distsim.store.codecs import json_safe
from distsim.store.shards import atomic_write

if TYPE_CHECKING:
    import torch

MODEL_FORMAT = "distsim-model/1"  # the sidecar of one model
ZOO_FORMAT = "distsim-zoo/1"  # the sidecar of a stacked arch


def export_models(store_or_results: Results | Store | str | os.PathLike[str],
                  out: str | os.PathLike[str], model_ids: Sequence[str] | None = None,
                  arch: str | None = None) -> list[Path]:
    """Write trained models under folder `out` (created); returns the files written.

    model_ids: one ``<model_id>.safetensors`` + ``<model_id>.json`` per model (any model
    with weights: ok or diverged; a failed one is a StoreError). arch: one stacked
    ``<arch>.safetensors`` + ``<arch>.json`` of the arch's ok models, sorted by task then seed.
    Neither: the stacked files of every arch of the study that has ok models. Both: StoreError.
    The JSON holds the arch config (``ArchConfig(**json["arch"])``), every tensor's shape,
    the models-table row(s), the task(s), the study's name and config hash (as study.json
    records it), and distsim's version; an imported model's row keeps its provenance
    (``source``, ``source_hash``, ``source_meta``) and the sidecar the zoo it came from.
    Files are written whole (temp file, then rename).
    """
    res = _results(store_or_results)
    folder = Path(out)
    if model_ids is not None and arch is not None:
        raise StoreError("export: give model_ids or arch, not both")
    if model_ids is not None:
        states = res.state_dicts(model_ids)
        rows = res.model_rows(list(states))
        written: list[Path] = []
        for mid, state in states.items():
            written += _write(folder, mid, state, _model_doc(res, rows[mid], state))
        return written
    archs = [arch] if arch is not None else list(res.study.arch_names)
    if arch is not None:
        res.arch_config(arch)  # StoreError naming the study's archs
    written = []
    for name in archs:
        ids = _ok_ids(res, name)
        if not ids:
            if arch is not None:
                raise StoreError(f"export: arch {name!r} has no ok models in the store")
            continue
        written += _export_arch(res, folder, name, ids)
    return written


def _results(source: Results | Store | str | os.PathLike[str]) -> Results:
    if isinstance(source, Results):
        return source
    return open_results(source)


def _ok_ids(res: Results, arch: str) -> list[str]:
    """Ids of the arch's ok models, by task then seed (the stack order)."""
    lf = res.store.scan("models").filter((pl.col("arch") == arch) & (pl.col("status") == "ok"))
    return lf.sort("task", "seed", "model_id").collect()["model_id"].to_list()


def _export_arch(res: Results, folder: Path, arch: str, ids: list[str]) -> list[Path]:
    """The stacked file and sidecar of `ids` (models of `arch`), in that order."""
    import torch

    states = res.state_dicts(ids)
    rows = res.model_rows(ids)
    keys = list(next(iter(states.values())))
    stacked = {k: torch.stack([states[mid][k] for mid in ids]) for k in keys}
    tasks = sorted({int(r["task"]) for r in rows.values()})
    doc = {
        "format": ZOO_FORMAT,
        "arch": _arch_doc(res, arch, tasks[0]),
        "tensors": {k: list(v.shape) for k, v in stacked.items()},
        "stack_axis": 0,
        "model_ids": ids,
        "models": [json_safe(rows[mid]) for mid in ids],
        "tasks": [_task_doc(res, t) for t in tasks],
        **_provenance(res),
    }
    return _write(folder, arch, stacked, doc)


def _model_doc(res: Results, row: dict[str, Any], state: dict[str, torch.Tensor]) -> dict:
    """The sidecar of one model: its arch config, tensor shapes, models row, task, study."""
    return {
        "format": MODEL_FORMAT,
        "model_id": row["model_id"],
        "arch": _arch_doc(res, row["arch"], int(row["task"])),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "metrics": json_safe(row),
        "task": _task_doc(res, int(row["task"])),
        **_provenance(res),
    }


def _arch_doc(res: Results, arch: str, task_id: int) -> dict[str, Any]:
    """Every ArchConfig field as JSON (``ArchConfig(**doc)`` rebuilds it), sized for the task."""
    return dict(json_safe(dataclasses.asdict(res.arch_config(arch, task_id))))


def _task_doc(res: Results, task_id: int) -> dict[str, Any]:
    if res.study.imports:  # an imported zoo's task is a number, with no data to rebuild
        return {"id": task_id}
    task = res.task(task_id)
    return {"id": task.task_id, "name": task.name, "classes": list(task.classes),
            "input_shape": list(task.input_shape), "num_classes": task.num_classes}


def _provenance(res: Results) -> dict[str, Any]:
    from distsim import __version__

    out: dict[str, Any] = {"study": {"name": res.study.name, "hash": res.config_hash},
                           "distsim_version": __version__}
    if res.study.imports:  # where the models came from (each row: source, hash, metadata)
        out["imported_from"] = {"format": res.study.zoo.format, "path": res.study.zoo.path}
    return out


def _write(folder: Path, stem: str, tensors: dict[str, torch.Tensor],
           doc: dict[str, Any]) -> list[Path]:
    """``<stem>.safetensors`` and ``<stem>.json`` under folder, each written whole."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    text = json.dumps({**doc, "weights": f"{stem}.safetensors"}, indent=1, allow_nan=False)
    paths = [folder / f"{stem}.safetensors", folder / f"{stem}.json"]
    for path, data in zip(paths, (blob, text.encode()), strict=True):
        atomic_write(path, functools.partial(_put, data))
    return paths


def _put(data: bytes, f: IO[bytes]) -> None:
    f.write(data)
