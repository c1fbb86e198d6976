"""The I/O errors that stop a launch at once: a full disk, a read-only or forbidden store, a
failing device.

Retrying a unit does not help when the store's filesystem is full (ENOSPC, EDQUOT), read-only
(EROFS), closed to this user (EACCES, EPERM) or failing (EIO): every unit would fail the same
way, each after its retries. So the stages do not retry them: the first one, in a worker (a
trial, a feature pack, a tile, a test chunk; :func:`find` reads it from Ray's or Tune's error)
or on the driver (a shard the driver writes, a stage marker), raises :class:`IOFault`, and the
launch ends with one line (:func:`message`) naming the path, the error, what to do and, for a
full disk, the free space and what the study still needs (distsim.pipeline.space).
"""

from __future__ import annotations

import errno as E
import re
from pathlib import Path

# errno -> (its name, what to do about it)
FATAL: dict[int, tuple[str, str]] = {
    E.ENOSPC: ("ENOSPC", "free space on it or move study.store to a larger disk"),
    E.EDQUOT: ("EDQUOT", "raise your disk quota or move study.store"),
    E.EROFS: ("EROFS", "remount it read-write or set study.store to a writable folder"),
    E.EACCES: ("EACCES", "give this user write access to the store's folders"),
    E.EPERM: ("EPERM", "give this user write access to the store's folders"),
    E.EIO: ("EIO", "the device failed; check the disk (dmesg) or move study.store"),
}
_NUMBER = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)|\[errno (\d+)\]")
_PATH = re.compile(r"\[Errno \d+\] [^:']*: '([^']+)'")


class IOFault(Exception):
    """A fatal I/O error of one unit of work or of the driver: errno, the path (None when the
    error did not name one) and where it happened ("pack mlp-t0-p0", "the driver")."""

    def __init__(self, errno: int, path: str | None, where: str, text: str) -> None:
        super().__init__(text)
        self.errno, self.path, self.where, self.text = errno, path, where, text

    @property
    def name(self) -> str:
        """The errno's symbol, e.g. "ENOSPC"."""
        return FATAL[self.errno][0]


def find(error: BaseException | str, where: str) -> IOFault | None:
    """The fatal I/O error in `error` (an exception, searched down its causes and Ray's wrapped
    cause, or the text of one: a Tune trial's error file), or None.

    >>> find(OSError(28, "No space left on device", "/s/x.parquet"), "the driver").path
    '/s/x.parquet'
    >>> find("OSError: [Errno 5] Input/output error", "pack mlp-t0-p0").name
    'EIO'
    >>> find(RuntimeError("boom"), "the driver") is None
    True
    """
    if isinstance(error, str):
        for m in _NUMBER.finditer(error):
            number = int(next(g for g in m.groups() if g))
            if number in FATAL:
                path = _PATH.search(error)
                return IOFault(number, path[1] if path else None, where, _line(error))
        return None
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FATAL:
            named = exc.filename if isinstance(exc.filename, str) else None
            return IOFault(exc.errno, named, where, _line(f"{type(exc).__name__}: {exc}"))
        stack += [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    text = str(error)
    return find(text, where) if _NUMBER.search(text) else None


def message(fault: IOFault, store_root: Path, space: str | None = None) -> str:
    """The launch's line for `fault`: what failed where, on which path, and what to do;
    `space` (for a full disk): the free space and what the study still needs."""
    name, fix = FATAL[fault.errno]
    on = f"on {fault.path!r}" if fault.path else f"in the store {str(store_root)!r}"
    text = fault.text.replace(f": {fault.path!r}", "")  # said once
    text = text if len(text) <= 200 else text[:200] + "..."
    where = "" if fault.where == "the driver" else f" in {fault.where}"
    line = f"{name} {on}{where}: {text}"
    if space:
        line += f"; {space}"
    return f"{line}; {fix}"


def _line(text: str) -> str:
    lines = [s for s in str(text).splitlines() if s.strip()]
    return " ".join((lines[-1] if lines else "").split())
