"""The features stage: a pool of Ray actors turns each pack's weights into invariant features.

One unit of work is one zoo pack (arch, task, pack): the actor reads the pack's weights, keeps
its ``ok`` models, and for every configured method x layer computes the (K, D) features with
``distsim.weights.features.weight_features_batch`` (vectorised over the pack) and writes one
features shard (arch, method, layer, task, pack). A pack whose shards are all present is skipped.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from distsim.config import Pack, Study
from distsim.config.data import DataConfig
from distsim.errors import LaunchError
from distsim.pipeline.faults import maybe_fail, plan
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.units import Units, run_refs
from distsim.pipeline.zoo import failed_packs, pack_arch, zoo_packs
from distsim.store import Store, lineage
from distsim.zoo.tasks import study_inputs

if TYPE_CHECKING:  # torch and the feature methods: imported where a pack is featurized
    import torch


def feature_keys(study: Study, pack: Pack) -> list[dict[str, Any]]:
    """Store keys of every features shard one pack produces (methods x layers)."""
    return [
        {"arch": pack.arch, "method": m, "layer": layer, "task": pack.task, "pack": pack.pack}
        for m in study.features.methods
        for layer in study.feature_layers(pack.arch)
    ]


def pending_feature_packs(study: Study, store: Store) -> list[Pack]:
    """Packs whose zoo is done (models shard, no failed trial) with a features shard missing
    or stale (computed from other models than the pack's ``ok`` models now).

    A failed pack is left to the next launch's zoo stage, which retrains it.
    """
    return _feature_state(study, store)[0]


def _feature_state(study: Study, store: Store) -> tuple[list[Pack], int, int]:
    """(pending packs, how many of them have a stale shard, packs whose zoo is done)."""
    models = lineage.pack_tokens(store)
    failed = failed_packs(store)
    have = lineage.feature_tokens(store)
    pending, stale, ready = [], 0, 0
    for pack in zoo_packs(study, store):
        pk = (pack.arch, pack.task, pack.pack)
        if pk not in models or (pk in failed and not models[pk]):
            continue  # a failed trial (retrained next launch); an import's failed checkpoints
            # leave the pack's other models to featurize
        ready += 1
        held = [have.get((pack.arch, k["method"], k["layer"], pack.task, pack.pack))
                for k in feature_keys(study, pack)]
        if any(rows != models[pk] for rows in held):
            pending.append(pack)
            stale += any(rows is not None and rows != models[pk] for rows in held)
    return pending, stale, ready


def outputs(study: Study, store: Store) -> Outputs:
    """Packs whose every features shard is present and computed from the pack's models now."""
    pending, stale, ready = _feature_state(study, store)
    return Outputs("packs", len(zoo_packs(study, store)), ready - len(pending), stale=stale)


def featurize_pack(study: Study, pack: Pack, faults: dict[str, float] | None = None) -> int:
    """Compute and write the features shards of one pack; returns the number of rows written.
    `faults`: a fault-injection plan (distsim.pipeline.faults), for tests."""
    import torch

    from distsim.weights.features import weight_features_batch

    store = Store(study.store)
    models = (
        pl.read_parquet(store.shard_path("models", pack.key))
        .filter(pl.col("status") == "ok")
        .sort("seed", "model_id")
    )
    maybe_fail("feature", f"{pack.arch}-t{pack.task}-p{pack.pack}", study.store, faults or {})
    ids = models["model_id"].to_list()
    seeds = models["seed"].to_list()
    trials = models["trial_id"].to_list()
    want = frozenset(map(lineage.token, ids, trials))
    arch = pack_arch(study, pack.arch, pack.task)
    state_dicts = store.read_state_dicts(ids) if ids else {}
    spec = study.features
    template: dict[str, torch.Tensor] | None = None
    rows = 0
    with torch.no_grad():
        for key in feature_keys(study, pack):
            path = store.shard_path("features", key)
            if path.is_file() and lineage.shard_tokens(path) == want:
                continue
            if ids:
                extra: dict[str, Any] = {}
                if key["method"] == "aligned":  # read once per pack, for every layer
                    template = template or read_template(store, pack.arch)
                    extra["template"] = template
                if key["method"] == "cka":
                    assert study.data is not None  # the config requires [data] for cka
                    extra["probe"] = study_probe(study.data, spec.probe_size, spec.seed)
                X = weight_features_batch([state_dicts[i] for i in ids], arch, key["method"],
                                          key["layer"], spec.dim, spec.seed, spec.sketch,
                                          spec.projection, **extra)
            else:
                X = None
            data = {
                "model_id": ids,
                "seed": seeds,
                "dim": [int(X.shape[1])] * len(ids) if X is not None else [],
                "vector": list(X) if X is not None else [],
                "trial_id": trials,
            }
            store.write_shard("features", key, data)
            rows += len(ids)
    return rows


@functools.lru_cache(maxsize=4)
def study_probe(data: DataConfig, size: int, seed: int) -> np.ndarray:
    """The study's CKA probe (size, *input_shape): a seeded, class-balanced sample of every input
    of its data (distsim.zoo.tasks.study_inputs), the same for every model and actor."""
    from distsim.weights.cka import probe_inputs

    return probe_inputs(*study_inputs(data), size, seed)


def read_template(store: Store, arch: str) -> dict[str, torch.Tensor]:
    """The aligned method's template of one arch from the store (float64 tensors)."""
    import torch

    df = pl.read_parquet(store.shard_path("templates", {"arch": arch}))
    return {name: torch.tensor(np.asarray(values, dtype=np.float64)).reshape(tuple(shape))
            for name, shape, values in zip(df["tensor"], df["shape"].to_list(),
                                           df["values"].to_list(), strict=True)}


def ensure_templates(study: Study, store: Store, stream: Any = None) -> list[str]:
    """Make and store the aligned method's template of every arch that lacks one (archs whose
    models are trained): features.template_models models drawn by features.seed from all
    tasks' ok models (with [train] save_epochs, of the last epoch), then
    features.template_iterations rounds of "align all, average"
    (distsim.weights.alignment.make_template). Written once: later launches reuse it, so every
    model's aligned features are matched to the same template. Returns the archs it made."""
    if "aligned" not in study.features.methods:
        return []
    import torch

    from distsim.weights.alignment import make_template

    spec, made = study.features, []
    for name in study.arch_names:
        if store.has_shard("templates", {"arch": name}):
            continue
        files = store.shard_files("models", {"arch": name})
        if not files:
            continue
        ok = (pl.concat([pl.read_parquet(f, columns=["model_id", "task", "status"]) for f in files])
              .filter(pl.col("status") == "ok").sort("model_id"))
        last = study.saved_epochs(name)[-1]  # [train] save_epochs: the trained models' template
        if last is not None:
            ok = ok.filter(pl.col("model_id").str.ends_with(f"-e{last}"))
        rng = np.random.default_rng([spec.seed, 7])
        pick = sorted(rng.choice(ok["model_id"].to_list(), min(spec.template_models, len(ok)),
                                 replace=False).tolist())
        arch = pack_arch(study, name, int(ok.filter(pl.col("model_id") == pick[0])["task"][0]))
        states = store.read_state_dicts(pick)
        template = make_template([states[i] for i in pick], arch, spec.template_iterations,
                                 spec.seed)
        store.write_shard("templates", {"arch": name}, {
            "tensor": list(template),
            "shape": [list(t.shape) for t in template.values()],
            "values": [t.to(torch.float32).flatten().numpy() for t in template.values()],
            "models": [",".join(pick)] * len(template),
            "iterations": [spec.template_iterations] * len(template),
        })
        if stream is not None:
            print(f"features  {name}: aligned template from {len(pick)} models, "
                  f"{spec.template_iterations} iterations", file=stream)
        made.append(name)
    return made


def run_features(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Featurize every pending pack on a pool of actors; returns counts for the launch summary.

    A pack whose task fails (an error, or its actor's process died: a new actor replaces it)
    is submitted again, up to ``resources.max_failures`` times; packs that still fail are left
    pending and counted as failed, with the first cause.
    """
    import ray

    packs = pending_feature_packs(study, store)
    total = len(zoo_packs(study, store))
    if not store.shard_keys("models"):
        raise LaunchError(f"features: store {str(store.root)!r} holds no models yet; "
                          "run the zoo stage first")
    rows = 0
    with Units("features", packs, label=lambda p: f"pack {p.arch}-t{p.task}-p{p.pack}",
               max_failures=study.resources.max_failures, stream=ctx.stream, noun="pack",
               skipped=total - len(packs)) as units:
        if not packs:
            return {"packs": 0, "skipped": total, "rows": 0, "failed": 0}
        ensure_templates(study, store, ctx.stream)
        cpus = study.resources.cpus_per_actor
        Worker = ray.remote(num_cpus=cpus)(_FeatureWorker)
        n_actors = min(study.resources.feature_actors, len(packs))
        idle: list[Any] = [Worker.remote(study, max(1, int(cpus)), plan()) for _ in range(n_actors)]
        busy: dict[Pack, Any] = {}  # pack -> the actor running it

        def submit(pack: Pack) -> Any:
            busy[pack] = idle.pop()
            return busy[pack].run.remote(pack)

        def settle(pack: Pack, error: BaseException | None) -> None:
            actor = busy.pop(pack)
            if isinstance(error, ray.exceptions.RayActorError):  # its process died
                ray.kill(actor, no_restart=True)
                actor = Worker.remote(study, max(1, int(cpus)), plan())
            idle.append(actor)

        def on_done(pack: Pack, written: int) -> None:
            nonlocal rows
            rows += written

        try:
            run_refs(units, submit, on_done, slots=n_actors, settle=settle)
        finally:
            for a in idle + list(busy.values()):
                ray.kill(a)
    return {"packs": len(packs), "skipped": total - len(packs), "rows": rows,
            **units.outcome()}


class _FeatureWorker:
    """A feature actor: holds the study (and its tasks, once loaded) across packs."""

    def __init__(self, study: Study, threads: int, faults: dict[str, float]) -> None:
        import torch

        torch.set_num_threads(threads)
        self.study, self.faults = study, faults

    def run(self, pack: Pack) -> int:
        return featurize_pack(self.study, pack, self.faults)


STAGE = Stage(name="features", outputs=outputs, run=run_features)
