"""The summary of a study's tests, as a launch prints it: one row per arch, layer, method, test,
under the column names of ``distsim query tests``, then a legend of what each method, protocol
and column means."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import polars as pl

from distsim.config import Study
from distsim.stats import q_values
from distsim.store import Store

PROTOCOL_ORDER = ("closed-set", "open-set", "permanova", "permdisp")


def summary_table(store: Store, study: Study) -> pl.DataFrame:
    """Per arch, layer, method and test (in study order): statistic, observed, chance, null
    mean, R^2 (PERMANOVA, PERMDISP), p-value, q-value, permutations, models.

    q_value: Benjamini-Hochberg over every test in the store (one family: the study's tests),
    so a reader can keep the false discovery rate of the rows read as discoveries."""
    df = store.scan("tests").collect()
    if df.height == 0:
        return df
    r2 = [json.loads(e or "{}").get("r2") for e in df["extra"]]
    df = df.with_columns(pl.Series("r2", [float("nan") if v is None else float(v) for v in r2]),
                         pl.Series("q_value", q_values(df["p_value"].to_numpy())))
    arch_order = {a: i for i, a in enumerate(study.arch_names)}
    layer_order = {(a, layer): i for a in study.arch_names
                   for i, layer in enumerate(study.feature_layers(a))}
    method_order = {m: i for i, m in enumerate(study.features.methods)}

    def order(r: dict[str, Any]) -> list[int]:
        protocol = r["protocol"]
        return [arch_order.get(r["arch"], 99), layer_order.get((r["arch"], r["layer"]), 99),
                method_order.get(r["method"], 99),
                PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else 9]

    rank = pl.struct("arch", "layer", "method", "protocol").map_elements(
        order, return_dtype=pl.List(pl.Int64))
    df = df.with_columns(rank.alias("_order")).sort("_order").drop("_order")
    return df.select("arch", "layer", "method", "protocol", "statistic", "observed", "chance",
                     "null_mean", "r2", "p_value", "q_value", "permutations", "n_models")


# (column, alignment) of the printed summary: the names `distsim query tests` uses
_COLUMNS = [("arch", "<"), ("layer", "<"), ("method", "<"), ("protocol", "<"),
            ("statistic", "<"), ("observed", ">"), ("chance", ">"), ("null_mean", ">"),
            ("r2", ">"), ("p_value", ">"), ("q_value", ">"), ("permutations", ">")]

# one line each: what a method's feature is, what a protocol tests (README: "What the features
# measure", "Reading the tests table")
METHODS = {
    "chain-gram": "Grams of the chain-normalized weights' linear chain (the paper's): invariant "
                  "to unit permutations and rescalings, blind to sign flips",
    "gram": "the same Grams of the unnormalized weights: chain-gram vs gram at hidden layers is "
            "what the normalization adds",
    "raw": "the trained weights flattened, no symmetry removed: the control",
    "aligned": "chain-normalized weights matched to a study-wide template, flattened: sees sign "
               "flips",
    "cka": "activations on a fixed probe set (cosine = linear CKA): the function, not the "
           "weights",
}
PROTOCOLS = {
    "closed-set": "a linear map learned on some models' task labels names the task of held-out "
                  "models; observed = accuracy",
    "open-set": "held-out tasks' models retrieve their task's models; observed = mAP",
    "permanova": "do the tasks' feature centroids differ? pseudo-F; r2 = share of the spread "
                 "the tasks explain",
    "permdisp": "do the tasks' spreads differ? significant here: permanova's signal may be "
                "spread, not location",
}
TERMS = {
    "chance": "the statistic's expected value under random task labels",
    "null_mean": "the mean of the statistic over the permutations",
    "p_value": "(1 + permutations at least as extreme) / (1 + permutations): never below "
               "1/(1 + permutations), e.g. 0.01 for 99",
    "q_value": "Benjamini-Hochberg over every test in the store: reading the rows with q <= 0.05 "
               "as discoveries keeps the expected share of false ones at most 5%",
    "permutations": "how many label permutations the null has (B)",
}


def _cell(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if name in ("p_value", "q_value"):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_summary(df: pl.DataFrame) -> str:
    """The summary as a fixed-width text table: one row per arch, layer, method and test."""
    if df.height == 0:
        return "(no tests in the store yet)"
    rows = [[_cell(c, r[c]) for c, _ in _COLUMNS] for r in df.iter_rows(named=True)]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, (c, _) in enumerate(_COLUMNS)]

    def line(values: list[str]) -> str:
        cells = zip(values, _COLUMNS, widths, strict=True)
        return "  ".join(f"{v:{align}{w}}" for v, (_, align), w in cells)

    head = line([c for c, _ in _COLUMNS])
    return "\n".join([head, "-" * len(head), *(line(row) for row in rows), "", legend(df)])


def legend(df: pl.DataFrame) -> str:
    """One line per method and protocol present in `df` and per column that needs one."""
    present = set(df["method"]) | set(df["protocol"])
    entries = [(k, v) for k, v in (METHODS | PROTOCOLS).items() if k in present]
    entries += list(TERMS.items())
    width = max(len(k) for k, _ in entries)
    pad = " " * (width + 2)
    return "\n".join(textwrap.fill(v, 100, initial_indent=f"{k:<{width}}  ", subsequent_indent=pad)
                     for k, v in entries)
