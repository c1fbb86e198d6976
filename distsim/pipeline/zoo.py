"""The zoo stage: one Ray Tune trial per (arch, task, pack of seeds) not yet in the store.

A trial trains its pack with ``distsim.zoo.train.train_pack`` and writes the pack's weights shard,
its history shard (per-epoch metrics), then its models shard (the models shard is the pack's
"done" marker, so a crash before it leaves the pack pending, and a pack with a models shard that
says ok or diverged has its history). A store written before the history table existed has no
history shards: its packs are not retrained for it, the table just holds no rows for them.
Shard names are deterministic (``Store.shard_path``), writes are temp file + rename: a killed
launch leaves whole packs or nothing, and the next launch trains only the packs that are
missing (or whose models were recorded as failed).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from distsim.config import Pack, Study
from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.errors import LaunchError
from distsim.pipeline import faults
from distsim.pipeline.faults import maybe_fail
from distsim.pipeline.io_errors import IOFault, find
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.units import Units, error_text
from distsim.store import Store, model_id
from distsim.zoo.tasks import Task, make_tasks

if TYPE_CHECKING:  # torch: imported where a pack is trained, so `distsim status` loads none
    from distsim.zoo.train import SeedResult

SYSTEMATIC = 3  # this many failed attempts with one cause before any trial succeeds: stop
# loggers of Tune's own writes to its storage_path (in the store): their failures are noted
TUNE_STATE_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer")


@functools.lru_cache(maxsize=4)
def study_tasks(data: DataConfig) -> tuple[Task, ...]:
    """The study's tasks, built once per worker process (make_tasks is deterministic)."""
    return tuple(make_tasks(data))


def zoo_packs(study: Study, store: Store) -> list[Pack]:
    """The study's packs: a trained study's from its config, an import study's as stored."""
    if study.imports:
        from distsim.pipeline.imports import stored_packs

        return stored_packs(study, store)
    return study.packs()


def pack_arch(study: Study, name: str, task: int) -> ArchConfig:
    """The arch `name` sized for task `task`'s samples (an import study's: as declared)."""
    if study.imports:
        return study.arch(name)
    assert study.data is not None  # a trained study has data
    t = study_tasks(study.data)[task]
    return study.arch(name).with_task_shape(t.input_shape, t.num_classes)


def failed_packs(store: Store) -> set[tuple[str, int, int]]:
    """(arch, task, pack) of every pack whose models shard records a failed trial."""
    return set(
        store.scan("models")
        .filter(pl.col("status") == "failed")
        .select("arch", "task", "pack")
        .unique()
        .collect()
        .iter_rows()
    )


def pending_packs(study: Study, store: Store) -> list[Pack]:
    """Packs with no models shard, or whose models shard records a failed trial."""
    present = {(k["arch"], k["task"], k["pack"]) for k in store.shard_keys("models")}
    failed = failed_packs(store)
    return [
        p for p in study.packs()
        if (p.arch, p.task, p.pack) not in present or (p.arch, p.task, p.pack) in failed
    ]


def node_label() -> str:
    """``hostname/ray-node-id`` of the process calling it (the node a trial ran on)."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return f"{socket.gethostname()}/{node}"


def sweep_factors(study: Study, pack: Pack) -> str | None:
    """The models' ``factors`` column of a pack: its [sweep] cell's train values as JSON (None
    without a sweep)."""
    return json.dumps(study.cells()[pack.cell], sort_keys=True) if study.sweep else None


def model_rows(pack: Pack, task: Task, results: list[SeedResult], trial_id: str,
               node: str, factors: str | None = None,
               last: int | None = None) -> list[dict[str, Any]]:
    """Rows of the models table for one trained pack (one per seed, in pack order); with
    [train] save_epochs (`last`: the last epoch) one per seed and saved epoch besides, each
    checkpoint a model ``<arch>-t<task>-s<seed>-e<epoch>`` with its epoch."""
    common = {"task_name": task.name, "trial_id": trial_id, "node": node, "error": None,
              "factors": factors}
    rows = []
    for r in results:
        for c in r.checkpoints:
            train_loss, train_acc, test_loss, test_acc = c.metrics
            rows.append({**common, "model_id": model_id(pack.arch, pack.task, r.seed, c.epoch),
                         "seed": r.seed, "status": c.status, "train_acc": train_acc,
                         "test_acc": test_acc, "train_loss": train_loss, "test_loss": test_loss,
                         "epochs": min(c.epoch, r.epochs), "seconds": r.seconds,
                         "epoch": c.epoch})
        rows.append({**common, "model_id": model_id(pack.arch, pack.task, r.seed, last),
                     "seed": r.seed, "status": r.status, "train_acc": r.train_acc,
                     "test_acc": r.test_acc, "train_loss": r.train_loss,
                     "test_loss": r.test_loss, "epochs": r.epochs, "seconds": r.seconds,
                     "epoch": last})
    return rows


def pack_weights(pack: Pack, results: list[SeedResult],
                 last: int | None = None) -> dict[str, dict[str, Any]]:
    """{model id: state dict} of a trained pack's models (model_rows' ids)."""
    out = {}
    for r in results:
        for c in r.checkpoints:
            out[model_id(pack.arch, pack.task, r.seed, c.epoch)] = c.state_dict
        out[model_id(pack.arch, pack.task, r.seed, last)] = r.state_dict
    return out


def history_rows(pack: Pack, results: list[SeedResult],
                 last: int | None = None) -> dict[str, Any]:
    """Columns of the history table for one trained pack: one row per seed x completed epoch
    (seeds in pack order, epochs from 1); a seed that diverged in its first epoch has none.
    With [train] save_epochs (`last`: the last epoch) a seed's rows carry its last model's id."""
    from distsim.zoo.train import HISTORY_COLUMNS

    tables = []  # (epochs, 4) per seed
    for r in results:
        if r.history is None:
            raise ValueError(f"seed {r.seed} was trained without its history")
        tables.append(r.history.reshape(-1, len(HISTORY_COLUMNS)))
    seeds = [r.seed for r, h in zip(results, tables, strict=True) for _ in range(len(h))]
    metrics = np.concatenate(tables)  # (rows, 4)
    return {
        "model_id": [model_id(pack.arch, pack.task, s, last) for s in seeds],
        "seed": seeds,
        "epoch": [e for h in tables for e in range(1, len(h) + 1)],
        **{name: metrics[:, j] for j, name in enumerate(HISTORY_COLUMNS)},
    }


def failed_rows(study: Study, pack: Pack, trial_id: str, error: str) -> list[dict[str, Any]]:
    """Rows recording a trial that failed after all retries (NaN metrics, the error text)."""
    try:
        assert study.data is not None  # a trained study has data
        name = study_tasks(study.data)[pack.task].name
    except Exception:  # the data may be what failed
        name = None
    nan = math.nan
    cfg = study.pack_config(pack)
    last = cfg.epochs if cfg.save_epochs else None
    return [
        {"model_id": model_id(pack.arch, pack.task, s, last), "task_name": name, "seed": s,
         "trial_id": trial_id, "status": "failed", "train_acc": nan, "test_acc": nan,
         "train_loss": nan, "test_loss": nan, "epochs": 0, "seconds": nan, "node": None,
         "error": error, "factors": sweep_factors(study, pack), "epoch": last}
        for s in pack.seeds
    ]


def train_and_store(study: Study, pack: Pack, trial_id: str,
                    threads: int = 1) -> dict[str, float]:
    """Train one pack and write its weights, history, then models shards; returns the trial's
    metrics.

    A pack whose models shard already says ok (a retried trial that had written it) is not
    trained again.
    """
    store = Store(study.store)
    key = pack.key
    if store.has_shard("models", key):
        held = pl.read_parquet(store.shard_path("models", key))
        if (held["status"] != "failed").all():
            return {"ok": held.filter(pl.col("status") == "ok").height,
                    "test_acc": float(held["test_acc"].to_numpy().mean()),
                    "seconds": 0.0, "skipped": 1}
    import torch

    from distsim.zoo.train import train_pack

    torch.set_num_threads(max(1, threads))
    assert study.data is not None  # a trained study has data
    task = study_tasks(study.data)[pack.task]
    arch = study.arch(pack.arch).with_task_shape(task.input_shape, task.num_classes)
    start = time.perf_counter()
    cfg = study.pack_config(pack)
    results = train_pack(task, arch, list(pack.seeds), cfg,
                         init_seeds=list(study.init_seeds(pack)))
    seconds = time.perf_counter() - start
    last = cfg.epochs if cfg.save_epochs else None  # the last model's epoch (id and column)
    store.write_weights(key, pack_weights(pack, results, last))
    store.write_shard("history", key, history_rows(pack, results, last))
    store.write_shard("models", key, model_rows(pack, task, results, trial_id, node_label(),
                                                sweep_factors(study, pack), last))
    ok = [r for r in results if r.status == "ok"]
    return {
        "ok": len(ok),
        "test_acc": float(sum(r.test_acc for r in ok) / len(ok)) if ok else math.nan,
        "seconds": seconds,
        "skipped": 0,
    }


def _trainable(config: dict[str, Any], study: Study | None = None,
               faults: dict[str, float] | None = None) -> None:
    """The Tune function trainable: one pack, reported once to Tune when stored."""
    from ray import tune

    assert study is not None  # bound by tune.with_parameters
    pack = _pack(config)
    maybe_fail("trial", _trial_name(config), study.store, faults or {})
    trial_id = tune.get_context().get_trial_id() or pack.trial_id
    threads = int(max(1, math.floor(study.resources.cpus_per_trial)))
    tune.report(train_and_store(study, pack, trial_id, threads))


class _Watch:
    """Tune callback and stopper in one: notes each finished trial and failed attempt in the
    stage's units (progress line, one line per failed attempt; Tune's FailureConfig decides the
    retries), and stops the experiment when the first SYSTEMATIC failed attempts, of more than
    one trial, share one cause before any trial succeeded (a broken setup: retrying every trial
    would only flood the terminal), or at once on a fatal I/O error (a full or read-only store,
    distsim.pipeline.io_errors: ``fault``, which run_zoo raises)."""

    def __init__(self, units: Units[Pack]) -> None:
        self.units = units
        self.causes: list[str] = []
        self.trials: set[Pack] = set()  # trials with a failed attempt
        self.systematic: str | None = None
        self.fault: IOFault | None = None  # the first fatal I/O error: stops the experiment

    def failed(self, trial: Any, again: bool) -> None:
        """Note one failed attempt of `trial` (`again`: Tune retries it)."""
        try:  # the text file of its errors, the latest last (its pickle is not read)
            text = Path(trial.error_file).read_text() if trial.error_file else ""
        except OSError:  # an unreadable error file is a failure with an unknown cause
            text = ""
        lines = [line for line in text.splitlines() if line.strip()]
        # the last line names the root cause, e.g. "pkg.module.SomeError: message"
        cause = re.sub(r"^[\w.]+\.(\w+): ", r"\1: ", " ".join(lines[-1].split())[:1000]) \
            if lines else "unknown error"
        self.causes.append(cause)
        pack = _pack(trial.config)
        self.trials.add(pack)
        fault = find(cause, self.units.label(pack))
        if fault is not None:  # a full or read-only store: no retry, no line; the launch's
            self.fault = self.fault or fault  # one line says it
            return
        self.units.failed(pack, cause, again=again)  # given up: counted in the progress
        first = self.causes[:SYSTEMATIC]
        if (not self.units.succeeded and len(first) == SYSTEMATIC and len(self.trials) > 1
                and len({re.sub(r"\b[0-9a-f]{8,}\b|\d+", "#", c) for c in first}) == 1):
            self.systematic = cause

    def callback(self) -> Any:
        from ray import tune

        watch = self

        class _Callback(tune.Callback):
            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                                  **info: Any) -> None:
                watch.units.done(_pack(trial.config))

            def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any,
                                 **info: Any) -> None:
                watch.failed(trial, again=True)

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                               **info: Any) -> None:
                watch.failed(trial, again=False)

        return _Callback()

    def stopper(self) -> Any:
        from ray import tune

        watch = self

        class _Stopper(tune.Stopper):
            def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
                return False

            def stop_all(self) -> bool:
                return watch.systematic is not None or watch.fault is not None

        return _Stopper()

    def handler(self) -> logging.Handler:
        """A logging handler for Tune's experiment-state and syncer loggers: a fatal I/O error
        in what they log (Tune's own writes to its storage_path in the store) stops the
        experiment like a trial's; any other record is printed as its first line (no
        traceback)."""
        watch = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                error = record.exc_info[1] if record.exc_info else None
                fault = find(error or record.getMessage(), "Tune's experiment state")
                if fault is None:
                    first = (record.getMessage().strip().splitlines() or [""])[0]
                    print(f"zoo       Tune: {first[:300]}", file=watch.units.stream, flush=True)
                watch.fault = watch.fault or fault

        return _Handler()


def run_zoo(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Train every pending pack as a Tune trial; returns counts for the launch summary.

    A trial that fails after its retries is recorded as failed (the next launch trains it
    again); a failure that repeats for the first trials stops the stage (LaunchError); a
    fatal I/O error in a trial or in Tune's own writes stops it at once (IOFault).
    """
    if study.imports:
        from distsim.pipeline.imports import run_import

        return run_import(study, store, ctx)
    from ray import tune

    packs = pending_packs(study, store)
    total = len(study.packs())
    skipped = total - len(packs)
    units = Units("zoo", packs, label=lambda p: f"trial {p.arch}-t{p.task}-p{p.pack}",
                  max_failures=study.resources.max_failures, stream=ctx.stream, noun="trial",
                  skipped=skipped)
    if not packs:
        units.close()
        return {"trials": 0, "skipped": total, "failed": 0}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0: no Tune tables, our progress only
    # a failed trial is one line from our callback, not Tune's error log with its traceback
    # (and a stopped zoo's unstarted trials are not warned about one by one)
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune",
                 "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    res = {"cpu": study.resources.cpus_per_trial}
    if study.resources.gpus_per_trial:
        res["gpu"] = study.resources.gpus_per_trial
    bound = tune.with_parameters(_trainable, study=study, faults=faults.plan())
    trainable = tune.with_resources(bound, res)
    space = [{**p.key, "seeds": list(p.seeds), "cell": p.cell}  # Tune runs them
             for p in units.take()]
    storage = store.root / "_tune"
    name = "zoo-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    watch = _Watch(units)
    tuner = tune.Tuner(
        trainable,
        param_space={"pack": tune.grid_search(space)},
        tune_config=tune.TuneConfig(
            reuse_actors=reuse_actors(),
            trial_name_creator=lambda t: _trial_name(t.config),
            trial_dirname_creator=lambda t: f"{_trial_name(t.config)}-{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            callbacks=[watch.callback()],
            stop=watch.stopper(),
            failure_config=tune.FailureConfig(max_failures=study.resources.max_failures),
        ),
    )
    sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C stops the launch, not only Tune
    handler, quiet = watch.handler(), [logging.getLogger(n) for n in TUNE_STATE_LOGGERS]
    for log in quiet:  # Tune's failed writes to the store: noted, not printed
        log.addHandler(handler)
        log.propagate = False
    try:
        grid = tuner.fit()
    except Exception as exc:  # e.g. reading a trial's error file that a full disk truncated
        fault = watch.fault or find(exc, "Tune's experiment state")
        if fault is None:
            raise
        raise fault from None
    finally:
        units.close()
        for log in quiet:
            log.removeHandler(handler)
            log.propagate = True
        if sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = sigint
    if watch.fault is not None:  # a full or read-only store: the launch says it in one line
        raise watch.fault
    if watch.systematic is not None:
        shutil.rmtree(storage / name, ignore_errors=True)  # no trial stored anything
        raise LaunchError(
            f"zoo: the first {SYSTEMATIC} trial attempts failed with the same error, so the "
            f"stage stopped instead of retrying every trial: {watch.systematic[:400]}"
        )
    failed, first = 0, None
    for result in [grid[i] for i in range(len(grid))]:  # a ResultGrid is indexed, not iterated
        if result.error is None:
            continue
        assert result.config is not None  # every trial of the grid has its pack
        pack = _pack(result.config)
        if store.has_shard("models", pack.key):
            continue  # the trial wrote its pack before it failed (e.g. while reporting)
        failed += 1
        error = error_text(result.error)
        first = first or error
        trial = os.path.basename(str(result.path or "").rstrip("/")) or pack.trial_id
        store.write_shard("models", pack.key, failed_rows(study, pack, trial, error))
    if failed:
        print(f"zoo       {failed} trial(s) failed after {study.resources.max_failures} retries; "
              "their models are recorded as failed and the next launch trains them again",
              file=units.stream, flush=True)
    if failed == 0:
        shutil.rmtree(storage / name, ignore_errors=True)  # everything it holds is in the store
        if storage.is_dir() and not any(storage.iterdir()):
            storage.rmdir()
    out: dict[str, Any] = {"trials": len(packs), "skipped": total - len(packs), "failed": failed}
    if first:
        out["error"] = first
    return out


def outputs(study: Study, store: Store) -> Outputs:
    """Packs of the study with a models shard (done) or one that records a failed trial (an
    import study's: distsim.pipeline.imports.outputs)."""
    if study.imports:
        from distsim.pipeline.imports import outputs as import_outputs

        return import_outputs(study, store)
    packs = {(p.arch, p.task, p.pack) for p in study.packs()}
    present = {(k["arch"], k["task"], k["pack"]) for k in store.shard_keys("models")} & packs
    failed = failed_packs(store) & packs
    return Outputs("packs", len(packs), len(present - failed), failed=len(failed))


def reuse_actors() -> bool:
    """Tune reuses a trial's actor for the next trial (no process start per trial) unless the
    environment says DISTSIM_TUNE_REUSE_ACTORS=0: then every trial gets its own actor, so trials
    that run at the same time are spread over the cluster deterministically (multi-node test)."""
    value = os.environ.get("DISTSIM_TUNE_REUSE_ACTORS", "1").strip().lower()
    if value not in ("0", "1", "true", "false"):
        raise ValueError(f"DISTSIM_TUNE_REUSE_ACTORS must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _pack(config: dict) -> Pack:
    p = config["pack"]
    return Pack(p["arch"], p["task"], p["pack"], tuple(p["seeds"]), p.get("cell", 0))


def _trial_name(config: dict) -> str:
    p = config["pack"]
    return f"{p['arch']}-t{p['task']}-p{p['pack']}"


STAGE = Stage(name="zoo", outputs=outputs, run=run_zoo)
