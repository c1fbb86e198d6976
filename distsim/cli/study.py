"""``distsim validate`` and ``distsim launch``: check a study file, run it on Ray."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from distsim.cli.common import fail, user_errors


def _stage_names() -> tuple[str, ...]:
    """The registry's stage names (imports the pipeline's modules, and through them torch)."""
    from distsim.pipeline.registry import STAGE_NAMES

    return STAGE_NAMES


# ----------------------------------------------------------------------------- study commands


@user_errors
def validate(
    study_file: Annotated[Path, typer.Argument(metavar="STUDY", help="The study TOML file.")],
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
    typer.echo(f"ok: study {study.name!r} (config {study.hash[:12]})")
    for note in notes:
        typer.echo(f"  {note}")
    for arch in study.archs:
        if study.train is None:
            shape = "x".join(map(str, arch.input_shape))
            typer.echo(f"  arch {arch.name} ({arch.kind}, {arch.activation}): imported, inputs "
                       f"{shape}, {arch.num_classes} outputs")
            continue
        assert study.data is not None  # a trained study has data
        cells = len(study.cells())
        n_models = study.data.num_tasks * study.train.seeds_per_task * cells
        cfg = study.train_config(arch.name)
        swept = dict(study.sweep)  # a swept key's value is the sweep's, shown on its own line
        shown = {k: "(swept)" if k in swept else str(getattr(cfg, k))
                 for k in ("epochs", "optimizer", "lr")}
        typer.echo(
            f"  arch {arch.name} ({arch.kind}): {n_models} models in "
            f"{len(study.packs(arch.name))} trials of <= {study.train.seeds_per_trial} seeds, "
            f"{shown['epochs']} epochs, {shown['optimizer']} lr {shown['lr']}"
        )
    if study.sweep:
        grid = " x ".join(f"{k} {list(v)}" for k, v in study.sweep)
        typer.echo(f"  sweep: {grid} ({len(study.cells())} cells, each column of `query models`)")
    typer.echo(f"  features: {', '.join(study.features.methods)} at layers {study.features.layers}")
    b = study.tests.permanova_permutations
    typer.echo(
        f"  tests: {', '.join(study.tests.protocols) or 'none'} "
        f"({study.tests.permutations} permutations), "
        f"PERMANOVA{' and PERMDISP' if b and study.pairs.metric == 'euclidean' else ''} "
        f"({f'{b} permutations' if b and not study.shared_init else 'skipped'})"
        + (", HTT within init-seed strata (train.shared_init)" if study.shared_init else "")
        + (f", groups by {study.tests.group_by}" if study.tests.group_by != "task" else "")
    )


@user_errors
def launch(
    study_file: Annotated[Path, typer.Argument(metavar="STUDY", help="The study TOML file.")],
    address: Annotated[
        str | None,
        typer.Option(metavar="ADDR", help=("Ray cluster to join ('auto' after `ray up`); "
                           "default: a local Ray (or RAY_ADDRESS).")),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            help="Comma-separated stages to run (zoo,features,pairs,tests); default: all.",
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
    no_space_check: Annotated[
        bool, typer.Option("--no-space-check", help=("Launch even when the store's filesystem "
                                                     "seems too small for the study."))
    ] = False,
) -> None:
    """Run a study on Ray: zoo -> features -> pairs -> tests, each stage skipping finished work.

    Exit codes: 0 done; 1 units failed after their retries, or the store's disk is full,
    read-only or failing (stored work is kept, a relaunch resumes); 2 a user error (one line);
    130 / 143 stopped by Ctrl-C / SIGTERM.
    """
    from distsim.config import load_study
    from distsim.pipeline.launch import run_study
    from distsim.pipeline.preflight import check_offline

    study = load_study(study_file)
    names = _stage_names()
    chosen = names if stages is None else [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in names]
    if unknown or not chosen:
        fail(f"--stages: {unknown[0] if unknown else stages!r} is not a stage; "
              f"stages: {','.join(names)}")
    chosen = [s for s in names if s in chosen]
    check_offline(study, stages=chosen)  # data, store path, splits: one line, before Ray starts
    ask = sys.stdin.isatty() and not yes
    run_study(study, address=address, stages=tuple(chosen),
              fresh=fresh, partial=partial, space_check=not no_space_check,
              confirm=(lambda q: typer.confirm(q, err=True)) if ask else None)


# ----------------------------------------------------------------------------- store commands
