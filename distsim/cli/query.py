"""``distsim query``: the models, tests, neighbors and history tables with filters, the tables'
columns, and read-only SQL over them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer

from distsim.cli.common import Format, StoreArg, emit, open_store, query_app, user_errors
from distsim.errors import StoreError
from distsim.store.query import empty_filter_note, models_with_meta, read_only_sql, tests_with_q
from distsim.store.tables import TABLES

_QUERIES = {
    # table: (columns of the terminal table, sort order)
    "models": (
        ["model_id", "arch", "task", "seed", "status", "train_acc", "test_acc", "test_loss",
         "epochs", "seconds", "node"],
        ["arch", "task", "seed", "epoch", "model_id"],
    ),
    "tests": (  # r2 and q_value: distsim.store.query.tests_with_q; a narrow terminal drops
        # columns from the right, so the summary's numbers come first
        ["arch", "layer", "method", "protocol", "statistic", "observed", "chance", "r2",
         "p_value", "q_value", "null_mean", "null_sd", "permutations", "n_models", "n_tasks"],
        ["arch", "layer", "method", "protocol", "factor", "epoch"],
    ),
    "neighbors": (
        ["model_id", "arch", "layer", "method", "task", "rank", "neighbor_id", "neighbor_task",
         "distance", "same_task"],
        ["arch", "layer", "method", "task", "model_id", "rank"],
    ),
    "history": (
        ["model_id", "arch", "task", "seed", "epoch", "train_loss", "train_acc", "test_loss",
         "test_acc"],
        ["arch", "task", "seed", "epoch"],
    ),
}

ArchOpt = Annotated[str | None, typer.Option(help="Only this architecture (name).")]
TaskOpt = Annotated[int | None, typer.Option(help="Only this task id.")]
LayerOpt = Annotated[str | None, typer.Option(help="Only this layer (e.g. fc1, conv2, out).")]
MethodOpt = Annotated[str | None, typer.Option(help="Only this feature method (chain-gram, raw).")]
ProtocolOpt = Annotated[
    str | None, typer.Option(help="Only this protocol (closed-set, open-set, permanova, permdisp).")
]
FactorOpt = Annotated[str | None, typer.Option(
    help="Only the tests of this factor (tests.factors; a PERMANOVA term).")]
EpochOpt = Annotated[int | None, typer.Option(
    help="Only the tests of this epoch's checkpoints ([train] save_epochs).")]
StatusOpt = Annotated[
    str | None, typer.Option(help="Only models with this status (ok, diverged, failed).")
]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Only this model_id.")]
LimitOpt = Annotated[
    int | None, typer.Option(help="At most N rows (0 = all; default 50 for table, all otherwise).")
]
FormatOpt = Annotated[
    Format, typer.Option("--format", help="table (terminal), csv, or json (rows).")
]


def _query(table: str, store_path: Path, filters: dict, limit: int | None, fmt: Format) -> None:
    store = open_store(store_path, reading=True)
    columns, order = _QUERIES[table]
    lf = (tests_with_q(store) if table == "tests"  # q over every test
          else models_with_meta(store) if table == "models" else store.scan(table))
    names = lf.collect_schema().names()

    def some(col: str) -> list[str]:  # [col] where some row has a value, else []
        return [col] if lf.select(pl.col(col).is_not_null().any()).collect().item() else []

    if table == "models":  # an imported zoo's epoch and metadata columns too
        meta = [c for c in names if c not in TABLES["models"].schema.names]
        if meta:  # a sweep's values or an imported zoo's metadata; checkpoints' epochs
            columns = [c for c in columns if c not in ("seconds", "node")] + [*some("epoch"),
                                                                               *meta]
        else:
            columns = columns + some("epoch")
    if table == "tests":  # [tests] factors, [train] save_epochs: after the protocol
        columns = [*columns[:4], *some("factor"), *some("epoch"), *columns[4:]]
    for col, value in filters.items():
        if value is None:
            continue
        if col not in names:
            raise StoreError(f"--{col.replace('_', '-')} does not apply to {table}")
        lf = lf.filter(pl.col(col) == value)
    archs = [a.get("name") for a in ((store.read_study(strict=False) or {})
                                     .get("config", {}).get("arch", []))]
    rank = pl.col("arch").replace_strict(archs, list(range(len(archs))), default=len(archs),
                                         return_dtype=pl.Int64)
    lf = lf.sort([rank, *order])  # archs in study order, then by name
    if fmt is Format.table:  # a terminal gets the main columns; csv/json get every column
        lf = lf.select(columns)
    if limit is None:
        limit = 50 if fmt is Format.table else 0
    if limit < 0:
        raise StoreError(f"--limit must be >= 0, got {limit}")
    total = lf.select(pl.len()).collect().item() if fmt is Format.table and limit else None
    df = (lf.head(limit) if limit else lf).collect()
    emit(df, fmt, limit=limit)
    if df.height == 0:
        note = empty_filter_note(store, table, filters)
        if note:
            typer.echo(note, err=True)
    if total is not None and total > df.height:
        typer.echo(f"({df.height} of {total} rows; --limit 0 shows all)", err=True)


@query_app.command("models")
@user_errors
def query_models(store_path: StoreArg, arch: ArchOpt = None, task: TaskOpt = None,
                 status: StatusOpt = None, model: ModelOpt = None, limit: LimitOpt = None,
                 fmt: FormatOpt = Format.table) -> None:
    """Models: seed, status, accuracy, loss, time, node (an imported zoo's: its epoch and
    metadata columns instead of time and node)."""
    _query("models", store_path,
           {"arch": arch, "task": task, "status": status, "model_id": model}, limit, fmt)


@query_app.command("tests")
@user_errors
def query_tests(store_path: StoreArg, arch: ArchOpt = None, layer: LayerOpt = None,
                method: MethodOpt = None, protocol: ProtocolOpt = None,
                factor: FactorOpt = None, epoch: EpochOpt = None, limit: LimitOpt = None,
                fmt: FormatOpt = Format.table) -> None:
    """Hypothesis tests: statistic, chance, null mean/sd, R^2, p-value and q-value
    (Benjamini-Hochberg over every test in the store) per arch/layer/method/protocol (and
    factor, epoch where the study has them)."""
    _query("tests", store_path,
           {"arch": arch, "layer": layer, "method": method, "protocol": protocol,
            "factor": factor, "epoch": epoch}, limit, fmt)


@query_app.command("neighbors")
@user_errors
def query_neighbors(store_path: StoreArg, arch: ArchOpt = None, layer: LayerOpt = None,
                    method: MethodOpt = None, task: TaskOpt = None, model: ModelOpt = None,
                    limit: LimitOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Per-model nearest neighbours in feature space (rank 1 = nearest)."""
    _query("neighbors", store_path,
           {"arch": arch, "layer": layer, "method": method, "task": task, "model_id": model},
           limit, fmt)


@query_app.command("history")
@user_errors
def query_history(store_path: StoreArg, arch: ArchOpt = None, task: TaskOpt = None,
                  model: ModelOpt = None, limit: LimitOpt = None,
                  fmt: FormatOpt = Format.table) -> None:
    """Training curves: per model and epoch, train loss/accuracy (mean over the epoch's
    mini-batches) and test loss/accuracy after the epoch."""
    _query("history", store_path, {"arch": arch, "task": task, "model_id": model}, limit, fmt)


@query_app.command("tables")
@user_errors
def query_tables(
    table: Annotated[str | None, typer.Argument(help="Only this table's columns.")] = None,
) -> None:
    """The store's tables: what one row is, the shard key, and every column with its type."""
    from distsim.store.tables import TABLES

    if table is not None and table not in TABLES:
        raise StoreError(f"query tables: no table {table!r}; tables: {', '.join(TABLES)}")
    for spec in TABLES.values() if table is None else [TABLES[table]]:
        typer.echo(f"{spec.name}: one row per {spec.row}; shard key {', '.join(spec.key)}")
        for c in spec.columns:
            note = f"  {c.note}" if c.note else ""
            typer.echo(f"  {c.name:<14} {_type_name(c.type):<15}{note}".rstrip())


def _type_name(t: Any) -> str:
    """An Arrow type as the README writes it: float32 / float64, list<float32>."""
    if hasattr(t, "value_type"):
        return f"list<{_type_name(t.value_type)}>"
    return {"float": "float32", "double": "float64"}.get(str(t), str(t))


@query_app.command("sql")
@user_errors
def query_sql(
    store_path: StoreArg,
    sql: Annotated[
        str,
        typer.Argument(
            help="A SELECT over the tables (`distsim query tables` lists them and their "
                 'columns); a column named like an SQL keyword needs double quotes: "values".'

        ),
    ],
    limit: LimitOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """One SQL SELECT over the store's tables (polars SQL); anything else, and every table
    function that reads files (read_csv, read_parquet, ...), is refused."""
    store = open_store(store_path, reading=True)
    lf = read_only_sql(store, sql)
    if limit is None:
        limit = 50 if fmt is Format.table else 0
    df = (lf.head(limit) if limit else lf).collect()
    emit(df, fmt, limit=limit)


# ----------------------------------------------------------------------------- output

