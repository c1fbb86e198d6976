"""The Ray layer of distsim: the only package that imports ray (inside the functions that run).

``run_study(study)`` runs the registry's stages, zoo (Ray Tune) -> features (actor pool) ->
pairs (Ray Data over distance tiles) -> tests (Ray tasks over permutation chunks), each
skipping the work its store already holds.
"""

from distsim.pipeline.launch import run_study

__all__ = ["run_study"]
