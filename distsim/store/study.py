"""A study's store: the shard store bound to one study, read as weights, features, markers.

``study.json`` binds the folder to one study (its resolved config and hash); the store reads
its shards back as torch weights and feature matrices, and keeps the stages' markers and a
per-arch summary.

Layout (one folder per study; ``<k>=<v>`` folders are hive partitions)::

    <root>/study.json                                     resolved config + its hash
    <root>/_stages/<stage>.json                           a stage's "done" marker
    <root>/_stages/unfinished/<stage>.json                seconds of its runs that ended early
    <root>/_launch.lock                                   the running launch (distsim.store.lock)
    <root>/_tune/, _faults/                               Tune's trial folders; fault-test marks
    <root>/models/arch=mlp/task=3-pack=0.parquet          one shard per zoo trial
    <root>/weights/arch=mlp/task=3-pack=0.parquet
    <root>/features/arch=mlp/method=raw/layer=fc1/task=3-pack=0.parquet
    <root>/neighbors/arch=mlp/method=raw/layer=fc1/block=0.parquet
    <root>/pairs/arch=mlp/method=raw/layer=fc1/block_i=0.parquet  one shard per block row
    <root>/tests/arch=mlp/method=raw/layer=fc1/protocol=closed-set.parquet

A multi-node Ray cluster needs a store path that every node can reach (NFS, EFS, a shared
disk): each trial writes its own shards from the node it runs on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import polars as pl

from distsim.errors import StoreError
from distsim.store import codecs
from distsim.store.codecs import FeatureMatrix
from distsim.store.lock import LOCK_NAME
from distsim.store.shards import TEMP_PREFIX, ShardStore, atomic_write, polars_schema
from distsim.store.tables import KEY_VALUE, STATUSES, TABLES, parse_model_id

if TYPE_CHECKING:
    import torch

    from distsim.config import Study


RESTORE = ("`distsim launch STUDY.toml` rewrites it when every stored shard matches that "
           "study (its tables can still be read: query, report, verify, distsim.open)")
OWN_FOLDERS = ("_stages", "_tune", "_faults")  # what the pipeline keeps beside the tables


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store(ShardStore):
    """A study's store at a local folder (created on first write)."""

    @property
    def exists(self) -> bool:
        """True when root holds a study.json or any table folder."""
        return (self.root / "study.json").is_file() or any((self.root / t).is_dir() for t in TABLES)

    # ------------------------------------------------------------------ study binding
    def read_study(self, strict: bool = True) -> dict[str, Any] | None:
        """The contents of study.json ({hash, name, source, created, config}), or None when
        there is none. An unreadable one (not JSON, not an object with a "hash") raises
        StoreError saying why and how to restore it (RESTORE), or gives None when not
        ``strict``."""
        doc, problem = self._load_study()
        if problem is not None and strict:
            raise StoreError(f"{problem}; {RESTORE}")
        return doc

    def study_problem(self) -> str | None:
        """Why study.json is unreadable ("<path>: unreadable study.json (<error>)"), or None
        (readable, or none)."""
        return self._load_study()[1]

    def _load_study(self) -> tuple[dict[str, Any] | None, str | None]:
        """(contents, None); (None, None) without study.json; (None, why) when unreadable."""
        path = self.root / "study.json"
        if not path.is_file():
            return None, None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("hash"), str):
                raise ValueError('not an object with a "hash"')
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
            return None, f"{path}: unreadable study.json ({exc})"
        return doc, None

    def check_study(self, study: Study, fresh: bool = False) -> str:
        """Bind this store to `study` (:meth:`binding`, then :meth:`bind`): "created",
        "resumed" or "fresh" (the store wiped first)."""
        outcome = self.binding(study, fresh)
        self.bind(study, outcome)
        return outcome

    def binding(self, study: Study, fresh: bool = False) -> str:
        """What binding `study` to this store would do, changing nothing: "created" (no
        study yet), "resumed" (the same study) or "fresh" (fresh asked: wipe and start over).

        A store written by a study with a different hash is refused (StoreError naming the
        changed keys) unless fresh. A non-empty folder that is not a distsim store is refused
        even with fresh: it is never wiped.
        """
        held = self.read_study(strict=not fresh)  # --fresh starts over from an unreadable one
        if held is None and self.root.is_dir() and not self.exists:
            foreign = [p.name for p in self.root.iterdir()
                       if p.name != LOCK_NAME and not p.name.startswith(TEMP_PREFIX)]
            if foreign:
                raise StoreError(
                    f"{str(self.root)!r} is a non-empty folder without study.json, not a "
                    "distsim store; set study.store to a new or empty folder"
                )
        if fresh:
            return "fresh"
        if held is not None and held.get("hash") != study.hash:
            raise StoreError(self._mismatch(held, study))
        return "resumed" if held is not None else "created"

    def bind(self, study: Study, outcome: str) -> None:
        """Carry out a :meth:`binding` outcome: "fresh" wipes what distsim wrote and writes
        study.json, "created" writes it, "resumed" deletes temp files left by crashed writers."""
        if outcome == "resumed":
            self.clean_temp_files()
            return
        if outcome == "fresh" and self.root.is_dir():
            self.wipe()
        doc = {"hash": study.hash, "name": study.name, "source": study.source,
               "created": _now(), "config": study.resolved()}
        self._write_json(self.root / "study.json", doc, indent=2)

    def wipe(self) -> list[Path]:
        """Delete what distsim wrote: study.json, its own folders (_stages, _tune, _faults),
        temp files, and the shard files of every table (then the folders left empty). The
        launch lock and anything else stay; symlinks are never followed. Returns what was
        left in the table folders (files distsim did not write)."""
        for name in (*OWN_FOLDERS, "study.json"):
            entry = self.root / name
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif entry.is_dir():
                shutil.rmtree(entry)
        for entry in self.root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
        kept: list[Path] = []
        for table in TABLES:
            folder = self.root / table
            if folder.is_symlink() or not folder.is_dir():
                continue
            for here, dirs, files in os.walk(folder, topdown=False):  # never into symlinks
                for name in files:
                    path = Path(here) / name
                    ours = name.startswith(TEMP_PREFIX) or (
                        name.endswith(".parquet") and "=" in name and not path.is_symlink())
                    if ours:
                        path.unlink()
                    else:
                        kept.append(path)
                for name in dirs:
                    sub = Path(here) / name
                    if not sub.is_symlink() and not any(sub.iterdir()):
                        sub.rmdir()
                    elif sub.is_symlink():
                        kept.append(sub)
            if not any(folder.iterdir()):
                folder.rmdir()
        return kept

    def _mismatch(self, held: dict[str, Any], study: Study) -> str:
        old, new = _flatten(held.get("config", {})), _flatten(study.resolved())
        ignore = ("study.store", "resources.")
        changed = [
            k for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>") and not k.startswith(ignore)
        ]
        shown = ", ".join(f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})"
                          for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        what = f"changed: {shown}{more}" if changed else "the config differs"
        return (
            f"store {str(self.root)!r} holds study {held.get('name')!r} with config "
            f"{str(held.get('hash'))[:12]}, this study is {study.hash[:12]} ({what}); launch "
            "with --fresh to wipe the store, or set study.store to a new folder"
        )

    # ------------------------------------------------------------------ weights and features
    def write_weights(self, key: Mapping[str, Any],
                      state_dicts: Mapping[str, Mapping[str, Any]]) -> Path:
        """Write the weights shard of one trial (key: arch, task, pack), {model_id: state_dict}."""
        return self.write_shard("weights", key, codecs.weights_table(state_dicts))

    def read_state_dicts(
        self,
        model_ids: Sequence[str] | None = None,
        *,
        arch: str | None = None,
        task: int | None = None,
        pack: int | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """{model_id: {tensor name: float32 tensor}} of the selected models, in stored order.

        Reads only the shards that can hold them: the one of (arch, task, pack) when all
        three are given, else those of the (arch, task) pairs named by the model ids.
        """
        columns = ["model_id", "tensor", "shape", "values"]
        files = self._weight_files(model_ids, arch, task, pack)
        lf: pl.LazyFrame
        if files is not None:
            parts = [pl.read_parquet(f, columns=["model_id", "task", "pack", *columns[1:]])
                     for f in files]
            empty = pl.LazyFrame(schema=polars_schema(TABLES["weights"].schema))
            lf = pl.concat(parts).lazy() if parts else empty
            for col, value in (("task", task), ("pack", pack)):
                if value is not None:
                    lf = lf.filter(pl.col(col) == value)
        else:
            lf = self.scan("weights")
            for col, v in (("arch", arch), ("task", task), ("pack", pack)):
                if v is not None:
                    lf = lf.filter(pl.col(col) == v)
        if model_ids is not None:
            lf = lf.filter(pl.col("model_id").is_in(list(model_ids)))
        df = lf.select(columns).collect()
        out = codecs.state_dicts(df)
        if model_ids is None:
            return out
        missing = sorted(set(model_ids) - set(out))
        if missing:
            raise StoreError(f"weights: no weights for {len(missing)} models, e.g. {missing[:3]}")
        return {mid: out[mid] for mid in model_ids}

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
            parsed = parse_model_id(mid)
            if parsed is None or (arch is not None and parsed[0] != arch):
                return None  # not an id of model_id(): scan everything
            pairs.add(parsed[:2])
        files: list[Path] = []
        for a, t in sorted(pairs):
            if not KEY_VALUE.match(a):
                return None
            files += [p for p in self.shard_files("weights", {"arch": a})
                      if p.name.startswith(f"task={t}-")]
        return files

    def feature_matrix(self, arch: str, method: str, layer: str,
                       epoch: int | None = None) -> FeatureMatrix:
        """The features of one (arch, method, layer) as a dense (N, D) float32 matrix: of the
        checkpoints of one `epoch` ([train] save_epochs; ids ending ``-e<epoch>``), or with
        epoch None of every model."""
        files = self._feature_files(arch, method, layer)
        what = f"{arch}/{method}/{layer}" + ("" if epoch is None else f"@e{epoch}")
        if not files:
            return codecs.feature_matrix(pl.DataFrame(), what)
        lf = _scan_features(files).select("model_id", "task", "seed", "vector", "trial_id")
        return codecs.feature_matrix(_of_epoch(lf, epoch).collect(), what)

    def feature_index(self, arch: str, method: str, layer: str,
                      epoch: int | None = None) -> pl.DataFrame:
        """The rows of :meth:`feature_matrix` without their vectors, in its order (task, seed,
        model_id): model_id, task, seed, trial_id and ``file``, the shard holding the row,
        so that any rows can be read alone (:meth:`feature_rows`)."""
        files = self._feature_files(arch, method, layer)
        columns = ["model_id", "task", "seed", "trial_id", "file"]
        if not files:
            return pl.DataFrame(schema={"model_id": pl.String, "task": pl.Int32,
                                        "seed": pl.Int64, "trial_id": pl.String,
                                        "file": pl.String})
        lf = _scan_features(files, include_file_paths="file").select(columns)
        return _of_epoch(lf, epoch).collect().sort("task", "seed", "model_id")

    def feature_rows(self, files: list[str], model_ids: list[str]) -> np.ndarray:
        """The feature vectors of `model_ids`, in that order, as an (n, D) float32 array,
        read from the shards `files` that hold them (:meth:`feature_index`'s ``file``): the
        rows of :meth:`feature_matrix` bit for bit. StoreError when some are not there."""
        lf = _scan_features(sorted(set(files))).select("model_id", "vector")
        df = lf.filter(pl.col("model_id").is_in(model_ids)).collect()
        where = {m: i for i, m in enumerate(model_ids)}
        found = [where[m] for m in df["model_id"]]
        if len(found) != len(model_ids) or len(set(found)) != len(found):
            missing = sorted(set(model_ids) - set(df["model_id"].to_list()))
            raise StoreError(f"features: {len(model_ids)} rows asked for, {df.height} read "
                             f"from {len(set(files))} shards (missing: {missing[:3]})")
        X = codecs.dense(df, f"rows of {len(set(files))} shards")
        return X[np.argsort(found)].astype(np.float32, copy=False)

    def _feature_files(self, arch: str, method: str, layer: str) -> list[Path]:
        """The features shards of a matrix by (task, pack) as numbers: the order of its rows
        (so feature_matrix needs no reordering)."""
        files = self.shard_files("features", {"arch": arch, "method": method, "layer": layer})
        return sorted(files, key=lambda p: [int(v) for v in re.findall(r"=(\d+)", p.name)])

    # ------------------------------------------------------------------ stages and status
    def mark_stage(self, stage: str, **info: Any) -> None:
        """Record that `stage` finished (info: any JSON-able facts, e.g. counts, seconds).

        When earlier runs of the stage ended before it was done (`note_unfinished`), info's
        seconds (this run's) gain seconds_all_runs and runs, and that note is removed."""
        note = self._unfinished_note(stage)
        earlier = json.loads(note.read_text()) if note.is_file() else None
        if earlier and "seconds" in info:
            info = {**info, "runs": earlier["runs"] + 1,
                    "seconds_all_runs": round(earlier["seconds"] + info["seconds"], 2)}
        doc = {"stage": stage, "finished": _now(), **info}
        self._write_json(self.root / "_stages" / f"{stage}.json", doc)
        note.unlink(missing_ok=True)

    def note_unfinished(self, stage: str, seconds: float) -> None:
        """Add the `seconds` of a run of `stage` that ended before the stage was done (stopped,
        or units left failed) to its note, which `mark_stage` folds into the stage's record.
        A run killed outright (SIGKILL, power) leaves no note."""
        note = self._unfinished_note(stage)
        doc = json.loads(note.read_text()) if note.is_file() else {"seconds": 0.0, "runs": 0}
        self._write_json(note, {"seconds": round(doc["seconds"] + seconds, 2),
                                "runs": doc["runs"] + 1})

    def _unfinished_note(self, stage: str) -> Path:
        """The path of `stage`'s note of early-ended runs (the stage name checked)."""
        if not KEY_VALUE.match(stage):
            raise StoreError(f"stage name {stage!r} must match [A-Za-z0-9_.-]+")
        return self.root / "_stages" / "unfinished" / f"{stage}.json"

    def stages(self) -> dict[str, dict[str, Any]]:
        """{stage: info} of the stages marked done."""
        folder = self.root / "_stages"
        if not folder.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}

    def summary(self) -> pl.DataFrame:
        """Per arch: models expected (from study.json: tasks x [sweep] cells x seeds x saved
        epochs; an import study's: the checkpoints its last import listed), ok, diverged,
        failed, the mean train and test accuracy of the ok models, feature rows, tests."""
        cfg = (self.read_study(strict=False) or {}).get("config", {})
        n_tasks = cfg.get("data", {}).get("num_tasks", 0)
        train = cfg.get("train", {})
        cells = math.prod(len(v) for v in cfg.get("sweep", {}).values())  # [sweep] cells

        def expected_of(arch: str) -> int:  # tasks x cells x seeds x checkpoints kept
            own = {**train, **train.get(arch, {})}
            saved = set(own.get("save_epochs", [])) | {own.get("epochs")}
            kept = len(saved) if own.get("save_epochs") else 1
            return n_tasks * cells * int(train.get("seeds_per_task", 0)) * kept
        imported = cfg.get("zoo", {}).get("source") == "import"
        archs = [a["name"] for a in cfg.get("arch", [])]
        count = pl.len().alias("n")
        counts = self.scan("models").group_by("arch", "status").agg(count).collect()
        accs = (self.scan("models").filter(pl.col("status") == "ok").group_by("arch")
                .agg(pl.col("train_acc").mean(), pl.col("test_acc").mean()).collect())
        feats = self.scan("features").group_by("arch").agg(count).collect()
        tests = self.scan("tests").group_by("arch").agg(count).collect()
        archs += sorted(set(counts["arch"].to_list()) - set(archs))
        rows = []
        for arch in archs:
            by = dict.fromkeys(STATUSES, 0)
            mine = counts.filter(pl.col("arch") == arch)
            for status, n in mine.select("status", "n").iter_rows():
                by[status] = by.get(status, 0) + int(n)
            f = feats.filter(pl.col("arch") == arch)["n"]
            t = tests.filter(pl.col("arch") == arch)["n"]
            acc = accs.filter(pl.col("arch") == arch)
            rows.append({"arch": arch,
                         "expected": sum(by.values()) if imported else expected_of(arch),
                         **{s: by[s] for s in STATUSES},
                         "train_acc": acc["train_acc"][0] if acc.height else None,
                         "test_acc": acc["test_acc"][0] if acc.height else None,
                         "features": int(f[0]) if len(f) else 0,
                         "tests": int(t[0]) if len(t) else 0})
        schema = {"arch": pl.String, "expected": pl.Int64, "ok": pl.Int64, "diverged": pl.Int64,
                  "failed": pl.Int64, "train_acc": pl.Float64, "test_acc": pl.Float64,
                  "features": pl.Int64, "tests": pl.Int64}
        return pl.DataFrame(rows, schema=schema)

    def _write_json(self, path: Path, doc: Mapping[str, Any], indent: int | None = None) -> None:
        blob = json.dumps(doc, indent=indent, sort_keys=True, default=str).encode()

        def write(f: IO[bytes]) -> None:
            f.write(blob)

        atomic_write(path, write)


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


def _scan_features(files: list[Any], **options: Any) -> pl.LazyFrame:
    """A lazy scan of features shards (older ones without trial_id get it as nulls)."""
    schema = polars_schema(TABLES["features"].file_schema)
    return pl.scan_parquet(files, schema=schema, missing_columns="insert", **options)


def _of_epoch(lf: pl.LazyFrame, epoch: int | None) -> pl.LazyFrame:
    """The rows of one saved epoch's checkpoints (ids ending ``-e<epoch>``), or all (None)."""
    return lf if epoch is None else lf.filter(pl.col("model_id").str.ends_with(f"-e{int(epoch)}"))
