"""The Ray layer of distsim: the only package that imports ray.

``run_study(study)`` runs the stages zoo (Ray Tune) -> features (actor pool) -> pairs (Ray
Data over distance blocks) -> tests (Ray tasks over permutation chunks), each skipping the
work its store already holds. Ray is imported lazily (``distsim.pipeline.launch``).
"""

from __future__ import annotations

from typing import Any

from distsim.store import StoreError

__all__ = ["LaunchError", "run_study"]


class LaunchError(StoreError):
    """A launch that cannot go on as asked (missing upstream stage, unshared store): one line.

    A StoreError subclass, so the CLI prints it as one line with exit code 2.
    """


def __getattr__(name: str) -> Any:
    if name == "run_study":
        from distsim.pipeline.launch import run_study

        return run_study
    raise AttributeError(f"module 'distsim.pipeline' has no attribute {name!r}")
