"""The study plan: a validated study (:class:`Study`), its zoo trials, feature matrices and hash.

Model seeds: model i (0-based) of task t in sweep cell c gets seed ``study.seed * 1_000_000 +
(c * num_tasks + t) * train.seeds_per_task + i``, distinct over tasks and cells, identical
across architectures (without a ``[sweep]`` there is one cell, c = 0). Pack p of a (task, cell)
holds its seeds ``[p * seeds_per_trial, (p + 1) * seeds_per_trial)`` and is numbered
``c * packs_per_task + p`` in the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from distsim.config.arch import ADDED_DEFAULTS, ArchConfig
from distsim.config.data import DataConfig
from distsim.config.sections import FeatureSpec, PairSpec, Resources, StatsSpec
from distsim.config.training import TrainConfig
from distsim.config.zoo import ZooSpec

GRU_FEATURES = 2  # version of the GRU's features (distsim.weights.recurrent), in a GRU study's hash

SEED_STRIDE = 1_000_000


@dataclass(frozen=True)
class TrainPlan:
    """How many models per task, how many share one trial (a pack), and how each is trained.

    base: the TrainConfig fields [train] sets, as sorted (field, value) pairs; overrides:
    (arch name, pairs) of [train.<arch name>]. Pairs, not dicts, keep a Study hashable.
    shared_init: model i of every task starts from the same initial weights (init seed of model
    i, not of (task, i)); its batch order stays its own.
    """

    seeds_per_task: int
    seeds_per_trial: int
    base: tuple[tuple[str, Any], ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    shared_init: bool = False

    def kwargs(self, arch_name: str | None = None) -> dict[str, Any]:
        """TrainConfig keyword arguments: [train], then [train.<arch_name>] on top."""
        over = dict(self.overrides).get(arch_name, ()) if arch_name is not None else ()
        return {**dict(self.base), **dict(over)}

    @property
    def packs_per_task(self) -> int:
        return math.ceil(self.seeds_per_task / self.seeds_per_trial)


@dataclass(frozen=True)
class Pack:
    """One zoo trial: `seeds` of architecture `arch` trained together on task `task`."""

    arch: str
    task: int
    pack: int
    seeds: tuple[int, ...]
    cell: int = 0  # the [sweep] cell whose train values it uses (0 without a sweep)

    @property
    def trial_id(self) -> str:
        return f"arch={self.arch}/task={self.task}/pack={self.pack}"

    @property
    def key(self) -> dict[str, Any]:
        """The store key (arch, task, pack) of the trial's models and weights shards."""
        return {"arch": self.arch, "task": self.task, "pack": self.pack}


@dataclass(frozen=True)
class MatrixKey:
    """One feature matrix of a study: the features of every model of `arch` by `method` at
    `layer` (the unit of the pairs and tests stages); with ``[train] save_epochs`` one per
    saved `epoch`, the checkpoints of that epoch."""

    arch: str
    method: str
    layer: str
    epoch: int | None = None

    @property
    def key(self) -> dict[str, Any]:
        """The store key part (arch, method, layer, epoch) of its pairs, neighbors and tests
        shards (epoch None: not in their names)."""
        return {"arch": self.arch, "method": self.method, "layer": self.layer,
                "epoch": self.epoch}

    @property
    def partition(self) -> dict[str, str]:
        """The (arch, method, layer) folders its shards live in."""
        return {"arch": self.arch, "method": self.method, "layer": self.layer}

    @property
    def id(self) -> tuple[str, str, str, int | None]:
        """(arch, method, layer, epoch): its key in ``distsim.store.lineage.matrix_rows``."""
        return (self.arch, self.method, self.layer, self.epoch)

    def __str__(self) -> str:
        name = f"{self.arch}/{self.method}/{self.layer}"
        return name if self.epoch is None else f"{name}@e{self.epoch}"


@dataclass(frozen=True)
class Study:
    """A validated study file: what to train (or import), featurize and test (see
    distsim.config). An import study (``zoo.source = "import"``) has no train plan, and data
    only when its ``[data]`` section gives the cka method its probe inputs."""

    name: str
    seed: int
    store: str
    source: str
    data: DataConfig | None
    archs: tuple[ArchConfig, ...]
    train: TrainPlan | None
    resources: Resources
    features: FeatureSpec
    tests: StatsSpec
    pairs: PairSpec
    zoo: ZooSpec = ZooSpec()
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # [sweep]: (train key, its values)

    def cells(self) -> list[dict[str, Any]]:
        """The [sweep] grid's cells, each {train key: value}, in the grid's order (the last key
        varies fastest); one empty cell without a sweep."""
        return [dict(zip([k for k, _ in self.sweep], values, strict=True))
                for values in itertools.product(*[v for _, v in self.sweep])]

    @property
    def imports(self) -> bool:
        """Whether the models are read from a zoo ([zoo] source = "import"), not trained."""
        return self.zoo.imports

    @property
    def plan(self) -> TrainPlan:
        """The train plan (ValueError for an import study, which trains nothing)."""
        if self.train is None:
            raise ValueError(f"study {self.name!r} imports its models: it has no train plan")
        return self.train

    @property
    def shared_init(self) -> bool:
        """train.shared_init (False for an import study)."""
        return self.train is not None and self.train.shared_init

    # ---- lookups
    @property
    def arch_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.archs)

    def arch(self, name: str) -> ArchConfig:
        """The ArchConfig named `name` (input_shape/num_classes still to be set per task)."""
        for a in self.archs:
            if a.name == name:
                return a
        raise KeyError(f"no arch named {name!r}; the study has {list(self.arch_names)}")

    def train_config(self, arch_name: str) -> TrainConfig:
        """The TrainConfig of one architecture ([train] + [train.<arch_name>])."""
        self.arch(arch_name)  # KeyError for an unknown name
        return TrainConfig(**self.plan.kwargs(arch_name))

    def pack_config(self, pack: Pack) -> TrainConfig:
        """The TrainConfig of one pack: its arch's, with its sweep cell's values on top."""
        return TrainConfig(**{**self.plan.kwargs(pack.arch), **self.cells()[pack.cell]})

    def model_seeds(self, task_id: int, cell: int = 0) -> tuple[int, ...]:
        """Seeds of the seeds_per_task models of one task in one sweep cell (the same for every
        arch)."""
        assert self.data is not None  # a trained study has data
        n = self.plan.seeds_per_task
        base = self.seed * SEED_STRIDE + (cell * self.data.num_tasks + task_id) * n
        return tuple(range(base, base + n))

    def model_index(self, seeds: Any, tasks: Any = None) -> Any:
        """Index i (0..seeds_per_task-1) of model seeds within their task and cell (ints or
        arrays; `tasks` is not needed, kept for callers that pass it)."""
        return (seeds - self.seed * SEED_STRIDE) % self.plan.seeds_per_task

    def init_seeds(self, pack: Pack) -> tuple[int, ...]:
        """The seeds that initialize a pack's models: their own seeds, or with
        train.shared_init the seed of model i of task 0 (cell 0) for model i of every task and
        sweep cell."""
        if not self.shared_init:
            return pack.seeds
        base = self.seed * SEED_STRIDE
        return tuple(base + int(self.model_index(s, pack.task)) for s in pack.seeds)

    def packs(self, arch_name: str | None = None) -> list[Pack]:
        """Every zoo trial (arch, task, pack) in a fixed order, or those of one arch (a trained
        study's; an import study's packs come from its source: distsim.pipeline.imports)."""
        names = self.arch_names if arch_name is None else (self.arch(arch_name).name,)
        plan = self.plan
        assert self.data is not None  # a trained study has data
        size = plan.seeds_per_trial
        out = []
        ppt = plan.packs_per_task
        for name in names:
            for t in range(self.data.num_tasks):
                for c in range(len(self.cells())):
                    seeds = self.model_seeds(t, c)
                    for p in range(ppt):
                        out.append(Pack(name, t, c * ppt + p, seeds[p * size : (p + 1) * size],
                                        c))
        return out

    def feature_layers(self, arch_name: str) -> tuple[str, ...]:
        """Layer names to featurize for one arch: all, the last, or the listed ones it has."""
        available = self.arch(arch_name).feature_layers()
        if self.features.layers == "all":
            return available
        if self.features.layers == "last":
            return available[-1:]
        return tuple(name for name in available if name in self.features.layers)

    def saved_epochs(self, arch_name: str) -> tuple[int | None, ...]:
        """The epochs whose checkpoints of one arch are models (``[train] save_epochs`` and the
        last epoch), or (None,) when the study saves none (the last checkpoint only)."""
        if self.train is None:
            return (None,)
        cfg = self.train_config(arch_name)
        if not cfg.save_epochs:
            return (None,)
        return tuple(sorted({*cfg.save_epochs, cfg.epochs}))

    def matrices(self) -> list[MatrixKey]:
        """Every feature matrix (arch, method, layer[, epoch]), in arch, layer, method, epoch
        order."""
        return [
            MatrixKey(arch, method, layer, epoch)
            for arch in self.arch_names
            for layer in self.feature_layers(arch)
            for method in self.features.methods
            for epoch in self.saved_epochs(arch)
        ]

    # ---- identity
    def resolved(self) -> dict[str, Any]:
        """The whole study as plain JSON types (lists, not tuples), defaults filled in."""
        archs = []
        for a in self.archs:
            d = _plain(dataclasses.asdict(a))
            if not self.imports:  # set from the tasks; an import study declares them
                d.pop("input_shape"), d.pop("num_classes")
            for key, default in ADDED_DEFAULTS.items():  # added later: keep older hashes
                if d[key] == default:
                    d.pop(key)
            archs.append(d)
        tests = _plain(dataclasses.asdict(self.tests))
        if tests["group_by"] == "task" and tests["group_bins"] is None:  # added later: keep
            del tests["group_by"], tests["group_bins"]  # older studies' hashes
        for key, default in (("strata", None), ("factors", None), ("permanova_terms", None),
                             ("permanova_by", "terms")):
            if tests[key] == default:  # added later: keep older studies' hashes
                del tests[key]
        out: dict[str, Any] = {"study": {"name": self.name, "seed": self.seed,
                                         "store": self.store}}
        if self.data is not None:
            out["data"] = _plain(self.data.resolved())  # mnist1d_* keys only for mnist1d
        out["arch"] = archs
        if self.train is not None:
            plan = self.train
            out["train"] = {
                "seeds_per_task": plan.seeds_per_task,
                "seeds_per_trial": plan.seeds_per_trial,
                **({"shared_init": True} if plan.shared_init else {}),
                **_train_resolved(TrainConfig(**plan.kwargs())),
                **{arch: _plain(dict(pairs)) for arch, pairs in plan.overrides},
            }
            for key, _ in self.sweep:  # a swept key's values are in "sweep", not here
                out["train"].pop(key, None)
        out.update({
            "resources": _plain(dataclasses.asdict(self.resources)),
            "features": _plain(dataclasses.asdict(self.features)),
            "tests": tests,
            "pairs": _plain(dataclasses.asdict(self.pairs)),
        })
        if self.imports:  # a trained study's resolved config (and hash) has no [zoo]
            out["zoo"] = _plain(dataclasses.asdict(self.zoo))
        if self.sweep:  # nor [sweep] without one
            out["sweep"] = {k: list(v) for k, v in self.sweep}
        return out

    @property
    def hash(self) -> str:
        """sha256 of the resolved config minus study.store, resources and the backends
        (tests.backend, pairs.backend): where and on what a study runs does not change what it
        computes, so a store can refuse a changed study.

        features.projection is hashed only where it changes what is computed and is not the
        map every store made before the key existed used: when the output projection is used
        (FeatureSpec.projects) and projection is not "gaussian". So a study without dim keeps
        its hash, a legacy Gaussian store resumes with projection = "gaussian", and one made
        with the Gaussian refuses the "countsketch" default (naming features.projection)
        rather than mixing the two maps' features. Likewise the cka and aligned options only
        when those methods run; a study with a GRU hashes GRU_FEATURES, the version of the GRU's
        features (2: distsim.weights.recurrent), so a store made with other GRU features is refused.
        The data.mnist1d_* keys are in the resolved config (so hashed) only with dataset =
        "mnist1d" (DataConfig.resolved), and so is the installed mnist1d package's version: a
        generator that changed would give other signals, so its store is refused, not mixed.
        """
        d = self.resolved()
        d["study"].pop("store")
        d.pop("resources")
        d["tests"].pop("backend"), d["pairs"].pop("backend")  # how, not what, is computed
        if not self.features.projects or self.features.projection == "gaussian":
            d["features"].pop("projection")
        if "cka" not in self.features.methods:
            d["features"].pop("probe_size")
        if "aligned" not in self.features.methods:
            d["features"].pop("template_models"), d["features"].pop("template_iterations")
        if any(a.kind == "rnn" for a in self.archs):  # distsim.weights.recurrent's GRU features
            d["features"]["gru_features"] = GRU_FEATURES
        if self.data is not None and self.data.dataset == "mnist1d":
            from distsim.zoo.datasets import mnist1d_version

            d["data"]["mnist1d_version"] = mnist1d_version()
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _train_resolved(cfg: TrainConfig) -> dict[str, Any]:
    """A TrainConfig as plain JSON types; test_history, init_scale and save_epochs (added
    later) only when not their defaults, so that older studies keep their hashes."""
    d = _plain(dataclasses.asdict(cfg))
    for key, default in (("test_history", False), ("init_scale", 1.0), ("save_epochs", [])):
        if d[key] == default:
            d.pop(key)
    return d


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
