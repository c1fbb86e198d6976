"""What one unit of the tests stage computes, per kind of test: a test's head (the observed
statistic, chance, extras and the first null chunk) or one more null chunk; the learner basis
an HTT's chunks share; the labellings of PERMANOVA's tiles route. Plain functions of numpy
arrays (``distsim.stats``), run as Ray tasks by ``distsim.pipeline.significance``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from distsim import stats  # lazy: names load their module on first use
from distsim.pipeline.groups import cells

if TYPE_CHECKING:  # types only: the statistics load when a unit runs
    from distsim.stats import HTTOptions, TermsResult, TileSums
    from distsim.stats.linear_embedding import Fit


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


def permanova_head(Y: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                   backend: str = "numpy") -> dict[str, Any]:
    """Chunk 0 of PERMANOVA's features route: the pseudo-F and the first null chunk of
    ``permanova_features`` on the features' Euclidean basis Y (no N x N array)."""
    r = stats.permanova_features(Y, tasks, permutations=permutations, seed=seed,
                                 backend=backend)
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


def permdisp_test(Y: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                  backend: str = "numpy") -> dict[str, Any]:
    """PERMDISP (distances to the task centroids, ``permdisp_features``) on the features'
    Euclidean basis Y, all B permutations in one task (O(N) each): whether the tasks' spreads
    differ, which PERMANOVA alone cannot tell from a difference of location."""
    r = stats.permdisp_features(Y, tasks, permutations=permutations, seed=seed,
                                backend=backend)
    spread = r.extra["dispersion"]
    return {"observed": r.statistic, "statistic": "F", "chance": float("nan"), "null": r.null,
            "extra": {"n_groups": r.n_groups, "route": "features", "test": "centroid",
                      "r2": r.r2, "dispersion_min": float(min(spread.values())),
                      "dispersion_max": float(max(spread.values()))}}


def permanova_chunk(Y: np.ndarray, tasks: np.ndarray, permutations: int, seed: int,
                    chunk: int, backend: str = "numpy") -> np.ndarray:
    """Null chunk c >= 1 of PERMANOVA's features route: permutations from seed (seed, c), the
    ones ``permanova_null_chunk`` draws."""
    return stats.permanova_features(Y, tasks, permutations, (seed, chunk), backend=backend).null


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


def permanova_terms_test(Y: np.ndarray, table: dict[str, np.ndarray], terms: tuple[str, ...],
                         by: str, strata: np.ndarray | None, permutations: int,
                         seed: int) -> dict[str, dict[str, Any]]:
    """Multi-term PERMANOVA (tests.factors) on the features' Euclidean basis Y, all B
    permutations in one task: {term: its head} (``terms_heads``)."""
    r = stats.permanova_terms_features(Y, table, list(terms), by=by, strata=strata,
                                       permutations=permutations, seed=seed)
    return terms_heads(r, table, terms, strata, "features")


def terms_heads(r: TermsResult, table: dict[str, np.ndarray], terms: tuple[str, ...],
                strata: np.ndarray | None, route: str) -> dict[str, dict[str, Any]]:
    """{term: its head (pseudo-F, null, extra with R^2, partial R^2, df, SS and the
    residual's)} of a multi-term PERMANOVA result by `route` ("features" or "tiles")."""
    res = r.residual
    return {row.term: {
        "observed": row.F, "statistic": "pseudo-F", "chance": float("nan"),
        "null": r.null[row.term],
        "extra": {"route": route, "r2": row.r2, "partial_r2": row.ss / (row.ss + res.ss),
                  "df": row.df, "ss": row.ss, "residual_df": res.df, "residual_ss": res.ss,
                  "by": r.by, "terms": "+".join(terms),
                  "n_groups": _levels(table, row.term),
                  **({} if strata is None else {"strata": int(len(np.unique(strata)))})}}
        for row in r.rows}


def _levels(table: dict[str, np.ndarray], term: str) -> int:
    """The number of levels of a term: a factor's groups, or an interaction's cells."""
    codes = cells(*[table[f] for f in term.split(":")])
    return 0 if codes is None else int(len(np.unique(codes)))
