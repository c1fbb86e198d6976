"""The one error root of distsim: a user's mistake as one line; the CLI prints it and exits 2."""

from __future__ import annotations


class DistsimError(Exception):
    """A mistake the user can fix (bad study file, changed store, unreachable cluster).

    The message is always one line (whitespace runs collapsed), so the CLI can print it as
    ``error: <message>`` with exit code ``exit_code`` (2) and no traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(DistsimError, ValueError):
    """A bad study value: ``"<key>: <problem>"``; ``key`` is the key path (e.g. ``arch[1].widths``).

    Also a ValueError, so constructing e.g. ``TrainConfig(lr=-1)`` raises what Python users
    expect.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key

    @classmethod
    def at(cls, key: str, problem: str) -> ConfigError:
        """The error of ``key``: ``"<key>: <problem>"``, e.g. ``"must be ..., got 0"``."""
        return cls(f"{key}: {problem}" if key else problem, key)

    @property
    def problem(self) -> str:
        """The message without its leading ``"<key>: "``."""
        text = str(self)
        return text[len(self.key) + 2:] if self.key and text.startswith(self.key + ": ") else text

    def moved(self, section: str, path: str) -> ConfigError:
        """The same error under another key path: ``<section>.x`` becomes ``<path>.x``
        (``arch`` -> ``arch[1]``, ``train`` -> ``train.gru``); any other key is prefixed."""
        if self.key == section or self.key.startswith(section + "."):
            key = path + self.key[len(section):]
        else:
            key = f"{path}.{self.key}" if self.key else path
        return ConfigError.at(key, self.problem)


class StoreError(DistsimError):
    """A store that cannot be used as asked (a changed study, a bad key, not a store)."""


class LaunchError(DistsimError):
    """A launch that cannot go on as asked (a missing upstream stage, an unshared store)."""


class IncompleteError(DistsimError):
    """A launch that ran but could not finish every unit of a stage (trials, packs or tiles that
    failed after their retries); what finished is stored and a relaunch resumes. Exit code 1."""

    exit_code = 1


class StorageError(DistsimError):
    """A launch stopped by the store's filesystem: full, read-only, closed to this user or
    failing (distsim.pipeline.io_errors). Retrying would fail the same way, so nothing is
    retried; what was stored is kept and the same launch resumes once it is fixed. Exit code 1."""

    exit_code = 1
