"""The summary of a study's tests, as a launch prints it: one grid per architecture (layers x
feature methods; each cell the closed-set accuracy against its chance and the PERMANOVA R^2,
marked where significant), a legend of what the grid shows, and the command that shows every
row."""

from __future__ import annotations

import math
import os
import textwrap
from typing import Any

import polars as pl

from distsim.config import Study
from distsim.store import Store
from distsim.store.query import tests_with_q

PROTOCOL_ORDER = ("closed-set", "open-set", "permanova", "permdisp")
SCORES = {"closed-set": "acc/chance", "open-set": "mAP/chance"}  # the first the store has
EFFECT = "permanova"  # the grid's second number: its r2
Q_LEVEL = 0.05  # a number is marked where its own test's q is at most this
MARK = "*"
_NAMES = {"closed-set": "closed-set", "open-set": "open-set", "permanova": "PERMANOVA"}
WIDTH = 100  # the legend's lines


def summary_table(store: Store, study: Study) -> pl.DataFrame:
    """Per arch, layer, method and test (in study order): statistic, observed, chance, null
    mean, R^2 (PERMANOVA, PERMDISP), p-value, q-value, permutations, models.

    r2 and q_value as distsim.store.query.tests_with_q computes them (q: Benjamini-Hochberg
    over every test in the store, one family), the same values as ``distsim query tests``
    and ``distsim.open(path).tests()``."""
    df = tests_with_q(store).collect()
    if df.height == 0:
        return df

    def rank(col: pl.Expr, names: list[str]) -> pl.Expr:  # position in `names`, unknown last
        return col.replace_strict(names, list(range(len(names))), default=len(names),
                                  return_dtype=pl.Int64)

    archs = list(study.arch_names)
    layers = [f"{a}/{layer}" for a in archs for layer in study.feature_layers(a)]
    factors = list(dict.fromkeys([*(study.tests.factors or ()), *study.tests.terms]))
    df = df.sort(rank(pl.col("arch"), archs),
                 rank(pl.col("factor").fill_null(""), factors),
                 rank(pl.concat_str("arch", pl.lit("/"), "layer"), layers),
                 rank(pl.col("method"), list(study.features.methods)),
                 rank(pl.col("protocol"), list(PROTOCOL_ORDER)),
                 "arch", "layer", "method", "protocol", "epoch", maintain_order=True)
    return df.select("arch", "layer", "method", "protocol", "factor", "epoch", "statistic",
                     "observed", "chance", "null_mean", "r2", "p_value", "q_value",
                     "permutations", "n_models")


# one line each: what a method's feature is, what a number of the grid is (docs: the method,
# read the tests table)
METHODS = {
    "chain-gram": "Grams of the chain-normalized weights' linear chain (the paper's): invariant "
                  "to unit permutations, rescalings and sign flips (of a ReLU net the first two "
                  "are the symmetries; other activations: docs/explanation/activations.md)",
    "gram": "the same Grams of the unnormalized weights: chain-gram vs gram at hidden layers is "
            "what the normalization adds",
    "raw": "the trained weights flattened, no symmetry removed: the control",
    "aligned": "chain-normalized weights matched to a study-wide template, flattened: sees sign "
               "flips",
    "cka": "activations on a fixed probe set (cosine = linear CKA): the function, not the "
           "weights",
}
NUMBERS = {
    "closed-set": "closed-set test: a linear map learned on some models' task labels names the "
                  "task of held-out models; its accuracy / chance (the accuracy's expected "
                  "value under random task labels)",
    "open-set": "open-set test: held-out tasks' models retrieve their task's models; their mAP "
                "/ chance (the mAP's expected value under random task labels)",
    "permanova": "PERMANOVA: the share of the features' spread that the tasks explain (do the "
                 "tasks' feature centroids differ?)",
}
Q_LINE = ("Benjamini-Hochberg over all {n} tests in the store (every row of `distsim query "
          "tests`), from permutation p-values (never below 1/(1 + permutations), e.g. 0.01 for "
          "99). BH controls the false discovery rate for independent or positively dependent "
          "(PRDS) tests; the rows of one store are dependent (the same models and features "
          "across methods, layers and protocols), so q <= 0.05 is a screening rule here, not "
          "a guaranteed FDR bound (Benjamini-Yekutieli would hold under any dependence, at a "
          "cost in power)")


def format_summary(df: pl.DataFrame, store: str | os.PathLike[str] | None = None,
                   group_by: str = "task", strata: str | None = None) -> str:
    """The summary of `df` (summary_table's rows) as text: a grid per arch, the legend, and
    the command that shows every row (of the store at `store`; "STORE" when None). group_by:
    the models column whose groups the tests compare (tests.group_by), when not the task;
    strata: the models column the tests split and permute within (tests.strata), if any.

    The grid's first number is the closed-set accuracy over its chance (the open-set mAP when
    the store has no closed-set test), the second the PERMANOVA R^2; each is marked where its
    own test's q <= 0.05. A study without one of them shows the other, and says so. With
    tests.factors a grid per arch and factor; with saved epochs the last epoch's tests."""
    if df.height == 0:
        return "(no tests in the store yet)"
    n_tests = df.height
    epoch = df["epoch"].max() if "epoch" in df.columns else None
    epoch = None if epoch is None else int(epoch)  # type: ignore[arg-type]
    if epoch is not None:
        df = df.filter(pl.col("epoch") == epoch)
    if "factor" not in df.columns:
        df = df.with_columns(factor=pl.lit(None, pl.String))
    protocols = set(df["protocol"])
    score = next((p for p in SCORES if p in protocols), None)
    effect = EFFECT if EFFECT in protocols else None
    methods = df["method"].unique(maintain_order=True).to_list()
    parts = []
    for arch in df["arch"].unique(maintain_order=True):
        mine = df.filter(pl.col("arch") == arch)
        for factor in mine["factor"].unique(maintain_order=True):
            title = ", ".join([*([] if factor is None else [f"factor {factor}"]),
                               *([] if epoch is None else [f"epoch {epoch}"])])
            parts.append(_grid(mine.filter(pl.col("factor").eq_missing(factor)), methods,
                               score, effect, title))
    factored = df["factor"].drop_nulls().unique().len() > 0
    parts.append(legend(df, score, effect, group_by, strata, n_tests, factored, epoch))
    where = "STORE" if store is None else str(store)
    rest = [p for p in PROTOCOL_ORDER if p in protocols and p not in (score, effect)]
    also = f" (also {', '.join(rest)})" if rest else ""
    parts.append(f"every row, with p and q{also}: distsim query tests {where} --limit 0")
    return "\n\n".join(parts)


def _grid(df: pl.DataFrame, methods: list[str], score: str | None, effect: str | None,
          title: str = "") -> str:
    """One arch's grid: a row per layer, a column per method (in `df`'s order); `title`
    follows the arch's name and model count (the factor, the epoch)."""
    arch = str(df["arch"][0])
    cells = {(r["layer"], r["method"], r["protocol"]): r for r in df.iter_rows(named=True)}
    layers = df["layer"].unique(maintain_order=True).to_list()
    methods = [m for m in methods if m in set(df["method"])]
    n_models = [int(n) for n in df["n_models"].to_list() if n is not None]
    head = f"{arch}: {max(n_models)} models" if n_models else arch
    head += f" ({title})" if title else ""
    if score is None and effect is None:
        return f"{head}: no closed-set, open-set or permanova test to show"

    def part(layer: str, method: str, protocol: str | None) -> str:
        r = cells.get((layer, method, protocol)) if protocol else None
        if r is None:
            return "-"
        q = r["q_value"]
        mark = MARK if q is not None and math.isfinite(q) and q <= Q_LEVEL else ""
        if protocol == effect:
            return _number(r["r2"], short=True) + mark
        return f"{_number(r['observed'])}/{_number(r['chance'])}" + mark

    labels = [SCORES[score]] if score else []
    labels += ["R2"] if effect else []
    rows = [[[part(layer, m, p) for p in (score, effect) if p] for m in methods]
            for layer in layers]
    # sub-column widths: one per number (score, R2) of every method column
    widths = [max(len(labels[i]), *(len(cell[i]) for row in rows for cell in row))
              for i in range(len(labels))]
    width = max(sum(widths) + len(widths) - 1, *(len(m) for m in methods))
    lw = max(len("layer"), *(len(layer) for layer in layers))

    def line(first: str, columns: list[str]) -> str:
        return "  ".join([f"{first:<{lw}}", *(f"{c:<{width}}" for c in columns)]).rstrip()

    def sub(values: list[str]) -> str:
        return " ".join(f"{v:<{w}}" for v, w in zip(values, widths, strict=True))

    out = [head, line("layer", methods), line("", [sub(labels)] * len(methods))]
    out += [line(layer, [sub(c) for c in row]) for layer, row in zip(layers, rows, strict=True)]
    return "\n".join(out)


def _number(value: Any, short: bool = False) -> str:
    """Two decimals ("-" for None or NaN); short: without the leading zero (R2 .48)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = f"{value:.2f}"
    return text[1:] if short and text.startswith("0.") else text


def legend(df: pl.DataFrame, score: str | None = None, effect: str | None = None,
           group_by: str = "task", strata: str | None = None, n_tests: int | None = None,
           factored: bool = False, epoch: int | None = None) -> str:
    """What the grid shows: a line per method in `df`, per number of the grid (`score`:
    closed-set or open-set; `effect`: permanova), the mark and q (over `n_tests`, default
    df's rows); a line for each of closed-set and permanova the store lacks, and for
    tests.group_by, tests.strata, tests.factors (`factored`) and saved epochs."""
    present = set(df["method"])
    entries = [(k, v) for k, v in METHODS.items() if k in present]
    entries += [(SCORES[score], NUMBERS[score])] if score else []
    entries += [("R2", NUMBERS[effect])] if effect else []
    marked = [f"the {_NAMES[p]} test's after {label}" for p, label in
              ((score, SCORES.get(score or "")), (effect, "R2")) if p]
    if marked:
        entries.append((MARK, f"q <= {Q_LEVEL}, each number by its own test's q: "
                              f"{' and '.join(marked)}"))
        entries.append(("q", Q_LINE.format(n=df.height if n_tests is None else n_tests)))
    if score is None:
        entries.append(("note", "no closed-set or open-set tests in this store: the grid has "
                                "no accuracy"))
    elif score != "closed-set":
        entries.append(("note", f"no closed-set tests in this store: the grid shows the "
                                f"{score} test's {SCORES[score]}"))
    if effect is None:
        entries.append(("note", "no PERMANOVA tests in this store: the grid has no R2"))
    if group_by != "task":
        entries.append(("groups", f"the tests compare the models' groups by {group_by!r} "
                                  "(tests.group_by), not their tasks: read each 'task' above "
                                  "as such a group"))
    if strata is not None:
        entries.append(("strata", f"the tests split and permute within the values of "
                                  f"{strata!r} (tests.strata): they compare the groups within "
                                  "each, not across; PERMDISP is not run"))
    if factored:
        entries.append(("factor", "each grid tests one models column (tests.factors): HTT "
                                  "within the cells of the other factors, its PERMANOVA R2 "
                                  "a term of one model of all factors (sequential unless "
                                  "tests.permanova_by = \"margin\"); read 'task' above as "
                                  "the factor's groups"))
    if epoch is not None:
        entries.append(("epoch", f"the tests of the checkpoints of epoch {epoch}, the last "
                                 "([train] save_epochs); every epoch's: distsim query tests, "
                                 "or the report's 'along training' figure"))
    width = max(len(k) for k, _ in entries)
    pad = " " * (width + 2)
    return "\n".join(textwrap.fill(v, WIDTH, initial_indent=f"{k:<{width}}  ",
                                   subsequent_indent=pad) for k, v in entries)
