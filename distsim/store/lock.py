"""One launch per store: ``<root>/_launch.lock`` names the launch that holds it.

The lock file is created exclusively (``O_CREAT | O_EXCL``, which fails on any existing
entry, a symlink included) and holds the holder's host, pid, process start time and launch
start time as JSON. A second launch fails at once naming the holder. A lock left by a launch
that died on this host (its pid gone, or reused by another process) is taken over with a
notice. A lock from another host is never taken over: distsim cannot see that host's
processes, so the message says which file to delete once that launch is known to be gone.

On a shared cluster volume (NFS v3+, EFS, Lustre) exclusive create is atomic across
clients, so two launches from different machines cannot both hold the lock. Only the lock
file itself is ever removed: distsim never follows its content to a path.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from distsim.errors import StoreError

LOCK_NAME = "_launch.lock"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None elsewhere or
    when it is gone: with the pid it names a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def alive(holder: dict[str, Any]) -> bool:
    """True when the holder's process (on this host) still runs."""
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OverflowError, ValueError):
        return False
    start = holder.get("process_start")
    return start is None or process_start(pid) in (None, start)


class StoreLock:
    """Context manager holding a store's launch lock (StoreError when another launch has it)."""

    def __init__(self, root: Path, stream: TextIO) -> None:
        self.path = Path(root) / LOCK_NAME
        self.stream = stream
        self.token = uuid.uuid4().hex
        self.held = False
        self.created = False

    def holder(self) -> dict[str, Any] | None:
        """The lock's content, {} when it is unreadable, None when there is no lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        with os.fdopen(fd) as f:
            try:
                doc = json.loads(f.read())
            except (ValueError, UnicodeDecodeError):
                return {}
        return doc if isinstance(doc, dict) else {}

    def acquire(self) -> None:
        self.created = not self.path.parent.exists()  # removed on release if still empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_fail()
                continue
            doc = {"host": socket.gethostname(), "pid": os.getpid(),
                   "process_start": process_start(os.getpid()), "token": self.token,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            self.held = True
            return
        raise StoreError(f"could not take the launch lock {str(self.path)!r}; another launch "
                         "keeps taking it")

    def _take_over_or_fail(self) -> None:
        """Remove a lock whose holder died on this host (with a notice), or raise StoreError."""
        held = self.holder()
        if held == {}:  # perhaps created a moment ago and not yet written: look again
            time.sleep(0.5)
            held = self.holder()
        if held is None:
            return  # released meanwhile
        here = held.get("host") == socket.gethostname()
        if held and here and not alive(held):
            print(f"distsim: taking over the launch lock of pid {held.get('pid')} (started "
                  f"{held.get('started')}), which is no longer running", file=self.stream,
                  flush=True)
            # rename first: of two launches taking over together, exactly one succeeds
            away = self.path.with_name(f"{LOCK_NAME}.{self.token}.stale")
            try:
                os.rename(self.path, away)
            except FileNotFoundError:
                return
            os.unlink(away)
            return
        who = (f"pid {held.get('pid')} on host {held.get('host')!r}, since {held.get('started')}"
               if held else "an unknown launch (unreadable lock)")
        gone = ("" if here and held else
                f"; if no launch is running there, delete {str(self.path)!r}")
        raise StoreError(f"store {str(self.path.parent)!r} is in use by another launch ({who}); "
                         f"wait for it to end or stop it{gone}")

    def release(self) -> None:
        """Remove the lock when it is still this launch's (same token), and the store folder
        when this launch created it and left it empty (a launch refused by its checks)."""
        if self.held and (self.holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
            folder = self.path.parent
            if self.created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
