"""Process-session helpers for tests that start Ray nodes or launches of their own.

Each such test starts its processes with ``start_new_session=True`` and stops exactly that
session (never ``ray stop``, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Pids of every live process in session `sid` (the process we started and its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of session `sid`; wait up to `timeout` s; return the survivors."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_pids(sid)
