"""The Ray layer of distsim: the only package that imports ray (inside the functions that run).

``run_study(study)`` runs the registry's stages, zoo (Ray Tune) -> features (actor pool) ->
pairs (Ray tasks over runs of distance tiles) -> tests (Ray tasks over permutation chunks),
each skipping the work its store already holds. ``run_study`` loads its module on first use
(PEP 562): a Ray worker that unpickles a stage's task function imports that stage's module,
not the launch and every other stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distsim.lazy import attach

if TYPE_CHECKING:
    from distsim.pipeline.launch import run_study

__all__ = ["run_study"]
__getattr__, __dir__ = attach(__name__, {"run_study": "distsim.pipeline.launch"})
