"""Seeded fault injection, a test tool: ``DISTSIM_FAULTS="trial=0.1,feature=0.1,tile=0.1"``.

Each unit of work (a zoo trial's pack, a feature pack, a pairs tile, a test's permutation
chunk) is chosen to fail with its kind's rate, from a seeded hash of its name (``seed=N``,
default 0), so the same units fail in every run. A chosen unit fails on its first ``times``
attempts (default 1; attempts are counted in ``<store>/_faults/``), so retries or a relaunch
get past it: a trial, tile or chunk raises :class:`InjectedFault`; a feature pack kills its
actor's process (``os._exit``), as an out-of-memory kill would. ``errno=N`` makes a chosen
unit of any kind raise ``OSError(N)`` instead (28: a full disk, 5: an I/O error, 13: no
permission; distsim.pipeline.io_errors). ``slow=S`` makes every unit sleep S seconds first (to
stop a launch in a given stage). Unset or empty: no effect. Never set it for a real study.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from distsim.errors import ConfigError

ENV = "DISTSIM_FAULTS"
KINDS = ("trial", "feature", "tile", "test")


class InjectedFault(RuntimeError):
    """The failure :func:`maybe_fail` raises for a chosen unit."""


def plan(text: str | None = None) -> dict[str, float]:
    """The parsed knob: {kind: rate, "seed": s, "times": t}; {} when unset. ConfigError (also a
    ValueError) on a bad item, one line naming it."""
    text = os.environ.get(ENV, "") if text is None else text
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        ok = (name in KINDS and 0 <= number <= 1) or (name == "slow" and number >= 0) or (
            name in ("seed", "times", "errno") and number >= 0 and number == int(number))
        if not ok:
            raise ConfigError.at(ENV, f"{item!r} is not kind=rate (kinds {', '.join(KINDS)}; "
                                 "rate in [0, 1]), slow=SECONDS, seed=N, times=N or errno=N")
        out[name] = number
    return out


def chosen(kind: str, unit: str, faults: dict[str, float]) -> bool:
    """True when `unit` of `kind` is one of the units the plan makes fail."""
    rate = faults.get(kind, 0.0)
    digest = hashlib.sha256(f"{int(faults.get('seed', 0))}/{kind}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def maybe_fail(kind: str, unit: str, store_root: str | os.PathLike[str],
               faults: dict[str, float]) -> None:
    """Fail here when `faults` (:func:`plan`, read on the driver and passed to the workers)
    chooses this unit and its failures so far are fewer than ``times``; else return at once."""
    if faults.get("slow"):
        time.sleep(faults["slow"])
    if not faults or not chosen(kind, unit, faults):
        return
    folder = Path(store_root) / "_faults"
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(int(faults.get("times", 1))):
        try:  # O_EXCL: each attempt's marker is created exactly once, by one process
            fd = os.open(folder / f"{kind}-{unit}-{attempt}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        if faults.get("errno"):
            number = int(faults["errno"])
            raise OSError(number, f"{os.strerror(number)} (injected {kind} fault in {unit})")
        if kind == "feature":
            os._exit(17)  # the actor's process dies, as if killed for memory
        raise InjectedFault(f"injected {kind} fault in {unit} (attempt {attempt + 1})")
