"""Each test row's effect size, one number a reader can compare across factors, methods and
epochs: a closed-set or open-set row's score over its chance (accuracy - chance, mAP - chance),
a PERMANOVA or PERMDISP row's R^2 (the share of the spread the groups explain) and, for a
multi-factor PERMANOVA, its partial R^2 (SS_term / (SS_term + SS_residual)), both from the
row's ``extra`` JSON. Polars and numpy only: the report, its figures and ``distsim.open``
share it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import polars as pl

# the tests table's columns that a store written before them lacks (null there)
NEW_COLUMNS = {"factor": pl.String, "epoch": pl.Int32}
_S, _F = pl.String, pl.Float64
# what Results.along_training returns, in this order (a column `tests` lacks: null, this type)
ALONG = {"arch": _S, "method": _S, "layer": _S, "factor": _S, "protocol": _S, "epoch": pl.Int32,
         "effect": _F, "effect_name": _S, "partial_r2": _F, "observed": _F, "chance": _F,
         "p_value": _F, "n_models": pl.Int32}
_SHORT = {"accuracy": "acc"}  # a statistic's name in effect_name


def effect_frame(tests: pl.DataFrame) -> pl.DataFrame:
    """`tests` (rows of the tests table) plus ``effect`` (Float64: observed - chance where
    the row has a finite chance, else ``extra``'s r2), ``effect_name`` ("acc - chance",
    "mAP - chance", "R^2"; null where the row has neither), ``partial_r2`` (``extra``'s,
    else null), and ``factor`` / ``epoch`` as null columns where `tests` lacks them.

    >>> tests = pl.DataFrame({"protocol": ["closed-set", "permanova"],
    ...                       "statistic": ["accuracy", "pseudo-F"], "observed": [0.75, 12.0],
    ...                       "chance": [0.25, float("nan")],
    ...                       "extra": ["{}", '{"r2": 0.3, "partial_r2": 0.4}']})
    >>> cols = ("effect", "effect_name", "partial_r2", "factor", "epoch")
    >>> effect_frame(tests).select(cols).rows()
    [(0.5, 'acc - chance', None, None, None), (0.3, 'R^2', 0.4, None, None)]
    """
    df = tests.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in
                            NEW_COLUMNS.items() if name not in tests.columns)
    extras = [_json(e) for e in df["extra"]] if "extra" in df.columns else [{}] * df.height
    r2 = pl.Series([_float(e.get("r2")) for e in extras], dtype=pl.Float64)
    if "r2" in df.columns:  # tests_with_q's column, where there is no extra
        r2 = r2.fill_null(df["r2"].cast(pl.Float64))
    partial = pl.Series([_float(e.get("partial_r2")) for e in extras], dtype=pl.Float64)
    scored = pl.col("chance").is_not_null() & pl.col("chance").is_finite()
    statistic = (pl.col("statistic").replace(_SHORT) if "statistic" in df.columns
                 else pl.lit("score"))
    return df.with_columns(
        effect=pl.when(scored).then(pl.col("observed") - pl.col("chance")).otherwise(pl.lit(r2)),
        effect_name=pl.when(scored).then(statistic + " - chance")
        .when(pl.lit(r2).is_not_null()).then(pl.lit("R^2")),
        partial_r2=pl.lit(partial))


def last_epoch(tests: pl.DataFrame) -> pl.DataFrame:
    """The rows of `tests` at their test's last epoch (a test: arch, layer, method, protocol
    and factor); every row of a study without epochs. Adds factor / epoch where missing.

    >>> tests = pl.DataFrame({"arch": ["mlp"] * 3, "layer": ["out"] * 3, "method": ["raw"] * 3,
    ...                       "protocol": ["permanova"] * 3, "epoch": [0, 5, 2]})
    >>> last_epoch(tests)["epoch"].to_list()
    [5]
    """
    df = tests.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in
                            NEW_COLUMNS.items() if name not in tests.columns)
    key = ["arch", "layer", "method", "protocol", "factor"]
    epoch = pl.col("epoch").fill_null(-1)
    return df.filter(epoch == epoch.max().over(key))


def along_training(tests: pl.DataFrame) -> pl.DataFrame:
    """The rows of `tests` that have an epoch, as :func:`effect_frame` gives them, columns
    ALONG, sorted by arch, layer, method, factor, protocol and epoch (nulls first); empty
    (with those columns) when no row has an epoch.

    >>> tests = pl.DataFrame({"arch": ["mlp"] * 2, "method": ["raw"] * 2, "layer": ["out"] * 2,
    ...     "protocol": ["closed-set"] * 2, "statistic": ["accuracy"] * 2, "epoch": [5, 0],
    ...     "observed": [0.9, 0.5], "chance": [0.5, 0.5], "p_value": [0.01, 0.6],
    ...     "n_models": [40, 40]})
    >>> along_training(tests).select("epoch", "effect").rows()
    [(0, 0.0), (5, 0.4)]
    """
    df = effect_frame(tests).filter(pl.col("epoch").is_not_null())
    df = df.with_columns(pl.lit(None, t).alias(c) for c, t in ALONG.items() if c not in df.columns)
    return (df.select(list(ALONG)).sort("arch", "layer", "method", "factor", "protocol", "epoch",
                                  nulls_last=False, maintain_order=True))


def _json(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else float("nan")
