"""What the readers of a store (the report, distsim.open) need to know of its study: name, archs,
layers, methods, factors, the epoch the figures show, seed and metric. From the study's config
(study.json), or, when study.json is unreadable, from what the store's tables hold (the reader
then says the config is unknown)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from distsim.config import Study
from distsim.config.choices import METHODS
from distsim.store import Store


@dataclass(frozen=True)
class Layout:
    """name: the study's; archs, methods: in the study's order; layers: each arch's feature
    layers, in order; factors: the tests' factors and PERMANOVA terms; epoch: each arch's epoch
    whose models the figures show (None: models without epochs); trained: the models were
    trained (only the shown epoch's models count in the zoo figures); seed: of the sampling;
    metric: of the distances; n_tasks: the study's tasks (0 when unknown)."""

    name: str
    archs: tuple[str, ...]
    layers: dict[str, tuple[str, ...]]
    methods: tuple[str, ...]
    factors: tuple[str, ...]
    epoch: dict[str, int | None]
    trained: bool
    seed: int
    metric: str
    n_tasks: int
    known: bool = True  # from the study's config (else from the tables)


def from_study(study: Study) -> Layout:
    """The layout of a study read from its study.json."""
    return Layout(
        name=study.name, archs=tuple(study.arch_names),
        layers={a: tuple(study.feature_layers(a)) for a in study.arch_names},
        methods=tuple(study.features.methods),
        factors=tuple(dict.fromkeys([*(study.tests.factors or ()), *study.tests.terms])),
        epoch={a: study.saved_epochs(a)[-1] for a in study.arch_names},
        trained=not study.imports, seed=study.seed, metric=study.pairs.metric,
        n_tasks=study.data.num_tasks if study.data is not None and not study.imports else 0)


def from_tables(store: Store) -> Layout:
    """The layout of a store whose study.json is unreadable, from its tables: archs, layers
    and methods as stored (names sorted, methods in distsim's order), the factors the tests
    have, each arch's last epoch, the pairs' metric (euclidean when none), seed 0."""
    keys = store.shard_keys("features")
    models = store.scan("models").select("arch", "epoch").collect()
    archs = sorted({*models["arch"].to_list(), *(k["arch"] for k in keys)})
    stored = {k["method"] for k in keys}
    methods = tuple([m for m in METHODS if m in stored] + sorted(stored - set(METHODS)))
    layers = {a: tuple(sorted({k["layer"] for k in keys if k["arch"] == a})) for a in archs}
    tests = store.scan("tests").collect()
    factors = tuple(sorted(set(tests["factor"].drop_nulls().to_list()))) \
        if "factor" in tests.columns else ()
    epoch = {a: models.filter(pl.col("arch") == a)["epoch"].max() for a in archs}
    pairs = store.scan("pairs").select("metric").head(1).collect()["metric"].to_list()
    return Layout(name="(unknown: study.json unreadable)", archs=tuple(archs), layers=layers,
                  methods=methods, factors=factors,
                  epoch={a: None if e is None else int(e) for a, e in epoch.items()},  # type: ignore[arg-type]
                  trained=True, seed=0, metric=pairs[0] if pairs else "euclidean", n_tasks=0,
                  known=False)
