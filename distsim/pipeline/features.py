"""The features stage: a pool of Ray actors turns each pack's weights into invariant features.

One unit of work is one zoo pack (arch, task, pack): the actor reads the pack's weights, keeps
its ``ok`` models, and for every configured method x layer computes the (K, D) features with
``distsim.features.weight_features_batch`` (vectorised over the pack) and writes one features
shard (arch, method, layer, task, pack). A pack whose shards are all present is skipped.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import torch

from distsim.config import Pack, Study
from distsim.errors import LaunchError
from distsim.features import weight_features_batch
from distsim.pipeline.progress import Progress
from distsim.pipeline.stage import RunContext, Stage
from distsim.pipeline.zoo import failed_packs, study_tasks
from distsim.store import Store


def feature_keys(study: Study, pack: Pack) -> list[dict[str, Any]]:
    """Store keys of every features shard one pack produces (methods x layers)."""
    return [
        {"arch": pack.arch, "method": m, "layer": layer, "task": pack.task, "pack": pack.pack}
        for m in study.features.methods
        for layer in study.feature_layers(pack.arch)
    ]


def pending_feature_packs(study: Study, store: Store) -> list[Pack]:
    """Packs with models in the store (none failed) and at least one features shard missing.

    A failed pack is left to the next launch's zoo stage, which retrains it.
    """
    have_models = {(k["arch"], k["task"], k["pack"]) for k in store.shard_keys("models")}
    have_models -= failed_packs(store)
    columns = ("arch", "method", "layer", "task", "pack")
    have = {tuple(k[c] for c in columns) for k in store.shard_keys("features")}
    out = []
    for pack in study.packs():
        if (pack.arch, pack.task, pack.pack) not in have_models:
            continue
        if any(tuple(k.values()) not in have for k in feature_keys(study, pack)):
            out.append(pack)
    return out


def featurize_pack(study: Study, pack: Pack) -> int:
    """Compute and write the features shards of one pack; returns the number of rows written."""
    store = Store(study.store)
    models = (
        pl.read_parquet(store.shard_path("models", pack.key))
        .filter(pl.col("status") == "ok")
        .sort("seed")
    )
    ids = models["model_id"].to_list()
    seeds = models["seed"].to_list()
    task = study_tasks(study.data)[pack.task]
    arch = study.arch(pack.arch).with_task_shape(task.input_shape, task.num_classes)
    state_dicts = store.read_state_dicts(ids) if ids else {}
    rows = 0
    with torch.no_grad():
        for key in feature_keys(study, pack):
            if store.has_shard("features", key):
                continue
            if ids:
                spec = study.features
                X = weight_features_batch([state_dicts[i] for i in ids], arch, key["method"],
                                          key["layer"], spec.dim, spec.seed, spec.sketch)
            else:
                X = None
            data = {
                "model_id": ids,
                "seed": seeds,
                "dim": [int(X.shape[1])] * len(ids) if X is not None else [],
                "vector": list(X) if X is not None else [],
            }
            store.write_shard("features", key, data)
            rows += len(ids)
    return rows


def run_features(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Featurize every pending pack with an actor pool; returns counts for the launch summary."""
    import ray
    from ray.util import ActorPool

    packs = pending_feature_packs(study, store)
    total = len(study.packs())
    if not store.shard_keys("models"):
        raise LaunchError(f"features: store {str(store.root)!r} holds no models yet; "
                          "run the zoo stage first")
    skipped = total - len(packs)
    rows = 0
    with Progress("features", len(packs), unit="pack", skipped=skipped,
                  stream=ctx.stream) as progress:
        if not packs:
            return {"packs": 0, "skipped": total, "rows": 0}
        cpus = study.resources.cpus_per_actor
        Worker = ray.remote(num_cpus=cpus)(_FeatureWorker)
        n_actors = min(study.resources.feature_actors, len(packs))
        actors: list[Any] = [Worker.remote(study, max(1, int(cpus))) for _ in range(n_actors)]
        try:
            for n in ActorPool(actors).map_unordered(lambda a, p: a.run.remote(p), packs):
                rows += n
                progress.update(1)
        finally:
            for a in actors:
                ray.kill(a)
    return {"packs": len(packs), "skipped": total - len(packs), "rows": rows}


class _FeatureWorker:
    """A feature actor: holds the study (and its tasks, once loaded) across packs."""

    def __init__(self, study: Study, threads: int) -> None:
        torch.set_num_threads(threads)
        self.study = study

    def run(self, pack: Pack) -> int:
        return featurize_pack(self.study, pack)


STAGE = Stage(
    name="features",
    pending=lambda study, store: len(pending_feature_packs(study, store)),
    run=run_features,
    complete=lambda study, store: not pending_feature_packs(study, store),
)
