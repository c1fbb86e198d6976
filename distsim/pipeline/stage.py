"""The protocol every stage offers the launch: what its outputs in the store amount to, and run."""

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
class Outputs:
    """A stage's outputs in the store, counted in its units (packs, matrices, tests).

    done: present and computed from exactly the upstream rows the store holds now; stale:
    present but computed from other upstream rows (recomputed by the next run); failed:
    recorded as failed (zoo packs whose trial failed after its retries; retrained next run).
    """

    unit: str  # plural: "packs", "matrices", "tests"
    total: int
    done: int
    stale: int = 0
    failed: int = 0

    @property
    def complete(self) -> bool:
        return self.done == self.total

    @property
    def pending(self) -> int:
        return self.total - self.done

    def __str__(self) -> str:
        extra = [f"{n} {what}" for n, what in ((self.failed, "failed"), (self.stale, "stale"))
                 if n]
        return f"{self.done}/{self.total} {self.unit}" + (f" ({', '.join(extra)})" if extra
                                                           else "")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see distsim.pipeline.registry for the order).

    outputs(study, store): its outputs in the store now (read only, no Ray).
    run(study, store, ctx): do the pending work on Ray (missing and stale outputs), skipping
        what the store holds; returns JSON-able counts for the launch summary and the marker.
    """

    name: str
    outputs: Callable[[Study, Store], Outputs]
    run: Callable[[Study, Store, RunContext], dict[str, Any]]
