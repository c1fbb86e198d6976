"""Progress of a stage: done/total, rate and ETA, as a bar on a terminal and plain lines otherwise.

Written here (no tqdm dependency). A bar redraws in place at most every ``min_interval`` seconds;
off a terminal (CI logs, pipes) a plain line is printed at most every ``line_interval`` seconds
and once at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"


class Progress:
    """A counter for one stage: ``update(n)`` as work finishes, ``close()`` at the end.

    ``total`` is the number of units of work (trials, packs, tiles, permutation chunks);
    ``skipped`` counts units the store already held (shown, but not part of the rate).
    """

    def __init__(
        self,
        name: str,
        total: int,
        *,
        unit: str = "it",
        skipped: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        min_interval: float = 0.2,
        line_interval: float = 10.0,
        width: int = 24,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.name, self.total, self.unit, self.skipped = name, int(total), unit, int(skipped)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = (bool(tty) if tty is not None
                    else bool(getattr(self.stream, "isatty", lambda: False)()))
        self.min_interval, self.line_interval, self.width = min_interval, line_interval, width
        self.done = 0
        self.start = time.monotonic()
        self._last_draw, self._drawn_done = -1e9, -1
        self._closed = False
        self._draw(force=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self) -> float:
        """Units finished per second since the stage started."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        """The status line: name, bar (terminal only), done/total, rate, elapsed and ETA."""
        rate = self.rate()
        left = self.total - self.done
        eta = _fmt_seconds(left / rate) if rate > 0 and left > 0 else "--:--"
        if self.total == 0:
            frac = 1.0
        else:
            frac = self.done / self.total
        parts = [f"{self.name:<9}"]
        if self.tty:
            filled = int(round(frac * self.width))
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
        parts.append(f"{self.done}/{self.total} {self.unit}")
        parts.append(f"{rate:.2f} {self.unit}/s")
        parts.append(f"{_fmt_seconds(self.elapsed)} elapsed")
        if self.done < self.total:
            parts.append(f"eta {eta}")
        if self.skipped:
            parts.append(f"({self.skipped} already in store)")
        return " ".join(parts)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        interval = self.min_interval if self.tty else self.line_interval
        if not force and now - self._last_draw < interval:
            return
        self._last_draw, self._drawn_done = now, self.done
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished units and redraw if it is time to."""
        self.done = min(self.total, self.done + int(n))
        self._draw(force=self.done == self.total)

    def close(self) -> None:
        """Draw the final state (once); a terminal bar ends its line."""
        if self._closed:
            return
        self._closed = True
        if self.tty or self._drawn_done != self.done:
            self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Retries:
    """Failed attempts of a stage's units (packs, tiles, chunks) against ``max_failures``
    retries, each said in one line: ``failed(unit, error)`` is True while the unit may run
    again (``again``: the mechanism decided, e.g. Tune's FailureConfig); ``outcome()`` gives
    the counts the launch reports (failed units, first cause). Used by
    :class:`distsim.pipeline.units.Units`."""

    def __init__(self, stage: str, max_failures: int, stream: TextIO) -> None:
        self.stage, self.max_failures, self.stream = stage, max_failures, stream
        self.tries: dict[str, int] = {}
        self.given_up: dict[str, str] = {}  # unit -> its last error

    def failed(self, unit: str, error: str, again: bool | None = None) -> bool:
        self.tries[unit] = self.tries.get(unit, 0) + 1
        if again is None:
            again = self.tries[unit] <= self.max_failures
        print(f"{self.stage:<9} {unit} failed ({'retrying' if again else 'giving up'}): "
              f"{error[:300]}", file=self.stream, flush=True)
        if not again:
            self.given_up[unit] = error
        return again

    def outcome(self) -> dict[str, int | str]:
        """{"failed": units given up} plus {"error": the first one's cause} when any."""
        first = next(iter(self.given_up.values()), None)
        return {"failed": len(self.given_up), **({"error": first} if first else {})}
