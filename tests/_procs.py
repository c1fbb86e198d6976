"""Process-session helpers for tests that start Ray nodes or launches of their own (and for
benchmarks/soak.py, which kills launches the same way).

Each such test starts its processes with ``start_new_session=True`` and stops exactly that
session (never ``ray stop``, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DISTSIM = str(Path(sys.executable).with_name("distsim"))  # the venv's command line


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


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launch a test starts: this one without RAY_ADDRESS (the launch
    starts its own Ray) or DISTSIM_FAULTS, usage stats off, one BLAS thread; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTSIM_FAULTS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return env


def kill_when(cmd: Sequence[str], cwd: Path, log: Path, until: Callable[[], bool],
              env: dict[str, str] | None = None, timeout: float = 150.0,
              poll: float = 0.02) -> None:
    """Start `cmd` in a session of its own (output to `log`), wait until `until()` holds, then
    SIGKILL the whole session. Fails (with the log's tail) when the process ended first or did
    not die by SIGKILL."""
    with open(log, "w") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env or launch_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if until():
                    break
                time.sleep(poll)
            assert proc.poll() is None, ("the launch ended before it could be killed: "
                                         + log.read_text()[-2000:])
        finally:
            kill_session(proc.pid)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
