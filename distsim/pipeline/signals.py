"""Ctrl-C and SIGTERM end the whole launch: the first one raises :class:`Interrupted` in the
driver; later ones, while the launch stops, are noted and ignored.

Nothing is lost or left half-written by stopping at any point: every shard is written to a
temp file and renamed into place (``distsim.store.shards.atomic_write``), so a shard is
stored whole or not at all, and every stage skips what the store holds on the next launch.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import TextIO

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The launch was told to stop by `signum`; the CLI exits with 128 + signum (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignals:
    """Context manager: inside it SIGINT and SIGTERM raise :class:`Interrupted` once; the
    previous handlers come back on exit. Call :meth:`arm` again after anything that installs
    handlers of its own (``ray.init`` sets one for SIGTERM). A no-op off the main thread."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            old = signal.signal(s, self._handle)
            self._old.setdefault(s, old)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            raise Interrupted(signum)
        print(f"distsim: {signal.Signals(signum).name} again: already stopping (no shard is "
              "left half-written)", file=self.stream, flush=True)

    def __enter__(self) -> StopOnSignals:
        self.arm()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)  # type: ignore[arg-type]
