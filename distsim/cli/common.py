"""What every distsim command shares: the Typer apps, one-line user errors, opening a store,
and printing a frame as a terminal table, CSV or JSON."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import polars as pl
import typer

from distsim import __version__
from distsim.errors import DistsimError, StoreError
from distsim.store import Store
from distsim.store.codecs import json_safe

if TYPE_CHECKING:
    from distsim.config import Study

F = TypeVar("F", bound=Callable[..., Any])
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="distsim",
    help=("Weight similarity of neural networks at scale: launch studies on Ray, "
          "query their stores, report and export their results."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: paragraphs rewrapped to the terminal
    context_settings=HELP,
)
query_app = typer.Typer(help="Query a study's store (lazy polars scans).", no_args_is_help=True,
                        rich_markup_mode=None, context_settings=HELP)
app.add_typer(query_app, name="query")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distsim {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True,
                           help="Print distsim's version and exit.")
    ] = False,
) -> None:
    """Weight similarity of neural networks at scale: launch studies on Ray, query their
    stores, report and export their results."""


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def fail(message: str, code: int = 2) -> None:
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
            fail(str(exc), exc.exit_code)
        except pl.exceptions.PolarsError as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            fail(f"query failed: {type(exc).__name__}: {first}")

    return wrapper  # type: ignore[return-value]



def open_store(path: Path, reading: bool = False) -> Store:
    """A store folder, or the store of a study TOML; StoreError when there is none. `reading`
    (query, report): an unreadable study.json is said in one stderr line, and the tables are
    read all the same."""
    if path.suffix == ".toml":
        from distsim.config import load_study

        path = Path(load_study(path).store)
    store = Store(path)
    if not store.exists:
        raise StoreError(f"no distsim store at {str(path)!r} (no study.json or tables); "
                         "run `distsim launch` first")
    problem = store.study_problem() if reading else None
    if problem is not None:
        typer.echo(f"distsim: the study's config is unknown ({problem}); the "
                   "tables are read as stored", err=True)
    return store



def held_study(store: Store) -> Study | None:
    """The study a store was written by (from its study.json, at the store's real path), or
    None when study.json is missing or not a valid study."""
    from distsim.results import held_study as study_of

    try:
        return study_of(store)
    except StoreError:
        return None


StoreArg = Annotated[Path, typer.Argument(metavar="STORE", help="Store folder or study TOML.")]


def emit(df: pl.DataFrame, fmt: Format, limit: int) -> None:
    """Print a frame as a terminal table, CSV or JSON rows (NaN -> null, lists kept in JSON)."""
    if fmt is Format.json:
        rows = [{k: json_safe(v) for k, v in row.items()} for row in df.iter_rows(named=True)]
        typer.echo(json.dumps(rows, allow_nan=False))
        return
    if fmt is Format.csv:  # a nested cell (list, struct) as its JSON text, NaN -> null
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        out = df.with_columns(
            pl.Series(c, [None if v is None else json.dumps(json_safe(v), allow_nan=False)
                          for v in df[c].to_list()], dtype=pl.String)
            for c in nested
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

