"""Units of a stage's work, each run until it succeeds or its retries are spent: the bookkeeping.

A stage cuts its work into units (a pack, a run of distance tiles, a permutation chunk) and runs
them on its own Ray mechanism: Tune trials (zoo), an actor pool (features), tasks (pairs,
tests). The mechanism stays with the stage; what every stage shares is kept here:

- :class:`Units` holds the units still to run, in order (a failed attempt goes to the back),
  counts each unit's failed attempts against ``resources.max_failures`` with one line each
  (``<stage> <label> failed (retrying|giving up): <cause>``), draws the stage's
  :class:`~distsim.pipeline.progress.Progress` (a unit counts once: when it succeeds or is
  given up) and gives the launch its outcome counts (``{"failed": units given up, "error":
  the first one's cause}``). Units may belong to groups (the chunks of one test): giving up
  one unit gives up its group, whose unfinished units are counted then and whose later
  results are dropped.
- :func:`run_refs` is the loop of the mechanisms that hand back Ray object refs (tasks, actor
  methods): submit pending units (at most ``slots`` at a time), wait for the next to finish,
  get it, pass its value on or note its error (resubmitted, or given up).

A mechanism that retries by itself (Tune) passes ``again`` to ``failed`` and only has its
lines, progress and counts kept here.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TextIO, TypeVar

from distsim.pipeline.io_errors import find
from distsim.pipeline.progress import Progress, Retries

U = TypeVar("U", bound=Hashable)
WAIT_S = 0.1  # run_refs waits on its refs in slices this long (Ray's wait holds off signals)


def error_text(error: BaseException) -> str:
    """The root cause of a unit's error as one short line (no Ray traceback, no ANSI colours)."""
    cause = getattr(error, "cause", None) or error
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {cause}")
    return " ".join(text.split())[:1000]


class Units(Generic[U]):
    """The units of one stage's run: what is still to run, failed attempts, progress, outcome.

    ``units``: every unit to run, in order (hashable and distinct: a pack, a tile id, a
    (test, chunk) pair); ``label(unit)`` names one in its failure lines ("pack mlp-t0-p1");
    ``noun`` and ``skipped`` go to the progress line (units of work, units the store already
    held); ``group(unit)``: units given up together (default: each unit alone); ``size(unit)``:
    what a unit counts for in the progress line (default 1: the pairs stage counts a run of
    tiles as its tiles). Use it as a context manager: the progress line is drawn at once and
    closed at the end.
    """

    def __init__(
        self,
        stage: str,
        units: Iterable[U],
        *,
        label: Callable[[U], str],
        max_failures: int,
        stream: TextIO,
        noun: str = "it",
        skipped: int = 0,
        group: Callable[[U], Hashable] | None = None,
        size: Callable[[U], int] | None = None,
    ) -> None:
        self.pending: deque[U] = deque(units)
        self.label, self.group = label, group or (lambda unit: unit)
        self.size = size or (lambda unit: 1)
        self.retries = Retries(stage, max_failures, stream)
        self.succeeded = 0  # units done
        self._left: dict[Hashable, int] = {}  # group -> size of its units neither done nor
        for unit in self.pending:  # given up
            g = self.group(unit)
            self._left[g] = self._left.get(g, 0) + self.size(unit)
        self._dropped: set[Hashable] = set()  # groups given up
        self.progress = Progress(stage, sum(self._left.values()), unit=noun, skipped=skipped,
                                 stream=stream)

    @property
    def stream(self) -> TextIO:
        """Where the stage's lines go (its progress line, failures, notices)."""
        return self.progress.stream

    def take(self, n: int | None = None) -> list[U]:
        """The next `n` pending units (all when None), removed from the queue: to submit now."""
        count = len(self.pending) if n is None else max(0, min(n, len(self.pending)))
        return [self.pending.popleft() for _ in range(count)]

    def dropped(self, unit: U) -> bool:
        """Whether `unit`'s group was given up (its results are not wanted any more)."""
        return self.group(unit) in self._dropped

    def done(self, *units: U) -> None:
        """`units` succeeded: the progress counts them (those of a given-up group aside)."""
        live = [u for u in units if not self.dropped(u)]
        for unit in live:
            self._left[self.group(unit)] -= self.size(unit)
        self.succeeded += len(live)
        self.progress.update(sum(self.size(u) for u in live))

    def failed(self, unit: U, error: str, *, again: bool | None = None) -> bool:
        """An attempt of `unit` failed with `error`: one line, and True while it may run again.

        ``again`` None: this decides (``max_failures`` retries) and a unit to run again goes
        to the back of ``pending``; a bool: the mechanism decided and retries it itself. A
        unit given up gives up its group: the group's unfinished units count in the progress
        now and the group's later results and errors are dropped (no line).
        """
        if self.dropped(unit):
            return False
        decided = again is not None
        if self.retries.failed(self.label(unit), error, again):
            if not decided:
                self.pending.append(unit)
            return True
        g = self.group(unit)
        self._dropped.add(g)
        self.progress.update(self._left.pop(g))
        return False

    def outcome(self) -> dict[str, int | str]:
        """{"failed": units given up} plus {"error": the first one's cause} when any."""
        return self.retries.outcome()

    def close(self) -> None:
        self.progress.close()

    def __enter__(self) -> Units[U]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_refs(
    units: Units[U],
    submit: Callable[[U], Any],
    on_done: Callable[[U, Any], None],
    *,
    slots: int | None = None,
    settle: Callable[[U, BaseException | None], None] | None = None,
) -> None:
    """Run every pending unit of `units` as a Ray object ref, until none is pending or running.

    ``submit(unit)`` starts one attempt and returns its ref (a task's, an actor method's); at
    most ``slots`` attempts run at once (all pending ones when None). Finished refs are taken
    one at a time (``ray.wait``): ``settle(unit, error)`` first, for every finished attempt
    (error None when it succeeded; e.g. give its actor back to the pool), then for a success
    ``on_done(unit, value)`` and ``units.done(unit)``, for an error (``RayTaskError``: it
    raised; ``RayActorError``: its process died) ``units.failed(unit, error_text(error))``,
    which queues the unit again or gives it up, except a fatal I/O error (a full, read-only or
    failing store: distsim.pipeline.io_errors), raised at once as an IOFault. Results of a
    given-up group are dropped; any other exception propagates (the stage's ``finally`` cleans
    up).
    """
    import ray

    if slots is not None and slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    errors = (ray.exceptions.RayTaskError, ray.exceptions.RayActorError)
    running: dict[Any, U] = {}  # ref -> its unit, in submission order
    while units.pending or running:
        for unit in units.take(None if slots is None else slots - len(running)):
            running[submit(unit)] = unit
        ready: list[Any] = []
        while not ready:  # back in Python every WAIT_S: a Ctrl-C is handled then, not only
            ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)  # when one ends
        unit = running.pop(ready[0])
        try:
            value = ray.get(ready[0])
        except errors as exc:
            if settle is not None:
                settle(unit, exc)
            fault = find(exc, units.label(unit))
            if fault is not None:  # a full or read-only disk: every retry would fail too
                raise fault from None
            units.failed(unit, error_text(exc))
            continue
        if settle is not None:
            settle(unit, None)
        if not units.dropped(unit):
            on_done(unit, value)
            units.done(unit)
