"""What the tests and pairs stages compare: the groups (the task, ``tests.group_by`` or each of
``tests.factors``), the strata the permutations stay within, and which (protocol, factor) tests
a study runs per feature matrix.

A factor's groups are the codes of a models column (``distsim.store.query.group_codes``; the
task is the models' task). With several factors, a factor's HTT splits and permutes within the
cells of the other factors (and of ``tests.strata``): the other factors are held fixed, so a
difference between its groups cannot come from them. PERMANOVA instead fits all factors as the
terms of one model (``permanova_terms_features``) and permutes within ``tests.strata`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from distsim.config import Study
from distsim.errors import LaunchError

if TYPE_CHECKING:
    import polars as pl

    from distsim.store import Store

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


def study_tests(study: Study, models: pl.DataFrame | None) -> list[tuple[str, str | None]]:
    """The (protocol, factor) tests of every feature matrix: (protocol, None) for each of
    ``study_protocols`` without tests.factors. With factors: each HTT protocol for each factor
    that has enough groups (open-set needs 4; a trained study's tasks and [sweep] values,
    other columns' among the ok models), one PERMANOVA row per term
    (tests.permanova_terms or the factors; the features route, or tiles for another metric),
    and PERMDISP per factor (metric euclidean, no strata)."""
    from distsim.stats.htt_split import MIN_TASKS

    spec = study.tests
    if spec.factors is None:
        return [(p, None) for p in study_protocols(study)]
    assert models is not None  # labelled_models read it
    ok = models.filter(models["status"] == "ok")
    counts = {f: ok[f].n_unique() if f in ok.columns else 0 for f in spec.factors}
    if study.train is not None and study.data is not None:  # known before the zoo runs
        counts.update({k: len(v) for k, v in study.sweep if k in counts})
        counts.update({"task": study.data.num_tasks} if "task" in counts else {})
    out: list[tuple[str, str | None]] = [(p, f) for f in spec.factors for p in spec.protocols
                                         if counts[f] >= MIN_TASKS.get(p, 2)]
    if spec.permanova_permutations and not study.shared_init:
        out += [(PERMANOVA, t) for t in spec.terms]
        if spec.strata is None and study.pairs.metric == "euclidean":
            out += [(PERMDISP, f) for f in spec.factors if counts[f] >= 2]
    return out


def labelled_models(study: Study, store: Store) -> pl.DataFrame | None:
    """The models table with its metadata columns (models_with_meta), read once for every
    matrix, when tests.group_by, tests.strata or tests.factors name a column other than the
    task; else None."""
    from distsim.store.query import models_with_meta

    spec = study.tests
    if (spec.group_by == "task" and spec.group_bins is None and spec.strata is None
            and spec.factors is None):
        return None
    return models_with_meta(store).collect()


def factor_codes(models: pl.DataFrame | None, model_ids: list[str], tasks: np.ndarray,
                 column: str, key: str = "tests.factors") -> np.ndarray:
    """The (N,) int64 codes of one models column for the rows `model_ids` (the tasks
    themselves for "task"); a LaunchError naming `key` for a column models lacks."""
    from distsim.errors import StoreError
    from distsim.store.query import group_codes

    if column == "task":
        return tasks
    assert models is not None  # labelled_models read it
    try:
        return group_codes(models, model_ids, column, key=key)[0]
    except StoreError as exc:
        raise LaunchError(str(exc)) from None


def cells(*codes: np.ndarray | None) -> np.ndarray | None:
    """The (N,) int64 codes of the cells that the given code arrays cross (None when none)."""
    given = [np.asarray(c) for c in codes if c is not None]
    if not given:
        return None
    return np.unique(np.stack(given, axis=1), axis=0, return_inverse=True)[1].reshape(-1)


def study_groups(study: Study, models: pl.DataFrame | None, model_ids: list[str],
                 tasks: np.ndarray, protocols: list[str]) -> np.ndarray:
    """The groups (N,) int64 the tests compare without tests.factors (and the pairs stage's
    groups: the first factor with them): the tasks, or the codes of the models column
    tests.group_by (binned by tests.group_bins; distsim.store.query.group_codes). LaunchError
    (one line) when there are too few groups for a protocol."""
    from distsim.stats.htt_split import MIN_TASKS
    from distsim.store.query import group_codes

    spec = study.tests
    if spec.factors is not None:
        return factor_codes(models, model_ids, tasks, spec.factors[0])
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


def matrix_codes(study: Study, models: pl.DataFrame | None, model_ids: list[str],
                 tasks: np.ndarray) -> dict[str, np.ndarray]:
    """The (N,) int64 codes of tests.strata and of every tests.factors column for the rows
    `model_ids` of one feature matrix, read once for all its tests (factor_codes)."""
    spec = study.tests
    keys = {f: "tests.factors" for f in spec.factors or ()}
    if spec.strata is not None:
        keys[spec.strata] = "tests.strata"
    return {c: factor_codes(models, model_ids, tasks, c, key) for c, key in keys.items()}


def study_strata(study: Study, codes: Mapping[str, np.ndarray], seeds: np.ndarray,
                 groups: np.ndarray, protocols: list[str],
                 factor: str | None = None) -> np.ndarray | None:
    """The strata (N,) int64 of the HTT tests of `factor` (None: the study's one grouping):
    the cells of the init-seed index (train.shared_init), the codes of the models column
    tests.strata and, with tests.factors, the other factors (`codes`: matrix_codes); None
    when there are none. LaunchError (one line) when an HTT split cannot be drawn within
    them."""
    from distsim.stats.htt_split import make_split

    spec = study.tests
    init = np.asarray(study.model_index(seeds)) if study.shared_init else None
    if spec.strata is None and (spec.factors is None or len(spec.factors) == 1):
        return init
    named = [] if spec.strata is None else [spec.strata]
    named += [f for f in spec.factors or () if f != factor]
    strata = cells(init, *[codes[c] for c in named])
    for protocol in [p for p in protocols if p in ("closed-set", "open-set")]:
        try:
            make_split(groups, np.unique(groups), protocol, spec.seed, strata=strata,
                       train_fraction=spec.train_fraction,
                       train_task_fraction=spec.train_task_fraction, n_query=spec.n_query,
                       strata_split="cell")
        except ValueError as exc:
            what = factor if factor is not None else spec.group_by
            raise LaunchError(f"tests: {protocol} of {what!r} cannot split its groups within "
                              f"the cells of {' x '.join(named)}: {exc}") from None
    return strata
