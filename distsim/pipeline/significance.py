"""The tests stage: HTT (closed-set, open-set) and PERMANOVA per feature matrix, on Ray tasks.

Each test's B permutations are cut into chunks of ``tests.chunk_size``. Chunk 0 is the full
statistic with its first null chunk (``htt(..., seed=s)`` / ``permanova(..., seed=s)``); chunk
c >= 1 draws its permutations from seed (s, c) with the same split (``htt_null_chunk(...,
seed=(s, c), split_seed=s)`` / ``permanova_null_chunk(..., seed=(s, c))``). The chunks run as
Ray tasks; their nulls concatenate into one null of B values and
p = (1 + #{null >= S}) / (1 + B) (``distsim.stats.p_value``). With one chunk the result equals
the single-process ``htt`` / ``permanova`` call exactly. An HTT's learner basis (``htt_prepare``:
the training rows' basis, (n + m) x r with r <= min(n, D), from the D x D Gram when n > D so
that no n x n array exists) is computed once per test by one task and shared by its chunks
through the object store; every HTT of a study gets the options of its ``[tests]`` section
(``StatsSpec.htt_options()``). One ``tests`` shard per (arch, method, layer, protocol); tests
already in the store are skipped. A row's ``seconds`` is the compute time of its chunks (or
tiles), summed: all tests are queued at the stage's start, so their wall times would measure
the queue.

PERMANOVA's R^2 (SS_between / SS_total) is in the row's extra. PERMDISP (metric euclidean only)
runs beside it: the distances of the models to their task's centroid, compared across tasks by an
ANOVA F with residual permutations (``permdisp_features`` on the features' Euclidean basis, which
PERMANOVA shares; one task, O(N) per permutation), so a reader can tell a difference of location
(PERMANOVA) from a difference of spread.

PERMANOVA never builds the N x N distance matrix; its route is recorded in the row's extra:

* ``"features"`` (metric euclidean): ``permanova_features`` on the features' Euclidean basis,
  one task per permutation chunk.
* ``"tiles"`` (any other metric): s_T and each labelling's s_W are sums over pairs, so they
  split over the upper tiles of the distance matrix (``upper_tiles(N, pairs.block)``). The
  labellings are drawn once per chunk, from seed s / (s, c) exactly as ``permanova`` /
  ``permanova_null_chunk`` draw them (``permanova_labels``: (N, b_c) int32 each, N (B + 1)
  int32 in all, in the object store and read zero-copy). One task per tile computes its
  distances (``distance_block`` in the matrix's shared ``distance_frame``: bit for bit those
  of ``pairwise_distances(X, metric, block=pairs.block)``) and returns its shares for all
  B + 1 labellings (``permanova_tile``); the driver adds them as they arrive (``TileSums``,
  O(B) held, order-free) and forms the pseudo-F. A worker holds one tile of distances and
  the tile's rows of the labels; the result is ``permanova`` on that matrix with the same
  seeds (pseudo-F to ~1e-13, the same p).

The tile tasks live here rather than in the pairs stage, although the pairs tiles see every
distance once too. They recompute the tile's distances (one GEMM, about 2 D t^2 flops for a
t x t tile) beside the permutation sums (about B t^2 / a gathers and B (t + a) bucket
writes); at N = 5,000, D = 512, B = 999, a = 50 the distances were 1.5 s of the tile route's
6.3 s (benchmarks/bench_permanova_routes.py, 2 shared cores), so fusing would save about a
quarter of PERMANOVA's time. It would instead tie the pairs stage to the tests' permutations:
a change of ``tests.seed``, ``permanova_permutations`` or ``chunk_size`` would redo the pairs
stage, the pairs stage would need the labels (N x B) before its tiles run and would have to
store B + 1 sums per tile and test (or hold them until every tile is in), and its
skip-what-is-stored resumption would track the tests' state too. Kept apart, each stage
stays resumable and retried on its own units.

Each pending test is a typed job (``Job``): ``HTTJob`` (fit, head, null chunks),
``FeaturesJob`` (PERMANOVA's or PERMDISP's chunks on the features' Euclidean basis) or
``TilesJob`` (PERMANOVA's tiles), planned with its helper tasks and units; it takes each
finished unit's value (``take``) and makes its row (``row``). ``run_tests`` submits the units,
through ``distsim.pipeline.units`` (a failed unit runs again or gives up its test), and a test
is written when its last unit is in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from distsim import stats  # lazy: names load their module on first use
from distsim.config import MatrixKey, PairSpec, StatsSpec, Study
from distsim.errors import LaunchError
from distsim.pipeline.faults import maybe_fail, plan
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.units import Units, run_refs
from distsim.store import Store, lineage

if TYPE_CHECKING:  # types only: the statistics load when a unit runs, not for `status`
    import polars as pl

    from distsim.stats import HTTOptions, TileSums
    from distsim.stats.linear_embedding import Fit

PERMANOVA = "permanova"
PERMDISP = "permdisp"


def study_protocols(study: Study) -> tuple[str, ...]:
    """The tests run per feature matrix: the HTT protocols, then PERMANOVA unless it has 0
    permutations, with PERMDISP beside it when the metric is Euclidean (its features route;
    another metric would need the N x N matrix's principal coordinates). With train.shared_init
    only the HTT protocols, restricted to init-seed strata: PERMANOVA's and PERMDISP's
    permutations are not restricted to strata, so their null would not hold there. With
    tests.strata, PERMANOVA permutes within the strata (``permanova_terms_features``, metric
    euclidean only) and PERMDISP, unrestricted, is left out."""
    if not study.tests.permanova_permutations or study.shared_init:
        return study.tests.protocols
    if study.tests.strata is not None:  # PERMANOVA within strata: its features route only
        return (*study.tests.protocols,
                *((PERMANOVA,) if study.pairs.metric == "euclidean" else ()))
    spread = (PERMDISP,) if study.pairs.metric == "euclidean" else ()
    return (*study.tests.protocols, PERMANOVA, *spread)


def chunk_sizes(permutations: int, chunk: int) -> list[int]:
    """Sizes of the permutation chunks: full chunks of `chunk`, then the remainder."""
    if permutations < 1 or chunk < 1:
        raise ValueError(f"need permutations >= 1 and chunk >= 1, got {permutations}, {chunk}")
    return [min(chunk, permutations - s) for s in range(0, permutations, chunk)]


def htt_fit(X: np.ndarray, tasks: np.ndarray, protocol: str, seed: int, options: HTTOptions,
            strata: np.ndarray | None) -> Fit:
    """The learner's label-independent part for the split of `seed` (``htt_prepare``): computed
    once per test, shared by its chunks through the object store."""
    return stats.htt_prepare(X, tasks, protocol, seed, options=options, strata=strata)


def htt_head(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
             options: HTTOptions, strata: np.ndarray | None, fit: Fit | None = None
             ) -> dict[str, Any]:
    """Chunk 0 of an HTT: the observed statistic, chance, extras and the first null chunk."""
    r = stats.htt(X, tasks, protocol, permutations=permutations, seed=seed, options=options,
                  fit=fit, strata=strata)
    return {"observed": r.statistic, "statistic": r.metric, "chance": r.chance, "null": r.null,
            "extra": {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str))}}


def htt_chunk(X: np.ndarray, tasks: np.ndarray, protocol: str, permutations: int, seed: int,
              chunk: int, options: HTTOptions, strata: np.ndarray | None,
              fit: Fit | None = None) -> np.ndarray:
    """Null chunk c >= 1 of an HTT: permutations from seed (seed, c), the split of `seed`."""
    return stats.htt_null_chunk(X, tasks, protocol, permutations=permutations, seed=(seed, chunk),
                          options=options, split_seed=seed, fit=fit, strata=strata)


def permanova_head(Y: np.ndarray, tasks: np.ndarray, permutations: int,
                   seed: int) -> dict[str, Any]:
    """Chunk 0 of PERMANOVA's features route: the pseudo-F and the first null chunk of
    ``permanova_features`` on the features' Euclidean basis Y (no N x N array)."""
    r = stats.permanova_features(Y, tasks, permutations=permutations, seed=seed)
    return {"observed": r.statistic, "statistic": "pseudo-F", "chance": float("nan"),
            "null": r.null, "extra": {"n_groups": r.n_groups, "route": "features", "r2": r.r2}}


def permanova_within(Y: np.ndarray, tasks: np.ndarray, strata: np.ndarray, permutations: int,
                     seed: int) -> dict[str, Any]:
    """PERMANOVA of the groups with every permutation within the strata (tests.strata), all B
    in one task: ``permanova_terms_features`` of the one term, on the features' basis Y."""
    r = stats.permanova_terms_features(Y, {"group": tasks}, ["group"], strata=strata,
                                       permutations=permutations, seed=seed)
    row = r.rows[0]
    return {"observed": row.F, "statistic": "pseudo-F", "chance": float("nan"),
            "null": r.null["group"], "extra": {"n_groups": int(len(np.unique(tasks))),
                                               "route": "features", "r2": row.r2,
                                               "strata": int(len(np.unique(strata)))}}


def permdisp_test(Y: np.ndarray, tasks: np.ndarray, permutations: int,
                  seed: int) -> dict[str, Any]:
    """PERMDISP (distances to the task centroids, ``permdisp_features``) on the features'
    Euclidean basis Y, all B permutations in one task (O(N) each): whether the tasks' spreads
    differ, which PERMANOVA alone cannot tell from a difference of location."""
    r = stats.permdisp_features(Y, tasks, permutations=permutations, seed=seed)
    spread = r.extra["dispersion"]
    return {"observed": r.statistic, "statistic": "F", "chance": float("nan"), "null": r.null,
            "extra": {"n_groups": r.n_groups, "route": "features", "test": "centroid",
                      "r2": r.r2, "dispersion_min": float(min(spread.values())),
                      "dispersion_max": float(max(spread.values()))}}


def permanova_chunk(Y: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                    chunk: int) -> np.ndarray:
    """Null chunk c >= 1 of PERMANOVA's features route: permutations from seed (seed, c), the
    ones ``permanova_null_chunk`` draws."""
    return stats.permanova_features(Y, tasks, permutations, (seed, chunk)).null


def chunk_labels(tasks: np.ndarray, permutations: int, seed: int, chunk: int) -> np.ndarray:
    """The labellings of chunk c of PERMANOVA's tiles route, (N, b_c) int32: seed s for chunk 0
    (with the observed labels first), (s, c) after, as ``permanova`` /
    ``permanova_null_chunk`` draw them."""
    if chunk == 0:
        return stats.permanova_labels(tasks, permutations, seed, observed=True)
    return stats.permanova_labels(tasks, permutations, (seed, chunk))


def tiles_head(sums: TileSums, sizes: np.ndarray, n_tiles: int) -> dict[str, Any]:
    """The head of a tiles-route PERMANOVA from its tiles' summed shares: the observed pseudo-F
    and the whole null (the labellings of all chunks, in order)."""
    f = stats.tile_pseudo_f(*sums.sums(), sizes)
    r2 = stats.r_squared(float(f[0]), int(sizes.sum()), len(sizes))
    return {"observed": float(f[0]), "statistic": "pseudo-F", "chance": float("nan"),
            "null": f[1:], "extra": {"n_groups": len(sizes), "route": "tiles",
                                     "tiles": n_tiles, "r2": r2}}


def _chunk(unit: str, store_root: str, faults: dict[str, float], fn: Callable[..., Any],
           *args: Any) -> tuple[Any, float]:
    """One unit of a test (a permutation chunk, or a tile of PERMANOVA's tiles route) as a Ray
    task: (fn(*args), the seconds it took), after the fault-injection hook."""
    maybe_fail("test", unit, store_root, faults)
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def combine(head: dict[str, Any], nulls: list[np.ndarray], permutations: int) -> dict[str, Any]:
    """One test row from chunk 0 and the other chunks' nulls: null summary, effect size, p."""
    null = np.concatenate([head["null"], *nulls]).astype(np.float64)
    if len(null) != permutations:
        raise RuntimeError(f"tests: combined null has {len(null)} values, expected {permutations}")
    observed = float(head["observed"])
    mean = float(null.mean())
    sd = float(null.std(ddof=1)) if len(null) > 1 else 0.0
    if sd > 0:
        effect = (observed - mean) / sd
    else:
        effect = float(np.sign(observed - mean) * np.inf) if observed != mean else 0.0
    return {"statistic": head["statistic"], "observed": observed, "chance": float(head["chance"]),
            "null_mean": mean, "null_sd": sd, "effect_size": effect,
            # a null with no finite value (PERMDISP with no spread within tasks) tests nothing
            "p_value": stats.p_value(observed, null) if np.isfinite(null).any() else float("nan"),
            "permutations": permutations, "null": null.tolist(),
            "extra": json.dumps(head["extra"], sort_keys=True)}


def _test_state(study: Study, store: Store) -> tuple[set[tuple[str, ...]], int]:
    """(tests (arch, method, layer, protocol) stored and computed from their matrix's feature
    rows now, how many stored tests are stale)."""
    rows, recorded = lineage.matrix_rows(store), lineage.recorded(store, "tests")
    fresh: set[tuple[str, ...]] = set()
    stale = 0
    for m in study.matrices():
        upstream = lineage.fingerprint(rows.get((m.arch, m.method, m.layer), frozenset()))
        for p in study_protocols(study):
            held = recorded.get((m.arch, m.method, m.layer, p))
            if held is not None and lineage.fresh(held, upstream):
                fresh.add((m.arch, m.method, m.layer, p))
            else:
                stale += held is not None
    return fresh, stale


def outputs(study: Study, store: Store) -> Outputs:
    """Tests (feature matrix x protocol) stored and computed from their matrix now."""
    fresh, stale = _test_state(study, store)
    return Outputs("tests", len(study.matrices()) * len(study_protocols(study)), len(fresh),
                   stale=stale)


# ----------------------------------------------------------------------------- the stage's jobs


@dataclass(frozen=True)
class Unit:
    """One Ray task of a test: a permutation chunk, or a tile of PERMANOVA's tiles route."""

    name: str  # "<matrix>-<protocol>-<part>": the fault-injection key, named when it fails
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(eq=False)
class MatrixRefs:
    """One feature matrix in the object store, shared by the units of its pending tests."""

    key: MatrixKey
    X: Any  # ObjectRef of the features (N, D)
    tasks: Any  # ObjectRef of the task labels (N,)
    n_models: int
    n_tasks: int
    upstream: str  # fingerprint of the feature rows (distsim.store.lineage)
    basis_task: Any  # the remote euclidean_basis
    _basis: Any = None

    def basis(self) -> Any:
        """The features' Euclidean basis (a ref), made once for PERMANOVA and PERMDISP."""
        if self._basis is None:
            self._basis = self.basis_task.remote(self.X)
        return self._basis

    def unit(self, protocol: str, part: str, fn: Callable[..., Any], *args: Any) -> Unit:
        return Unit(f"{self.key}-{protocol}".replace("/", "-") + f"-{part}", fn, args)


@dataclass(eq=False)
class Job:
    """A pending test (one tests shard): its units, and what they have returned so far.
    ``take`` gets a finished unit's value, ``row`` the test's row once all are in."""

    matrix: MatrixRefs
    protocol: str
    permutations: int
    units: list[Unit]
    learner: str | None = None  # the row's learner: the HTT learner, None for the others
    seconds: float = 0.0  # the compute time of the units in, summed
    left: int = field(init=False)  # units not in yet
    kind: ClassVar[str] = "chunk"  # what a unit is called when it fails

    def __post_init__(self) -> None:
        self.left = len(self.units)

    def take(self, i: int, value: Any) -> None:
        raise NotImplementedError

    def head_and_nulls(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The head (observed statistic, chance, extra, first null) and the other nulls."""
        raise NotImplementedError

    def row(self, seed: int) -> dict[str, Any]:
        """The test's row of the tests table, from its units' values."""
        row = combine(*self.head_and_nulls(), self.permutations)
        m = self.matrix
        row.update({"n_models": m.n_models, "n_tasks": m.n_tasks, "seed": seed,
                    "upstream": m.upstream, "learner": self.learner, "seconds": self.seconds})
        return row


@dataclass(eq=False)
class ChunkedJob(Job):
    """A test in permutation chunks: chunk 0 the head, chunks c >= 1 more of the null."""

    values: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.values = [None] * len(self.units)

    def take(self, i: int, value: Any) -> None:
        self.values[i] = value

    def head_and_nulls(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        head, *nulls = self.values
        return head, nulls


@dataclass(eq=False)
class HTTJob(ChunkedJob):
    """An HTT protocol: one ``htt_fit`` task, then ``htt_head`` and ``htt_chunk`` units that
    share it."""

    @classmethod
    def plan(cls, m: MatrixRefs, protocol: str, spec: StatsSpec, options: HTTOptions,
             strata: np.ndarray | None, fit_task: Any) -> HTTJob:
        B, seed = spec.permutations, spec.seed
        sizes = chunk_sizes(B, spec.chunk_size)
        fit = fit_task.remote(m.X, m.tasks, protocol, seed, options, strata)
        units = [m.unit(protocol, "0", htt_head, m.X, m.tasks, protocol, sizes[0], seed,
                        options, strata, fit)]
        units += [m.unit(protocol, str(c), htt_chunk, m.X, m.tasks, protocol, b, seed, c,
                         options, strata, fit) for c, b in enumerate(sizes[1:], 1)]
        return cls(m, protocol, B, units, learner=options.learner)


@dataclass(eq=False)
class FeaturesJob(ChunkedJob):
    """PERMANOVA (metric euclidean: chunks of ``permanova_features``) or PERMDISP (one unit)
    on the features' Euclidean basis."""

    @classmethod
    def plan(cls, m: MatrixRefs, protocol: str, spec: StatsSpec,
             strata: np.ndarray | None = None) -> FeaturesJob:
        B, seed, y = spec.permanova_permutations, spec.seed, m.basis()
        if protocol == PERMDISP:
            units = [m.unit(protocol, "0", permdisp_test, y, m.tasks, B, seed)]
        elif strata is not None:  # tests.strata: every permutation within the strata
            units = [m.unit(protocol, "0", permanova_within, y, m.tasks, strata, B, seed)]
        else:
            sizes = chunk_sizes(B, spec.chunk_size)
            units = [m.unit(protocol, "0", permanova_head, y, m.tasks, sizes[0], seed)]
            units += [m.unit(protocol, str(c), permanova_chunk, y, m.tasks, b, seed, c)
                      for c, b in enumerate(sizes[1:], 1)]
        return cls(m, protocol, B, units)


@dataclass(eq=False)
class TilesJob(Job):
    """PERMANOVA on any metric: one ``permanova_tile`` unit per upper tile of the distance
    matrix, whose shares are added as they arrive (never all held)."""

    groups: np.ndarray = field(kw_only=True)  # the group sizes (permanova_groups)
    sums: TileSums = field(init=False)
    kind: ClassVar[str] = "tile"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sums = stats.TileSums(self.permutations + 1)

    @classmethod
    def plan(cls, m: MatrixRefs, spec: StatsSpec, pairs: PairSpec, tasks: np.ndarray,
             frame_task: Any, labels_task: Any) -> TilesJob:
        B, metric = spec.permanova_permutations, pairs.metric
        groups = stats.permanova_groups(tasks)[1]
        frame = frame_task.remote(m.X, metric)
        labels = [labels_task.remote(m.tasks, b, spec.seed, c)
                  for c, b in enumerate(chunk_sizes(B, spec.chunk_size))]
        units = [m.unit(PERMANOVA, f"tile{t[0]}-{t[2]}", stats.permanova_tile, m.X, frame, t,
                        metric, groups, *labels)
                 for t in stats.upper_tiles(len(tasks), pairs.block)]
        return cls(m, PERMANOVA, B, units, groups=groups)

    def take(self, i: int, value: Any) -> None:
        self.sums.add(*value)

    def head_and_nulls(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return tiles_head(self.sums, self.groups, len(self.units)), []


# ----------------------------------------------------------------------------- the stage


def _plan(study: Study, store: Store, have: set[tuple[str, ...]],
          remotes: dict[str, Any]) -> Iterator[Job]:
    """The jobs of the tests not in the store, matrix by matrix; a job's helper tasks (basis,
    fit, distance frame, labels) are submitted as it is planned."""
    import ray

    spec, options = study.tests, study.tests.htt_options()
    euclidean = study.pairs.metric == "euclidean"
    models = labelled_models(study, store)
    for matrix in study.matrices():
        protocols = [p for p in study_protocols(study)
                     if (matrix.arch, matrix.method, matrix.layer, p) not in have]
        if not protocols:
            continue
        fm = store.feature_matrix(matrix.arch, matrix.method, matrix.layer)
        if len(fm.model_ids) < 4:
            raise LaunchError(
                f"tests: {matrix} has {len(fm.model_ids)} feature rows in the store; run the zoo "
                "and features stages first"
            )
        groups = study_groups(study, models, fm.model_ids, fm.tasks, protocols)
        m = MatrixRefs(matrix, ray.put(fm.X), ray.put(groups), len(fm.model_ids),
                       int(len(np.unique(groups))), fm.upstream, remotes["basis"])
        # train.shared_init: split and permute within init-seed strata (htt_split); or the
        # strata of tests.strata, a models column
        strata = study_strata(study, models, fm.model_ids, fm.seeds, groups, protocols)
        for protocol in protocols:
            if protocol == PERMDISP or (protocol == PERMANOVA and euclidean):  # features route
                yield FeaturesJob.plan(m, protocol, spec,
                                       strata if spec.strata is not None else None)
            elif protocol == PERMANOVA:  # any metric: tiles of the distance matrix
                yield TilesJob.plan(m, spec, study.pairs, groups, remotes["frame"],
                                    remotes["labels"])
            else:
                yield HTTJob.plan(m, protocol, spec, options, strata, remotes["fit"])


def labelled_models(study: Study, store: Store) -> pl.DataFrame | None:
    """The models table with its metadata columns (models_with_meta), read once for every
    matrix, when tests.group_by or tests.strata names a column other than the task; else None."""
    from distsim.store.query import models_with_meta

    spec = study.tests
    if spec.group_by == "task" and spec.group_bins is None and spec.strata is None:
        return None
    return models_with_meta(store).collect()


def study_groups(study: Study, models: pl.DataFrame | None, model_ids: list[str],
                 tasks: np.ndarray, protocols: list[str]) -> np.ndarray:
    """The groups (N,) int64 the tests compare: the tasks, or the codes of the models column
    tests.group_by (binned by tests.group_bins; distsim.store.query.group_codes). LaunchError
    (one line) when there are too few groups for a protocol."""
    from distsim.stats.htt_split import MIN_TASKS
    from distsim.store.query import group_codes

    spec = study.tests
    if spec.group_by == "task" and spec.group_bins is None:
        return tasks
    assert models is not None  # labelled_models read it
    codes, names = group_codes(models, model_ids, spec.group_by, spec.group_bins)
    need = max([MIN_TASKS.get(p, 2) for p in protocols], default=2)
    if len(names) < need:
        raise LaunchError(f"tests.group_by: {spec.group_by!r} has {len(names)} group(s) "
                          f"({', '.join(names[:5])}); {'/'.join(protocols)} need at least {need}")
    counts = np.bincount(codes, minlength=len(names))
    if any(p in MIN_TASKS for p in protocols) and counts.min() < 2:
        small = names[int(counts.argmin())]
        raise LaunchError(f"tests.group_by: group {small!r} of {spec.group_by!r} has "
                          f"{int(counts.min())} model; HTT splits each group, so each needs at "
                          "least 2 (bin the column with tests.group_bins, or drop the HTT "
                          "protocols)")
    return codes


def study_strata(study: Study, models: pl.DataFrame | None, model_ids: list[str],
                 seeds: np.ndarray, groups: np.ndarray,
                 protocols: list[str]) -> np.ndarray | None:
    """The strata (N,) int64 of the tests: the init-seed index (train.shared_init), the codes
    of the models column tests.strata, or None. LaunchError (one line) when an HTT split cannot
    be drawn within them."""
    spec = study.tests
    if spec.strata is None:
        return np.asarray(study.model_index(seeds)) if study.shared_init else None
    from distsim.stats.htt_split import make_split
    from distsim.store.query import group_codes

    assert models is not None  # labelled_models read it
    codes, names = group_codes(models, model_ids, spec.strata)
    for protocol in [p for p in protocols if p in ("closed-set", "open-set")]:
        try:
            make_split(groups, np.unique(groups), protocol, spec.seed, strata=codes,
                       train_fraction=spec.train_fraction,
                       train_task_fraction=spec.train_task_fraction, n_query=spec.n_query,
                       strata_split="cell")
        except ValueError as exc:
            raise LaunchError(f"tests.strata: {protocol} cannot split the groups within the "
                              f"{len(names)} strata of {spec.strata!r}: {exc}") from None
    return codes


def run_tests(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Run every pending test of every feature matrix as Ray tasks (permutation chunks, or
    tiles for PERMANOVA on a non-Euclidean metric); one shard per test, written when its last
    unit is in. A unit that raised runs again while ``resources.max_failures`` allow, else its
    test is given up (``distsim.pipeline.units``: its other units' results are dropped)."""
    import ray

    task = ray.remote(num_cpus=1)(_chunk)
    root, fault_plan = str(store.root), plan()
    remotes = {name: ray.remote(num_cpus=1)(fn) for name, fn in (
        ("basis", stats.euclidean_basis), ("fit", htt_fit), ("frame", stats.distance_frame),
        ("labels", chunk_labels))}

    def submit(part: tuple[Job, int]) -> Any:
        unit = part[0].units[part[1]]
        return task.remote(unit.name, root, fault_plan, unit.fn, *unit.args)

    def on_done(part: tuple[Job, int], result: tuple[Any, float]) -> None:
        (job, i), (value, seconds) = part, result
        job.take(i, value)
        job.seconds += seconds
        job.left -= 1
        if job.left == 0:
            store.write_shard("tests", {**job.matrix.key.key, "protocol": job.protocol},
                              [job.row(study.tests.seed)])

    jobs = list(_plan(study, store, _test_state(study, store)[0], remotes))
    n_tests = len(study.matrices()) * len(study_protocols(study))
    parts = [(job, i) for job in jobs for i in range(len(job.units))]  # a job: eq=False, hashable

    def label(part: tuple[Job, int]) -> str:  # names a unit in its failure line
        return f"{part[0].kind} {part[0].units[part[1]].name}"

    with Units("tests", parts, label=label, max_failures=study.resources.max_failures,
               stream=ctx.stream, noun="task",
               group=lambda part: part[0]) as units:  # a unit given up gives up its test
        if n_tests > len(jobs):
            print(f"tests     {n_tests - len(jobs)} of {n_tests} tests already in store",
                  file=units.stream)
        run_refs(units, submit, on_done)
    return {"tests": len(jobs), "skipped": n_tests - len(jobs), "tasks": len(parts),
            **units.outcome()}


STAGE = Stage(name="tests", outputs=outputs, run=run_tests)
