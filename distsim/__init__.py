"""distsim: weight similarity of neural networks at scale (chain normalization, HTT) on Ray.

``distsim.open(path)`` reads a finished study back (:mod:`distsim.results`); it is imported on
first use, so ``import distsim`` itself loads neither torch, polars nor Ray.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"

_LAZY = {"open": "distsim.results", "Results": "distsim.results"}


def __getattr__(name: str) -> Any:
    """``distsim.open`` and ``distsim.Results``, imported from their module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'distsim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
