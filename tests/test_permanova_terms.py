"""PERMANOVA of several terms (`permanova_terms`, `permanova_terms_features`, vegan's adonis2).

Checked against an independent reference written here from the definitions (McArdle & Anderson
2001: hat matrices of treatment-coded designs on Gower's centred matrix, SS as traces), against
scikit-bio's one-way pseudo-F, and against adonis2 output printed for vegan's dune data. The
permutation scheme is checked exactly on small N (every null F tuple is the tuple of one
permutation of the response rows, within strata when given), and its calibration by simulation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist, pdist, squareform

from distsim.stats import p_value, permanova_terms, permanova_terms_features

TOL = 1e-9

# ---------------------------------------------------------------- independent reference


def _gower(D: np.ndarray) -> np.ndarray:
    """G = -1/2 C (D * D) C, C = I - 11'/N."""
    D = np.asarray(D, dtype=np.float64)
    n = len(D)
    C = np.eye(n) - 1.0 / n
    return C @ (-0.5 * D * D) @ C


def _dummies(labels) -> np.ndarray:
    """Treatment coding: one 0/1 column per level but the first in sorted order."""
    labels = np.asarray(labels)
    levels = np.unique(labels)
    return np.column_stack(
        [np.ones(len(labels))] + [(labels == lv).astype(np.float64) for lv in levels[1:]]
    )[:, 1:]


def _term_columns(table, term: str, n: int) -> np.ndarray:
    """A main effect's dummies, or an interaction's products of its factors' dummy columns."""
    out = np.ones((n, 1))
    for name in term.split(":"):
        d = _dummies(table[name])
        out = (out[:, :, None] * d[:, None, :]).reshape(n, -1)
    return out


def _basis(M: np.ndarray) -> np.ndarray:
    """Orthonormal basis of M's column space (SVD, numpy matrix_rank's tolerance)."""
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    r = int(np.sum(s > s[0] * max(M.shape) * np.finfo(np.float64).eps)) if s.size else 0
    return U[:, :r]


def _hat(table, terms, n: int) -> tuple[np.ndarray, int]:
    """(H = X X^+, rank X) of the design X = intercept + terms' columns."""
    Q = _basis(np.column_stack([np.ones(n)] + [_term_columns(table, t, n) for t in terms]))
    return Q @ Q.T, Q.shape[1]


def _projectors(table, terms, by: str, n: int):
    """[(term, df, P)] with a tested term's SS = trace(P G), and (df_res, H_full)."""
    terms = list(terms)
    H_full, rank_full = _hat(table, terms, n)
    out = []
    if by == "terms":
        H_prev, r_prev = _hat(table, [], n)
        for k, term in enumerate(terms):
            H, r = _hat(table, terms[: k + 1], n)
            out.append((term, r - r_prev, H - H_prev))
            H_prev, r_prev = H, r
    else:
        for k, term in enumerate(terms):
            own = set(term.split(":"))
            if any(own < set(other.split(":")) for other in terms):
                continue  # contained in a higher-order interaction of the model: no row
            H_rest, r_rest = _hat(table, terms[:k] + terms[k + 1 :], n)
            out.append((term, rank_full - r_rest, H_full - H_rest))
    return out, (n - rank_full, H_full)


def reference(G: np.ndarray, table, terms, by: str = "terms"):
    """Rows (term, df, ss, r2, F), residual (df, ss, r2) and total SS, from the definitions."""
    n = len(G)
    parts, (df_res, H_full) = _projectors(table, terms, by, n)
    total = float(np.trace(G))
    ss_res = total - float(np.trace(H_full @ G))
    rows = []
    for term, df, P in parts:
        ss = float(np.trace(P @ G))
        F = (ss / df) / (ss_res / df_res) if df > 0 else math.nan
        rows.append({"term": term, "df": df, "ss": ss, "r2": ss / total, "F": F})
    return rows, {"df": df_res, "ss": ss_res, "r2": ss_res / total}, total


def _assert_matches(res, ref, n: int, by: str) -> None:
    rows, resid, total = ref
    assert res.n_samples == n and res.by == by
    assert res.total_ss == pytest.approx(total, rel=TOL)
    assert [r.term for r in res.rows] == [r["term"] for r in rows]
    f_scale = total / (resid["ss"] / resid["df"])  # F of a term holding all the SS, per df
    for got, exp in zip(res.rows, rows, strict=True):
        assert got.df == exp["df"], got.term
        assert got.ss == pytest.approx(exp["ss"], rel=TOL, abs=TOL * total), got.term
        assert got.r2 == pytest.approx(exp["r2"], rel=TOL, abs=TOL), got.term
        if exp["df"] == 0:
            assert math.isnan(got.F) and math.isnan(got.p_value), got.term
        else:
            assert got.F == pytest.approx(exp["F"], rel=TOL, abs=TOL * f_scale), got.term
    assert res.residual.df == resid["df"]
    assert res.residual.ss == pytest.approx(resid["ss"], rel=TOL, abs=TOL * total)
    assert res.residual.r2 == pytest.approx(resid["r2"], rel=TOL, abs=TOL)
    assert math.isnan(res.residual.F) and math.isnan(res.residual.p_value)


def _check_both_routes(X, table, terms, by, permutations=9) -> None:
    """D route (Euclidean D) and features route agree with the reference and each other."""
    n = len(X)
    D = cdist(X, X)
    ref = reference(_gower(D), table, terms, by)
    via_d = permanova_terms(D, table, terms, by=by, permutations=permutations, seed=3)
    via_x = permanova_terms_features(X, table, terms, by=by, permutations=permutations, seed=3)
    _assert_matches(via_d, ref, n, by)
    _assert_matches(via_x, ref, n, by)
    for a, b in zip(via_d.rows, via_x.rows, strict=True):
        assert (a.term, a.df) == (b.term, b.df)
        assert a.ss == pytest.approx(b.ss, rel=TOL, abs=TOL * via_d.total_ss)
        # same seed, same permutations (as permanova / permanova_features): same null
        np.testing.assert_allclose(via_d.null[a.term], via_x.null[b.term], rtol=1e-8, atol=1e-12)


def test_reference_is_the_textbook_one_way_pseudo_f():
    """The reference itself: one factor gives Anderson (2001)'s s_W / s_T pseudo-F."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], [4, 7, 9])
    X = rng.standard_normal((20, 3))
    X[labels == "b", 0] += 1.0
    D = cdist(X, X)
    d2 = np.triu(D * D, 1)
    s_t = d2.sum() / 20
    s_w = sum(d2[np.ix_(labels == g, labels == g)].sum() / np.sum(labels == g) for g in "abc")
    rows, resid, total = reference(_gower(D), {"g": labels}, ["g"])
    assert total == pytest.approx(s_t, rel=1e-12)
    assert resid["ss"] == pytest.approx(s_w, rel=1e-12)
    assert rows[0]["F"] == pytest.approx(((s_t - s_w) / 2) / (s_w / 17), rel=1e-12)


# ---------------------------------------------------------------- fixed designs


def _crossed(rng, a_levels, b_levels, reps):
    A, B = (np.array(v) for v in zip(*itertools.product(a_levels, b_levels), strict=True))
    A, B = np.repeat(A, reps), np.repeat(B, reps)
    order = rng.permutation(len(A))  # rows interleaved, not sorted by cell
    return A[order], B[order]


def _designs():
    rng = np.random.default_rng(42)
    out = {}
    out["one factor"] = ({"A": rng.permutation(np.repeat(["x", "y", "z"], [5, 7, 9]))}, ["A"])
    A, B = _crossed(rng, ["a0", "a1", "a2"], ["b0", "b1"], 4)
    out["crossed balanced"] = ({"A": A, "B": B}, ["A", "B"])
    out["interaction balanced"] = ({"A": A, "B": B}, ["A", "B", "A:B"])
    A = rng.choice(["a0", "a1", "a2"], 27)
    B = rng.choice([10, 20, 30], 27, p=[0.6, 0.3, 0.1])  # integer labels, unequal cells
    out["crossed unbalanced"] = ({"A": A, "B": B}, ["A", "B"])
    out["crossed unbalanced, B first"] = ({"A": A, "B": B}, ["B", "A"])
    out["interaction unbalanced"] = ({"A": A, "B": B}, ["A", "B", "A:B"])
    out["interaction, reversed name"] = ({"A": A, "B": B}, ["B", "A", "B:A"])
    A, B = _crossed(rng, ["a0", "a1", "a2"], ["b0", "b1", "b2"], 3)
    keep = ~((A == "a2") & (B == "b2"))  # an empty cell: the interaction loses a df
    out["interaction, empty cell"] = ({"A": A[keep], "B": B[keep]}, ["A", "B", "A:B"])
    A = rng.permutation(np.repeat(["a0", "a1", "a2", "a3"], 6))
    relabel = {"a0": "q", "a1": "z", "a2": "b", "a3": "m"}  # same partition, other names
    out["duplicated factor"] = ({"A": A, "A2": np.array([relabel[v] for v in A])}, ["A", "A2"])
    C = np.where(A == "a0", "none", rng.choice(["c1", "c2", "c3"], 24))  # a0 <=> "none"
    out["partially aliased factor"] = ({"A": A, "C": C}, ["A", "C"])
    out["partially aliased, C first"] = ({"A": A, "C": C}, ["C", "A"])
    A, B = _crossed(rng, ["a0", "a1"], ["b0", "b1"], 5)
    Z = rng.choice(["z0", "z1", "z2"], 20)
    out["three factors + one interaction"] = ({"A": A, "B": B, "Z": Z}, ["A", "B", "Z", "A:B"])
    return out


DESIGNS = _designs()


@pytest.mark.parametrize("by", ["terms", "margin"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_fixed_designs_match_the_reference(name, by):
    table, terms = DESIGNS[name]
    n = len(next(iter(table.values())))
    rng = np.random.default_rng([list(DESIGNS).index(name), by == "margin"])
    X = rng.standard_normal((n, 4))
    X[:, 0] += 1.5 * (np.asarray(table[terms[0]]) == np.unique(table[terms[0]])[0])
    _check_both_routes(X, table, terms, by)


def test_rank_deficiency_is_counted():
    """df counts only new independent columns: a duplicate factor adds 0 (F, p NaN)."""
    table, terms = DESIGNS["duplicated factor"]
    X = np.random.default_rng(1).standard_normal((24, 3))
    res = permanova_terms_features(X, table, terms, permutations=19)
    assert [(r.term, r.df) for r in res.rows] == [("A", 3), ("A2", 0)]
    assert math.isnan(res.rows[1].F) and math.isnan(res.rows[1].p_value)
    assert res.rows[1].ss == pytest.approx(0.0, abs=TOL * res.total_ss)
    assert res.residual.df == 24 - 4
    margin = permanova_terms_features(X, table, terms, by="margin", permutations=19)
    assert [r.df for r in margin.rows] == [0, 0]  # each is spanned by the other
    table, terms = DESIGNS["interaction, empty cell"]
    res = permanova_terms_features(np.ones((24, 1)) + X[:, :1], table, terms, permutations=0)
    assert [r.df for r in res.rows] == [2, 2, 3]


@pytest.mark.parametrize("metric", ["braycurtis", "cityblock"])
@pytest.mark.parametrize("by", ["terms", "margin"])
def test_non_euclidean_distances_match_the_reference(metric, by):
    rng = np.random.default_rng(7)
    A, B = _crossed(rng, ["a0", "a1", "a2"], ["b0", "b1"], 3)
    A, B = A[:-2], B[:-2]  # unbalanced
    counts = rng.poisson(3.0, (len(A), 12)).astype(np.float64) + (A == "a1")[:, None] * 2
    D = squareform(pdist(counts, metric))
    G = _gower(D)
    eig = np.linalg.eigvalsh(G)
    assert eig[0] < -1e-6 * eig[-1]  # really non-Euclidean: negative eigenvalues
    for terms in (["A", "B"], ["A", "B", "A:B"]):
        res = permanova_terms(D, {"A": A, "B": B}, terms, by=by, permutations=9)
        _assert_matches(res, reference(G, {"A": A, "B": B}, terms, by), len(A), by)


@st.composite
def _random_designs(draw):
    n = draw(st.integers(6, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a = draw(st.integers(1, 4))
    b = draw(st.integers(1, 3))
    p = draw(st.integers(1, 6))
    A = np.array([f"lvl{k}" for k in rng.integers(0, a, n)])  # strings
    B = rng.integers(0, b, n) * 7 - 3  # integers, negative ones too
    X = rng.standard_normal((n, p)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    X[:, 0] += draw(st.floats(0, 3)) * (A == "lvl0")
    terms = draw(
        st.sampled_from([["A"], ["A", "B"], ["B", "A"], ["A", "B", "A:B"], ["B", "A", "B:A"]])
    )
    by = draw(st.sampled_from(["terms", "margin"]))
    return X, {"A": A, "B": B}, terms, by


@settings(max_examples=25, deadline=None)
@given(_random_designs())
def test_random_designs_match_the_reference(case):
    X, table, terms, by = case
    rows, resid, total = reference(_gower(cdist(X, X)), table, terms, by)
    assume(resid["df"] >= 1 and resid["ss"] > 1e-6 * total)  # F defined and not ill-posed
    _check_both_routes(X, table, terms, by)


@settings(max_examples=15, deadline=None)
@given(_random_designs())
def test_sequential_ss_partition_the_total(case):
    X, table, terms, _ = case
    res = permanova_terms_features(X, table, terms, permutations=0)
    assume(res.residual.df >= 1)
    assert sum(r.ss for r in res.rows) + res.residual.ss == pytest.approx(res.total_ss, rel=1e-9)
    assert sum(r.df for r in res.rows) + res.residual.df == len(X) - 1
    if ":" not in terms[-1]:  # the last main effect: marginal SS == sequential SS
        last = permanova_terms_features(X, table, terms, by="margin", permutations=0).rows[-1]
        assert (last.term, last.df) == (terms[-1], res.rows[-1].df)
        assert last.ss == pytest.approx(res.rows[-1].ss, rel=1e-9, abs=1e-9 * res.total_ss)


def test_margin_rows_are_the_terms_no_interaction_contains():
    table, _ = DESIGNS["three factors + one interaction"]
    X = np.random.default_rng(3).standard_normal((20, 2))
    res = permanova_terms_features(X, table, ["A", "B", "Z", "A:B"], by="margin", permutations=9)
    assert [r.term for r in res.rows] == ["Z", "A:B"]
    assert set(res.null) >= {"Z", "A:B"}


# ---------------------------------------------------------------- scikit-bio, one factor


@pytest.mark.parametrize("sizes", [(5, 5, 5), (2, 9, 4, 7), (12, 3)])
def test_one_factor_f_matches_scikit_bio(sizes):
    skbio = pytest.importorskip("skbio")
    from skbio.stats.distance import permanova as skbio_permanova

    rng = np.random.default_rng(sum(sizes))
    labels = rng.permutation(np.repeat([f"g{i}" for i in range(len(sizes))], sizes))
    X = rng.standard_normal((len(labels), 4))
    X[:, 0] += 0.8 * (labels == "g0")
    D = cdist(X, X)
    ref = skbio_permanova(skbio.DistanceMatrix(D), labels, permutations=0)
    for res in (
        permanova_terms(D, {"g": labels}, ["g"], permutations=9),
        permanova_terms_features(X, {"g": labels}, ["g"], permutations=9),
    ):
        assert res.rows[0].F == pytest.approx(ref["test statistic"], rel=TOL)
        assert res.rows[0].df == ref["number of groups"] - 1
        assert res.n_samples == ref["sample size"]


# ---------------------------------------------------------------- vegan's dune data

# vegan's data(dune) (20 sites x 30 species cover classes) and the factors of data(dune.env),
# as text from public CSV copies of the R data (the species table matches vegan's printed head).
_DUNE = """\
1 0 0 0 0 0 0 0 0 0 0 4 0 0 0 0 7 0 4 2 0 0 0 0 0 0 0 0 0 0
3 0 0 2 0 3 4 0 0 0 0 4 0 0 0 0 5 0 4 7 0 0 0 0 5 0 5 0 0 0
0 4 0 7 0 2 0 0 0 0 0 4 0 0 0 0 6 0 5 6 0 0 0 0 2 0 2 0 2 0
0 8 0 2 0 2 3 0 2 0 0 4 0 0 0 0 5 0 4 5 0 0 5 0 2 0 1 0 2 0
2 0 0 0 4 2 2 0 0 0 0 4 0 0 0 0 2 5 2 6 0 5 0 0 3 2 2 0 2 0
2 0 0 0 3 0 0 0 0 0 0 0 0 0 0 0 6 5 3 4 0 6 0 0 3 5 5 0 6 0
2 0 0 0 2 0 2 0 0 0 0 0 0 0 0 2 6 5 4 5 0 3 0 0 3 2 2 0 2 0
0 4 0 5 0 0 0 0 0 0 4 0 0 0 4 0 4 0 4 4 2 0 2 0 3 0 2 0 2 0
0 3 0 3 0 0 0 0 0 0 0 6 0 0 4 4 2 0 4 5 0 2 2 0 2 0 3 0 2 0
4 0 0 0 4 2 4 0 0 0 0 0 0 0 0 0 6 3 4 4 0 0 0 0 3 0 6 1 2 0
0 0 0 0 0 0 0 0 0 0 0 0 0 2 0 0 7 3 4 0 0 0 2 0 5 0 3 2 4 0
0 4 0 8 0 0 0 0 0 0 0 0 0 0 0 4 0 0 0 4 0 2 4 0 2 0 3 0 4 0
0 5 0 5 0 0 0 1 0 0 0 0 0 0 0 3 0 0 2 9 2 0 2 0 2 0 2 0 0 0
0 4 0 0 0 0 0 0 0 2 4 0 0 0 0 0 0 0 0 0 2 0 0 0 2 0 6 0 0 4
0 4 0 0 0 0 0 0 0 2 5 0 0 0 3 0 0 0 0 0 2 0 0 0 2 0 1 0 4 0
0 7 0 4 0 0 0 0 0 0 8 0 0 0 3 0 0 0 0 2 2 0 0 0 0 0 0 0 4 3
2 0 2 0 4 0 0 0 0 0 0 0 0 2 0 0 0 2 1 0 0 0 0 0 2 0 0 0 0 0
0 0 0 0 0 2 0 0 0 0 0 0 0 0 0 0 2 3 3 0 0 0 0 3 5 0 2 1 6 0
0 0 3 0 4 0 0 0 0 0 0 0 2 5 0 0 0 0 0 0 0 0 3 3 6 0 2 0 3 0
0 5 0 0 0 0 0 0 0 0 4 0 0 0 4 0 0 0 0 0 4 0 0 5 2 0 0 0 4 3
"""
_DUNE_ENV = {
    "Moisture": "1 1 2 2 1 1 1 5 4 2 1 4 5 5 5 5 2 1 5 5".split(),
    "Management": "SF BF SF SF HF HF HF HF HF BF BF SF SF NM NM SF NM NM NM NM".split(),
    "Use": (
        "Haypastu Haypastu Haypastu Haypastu Hayfield Haypastu Pasture Pasture Hayfield "
        "Hayfield Pasture Haypastu Haypastu Pasture Haypastu Pasture Hayfield Hayfield "
        "Hayfield Hayfield"
    ).split(),
    "Manure": "4 2 4 4 2 2 3 3 1 1 1 2 3 0 0 3 0 0 0 0".split(),
}


def _dune_bray() -> np.ndarray:
    Y = np.array([[float(v) for v in line.split()] for line in _DUNE.splitlines()])
    assert Y.shape == (20, 30)
    return squareform(pdist(Y, "braycurtis"))  # vegan's vegdist default, "bray"


# adonis2(dune ~ <factor>, data = dune.env) (Bray-Curtis): Df, SumOfSqs, R2, F as printed by
# vegan's adonis (7 significant digits; the 5-digit adonis2 prints of Management and Moisture,
# e.g. in vegan's tests/vegan-tests.Rout.save, agree). Total SS 4.2990219.
_DUNE_ONE_FACTOR = {
    "Management": (3, 1.4685918, 0.3416107, 2.767243),
    "Moisture": (3, 1.7281651, 0.4019903, 3.585140),
    "Use": (2, 0.5531507, 0.1286690, 1.255190),
    "Manure": (4, 1.5238805, 0.3544714, 2.059193),
}


@pytest.mark.parametrize("factor", list(_DUNE_ONE_FACTOR))
def test_dune_one_factor_matches_vegan(factor):
    df, ss, r2, F = _DUNE_ONE_FACTOR[factor]
    res = permanova_terms(_dune_bray(), _DUNE_ENV, [factor], permutations=0)
    row = res.rows[0]
    assert res.total_ss == pytest.approx(4.2990219, abs=5e-8)
    assert row.df == df and res.residual.df == 19 - df
    assert row.ss == pytest.approx(ss, abs=5e-8)
    assert row.r2 == pytest.approx(r2, abs=5e-8)
    assert row.F == pytest.approx(F, abs=5e-7)


def test_dune_manure_then_management_matches_vegan():
    """adonis(dune ~ Manure*Management*A1*Moisture) prints, sequentially, Manure (4 df, SS
    1.5239, R2 0.35447) then Management with 2 df (NM is Manure 0: one Management contrast is
    aliased), SS 0.6118, R2 0.14232. Sequential rows depend only on the terms before them; F does
    not carry over (its residual is the larger model's). Marginal SS of the last main effect of
    Manure + Management is that same sequential SS."""
    D = _dune_bray()
    res = permanova_terms(D, _DUNE_ENV, ["Manure", "Management"], permutations=0)
    (manure, management) = res.rows
    assert (manure.df, management.df) == (4, 2)
    assert manure.ss == pytest.approx(1.5239, abs=5e-5)
    assert manure.r2 == pytest.approx(0.35447, abs=5e-6)
    assert management.ss == pytest.approx(0.6118, abs=5e-5)
    assert management.r2 == pytest.approx(0.14232, abs=5e-6)
    margin = permanova_terms(D, _DUNE_ENV, ["Manure", "Management"], by="margin", permutations=0)
    assert margin.rows[1].term == "Management" and margin.rows[1].df == 2
    assert margin.rows[1].ss == pytest.approx(0.6118, abs=5e-5)
    _assert_matches(res, reference(_gower(D), _DUNE_ENV, ["Manure", "Management"]), 20, "terms")


@pytest.mark.parametrize("by", ["terms", "margin"])
def test_dune_interaction_matches_the_reference(by):
    """No printed factor-only adonis2 interaction table was found: the reference stands in."""
    D = _dune_bray()
    terms = ["Management", "Use", "Management:Use"]
    res = permanova_terms(D, _DUNE_ENV, terms, by=by, permutations=0)
    _assert_matches(res, reference(_gower(D), _DUNE_ENV, terms, by), 20, by)


# ---------------------------------------------------------------- the permutations


def _null_tuples(res) -> np.ndarray:
    return np.column_stack([res.null[r.term] for r in res.rows])


def _all_perm_tuples(G, table, terms, by, perms) -> np.ndarray:
    """The reference F tuple of every permutation P of the response rows (G -> P G P')."""
    parts, (df_res, H_full) = _projectors(table, terms, by, len(G))
    Gp = G[perms[:, :, None], perms[:, None, :]]  # (n_perms, N, N)
    ss_res = np.einsum("pii->p", Gp) - np.einsum("ij,pij->p", H_full, Gp)
    return np.column_stack(
        [(np.einsum("ij,pij->p", P, Gp) / df) / (ss_res / df_res) for _, df, P in parts]
    )


def _matched(tuples: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each tuple: is it (to 1e-8 relative) the tuple of one of the pool's permutations?"""
    scale = np.abs(pool).clip(1e-300)
    return np.array([(np.abs(t - pool) / scale).max(axis=1).min() <= 1e-8 for t in tuples])


@pytest.fixture(scope="module")
def small_exact():
    """N = 8 in two strata of 4: every free (8!) and within-strata (4! 4!) permutation's F."""
    rng = np.random.default_rng(11)
    strata = np.repeat(["s0", "s1"], 4)
    table = {"A": np.array(["a", "b"] * 4), "B": np.array(list("xxyyxyyx"))}
    X = rng.standard_normal((8, 3))
    X[4:, 0] += 3.0  # a strong stratum effect
    G = _gower(cdist(X, X))
    terms = ["A", "B"]
    free = np.array(list(itertools.permutations(range(8))))
    within = np.array(
        [
            a + tuple(4 + np.array(b))
            for a in itertools.permutations(range(4))
            for b in itertools.permutations(range(4))
        ]
    )
    pools = {
        (by, kind): _all_perm_tuples(G, table, terms, by, perms)
        for by in ("terms", "margin")
        for kind, perms in (("free", free), ("within", within))
    }
    return X, table, terms, strata, pools


@pytest.mark.parametrize("by", ["terms", "margin"])
def test_null_tuples_come_from_one_permutation_within_strata(small_exact, by):
    """Every null (F_A, F_B) is the tuple of ONE permutation of the response rows, and with
    strata of one that keeps each row in its stratum."""
    X, table, terms, strata, pools = small_exact
    D = cdist(X, X)
    for res in (
        permanova_terms(D, table, terms, by=by, strata=strata, permutations=300, seed=5),
        permanova_terms_features(X, table, terms, by=by, strata=strata, permutations=300, seed=5),
    ):
        tuples = _null_tuples(res)
        assert tuples.shape == (300, 2)
        assert _matched(tuples, pools[(by, "within")]).all()
    free = permanova_terms_features(X, table, terms, by=by, permutations=300, seed=5)
    tuples = _null_tuples(free)
    assert _matched(tuples, pools[(by, "free")]).all()
    # the check has teeth: unrestricted permutations mostly leave the within-strata set
    assert _matched(tuples, pools[(by, "within")]).mean() < 0.5


def test_strata_term_constant_within_strata_has_a_degenerate_null():
    """A term constant within each stratum: permuting rows within strata keeps every group's
    row set, so each permutation gives exactly the observed F, and p = 1. Without strata the
    strong stratum effect is found."""
    rng = np.random.default_rng(2)
    strata = np.repeat([f"s{i}" for i in range(6)], 5)
    parity = np.repeat(["even", "odd"] * 3, 5)
    X = rng.standard_normal((30, 3))
    X[:, 0] += 2.0 * np.repeat(np.arange(6), 5)
    table = {"T": parity, "S": strata}
    for by, terms in (("terms", ["T", "S"]), ("terms", ["S"]), ("margin", ["T", "S"])):
        res = permanova_terms_features(X, table, terms, by=by, strata=strata, permutations=99)
        for row in res.rows:
            if row.df == 0:
                continue
            np.testing.assert_allclose(res.null[row.term], row.F, rtol=1e-9)
            assert row.p_value == 1.0
    free = permanova_terms(cdist(X, X), table, ["S"], permutations=99)
    assert free.rows[0].p_value == pytest.approx(0.01)


def test_seed_reproducibility_and_p_values():
    rng = np.random.default_rng(4)
    A, B = _crossed(rng, ["a0", "a1", "a2"], ["b0", "b1"], 4)
    X = rng.standard_normal((24, 3))
    X[:, 0] += 4.0 * (A == "a1")
    table, terms = {"A": A, "B": B}, ["A", "B", "A:B"]
    one = permanova_terms_features(X, table, terms, permutations=199, seed=123)
    two = permanova_terms_features(X, table, terms, permutations=199, seed=123)
    other = permanova_terms_features(X, table, terms, permutations=199, seed=124)
    assert one.permutations == 199
    for row in one.rows:
        null = one.null[row.term]
        assert null.shape == (199,)
        np.testing.assert_array_equal(null, two.null[row.term])
        assert not np.allclose(null, other.null[row.term])
        assert row.p_value == p_value(row.F, null)
        assert row.p_value == pytest.approx((1 + np.sum(null >= row.F * (1 - 1e-9))) / 200)
    assert one.rows[0].p_value < 0.05  # the A effect is found
    strat = permanova_terms_features(X, table, terms, strata=B, permutations=199, seed=123)
    again = permanova_terms_features(X, table, terms, strata=B, permutations=199, seed=123)
    for row in strat.rows:
        np.testing.assert_array_equal(strat.null[row.term], again.null[row.term])


def test_no_permutations_gives_the_same_statistics():
    table, terms = DESIGNS["interaction unbalanced"]
    X = np.random.default_rng(8).standard_normal((27, 2))
    zero = permanova_terms_features(X, table, terms, permutations=0)
    some = permanova_terms_features(X, table, terms, permutations=19)
    assert [(r.term, r.df, r.ss, r.F) for r in zero.rows] == [
        (r.term, r.df, r.ss, r.F) for r in some.rows
    ]


# ---------------------------------------------------------------- calibration

_CAL_N = 32  # B: 2 levels of 16; A: 2 levels (8 + 8 within each B level, or iid with 3 levels)


def _cal_sample(rng, balanced: bool, a_shift: float):
    B = np.repeat(["b0", "b1"], _CAL_N // 2)
    if balanced:
        A = np.concatenate([rng.permutation(np.repeat(["a0", "a1"], _CAL_N // 4)) for _ in "01"])
    else:
        A = rng.choice(["a0", "a1", "a2"], _CAL_N)
    X = rng.standard_normal((_CAL_N, 4))
    X[:, 0] += 6.0 * (B == "b1")  # a strong B effect
    X[:, 1] += a_shift * (A == "a1")
    return X, {"A": A, "B": B}


_CAL_CONFIGS = [  # (by, terms, strata = B?)
    ("terms", ("B", "A"), False),
    ("terms", ("A", "B"), False),
    ("margin", ("A", "B"), False),
    ("terms", ("B", "A"), True),
    ("terms", ("A", "B"), True),
    ("margin", ("A", "B"), True),
]


def _rejection_rates(balanced: bool, a_shift: float, reps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(_CAL_CONFIGS))
    for rep in range(reps):
        X, table = _cal_sample(rng, balanced, a_shift)
        for c, (by, terms, stratified) in enumerate(_CAL_CONFIGS):
            res = permanova_terms_features(
                X,
                table,
                list(terms),
                by=by,
                permutations=99,
                seed=rep,
                strata=table["B"] if stratified else None,
            )
            hits[c] += {r.term: r for r in res.rows}["A"].p_value <= 0.05
    return hits / reps


@pytest.mark.slow
def test_calibration_and_power_for_a_null_factor_beside_a_strong_one():
    """A has no effect, B a strong one (6 noise sd). Within strata = B the test of A is exact:
    rate in [0.02, 0.08] whatever the order or by. Unrestricted permutation of the raw response
    (vegan's default) is valid but conservative when another factor has a large effect (Anderson
    & Legendre 1999): there only rate <= 0.08 is required. With A and B orthogonal (balanced) the
    three tables give the same A test. An A shift must be found (rate > 0.8)."""
    null_bal = _rejection_rates(balanced=True, a_shift=0.0, reps=800, seed=1)
    null_iid = _rejection_rates(balanced=False, a_shift=0.0, reps=800, seed=2)
    alt_bal = _rejection_rates(balanced=True, a_shift=2.5, reps=200, seed=3)
    alt_iid = _rejection_rates(balanced=False, a_shift=2.5, reps=200, seed=4)
    rates = np.column_stack([null_bal, null_iid, alt_bal, alt_iid])
    print("\nconfig: null balanced, null iid, power balanced, power iid")
    for (by, terms, s), row in zip(_CAL_CONFIGS, rates, strict=True):
        print(f"{by} {'+'.join(terms)} strata={s}:", " ".join(f"{x:.3f}" for x in row))
    stratified = np.array([s for _, _, s in _CAL_CONFIGS])
    assert np.all((null_bal[stratified] >= 0.02) & (null_bal[stratified] <= 0.08))
    assert np.all((null_iid[stratified] >= 0.02) & (null_iid[stratified] <= 0.08))
    assert np.all(null_bal[~stratified] <= 0.08)
    # iid A, A entered first without strata: type I SS of A absorbs B's effect through the
    # chance A-B imbalance, so that is not a null test of A; B-first and margin are
    assert null_iid[0] <= 0.08 and null_iid[2] <= 0.08
    assert np.all(alt_bal > 0.8)
    assert np.all(alt_iid[stratified] > 0.8) and alt_iid[0] > 0.8 and alt_iid[2] > 0.8


# ---------------------------------------------------------------- errors


def _err_case():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 3))
    table = {"A": np.repeat(["x", "y", "z"], 4), "B": np.tile(["p", "q"], 6)}
    return X, cdist(X, X), table


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"table": {"A": np.repeat(["x", "y", "z"], 4)[:-1]}, "terms": ["A"]}, "label"),
        ({"terms": ["C"]}, "C"),
        ({"terms": ["A", "B", "A:C"]}, "C"),
        ({"terms": ["A", "A:B"]}, "main effect"),
        ({"terms": ["A:B", "A", "B"]}, "main effect"),
        ({"by": "type2"}, "by"),
        ({"strata": np.zeros(5)}, "strata"),
        ({"permutations": -1}, "permutations"),
        ({"terms": []}, "terms"),
        ({"terms": ["A", "A"]}, "twice"),
    ],
)
@pytest.mark.parametrize("route", ["D", "X"])
def test_invalid_arguments_are_one_line_value_errors(kwargs, match, route):
    X, D, table = _err_case()
    args = {"table": table, "terms": ["A", "B"], **kwargs}
    fn, data = (permanova_terms, D) if route == "D" else (permanova_terms_features, X)
    with pytest.raises(ValueError, match=match) as info:
        fn(data, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "D",
    [
        lambda D: D[:, :5],  # not square
        lambda D: D + np.eye(len(D)),  # non-zero diagonal
        lambda D: D + np.triu(np.ones_like(D), 1),  # not symmetric
        lambda D: np.where(np.eye(len(D)) > 0, 0.0, np.nan),  # NaN
    ],
)
def test_invalid_distance_matrices(D):
    _, D0, table = _err_case()
    with pytest.raises(ValueError) as info:
        permanova_terms(D(D0), table, ["A"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("X", [lambda X: X[:, 0], lambda X: np.full_like(X, np.nan)])
def test_invalid_features(X):
    X0, _, table = _err_case()
    with pytest.raises(ValueError) as info:
        permanova_terms_features(X(X0), table, ["A"])
    assert "\n" not in str(info.value)
