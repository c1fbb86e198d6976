"""distsim: weight similarity of neural networks at scale (chain normalization, HTT) on Ray.

``distsim.open(path)`` reads a finished study back (:mod:`distsim.results`); it is imported on
first use, so ``import distsim`` itself loads neither torch, polars nor Ray.
"""

from __future__ import annotations

from distsim.lazy import attach

__version__ = "0.9.0"

__getattr__, __dir__ = attach(__name__, {"open": "distsim.results", "Results": "distsim.results"})
