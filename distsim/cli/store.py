"""``distsim status``, ``verify``, ``report`` and ``export``: what a store holds, whether it is
sound, and its results as a web page or as weights files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from distsim.cli.common import Format, StoreArg, emit, fail, held_study, open_store, user_errors


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

    store = open_store(store_path)
    held = store.read_study() or {}
    typer.echo(f"store: {store.root}")
    if held:
        typer.echo(f"study: {held.get('name')} (config {str(held.get('hash'))[:12]}, "
                   f"created {held.get('created')})")
    lock = StoreLock(store.root, sys.stderr).holder()
    if lock is not None:
        typer.echo(f"launch: running (pid {lock.get('pid')} on {lock.get('host')}, since "
                   f"{lock.get('started')})" if lock else "launch: locked (unreadable lock)")
    study = held_study(store)
    marks = store.stages()
    if study is None:
        typer.echo("  (study.json missing or unreadable: stage states unknown)")
    else:
        for stage, state, outputs in stage_states(study, store):
            finished = marks.get(stage, {}).get("finished", "") if state == "complete" else ""
            typer.echo(f"  {stage:<9} {state:<9} {str(outputs):<28} {finished}".rstrip())
    emit(store.summary(), Format.table, limit=0)


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

    store = open_store(store_path)
    problems = verify_store(store)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {store.root}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {store.root} is sound")



@user_errors
def report(
    store_path: StoreArg,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for index.html and its PNGs; default: <store>-report beside "
                          "the store."),
    ] = None,
) -> None:
    """Write one self-contained HTML page with plots of a study (tests, null distributions,
    distance heatmaps, embeddings, accuracy, training curves); reads only the store."""
    from distsim.report import write_report

    page = write_report(open_store(store_path, reading=True), out)
    typer.echo(f"report: {page}")


@user_errors
def export(
    store_path: StoreArg,
    out: Annotated[Path, typer.Option(help="Folder to write the files into (created).")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="A model_id to export (repeat the option for several)."),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(help="Export every ok model of this architecture, stacked in one file."),
    ] = None,
) -> None:
    """Write models' weights as safetensors plus a JSON of each model's config and metrics, so
    that any PyTorch code loads them without distsim."""
    from distsim.export import export_models

    if bool(model) == (arch is not None):
        fail("export: give --model ID (one or more) or --arch NAME, not both")
    paths = export_models(open_store(store_path), out, model_ids=model or None, arch=arch)
    typer.echo(f"exported {len(paths)} file(s) to {out}")
