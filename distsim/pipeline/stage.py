"""The protocol every stage offers the launch: what is pending, run it, is it complete."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from distsim.config import Study
from distsim.store import Store


@dataclass(frozen=True)
class RunContext:
    """What a running stage may use besides the study and its store."""

    stream: TextIO  # progress lines and notices
    cpus: int  # CPUs of the Ray cluster the launch holds


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see distsim.pipeline.registry for the order).

    pending(study, store): units of work it would do now (trials, packs, tiles, tests),
        read from the store; 0 when its outputs are all there.
    run(study, store, ctx): do the pending work on Ray, skipping what the store holds;
        returns JSON-able counts for the launch summary and the stage marker.
    complete(study, store): True when the store holds every output (a failed zoo pack
        leaves the zoo incomplete, so it is not marked done).
    """

    name: str
    pending: Callable[[Study, Store], int]
    run: Callable[[Study, Store, RunContext], dict[str, Any]]
    complete: Callable[[Study, Store], bool]
