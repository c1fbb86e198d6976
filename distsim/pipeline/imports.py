"""The zoo stage of an import study: read a zoo someone else trained into the store, on Ray.

The source is listed in the driver (``distsim.zoo.sources.list_entries``: folders and file stats,
small metadata files; no tensor is read), in its own order, and cut into packs: pack p of task t
holds entries ``[p * zoo.pack_size, (p + 1) * zoo.pack_size)`` of that task (a foreign zoo has
one task, 0; a distsim export keeps its models' tasks). One Ray task per pending pack reads its
checkpoints (``read_entry``), maps their tensors onto the study's ``[[arch]]``
(``distsim.zoo.mapping.to_state_dict``) and writes the pack's weights shard, then its models
shard (the pack's "done" marker, as in the trained zoo).

Lineage: a models row's ``trial_id`` is ``<source>@<16 hex digits of the SHA-256 of its content
hash and its metadata>``, so the features (and the pairs and tests after them) of a checkpoint
whose bytes or metadata changed are stale; ``source_hash`` is the content hash alone. A pack is read
again when it has no models shard, records a failed model, or its entries' files changed
stat (size, mtime) since they were read (``source_stamp``); a file touched but not changed keeps
its ``trial_id``, so nothing downstream is recomputed. Packs the source no longer has (files
removed) are deleted with their features.

An unreadable or mismatched checkpoint is one line (``zoo  failed: <file>: ...``) and one
``failed`` models row with the error; its pack's other models are stored. A non-finite
checkpoint is ``diverged`` (kept, not featurized), as a trained one is.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import polars as pl

from distsim.config import Pack, Study
from distsim.pipeline.stage import Outputs, RunContext
from distsim.pipeline.units import Units, run_refs
from distsim.store import Store
from distsim.store.codecs import json_safe
from distsim.store.tables import model_epoch
from distsim.zoo.sources import Entry, SourceError  # no torch: read_entry loads it for a .pt

# models columns an import fills from the source's metadata, and the names a source may use
METRICS = {
    "test_acc": ("test_acc", "test_accuracy"),
    "train_acc": ("train_acc", "train_accuracy"),
    "test_loss": ("test_loss",),
    "train_loss": ("train_loss",),
}


@dataclass(frozen=True)
class ImportPack:
    """One unit of the import: the entries of pack `pack`, with their model ids."""

    pack: Pack
    entries: tuple[Entry, ...]
    model_ids: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"pack {self.pack.arch}-t{self.pack.task}-p{self.pack.pack}"


def source_entries(study: Study) -> list[Entry]:
    """The source's entries for the study's arch (SourceError, one line, when it cannot be
    listed: a missing path, a malformed manifest, no model found)."""
    from distsim.store.tables import parse_model_id
    from distsim.zoo.sources import list_entries

    zoo = study.zoo
    assert zoo.format is not None and zoo.path is not None  # an import study has both
    entries = list_entries(zoo.format, zoo.path, zoo.epochs, manifest=zoo.manifest,
                           labels=zoo.labels)
    if zoo.format == "distsim-export":  # a folder may hold several archs: keep the study's
        arch = study.archs[0].name
        mine = [e for e in entries if e.model_id and (parse_model_id(e.model_id) or ("",))[0]
                == arch]
        entries = mine or entries
    return entries


def plan(study: Study, entries: Iterable[Entry]) -> list[ImportPack]:
    """The import's packs: each task's entries, in source order, cut into zoo.pack_size."""
    arch, size = study.archs[0].name, study.zoo.pack_size
    by_task: dict[int, list[Entry]] = {}
    for e in entries:
        by_task.setdefault(e.task, []).append(e)
    out = []
    for task in sorted(by_task):
        items = by_task[task]
        for p in range(math.ceil(len(items) / size)):
            chunk = items[p * size:(p + 1) * size]
            ids = tuple(_model_id(arch, e, p * size + i) for i, e in enumerate(chunk))
            out.append(ImportPack(Pack(arch, task, p, ()), tuple(chunk), ids))
    seen: dict[str, Entry] = {}
    for ip in out:
        for mid, e in zip(ip.model_ids, ip.entries, strict=True):
            if mid in seen:  # e.g. one model exported both alone and in a stack
                raise SourceError(f"zoo.path: model {mid} is in the zoo twice: "
                                  f"{source_label(seen[mid])} and {source_label(e)}")
            seen[mid] = e
    return out


def _model_id(arch: str, entry: Entry, index: int) -> str:
    """``<arch>-t<task>-s<seed>`` for a distsim export's model (its own id when the arch name
    is the same; ``-e<epoch>`` kept for a checkpoint of a study with [train] save_epochs),
    ``<arch>-t<task>-m<index>`` for a foreign zoo's (index: its place in the task's entries,
    epochs included)."""
    if entry.seed is not None:
        epoch = model_epoch(entry.model_id or "")
        return f"{arch}-t{entry.task}-s{entry.seed}" + ("" if epoch is None else f"-e{epoch}")
    return f"{arch}-t{entry.task}-m{index}"


def source_label(entry: Entry) -> str:
    """Where an entry is read from: its file, with ``#<row>`` for a row of a stacked file."""
    return entry.file if entry.row is None else f"{entry.file}#{entry.row}"


def pending(study: Study, store: Store, packs: list[ImportPack]) -> list[ImportPack]:
    """Packs to read: no models shard, a failed model, other models or files that changed."""
    out = []
    for ip in packs:
        path = store.shard_path("models", ip.pack.key)
        if not path.is_file():
            out.append(ip)
            continue
        held = pl.read_parquet(path, columns=["model_id", "status", "source", "source_stamp"])
        want = [(m, source_label(e), e.stamp) for m, e in zip(ip.model_ids, ip.entries,
                                                               strict=True)]
        have = list(zip(held["model_id"], held["source"], held["source_stamp"], strict=True))
        if have != want or (held["status"] == "failed").any():
            out.append(ip)
    return out


def gone(study: Study, store: Store, packs: list[ImportPack]) -> list[dict[str, Any]]:
    """Keys of models shards of the arch that the plan no longer has (files removed)."""
    planned = {(ip.pack.task, ip.pack.pack) for ip in packs}
    arch = study.archs[0].name
    return [k for k in store.shard_keys("models", {"arch": arch})
            if (k["task"], k["pack"]) not in planned]


def drop(store: Store, key: dict[str, Any]) -> None:
    """Delete one pack's models, weights and features shards."""
    for table in ("models", "weights"):
        store.shard_path(table, key).unlink(missing_ok=True)
    leaf = f"task={key['task']}-pack={key['pack']}.parquet"
    for path in store.shard_files("features", {"arch": key["arch"]}):
        if path.name == leaf:
            path.unlink(missing_ok=True)


def read_pack(study: Study, ip: ImportPack) -> dict[str, Any]:
    """Read one pack's checkpoints and write its weights, then models shards; returns counts
    and the error lines of its failed models."""
    import numpy as np
    import torch

    from distsim.errors import DistsimError
    from distsim.pipeline.zoo import node_label
    from distsim.zoo.mapping import to_state_dict
    from distsim.zoo.sources import read_entries

    torch.set_num_threads(1)
    zoo, arch = study.zoo, study.archs[0]
    assert zoo.format is not None and zoo.path is not None
    store, node = Store(study.store), node_label()
    rows, weights, errors = [], {}, []
    start = time.perf_counter()
    read = read_entries(zoo.format, zoo.path, list(ip.entries), zoo.manifest, zoo.labels)
    seconds = (time.perf_counter() - start) / max(1, len(read))  # the pack's read, shared out
    first = ip.pack.pack * zoo.pack_size
    for index, (mid, entry, ck) in enumerate(zip(ip.model_ids, ip.entries, read, strict=True),
                                             first):
        try:
            if isinstance(ck, DistsimError):
                raise ck
            state = to_state_dict(ck.tensors, arch, ck.layout, where=source_label(entry))
        except DistsimError as exc:
            errors.append(str(exc))
            rows.append(_row(mid, index, ip.pack.task, entry, None, {}, "failed", str(exc),
                             node, seconds))
            continue
        finite = bool(np.isfinite(np.concatenate([a.reshape(-1) for _, a in ck.tensors])).all())
        weights[mid] = state
        rows.append(_row(mid, index, ip.pack.task, entry, ck.digest, ck.meta,
                         "ok" if finite else "diverged", None, node, seconds))
    store.write_weights(ip.pack.key, weights)
    store.write_shard("models", ip.pack.key, rows)
    return {"ok": sum(r["status"] == "ok" for r in rows), "failed": len(errors),
            "errors": errors, "rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(mid: str, index: int, task: int, entry: Entry, digest: str | None,
         meta: dict[str, Any], status: str, error: str | None, node: str,
         seconds: float) -> dict[str, Any]:
    """One models row of an imported checkpoint (metadata in source_meta, JSON). seed: the
    source's integer ``seed`` (a distsim export's model seed), else the entry's index."""
    source = source_label(entry)
    text = _json(meta) if meta else None
    # the lineage: its bytes and its metadata (a changed label regroups the tests)
    lineage = hashlib.sha256(f"{digest}\n{text}".encode()).hexdigest()[:16] if digest else None
    seed = meta.get("seed", entry.seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        seed = entry.seed if entry.seed is not None else index
    row: dict[str, Any] = {
        "model_id": mid,
        "task_name": meta.get("task_name") if isinstance(meta.get("task_name"), str) else None,
        "seed": seed,
        "trial_id": f"{source}@{lineage or 'unread'}",
        "status": status,
        "epochs": entry.epoch,
        "seconds": seconds,
        "node": node,
        "error": error,
        "epoch": entry.epoch,
        "source": source,
        "source_hash": digest,
        "source_stamp": entry.stamp,
        "source_meta": text,
    }
    for column, names in METRICS.items():
        value = next((meta[n] for n in names if isinstance(meta.get(n), (int, float))
                      and not isinstance(meta.get(n), bool)), math.nan)
        row[column] = float(value)
    return row


def _json(meta: dict[str, Any]) -> str:
    """The metadata as JSON (NaN and infinities as null)."""
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except ValueError:  # a NaN metric: null, as the store's JSON columns write it
        return json.dumps(json_safe(meta), sort_keys=True)


def run_import(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Read every pending pack with one Ray task each; returns counts for the launch summary.

    A pack whose task fails (its process died, an unexpected error) is submitted again, up to
    ``resources.max_failures`` times; a checkpoint that cannot be read or mapped is a failed
    model (one line each), not a failed pack.
    """
    import ray

    packs = plan(study, source_entries(study))
    for key in gone(study, store, packs):
        drop(store, key)
    todo = pending(study, store, packs)
    failed_models, first, rss = 0, None, 0.0
    units = Units("zoo", todo, label=lambda ip: ip.label,
                  max_failures=study.resources.max_failures, stream=ctx.stream, noun="pack",
                  skipped=len(packs) - len(todo))
    with units:
        if not todo:
            return {"packs": 0, "skipped": len(packs), "models": 0, "failed": 0}
        task = ray.remote(num_cpus=1, max_retries=0)(read_pack)
        ref = ray.put(study)

        def on_done(ip: ImportPack, out: dict[str, Any]) -> None:
            nonlocal failed_models, first, rss
            rss = max(rss, out["rss_mb"])
            for line in out["errors"]:
                print(f"zoo       failed: {line}", file=ctx.stream, flush=True)
            failed_models += out["failed"]
            first = first or (out["errors"][0] if out["errors"] else None)

        run_refs(units, lambda ip: task.remote(ref, ip), on_done,
                 slots=max(1, ctx.cpus))
    result: dict[str, Any] = {"packs": len(todo), "skipped": len(packs) - len(todo),
                              "models": sum(len(ip.entries) for ip in todo),
                              "failed_models": failed_models, "worker_rss_mb": round(rss, 1),
                              **units.outcome()}
    if failed_models:
        print(f"zoo       {failed_models} checkpoint(s) could not be imported; they are recorded "
              "as failed models and the next launch reads them again", file=ctx.stream,
              flush=True)
        result.setdefault("error", first)
    return result


def outputs(study: Study, store: Store) -> Outputs:
    """Packs of the source whose models shard is stored and current; failed: packs that record
    a failed model; stale: stored packs the source no longer has (counted in the total, so the
    stage runs and deletes them). A source that cannot be listed now (moved, unmounted) counts
    the stored packs."""
    from distsim.errors import DistsimError

    try:
        packs = plan(study, source_entries(study))
    except DistsimError:
        keys = store.shard_keys("models", {"arch": study.archs[0].name})
        return Outputs("packs", len(keys), len(keys))
    todo = {ip.pack for ip in pending(study, store, packs)}
    failed = sum(1 for ip in packs if store.has_shard("models", ip.pack.key) and ip.pack in todo
                 and _has_failed(store, ip.pack))
    extra = len(gone(study, store, packs))  # stored packs of files since removed: to delete
    return Outputs("packs", len(packs) + extra, len(packs) - len(todo), stale=extra,
                   failed=failed)


def _has_failed(store: Store, pack: Pack) -> bool:
    held = pl.read_parquet(store.shard_path("models", pack.key), columns=["status"])
    return bool((held["status"] == "failed").any())


def stored_packs(study: Study, store: Store) -> list[Pack]:
    """The import's packs present in the store (what the features stage works on)."""
    return [Pack(k["arch"], k["task"], k["pack"], ())
            for k in store.shard_keys("models", {"arch": study.archs[0].name})]
