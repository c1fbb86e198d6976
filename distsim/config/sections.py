"""The typed sections of a study file that no science module owns, each with its constraint table.

``[data]``, ``[[arch]]`` and ``[train]`` are the science modules' own dataclasses
(:class:`~distsim.zoo.tasks.DataConfig`, :class:`~distsim.zoo.models.ArchConfig`,
:class:`~distsim.zoo.train.TrainConfig`), each with its table next to it. The allowed values
(feature methods, sketches, protocols, learners, metrics) are imported from the modules that
implement them: one source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from distsim.config.choices import (
    BACKENDS,
    LEARNERS,
    METHODS,
    METRICS,
    PROJECTIONS,
    PROTOCOLS,
    SKETCHES,
)
from distsim.config.training import TRAIN_PARAMS
from distsim.errors import ConfigError
from distsim.params import (
    NAME_PATTERN,
    Array,
    Either,
    Flag,
    Integer,
    Maybe,
    Number,
    Options,
    Table,
    Text,
    check_fields,
)

if TYPE_CHECKING:
    from distsim.stats.hypothesis_training import HTTOptions

# [study] and the plan keys of [train] are not dataclasses of their own: checked by the loader.
STUDY_PARAMS: Table = {
    "name": Text(pattern=NAME_PATTERN, empty=False),
    "seed": Integer(lo=0),
    "store": Text(empty=False),
}
PLAN_PARAMS: Table = {"seeds_per_task": Integer(lo=2), "seeds_per_trial": Integer(lo=1),
                      "shared_init": Flag()}
# [sweep]: the [train] keys a grid may vary, each a non-empty list of distinct [train] values
SWEEP_PARAMS: Table = {key: Array(TRAIN_PARAMS[key], nonempty=True, distinct=True)
                       for key in ("lr", "weight_decay", "momentum", "batch_size", "epochs",
                                   "optimizer", "init_scale")}


@dataclass(frozen=True)
class Resources:
    """What one zoo trial, one feature actor and one task of the pairs and tests stages ask Ray
    for (fractional GPUs share a device)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    feature_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_test: float = 0.0  # a GPU share for each pairs segment and test task

    def __post_init__(self) -> None:
        check_fields(self, "resources", RESOURCE_PARAMS)
        for key in ("gpus_per_trial", "gpus_per_test"):
            gpus = getattr(self, key)
            if gpus > 1 and gpus != int(gpus):
                raise ConfigError.at(f"resources.{key}",
                                     f"a share above 1 GPU must be a whole number, got {gpus}")


RESOURCE_PARAMS: Table = {
    "cpus_per_trial": Number(lo=0.0, lo_open=True),
    "gpus_per_trial": Number(lo=0.0),
    "max_failures": Integer(lo=0),
    "feature_actors": Integer(lo=1),
    "cpus_per_actor": Number(lo=0.0, lo_open=True),
    "gpus_per_test": Number(lo=0.0),
}


@dataclass(frozen=True)
class FeatureSpec:
    """Which invariant features to build: methods x layers, optional seeded projection to dim
    (sketch: "output" projects the vector, "input" the chain maps; projection: the output map,
    "countsketch" or the legacy dense "gaussian"; see distsim.weights.features)."""

    methods: tuple[str, ...] = ("chain-gram", "raw")
    layers: str | tuple[str, ...] = "all"
    dim: int | None = None
    seed: int = 0
    sketch: str = "output"
    projection: str = "countsketch"
    probe_size: int = 128  # cka: inputs in the study's probe (a feature has n(n+1)/2 values)
    template_models: int = 64  # aligned: models the study-wide template is averaged from
    template_iterations: int = 3  # aligned: rounds of "align every model, take the mean"

    def __post_init__(self) -> None:
        check_fields(self, "features", FEATURE_PARAMS)
        if self.sketch == "input" and self.dim is None:
            raise ConfigError.at("features.sketch",
                                 '"input" needs features.dim (the size of a sketched Gram)')

    @property
    def projects(self) -> bool:
        """Whether some feature goes through the output projection (so ``projection`` matters):
        dim is set and either sketch is "output" or raw (which has no chain) is a method."""
        return self.dim is not None and (self.sketch == "output" or "raw" in self.methods)


FEATURE_PARAMS: Table = {
    "methods": Array(Options(METHODS), nonempty=True, distinct=True),
    "layers": Either((Options(("all", "last")), Array(Text(), nonempty=True)),
                     '"all", "last" or a non-empty list of layer names'),
    "dim": Maybe(Integer(lo=1)),
    "seed": Integer(lo=0),
    "sketch": Options(SKETCHES),
    "projection": Options(PROJECTIONS),
    "probe_size": Integer(lo=3),
    "template_models": Integer(lo=1),
    "template_iterations": Integer(lo=0),
}


@dataclass(frozen=True)
class StatsSpec:
    """The ``[tests]`` section: HTT protocols and PERMANOVA, permutations spread in chunks.

    group_by: the column of ``models`` whose values are the groups every test compares (the
    task by default; any metadata column of an imported zoo, e.g. ``optim::lr`` or ``epoch``);
    group_bins: bins a numeric column first, into that many equal-count bins or at the given
    edges (a value v falls in bin i when edges[i-1] <= v < edges[i]).
    strata: a models column whose values are strata: HTT splits and permutes within them, and
    PERMANOVA permutes within them (its features route: metric euclidean); PERMDISP, whose
    permutations are not restricted, is not run.
    factors: models columns each tested in one run (instead of group_by): HTT per factor
    within the cells of the other factors (and the strata), one multi-term PERMANOVA whose
    terms are ``permanova_terms`` (default: the factors in order; ``"a:b"`` an interaction)
    with sums of squares by ``permanova_by`` ("terms": sequential, "margin": marginal, as
    vegan's adonis2), and PERMDISP per factor (without strata; permutations unrestricted).
    A protocol that needs more groups than a factor has (open-set: 4) is not run for it."""

    protocols: tuple[str, ...] = ("closed-set", "open-set")
    permutations: int = 199
    permanova_permutations: int = 999
    learner: str = "lda"
    chunk_size: int = 50
    seed: int = 0
    train_fraction: float = 0.6
    train_task_fraction: float = 0.6
    n_query: int | None = None
    k: int | None = None
    group_by: str = "task"
    group_bins: int | tuple[float, ...] | None = None
    strata: str | None = None
    factors: tuple[str, ...] | None = None
    permanova_terms: tuple[str, ...] | None = None
    permanova_by: str = "terms"
    backend: str = "auto"  # numpy, torch, or auto: torch where the worker has a GPU

    def __post_init__(self) -> None:
        check_fields(self, "tests", STATS_PARAMS)
        if self.factors is not None and (self.group_by != "task" or self.group_bins):
            raise ConfigError.at("tests.factors", "set either tests.factors or "
                                 "tests.group_by/group_bins, not both")
        if self.permanova_terms is not None:
            if self.factors is None:
                raise ConfigError.at("tests.permanova_terms", "needs tests.factors")
            for term in self.permanova_terms:
                bad = [f for f in term.split(":") if f not in self.factors]
                if bad or len(set(term.split(":"))) != len(term.split(":")):
                    raise ConfigError.at("tests.permanova_terms", f"{term!r} is not a factor "
                                         "or an interaction 'a:b' of distinct factors of "
                                         f"tests.factors {list(self.factors)}")
        if self.strata is not None and self.factors and self.strata in self.factors:
            raise ConfigError.at("tests.strata", f"{self.strata!r} is also a factor")
        if isinstance(self.group_bins, tuple) and list(self.group_bins) != sorted(
                set(self.group_bins)):
            raise ConfigError.at("tests.group_bins", "edges must increase strictly, got "
                                 f"{list(self.group_bins)}")

    @property
    def terms(self) -> tuple[str, ...]:
        """PERMANOVA's terms with tests.factors: permanova_terms, or the factors in order."""
        return self.permanova_terms or self.factors or ()

    def htt_options(self) -> HTTOptions:
        """The options of every HTT of the study (``htt(..., options=...)``): this section's
        learner, split and k, the rest at HTTOptions' defaults. (HTT's module is imported
        here, not at the top: the config loads no numba.)"""
        from distsim.stats.hypothesis_training import HTTOptions

        return HTTOptions(learner=self.learner, train_fraction=self.train_fraction,
                          train_task_fraction=self.train_task_fraction, n_query=self.n_query,
                          k=self.k, strata_split="cell" if self.strata is not None or (
                              self.factors is not None and len(self.factors) > 1) else "stratum",
                          backend=self.backend)


STATS_PARAMS: Table = {
    "protocols": Array(Options(PROTOCOLS), distinct=True),
    "permutations": Integer(lo=1),
    "permanova_permutations": Integer(lo=0),
    "learner": Options(LEARNERS),
    "chunk_size": Integer(lo=1),
    "seed": Integer(lo=0),
    "train_fraction": Number(lo=0, hi=1, lo_open=True, hi_open=True),
    "train_task_fraction": Number(lo=0, hi=1, lo_open=True, hi_open=True),
    "n_query": Maybe(Integer(lo=1)),
    "k": Maybe(Integer(lo=1)),
    "group_by": Text(empty=False),
    "group_bins": Maybe(Either((Integer(lo=2), Array(Number(), nonempty=True)),
                               "a number of equal-count bins (>= 2) or a list of bin edges")),
    "strata": Maybe(Text(empty=False)),
    "factors": Maybe(Array(Text(empty=False), nonempty=True, distinct=True)),
    "permanova_terms": Maybe(Array(Text(empty=False), nonempty=True, distinct=True)),
    "permanova_by": Options(("terms", "margin")),
    "backend": Options(BACKENDS),
}


@dataclass(frozen=True)
class PairSpec:
    """All-pairs distances: per-model top_k neighbours, computed in blocks of `block` rows."""

    top_k: int = 10
    block: int = 512
    metric: str = "euclidean"
    backend: str = "auto"  # numpy, torch, or auto: torch where the worker has a GPU

    def __post_init__(self) -> None:
        check_fields(self, "pairs", PAIR_PARAMS)


PAIR_PARAMS: Table = {
    "top_k": Integer(lo=1),
    "block": Integer(lo=1),
    "metric": Options(METRICS),
    "backend": Options(BACKENDS),
}
