"""PERMANOVA of several terms (vegan's adonis2): sequential or marginal sums of squares, strata.

With N objects, their Gower matrix G = -1/2 C (D * D) C (C = I - 11'/N centres) and a design X
(intercept and treatment-coded factors), McArdle & Anderson (2001):

    SS(X) = trace(H G),  H = X X^+ the hat matrix;  SS_total = trace(G);
    sequential (``by="terms"``, type I): SS_k = SS(X_1..k) - SS(X_1..k-1), terms in the order given;
    marginal (``by="margin"``): SS_k = SS(all terms) - SS(all terms but k), for each term that no
        higher-order interaction of the model contains (vegan's drop.scope);
    F_k = (SS_k / df_k) / (SS_res / df_res),  df_res = N - rank(X),  R^2_k = SS_k / SS_total,

df_k the rank each term adds (a term its predecessors already span adds 0 and gets no F). The
null permutes the response's rows against the fixed design (vegan's permutation of raw data),
within strata when given; one permutation gives every term its F, and
p = (1 + #{F_b >= F}) / (1 + B).

Computed without H: an orthonormal basis Q_k of what each term adds (its dummy columns minus
their projection on the terms before it; SVD, rank by tolerance) gives SS_k = ||Q_k' Y||^2 for
a response Y with Y Y' = G. Features X: Y is their centred Euclidean basis (``euclidean_basis``,
no N x N matrix). A distance matrix: G's eigenvectors scaled by the square roots of |eigenvalues|,
the negative part (a non-Euclidean D) subtracted: SS = ||Q'Y+||^2 - ||Q'Y-||^2, exactly trace(H G).
A permutation P costs O(N k r): ||Q_k' P Y||^2 = ||(P'Q_k)' Y||^2 permutes the k basis rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsim.stats.permutation import SeedLike, p_value
from distsim.stats.permutational_anova import (
    _check_permutations,
    _distance_matrix,
    euclidean_basis,
    factorize,
)

BY = ("terms", "margin")
_BATCH = 64  # permutations drawn at a time


@dataclass(frozen=True)
class TermRow:
    """One row of the table: a term (or "Residual"), its df, sum of squares, R^2, F and p."""

    term: str
    df: int
    ss: float
    r2: float
    F: float
    p_value: float


@dataclass(frozen=True)
class TermsResult:
    """Outcome of :func:`permanova_terms`: a row per tested term, the residual, the total sum of
    squares, and each term's (B,) null F in permutation order."""

    rows: tuple[TermRow, ...]
    residual: TermRow
    total_ss: float
    n_samples: int
    permutations: int
    by: str
    null: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """The rows and the residual as dicts (``polars.DataFrame(result.table())``)."""
        return [vars(r) for r in (*self.rows, self.residual)]


def permanova_terms(D: np.ndarray, table: Mapping[str, Sequence[Any] | np.ndarray],
                    terms: Sequence[str], by: str = "terms",
                    strata: Sequence[Any] | np.ndarray | None = None, permutations: int = 999,
                    seed: SeedLike = 0) -> TermsResult:
    """PERMANOVA of `terms` on a distance matrix D (N, N) of any metric.

    table: column name -> N labels (each column a categorical factor, treatment-coded with its
    first level in sorted order as the reference); terms: column names or interactions
    ``"a:b"`` (after the terms they combine); by: "terms" or "margin"; strata: N labels,
    permutations then stay within each; seed: the permutations' seed.

    >>> D = np.array([[0, 1, 4, 4], [1, 0, 4, 4], [4, 4, 0, 1], [4, 4, 1, 0]], float)
    >>> res = permanova_terms(D, {"g": ["a", "a", "b", "b"]}, ["g"], permutations=0)
    >>> row = res.rows[0]
    >>> row.term, row.df, round(row.ss, 6), round(row.r2, 4), round(row.F, 4)
    ('g', 1, 15.5, 0.9394, 31.0)
    """
    G = _gower(_distance_matrix(D))
    w, V = np.linalg.eigh(G)
    tol = 1e-10 * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    pos = V[:, w > tol] * np.sqrt(w[w > tol])
    neg = V[:, w < -tol] * np.sqrt(-w[w < -tol])
    return _terms(pos, neg, table, terms, by, strata, permutations, seed)


def permanova_terms_features(X: np.ndarray, table: Mapping[str, Sequence[Any] | np.ndarray],
                             terms: Sequence[str], by: str = "terms",
                             strata: Sequence[Any] | np.ndarray | None = None,
                             permutations: int = 999, seed: SeedLike = 0) -> TermsResult:
    """:func:`permanova_terms` of the Euclidean distances between the rows of X (N, p), without
    forming them: O(N k r) per permutation for k design columns and r = rank(X) <= min(N, p).

    >>> X = np.array([[0.0, 0], [1, 0], [5, 0], [6, 0]])
    >>> res = permanova_terms_features(X, {"g": ["a", "a", "b", "b"]}, ["g"], permutations=9)
    >>> round(res.rows[0].r2, 4), res.residual.df, round(res.total_ss, 2)
    (0.9615, 2, 26.0)
    """
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"X must be a finite (N, p) feature matrix, got shape {arr.shape}")
    return _terms(euclidean_basis(arr), None, table, terms, by, strata, permutations, seed)


def _gower(D: np.ndarray) -> np.ndarray:
    """-1/2 C (D * D) C: the double-centred squared distances."""
    A = -0.5 * D * D
    return A - A.mean(axis=0) - A.mean(axis=1)[:, None] + A.mean()


@dataclass(frozen=True)
class TermsDesign:
    """A model of terms as orthonormal columns (N, k), each orthogonal to the intercept: under
    a row order, a column's SS is q' G q (q's rows reordered), and the SS of a tested term is
    the sum over its block of columns, the model's over ``model`` (every column for "terms";
    the whole model's basis after the tested terms' for "margin")."""

    tested: tuple[str, ...]
    columns: np.ndarray  # (N, k) float64
    ends: np.ndarray  # (tested + 1,) bounds of the tested terms' column blocks
    model: tuple[int, int]  # the model's column block
    dfs: tuple[int, ...]
    df_res: int
    by: str

    def block_sums(self, per: np.ndarray) -> np.ndarray:
        """(B, k) per-column SS -> (B, tested + 1): each tested term's SS, then the model's."""
        cum = np.concatenate([np.zeros((len(per), 1)), np.cumsum(per, axis=1)], axis=1)
        lo, hi = self.model
        return np.concatenate([cum[:, self.ends[1:]] - cum[:, self.ends[:-1]],
                               (cum[:, hi] - cum[:, lo])[:, None]], axis=1)


def terms_design(table: Mapping[str, Any], terms: Sequence[str], by: str,
                 n: int) -> TermsDesign:
    """The TermsDesign of `terms` over `table`'s N labels per column (see permanova_terms)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, got {by!r}")
    tested, bases, full = _bases(_design(table, terms, n), by)
    dfs = tuple(Q.shape[1] for Q in bases)
    ends = np.cumsum([0, *dfs])
    if by == "terms":  # the model's basis is the terms' bases side by side
        columns, model = np.hstack(bases), (0, int(ends[-1]))
    else:
        columns, model = np.hstack([*bases, full]), (int(ends[-1]), int(ends[-1]) + full.shape[1])
    return TermsDesign(tuple(tested), columns, ends, model, dfs, n - 1 - full.shape[1], by)


def terms_orders(strata: Any, n: int, permutations: int, seed: SeedLike) -> Iterator[np.ndarray]:
    """The row orders of the null, (b, N) int64 batches of at most 64, uniform within strata:
    the permutations every route of permanova_terms draws for `seed`."""
    rng = np.random.default_rng(seed)
    codes = _strata(strata, n)
    for start in range(0, permutations, _BATCH):
        yield _permutations(rng, codes, min(_BATCH, permutations - start))


def terms_result(design: TermsDesign, total: float, observed: np.ndarray, null_sums: np.ndarray,
                 n: int) -> TermsResult:
    """The TermsResult from SS_total, the observed block sums (tested + 1,) and the null's
    (B, tested + 1) (``TermsDesign.block_sums``)."""
    dfs, df_res = np.array(design.dfs, float), design.df_res

    def f_of(ss: np.ndarray, res: np.ndarray | float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (ss / dfs) / (np.asarray(res)[..., None] / df_res) \
                if df_res > 0 else np.full_like(ss, np.nan)

    res_ss = total - observed[-1]
    F = np.where(dfs > 0, f_of(observed[:-1], res_ss), np.nan)
    null = f_of(null_sums[:, :-1], total - null_sums[:, -1])
    permutations = len(null_sums)
    rows = tuple(
        TermRow(t, design.dfs[i], float(observed[i]), float(observed[i] / total), float(F[i]),
                p_value(F[i], null[:, i]) if permutations and np.isfinite(F[i]) else float("nan"))
        for i, t in enumerate(design.tested))
    residual = TermRow("Residual", df_res, float(res_ss), float(res_ss / total), float("nan"),
                       float("nan"))
    return TermsResult(rows, residual, total, n, permutations, design.by,
                       {t: null[:, i].copy() for i, t in enumerate(design.tested)})


def _terms(pos: np.ndarray, neg: np.ndarray | None, table: Mapping[str, Any],
           terms: Sequence[str], by: str, strata: Any, permutations: int,
           seed: SeedLike) -> TermsResult:
    n = len(pos)
    permutations = _check_permutations(permutations)
    design = terms_design(table, terms, by, n)

    def sums(rows: np.ndarray) -> np.ndarray:
        """(B, N) row orders -> (B, tested + 1): each tested term's SS, then the model's."""
        per = np.empty((len(rows), design.columns.shape[1]))
        for b, order in enumerate(rows):
            Q = design.columns[order]  # the basis rows reordered: the response's rows permuted
            per[b] = ((Q.T @ pos) ** 2).sum(axis=1)  # (k,) squared norms of the projections
            if neg is not None:
                per[b] -= ((Q.T @ neg) ** 2).sum(axis=1)
        return design.block_sums(per)

    total = float((pos ** 2).sum() - (0.0 if neg is None else (neg ** 2).sum()))
    observed = sums(np.arange(n)[None])[0]
    batches = [sums(rows) for rows in terms_orders(strata, n, permutations, seed)]
    null = np.concatenate(batches) if batches else np.empty((0, len(design.tested) + 1))
    return terms_result(design, total, observed, null, n)


def _design(table: Mapping[str, Any], terms: Sequence[str], n: int
            ) -> list[tuple[str, np.ndarray]]:
    """(term, its treatment-coded columns (N, m)) per term, checked: known columns of N labels,
    interactions after every factor they combine."""
    if isinstance(terms, str) or not len(terms):
        raise ValueError(f"terms must be a non-empty list of column names, got {terms!r}")
    dummies: dict[str, np.ndarray] = {}
    out: list[tuple[str, np.ndarray]] = []
    if n < 2:
        raise ValueError(f"PERMANOVA needs at least 2 objects, got {n}")
    for term in terms:
        factors = term.split(":")
        if len(set(factors)) < len(factors):
            raise ValueError(f"interaction {term!r} names a factor twice")
        for name in factors:
            if name not in table:
                raise ValueError(f"term {term!r}: no column {name!r} in table (columns: "
                                 f"{', '.join(map(str, table))})")
            if name not in dummies:
                _, codes = factorize(table[name], n, f"the response, column {name!r}")
                dummies[name] = (codes[:, None] == np.arange(1, codes.max() + 1)[None]
                                 ).astype(np.float64)  # (N, levels - 1): level 0 the reference
        if len(factors) > 1:
            earlier = {t for t, _ in out}
            missing = [f for f in factors if f not in earlier]
            if missing:
                raise ValueError(f"interaction {term!r} needs its main effects earlier in "
                                 f"terms: {', '.join(missing)} missing")
            cols = dummies[factors[0]]
            for name in factors[1:]:
                cols = (cols[:, :, None] * dummies[name][:, None, :]).reshape(n, -1)
        else:
            cols = dummies[term]
        if term in {t for t, _ in out}:
            raise ValueError(f"term {term!r} is given twice")
        out.append((term, cols))
    return out


def _bases(blocks: list[tuple[str, np.ndarray]], by: str
           ) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(tested terms, the orthonormal basis (N, df) of what each adds, the model's basis (N, k)
    without the intercept). Sequential: each term on top of those before it; marginal: each
    droppable term on top of all the others."""
    n = len(blocks[0][1])
    one = np.full((n, 1), 1 / np.sqrt(n))
    full, seq = _grow(one, [c for _, c in blocks])
    if by == "terms":
        return [t for t, _ in blocks], seq, full[:, 1:]
    tested, bases = [], []
    for i, (term, cols) in enumerate(blocks):
        inside = set(term.split(":"))
        if any(inside < set(other.split(":")) for other, _ in blocks):
            continue  # a higher-order interaction contains it: not dropped alone (drop.scope)
        rest, _ = _grow(one, [c for j, (_, c) in enumerate(blocks) if j != i])
        _, added = _grow(rest, [cols])
        tested.append(term)
        bases.append(added[0])
    return tested, bases, full[:, 1:]


def _grow(Q: np.ndarray, blocks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Q (N, k) orthonormal extended by each block in turn: (the whole basis, what each block
    added: the SVD basis of its columns minus their projection on the basis so far)."""
    added = []
    for cols in blocks:
        rest = cols - Q @ (Q.T @ cols)
        rest = rest - Q @ (Q.T @ rest)  # twice: Gram-Schmidt's loss of orthogonality
        U, s, _ = np.linalg.svd(rest, full_matrices=False)
        scale = max(float(np.linalg.norm(cols, axis=0).max(initial=0.0)), 1.0)
        new = U[:, s > 1e-9 * scale]
        added.append(new)
        Q = np.hstack([Q, new])
    return Q, added


def _strata(strata: Any, n: int) -> np.ndarray:
    """Stratum codes (N,): one stratum when strata is None."""
    if strata is None:
        return np.zeros(n, dtype=np.int64)
    _, codes = factorize(strata, n, "the response (strata)")
    return codes


def _permutations(rng: np.random.Generator, strata: np.ndarray, b: int) -> np.ndarray:
    """(b, N) row orders, uniform within each stratum: position i holds a row of i's stratum."""
    n = len(strata)
    keys = rng.random((b, n)) + 2.0 * strata[None, :]
    order = np.argsort(strata, kind="stable")
    ranked = np.argsort(keys[:, order], axis=1)  # within each stratum's block of `order`
    out = np.empty((b, n), dtype=np.int64)
    out[:, order] = order[ranked]
    return out
