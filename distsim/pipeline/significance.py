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
(``StatsSpec.htt_options()``). One ``tests`` shard per (arch, method, layer, protocol), and
per factor (tests.factors: ``distsim.pipeline.groups``) and saved epoch ([train] save_epochs)
where the study has them; tests already in the store are skipped. A row's ``seconds`` is the
compute time of its chunks (or tiles), summed: all tests are queued at the stage's start, so
their wall times would measure the queue.

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

import functools
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
from distsim.pipeline.groups import (
    PERMANOVA,
    PERMDISP,
    labelled_models,
    matrix_codes,
    study_groups,
    study_strata,
    study_tests,
)
from distsim.pipeline.stage import Outputs, RunContext, Stage
from distsim.pipeline.test_units import (
    chunk_labels,
    htt_chunk,
    htt_fit,
    htt_head,
    permanova_chunk,
    permanova_head,
    permanova_terms_test,
    permanova_within,
    permdisp_test,
    terms_heads,
    tiles_head,
)
from distsim.pipeline.units import Units, run_refs
from distsim.store import Store, lineage

if TYPE_CHECKING:  # types only: the statistics load when a unit runs, not for `status`
    import polars as pl

    from distsim.stats import HTTOptions, TermsDesign, TileSums

def chunk_sizes(permutations: int, chunk: int) -> list[int]:
    """Sizes of the permutation chunks: full chunks of `chunk`, then the remainder."""
    if permutations < 1 or chunk < 1:
        raise ValueError(f"need permutations >= 1 and chunk >= 1, got {permutations}, {chunk}")
    return [min(chunk, permutations - s) for s in range(0, permutations, chunk)]


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


TestKey = tuple[Any, ...]  # (arch, method, layer, protocol, factor, epoch): the shard key


def test_key(m: MatrixKey, protocol: str, factor: str | None) -> TestKey:
    return (m.arch, m.method, m.layer, protocol, factor, m.epoch)


def _test_state(study: Study, store: Store,
                tests: list[tuple[str, str | None]]) -> tuple[set[TestKey], int]:
    """(the (protocol, factor) `tests` of every matrix stored and computed from their
    matrix's feature rows now, how many stored tests are stale)."""
    rows, recorded = lineage.matrix_rows(store), lineage.recorded(store, "tests")
    fresh: set[TestKey] = set()
    stale = 0
    for m in study.matrices():
        upstream = lineage.fingerprint(rows.get(m.id, frozenset()))
        for p, f in tests:
            held = recorded.get(test_key(m, p, f))
            if held is not None and lineage.fresh(held, upstream):
                fresh.add(test_key(m, p, f))
            else:
                stale += held is not None
    return fresh, stale


def outputs(study: Study, store: Store) -> Outputs:
    """Tests (feature matrix x protocol x factor) stored and computed from their matrix now."""
    tests = study_tests(study, labelled_models(study, store))
    fresh, stale = _test_state(study, store, tests)
    return Outputs("tests", len(study.matrices()) * len(tests), len(fresh), stale=stale)


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
    factor: str | None = None  # the models column whose groups `tasks` holds (tests.factors)
    shared: dict[str, Any] = field(default_factory=dict)  # the basis, shared by the factors

    def basis(self) -> Any:
        """The features' Euclidean basis (a ref), made once for PERMANOVA and PERMDISP."""
        if "basis" not in self.shared:
            self.shared["basis"] = self.basis_task.remote(self.X)
        return self.shared["basis"]

    def unit(self, protocol: str, part: str, fn: Callable[..., Any], *args: Any) -> Unit:
        name = f"{self.key}-{protocol}" + (f"-{self.factor}" if self.factor else "")
        return Unit(name.replace("/", "-").replace("@", "-") + f"-{part}", fn, args)


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

    def shards(self, seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(shard key, row) of each tests shard the job writes: one."""
        m = self.matrix
        return [({**m.key.key, "protocol": self.protocol, "factor": m.factor}, self.row(seed))]


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
        on = spec.backend  # where the null's sums run (tests.backend)
        if protocol == PERMDISP:
            units = [m.unit(protocol, "0", functools.partial(permdisp_test, backend=on), y,
                            m.tasks, B, seed)]
        elif strata is not None:  # tests.strata: every permutation within the strata
            units = [m.unit(protocol, "0", permanova_within, y, m.tasks, strata, B, seed)]
        else:
            sizes = chunk_sizes(B, spec.chunk_size)
            head = functools.partial(permanova_head, backend=on)
            chunk = functools.partial(permanova_chunk, backend=on)
            units = [m.unit(protocol, "0", head, y, m.tasks, sizes[0], seed)]
            units += [m.unit(protocol, str(c), chunk, y, m.tasks, b, seed, c)
                      for c, b in enumerate(sizes[1:], 1)]
        return cls(m, protocol, B, units)


@dataclass(eq=False)
class TermsJob(Job):
    """tests.factors' PERMANOVA on the features' Euclidean basis: one model of every term, one
    unit; a tests shard per term."""

    value: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)

    @classmethod
    def plan(cls, m: MatrixRefs, spec: StatsSpec, table: dict[str, np.ndarray],
             strata: np.ndarray | None) -> TermsJob:
        B = spec.permanova_permutations
        unit = m.unit(PERMANOVA, "0", permanova_terms_test, m.basis(), table, spec.terms,
                      spec.permanova_by, strata, B, spec.seed)
        return cls(m, PERMANOVA, B, [unit])

    def take(self, i: int, value: Any) -> None:
        self.value = value

    def heads(self) -> dict[str, dict[str, Any]]:
        """{term: its head} once every unit is in."""
        return self.value

    def shards(self, seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        m, out = self.matrix, []
        for term, head in self.heads().items():
            row = combine(head, [], self.permutations)
            row.update({"n_models": m.n_models, "n_tasks": head["extra"]["n_groups"],
                        "seed": seed, "upstream": m.upstream, "learner": None,
                        "seconds": self.seconds})
            out.append(({**m.key.key, "protocol": PERMANOVA, "factor": term}, row))
        return out


@dataclass(eq=False)
class TermsTilesJob(TermsJob):
    """tests.factors' PERMANOVA on any metric: one ``permanova_terms_tile`` unit per upper
    tile of the distance matrix (every design column's quadratic form under every row order),
    the shares added as they arrive."""

    design: TermsDesign = field(kw_only=True)
    terms: tuple[str, ...] = field(kw_only=True)
    table: dict[str, np.ndarray] = field(kw_only=True)
    strata: np.ndarray | None = field(kw_only=True)
    sums: np.ndarray = field(init=False)
    kind: ClassVar[str] = "tile"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sums = np.zeros((self.permutations + 1, self.design.columns.shape[1] + 1))

    @classmethod
    def plan_tiles(cls, m: MatrixRefs, spec: StatsSpec, pairs: PairSpec,
                   table: dict[str, np.ndarray], strata: np.ndarray | None,
                   frame_task: Any, orders_task: Any) -> TermsTilesJob:
        import ray

        B, n = spec.permanova_permutations, m.n_models
        design = stats.terms_design(table, spec.terms, spec.permanova_by, n)
        frame = frame_task.remote(m.X, pairs.metric)
        orders = orders_task.remote(strata, n, B, spec.seed)
        columns = ray.put(design.columns)
        tile = functools.partial(stats.permanova_terms_tile, backend=spec.backend)
        units = [m.unit(PERMANOVA, f"tile{t[0]}-{t[2]}", tile, m.X, frame, t, pairs.metric,
                        columns, orders)
                 for t in stats.upper_tiles(n, pairs.block)]
        return cls(m, PERMANOVA, B, units, design=design, terms=spec.terms, table=table,
                   strata=strata)

    def take(self, i: int, value: Any) -> None:
        self.sums += value

    def heads(self) -> dict[str, dict[str, Any]]:
        r = stats.permanova_terms_finish(self.design, self.sums, self.matrix.n_models)
        heads = terms_heads(r, self.table, self.terms, self.strata, "tiles")
        for head in heads.values():
            head["extra"]["tiles"] = len(self.units)
        return heads


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
        tile = functools.partial(stats.permanova_tile, backend=spec.backend)
        units = [m.unit(PERMANOVA, f"tile{t[0]}-{t[2]}", tile, m.X, frame, t, metric, groups,
                        *labels)
                 for t in stats.upper_tiles(len(tasks), pairs.block)]
        return cls(m, PERMANOVA, B, units, groups=groups)

    def take(self, i: int, value: Any) -> None:
        self.sums.add(*value)

    def head_and_nulls(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return tiles_head(self.sums, self.groups, len(self.units)), []


# ----------------------------------------------------------------------------- the stage


def _plan(study: Study, store: Store, tests: list[tuple[str, str | None]], have: set[TestKey],
          remotes: dict[str, Any], models: pl.DataFrame | None) -> Iterator[Job]:
    """The jobs of the tests not in the store, matrix by matrix (and factor by factor with
    tests.factors); a job's helper tasks (basis, fit, distance frame, labels) are submitted
    as it is planned."""
    import ray

    spec, options = study.tests, study.tests.htt_options()
    euclidean = study.pairs.metric == "euclidean"
    for matrix in study.matrices():
        todo = [(p, f) for p, f in tests if test_key(matrix, p, f) not in have]
        if not todo:
            continue
        fm = store.feature_matrix(matrix.arch, matrix.method, matrix.layer, matrix.epoch)
        if len(fm.model_ids) < 4:
            raise LaunchError(
                f"tests: {matrix} has {len(fm.model_ids)} feature rows in the store; run the zoo "
                "and features stages first"
            )
        X, shared = ray.put(fm.X), dict[str, Any]()
        codes = matrix_codes(study, models, fm.model_ids, fm.tasks)  # strata and factors
        within = None if spec.strata is None else codes[spec.strata]  # PERMANOVA's strata
        for factor in dict.fromkeys(f for _, f in todo if f is None or ":" not in f):
            protocols = [p for p, f in todo if f == factor and (factor is None or
                                                                  p != PERMANOVA)]
            if not protocols:  # a factor only PERMANOVA still tests
                continue
            groups = (study_groups(study, models, fm.model_ids, fm.tasks, protocols)
                      if factor is None else codes[factor])
            m = MatrixRefs(matrix, X, ray.put(groups), len(fm.model_ids),
                           int(len(np.unique(groups))), fm.upstream, remotes["basis"],
                           factor, shared)
            # train.shared_init: split and permute within init-seed strata (htt_split); the
            # strata of tests.strata, a models column; and the cells of the other factors
            strata = study_strata(study, codes, fm.seeds, groups, protocols, factor)
            for protocol in protocols:
                if protocol == PERMDISP or (protocol == PERMANOVA and euclidean):
                    yield FeaturesJob.plan(m, protocol, spec, within)  # features route
                elif protocol == PERMANOVA:  # any metric: tiles of the distance matrix
                    yield TilesJob.plan(m, spec, study.pairs, groups, remotes["frame"],
                                        remotes["labels"])
                else:
                    yield HTTJob.plan(m, protocol, spec, options, strata, remotes["fit"])
        if spec.factors is not None and any(p == PERMANOVA for p, _ in todo):
            table = {f: codes[f] for f in spec.factors}  # every term's factors
            m = MatrixRefs(matrix, X, None, len(fm.model_ids), 0, fm.upstream,
                           remotes["basis"], None, shared)
            if euclidean:  # the features route
                yield TermsJob.plan(m, spec, table, within)
            else:  # any metric: tiles of the distance matrix
                yield TermsTilesJob.plan_tiles(m, spec, study.pairs, table, within,
                                               remotes["frame"], remotes["orders"])


def run_tests(study: Study, store: Store, ctx: RunContext) -> dict[str, Any]:
    """Run every pending test of every feature matrix as Ray tasks (permutation chunks, or
    tiles for PERMANOVA on a non-Euclidean metric); one shard per test, written when its last
    unit is in. A unit that raised runs again while ``resources.max_failures`` allow, else its
    test is given up (``distsim.pipeline.units``: its other units' results are dropped)."""
    import ray

    # a GPU share per unit (resources.gpus_per_test) for the torch backend (tests.backend)
    task = ray.remote(num_cpus=1)(_chunk).options(num_gpus=study.resources.gpus_per_test)
    root, fault_plan = str(store.root), plan()
    remotes = {name: ray.remote(num_cpus=1)(fn) for name, fn in (
        ("basis", stats.euclidean_basis), ("fit", htt_fit), ("frame", stats.distance_frame),
        ("labels", chunk_labels), ("orders", stats.permanova_terms_orders))}

    def submit(part: tuple[Job, int]) -> Any:
        unit = part[0].units[part[1]]
        return task.remote(unit.name, root, fault_plan, unit.fn, *unit.args)

    def on_done(part: tuple[Job, int], result: tuple[Any, float]) -> None:
        (job, i), (value, seconds) = part, result
        job.take(i, value)
        job.seconds += seconds
        job.left -= 1
        if job.left == 0:
            for key, row in job.shards(study.tests.seed):
                store.write_shard("tests", key, [row])

    models = labelled_models(study, store)
    tests = study_tests(study, models)
    have = _test_state(study, store, tests)[0]
    jobs = list(_plan(study, store, tests, have, remotes, models))
    n_tests = len(study.matrices()) * len(tests)
    parts = [(job, i) for job in jobs for i in range(len(job.units))]  # a job: eq=False, hashable

    def label(part: tuple[Job, int]) -> str:  # names a unit in its failure line
        return f"{part[0].kind} {part[0].units[part[1]].name}"

    with Units("tests", parts, label=label, max_failures=study.resources.max_failures,
               stream=ctx.stream, noun="task",
               group=lambda part: part[0]) as units:  # a unit given up gives up its test
        if have:
            print(f"tests     {len(have)} of {n_tests} tests already in store",
                  file=units.stream)
        run_refs(units, submit, on_done)
    return {"tests": len(jobs), "skipped": len(have), "tasks": len(parts),
            **units.outcome()}


STAGE = Stage(name="tests", outputs=outputs, run=run_tests)
