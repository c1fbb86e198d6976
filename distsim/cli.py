"""The ``distsim`` command line: validate and launch studies, query their stores.

    distsim validate STUDY.toml
    distsim launch STUDY.toml [--address ADDR] [--stages zoo,features,pairs,tests] [--fresh]
                  [--yes] [--partial]
    distsim status STORE
    distsim verify STORE
    distsim query models|tests|neighbors STORE [--arch ..] [--task ..] [--layer ..] [--method ..]
                  [--protocol ..] [--status ..] [--model ..] [--limit N] [--format table|csv|json]
    distsim query sql STORE "SELECT ... FROM models ..."

STORE is a store folder or a study TOML (whose study.store is used). User errors (any
distsim.errors.DistsimError: bad study file, changed study, unknown table; bad SQL) print one
line on stderr and exit with code 2; a launch whose units failed after their retries exits 1;
Ctrl-C / SIGTERM exit 130 / 143. Only ``launch`` imports Ray; ``query`` and ``verify`` on a
store folder import neither Ray nor torch, so they answer fast.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import polars as pl
import typer

from distsim.errors import DistsimError, StoreError
from distsim.store import Store
from distsim.store.query import empty_filter_note, read_only_sql

if TYPE_CHECKING:
    from distsim.config import Study

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="distsim",
    help=("Weight similarity of neural networks at scale: launch studies on Ray, "
          "query their stores."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
query_app = typer.Typer(help="Query a study's store (lazy polars scans).", no_args_is_help=True)
app.add_typer(query_app, name="query")


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn a DistsimError or a polars query error into one stderr line and its exit code (2;
    1 for an incomplete launch), and Ctrl-C / SIGTERM into exit code 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:  # the launch printed what it stored (Interrupted)
            code = getattr(exc, "exit_code", 130)
            if code == 130 and not hasattr(exc, "exit_code"):
                typer.echo("distsim: interrupted", err=True)
            raise typer.Exit(code) from None
        except DistsimError as exc:
            _fail(str(exc), exc.exit_code)
        except pl.exceptions.PolarsError as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"query failed: {type(exc).__name__}: {first}")

    return wrapper  # type: ignore[return-value]


def _stage_names() -> tuple[str, ...]:
    """The registry's stage names (imports the pipeline's modules, and through them torch)."""
    from distsim.pipeline.registry import STAGE_NAMES

    return STAGE_NAMES


# ----------------------------------------------------------------------------- study commands


@app.command()
@user_errors
def validate(
    study_file: Annotated[Path, typer.Argument(help="The study TOML file.")],
    no_data: Annotated[
        bool, typer.Option("--no-data", help=("Skip building the tasks (a cluster job whose "
                                               "data is only on the cluster)."))
    ] = False,
) -> None:
    """Check a study file without running it (values, data, store path); print what it would
    launch. The cluster (GPUs, resources) is checked by `launch` once connected."""
    from distsim.config import load_study
    from distsim.pipeline.preflight import check_offline

    study = load_study(study_file)
    notes = check_offline(study, data=not no_data)
    n_models = study.data.num_tasks * study.train.seeds_per_task
    typer.echo(f"ok: study {study.name!r} (config {study.hash[:12]})")
    for note in notes:
        typer.echo(f"  {note}")
    for arch in study.archs:
        cfg = study.train_config(arch.name)
        typer.echo(
            f"  arch {arch.name} ({arch.kind}): {n_models} models in "
            f"{len(study.packs(arch.name))} trials of <= {study.train.seeds_per_trial} seeds, "
            f"{cfg.epochs} epochs, {cfg.optimizer} lr {cfg.lr}"
        )
    typer.echo(f"  features: {', '.join(study.features.methods)} at layers {study.features.layers}")
    b = study.tests.permanova_permutations
    typer.echo(
        f"  tests: {', '.join(study.tests.protocols) or 'none'} "
        f"({study.tests.permutations} permutations), "
        f"PERMANOVA{' and PERMDISP' if b and study.pairs.metric == 'euclidean' else ''} "
        f"({f'{b} permutations' if b and not study.train.shared_init else 'skipped'})"
        + (", HTT within init-seed strata (train.shared_init)" if study.train.shared_init else "")
    )


@app.command()
@user_errors
def launch(
    study_file: Annotated[Path, typer.Argument(help="The study TOML file.")],
    address: Annotated[
        str | None,
        typer.Option(help=("Ray cluster to join ('auto' after `ray up`); "
                           "default: a local Ray (or RAY_ADDRESS).")),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated stages to run (zoo,features,pairs,tests); default: all."
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help=("Wipe the study's store and start over (after the "
                                             "checks; asks on a terminal)."))
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before --fresh wipes the store.")
    ] = False,
    partial: Annotated[
        bool, typer.Option("--partial", help=("Run later stages even when an earlier one is "
                                              "incomplete (marked as partial)."))
    ] = False,
) -> None:
    """Run a study on Ray: zoo -> features -> pairs -> tests, each stage skipping finished work.

    Exit codes: 0 done; 1 units failed after their retries (stored work is kept, a relaunch
    resumes); 2 a user error (one line); 130 / 143 stopped by Ctrl-C / SIGTERM.
    """
    from distsim.config import load_study
    from distsim.pipeline.launch import run_study
    from distsim.pipeline.preflight import check_offline

    study = load_study(study_file)
    names = _stage_names()
    chosen = names if stages is None else [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        _fail(f"--stages: {unknown[0] if unknown else stages!r} is not a stage; "
              f"stages: {','.join(names)}")
    chosen = [s for s in names if s in chosen]
    check_offline(study, stages=chosen)  # data, store path, splits: one line, before Ray starts
    ask = sys.stdin.isatty() and not yes
    run_study(study, address=address, stages=tuple(chosen),
              fresh=fresh, partial=partial,
              confirm=(lambda q: typer.confirm(q, err=True)) if ask else None)


# ----------------------------------------------------------------------------- store commands


def _open_store(path: Path) -> Store:
    """A store folder, or the store of a study TOML; StoreError when there is none."""
    if path.suffix == ".toml":
        from distsim.config import load_study

        path = Path(load_study(path).store)
    store = Store(path)
    if not store.exists:
        raise StoreError(f"no distsim store at {str(path)!r} (no study.json or tables); "
                         "run `distsim launch` first")
    return store


@app.command()
@user_errors
def status(
    store_path: Annotated[
        Path, typer.Argument(metavar="STORE", help="Store folder or study TOML.")
    ],
) -> None:
    """Each stage complete / partial / stale / pending, the launch holding the store, and
    models ok/diverged/failed per architecture."""
    from distsim.pipeline.launch import stage_states
    from distsim.store.lock import StoreLock

    store = _open_store(store_path)
    held = store.read_study() or {}
    typer.echo(f"store: {store.root}")
    if held:
        typer.echo(f"study: {held.get('name')} (config {str(held.get('hash'))[:12]}, "
                   f"created {held.get('created')})")
    lock = StoreLock(store.root, sys.stderr).holder()
    if lock is not None:
        typer.echo(f"launch: running (pid {lock.get('pid')} on {lock.get('host')}, since "
                   f"{lock.get('started')})" if lock else "launch: locked (unreadable lock)")
    study = _held_study(store)
    marks = store.stages()
    if study is None:
        typer.echo("  (study.json missing or unreadable: stage states unknown)")
    else:
        for stage, state, outputs in stage_states(study, store):
            finished = marks.get(stage, {}).get("finished", "") if state == "complete" else ""
            typer.echo(f"  {stage:<9} {state:<9} {str(outputs):<28} {finished}".rstrip())
    _emit(store.summary(), Format.table, limit=0)


@app.command()
@user_errors
def verify(
    store_path: Annotated[
        Path, typer.Argument(metavar="STORE", help="Store folder or study TOML.")
    ],
) -> None:
    """Read every shard and check it against the table contract: readable, right columns and
    types, no duplicate keys, no leftover temp files, lineage fresh. Exit 0 when sound, 1 with
    one line per problem."""
    from distsim.store.verify import verify_store

    store = _open_store(store_path)
    problems = verify_store(store)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {store.root}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {store.root} is sound")


def _held_study(store: Store) -> Study | None:
    """The study a store was written by (from its study.json, at the store's real path)."""
    from distsim.config import study_from_dict

    held = store.read_study()
    if not held or not isinstance(held.get("config"), dict):
        return None
    config = dict(held["config"])
    config["study"] = {**config.get("study", {}), "store": str(store.root)}
    try:
        return study_from_dict(config, source=str(held.get("source", "<store>")))
    except DistsimError:
        return None


_QUERIES = {
    # table: (columns of the terminal table, sort order)
    "models": (
        ["model_id", "arch", "task", "seed", "status", "train_acc", "test_acc", "test_loss",
         "epochs", "seconds", "node"],
        ["arch", "task", "seed"],
    ),
    "tests": (
        ["arch", "layer", "method", "protocol", "statistic", "observed", "chance", "null_mean",
         "null_sd", "p_value", "permutations", "n_models", "n_tasks"],
        ["arch", "layer", "method", "protocol"],
    ),
    "neighbors": (
        ["model_id", "arch", "layer", "method", "task", "rank", "neighbor_id", "neighbor_task",
         "distance", "same_task"],
        ["arch", "layer", "method", "task", "model_id", "rank"],
    ),
}

StoreArg = Annotated[Path, typer.Argument(metavar="STORE", help="Store folder or study TOML.")]
ArchOpt = Annotated[str | None, typer.Option(help="Only this architecture (name).")]
TaskOpt = Annotated[int | None, typer.Option(help="Only this task id.")]
LayerOpt = Annotated[str | None, typer.Option(help="Only this layer (e.g. fc1, conv2, out).")]
MethodOpt = Annotated[str | None, typer.Option(help="Only this feature method (chain-gram, raw).")]
ProtocolOpt = Annotated[
    str | None, typer.Option(help="Only this protocol (closed-set, open-set, permanova, permdisp).")
]
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
    store = _open_store(store_path)
    columns, order = _QUERIES[table]
    lf = store.scan(table)
    names = lf.collect_schema().names()
    for col, value in filters.items():
        if value is None:
            continue
        if col not in names:
            raise StoreError(f"--{col.replace('_', '-')} does not apply to {table}")
        lf = lf.filter(pl.col(col) == value)
    archs = [a.get("name") for a in ((store.read_study() or {}).get("config", {}).get("arch", []))]
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
    _emit(df, fmt, limit=limit)
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
    """Trained models: seed, status, accuracy, loss, time, node."""
    _query("models", store_path,
           {"arch": arch, "task": task, "status": status, "model_id": model}, limit, fmt)


@query_app.command("tests")
@user_errors
def query_tests(store_path: StoreArg, arch: ArchOpt = None, layer: LayerOpt = None,
                method: MethodOpt = None, protocol: ProtocolOpt = None, limit: LimitOpt = None,
                fmt: FormatOpt = Format.table) -> None:
    """Hypothesis tests: statistic, chance, null mean/sd, p-value per arch/layer/method/protocol."""
    _query("tests", store_path,
           {"arch": arch, "layer": layer, "method": method, "protocol": protocol}, limit, fmt)


@query_app.command("neighbors")
@user_errors
def query_neighbors(store_path: StoreArg, arch: ArchOpt = None, layer: LayerOpt = None,
                    method: MethodOpt = None, task: TaskOpt = None, model: ModelOpt = None,
                    limit: LimitOpt = None, fmt: FormatOpt = Format.table) -> None:
    """Per-model nearest neighbours in feature space (rank 1 = nearest)."""
    _query("neighbors", store_path,
           {"arch": arch, "layer": layer, "method": method, "task": task, "model_id": model},
           limit, fmt)


@query_app.command("sql")
@user_errors
def query_sql(
    store_path: StoreArg,
    sql: Annotated[
        str,
        typer.Argument(
            help="A SELECT over the tables models, weights, templates, features, neighbors, "
                 "pairs, tests."
        ),
    ],
    limit: LimitOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """One SQL SELECT over the store's tables (polars SQL); anything else, and every table
    function that reads files (read_csv, read_parquet, ...), is refused."""
    store = _open_store(store_path)
    lf = read_only_sql(store, sql)
    if limit is None:
        limit = 50 if fmt is Format.table else 0
    df = (lf.head(limit) if limit else lf).collect()
    _emit(df, fmt, limit=limit)


# ----------------------------------------------------------------------------- output


def _emit(df: pl.DataFrame, fmt: Format, limit: int) -> None:
    """Print a frame as a terminal table, CSV or JSON rows (NaN -> null, lists kept in JSON)."""
    if fmt is Format.json:
        rows = [{k: _json_value(v) for k, v in row.items()} for row in df.iter_rows(named=True)]
        typer.echo(json.dumps(rows, allow_nan=False))
        return
    if fmt is Format.csv:
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        out = df.with_columns(
            pl.col(c).map_elements(json.dumps, return_dtype=pl.String) for c in nested
        ) if nested else df
        sys.stdout.write(out.write_csv())
        return
    width = shutil.get_terminal_size((120, 40)).columns
    with pl.Config(
        tbl_rows=max(df.height, 1) if limit == 0 else max(limit, 1),
        tbl_cols=-1,
        tbl_width_chars=10_000,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        float_precision=4,
        fmt_str_lengths=24,
        fmt_table_cell_list_len=4,
    ):
        shown = df
        text = str(shown)
        while shown.width > 1 and max(len(line) for line in text.splitlines()) > width:
            shown = shown.drop(shown.columns[-1])  # drop columns from the right until it fits
            text = str(shown)
        typer.echo(text)
    if shown.width < df.width:
        typer.echo(f"(not shown to fit {width} columns: {', '.join(df.columns[shown.width:])}; "
                   "use a wider terminal or --format csv/json)", err=True)


def _json_value(v: Any) -> Any:
    """A JSON-safe cell: NaN and infinities become null (lists element-wise)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


if __name__ == "__main__":  # pragma: no cover
    app()
