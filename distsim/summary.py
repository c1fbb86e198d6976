"""The summary of a study's tests, as a launch prints it: one row per arch, layer, method, test."""

from __future__ import annotations

import json
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


# (header, column, alignment) of the printed summary
_COLUMNS = [("arch", "arch", "<"), ("layer", "layer", "<"), ("method", "method", "<"),
            ("test", "protocol", "<"), ("statistic", "statistic", "<"),
            ("observed", "observed", ">"), ("chance", "chance", ">"),
            ("null mean", "null_mean", ">"), ("R2", "r2", ">"), ("p", "p_value", ">"),
            ("q", "q_value", ">"), ("B", "permutations", ">")]


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
    rows = [[_cell(c, r[c]) for _, c, _ in _COLUMNS] for r in df.iter_rows(named=True)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(_COLUMNS)]

    def line(values: list[str]) -> str:
        cells = zip(values, _COLUMNS, widths, strict=True)
        return "  ".join(f"{v:{align}{w}}" for v, (_, _, align), w in cells)

    head = line([h for h, _, _ in _COLUMNS])
    return "\n".join([head, "-" * len(head), *(line(row) for row in rows)])
