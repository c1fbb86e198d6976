"""Statistics on weight features: all-pairs distances, PERMANOVA, hypothesis-training-testing."""

from __future__ import annotations

import importlib
from typing import Any

from distsim.stats._pvalue import p_value
from distsim.stats.distances import (
    block_topk,
    distance_block,
    merge_topk,
    pairwise_distances,
    topk_neighbors,
    upper_tiles,
)
from distsim.stats.permanova import PermanovaResult, permanova, permanova_null_chunk

_HTT_NAMES = ("htt", "htt_null_chunk", "HTTResult")

__all__ = [
    "PermanovaResult",
    "block_topk",
    "distance_block",
    "merge_topk",
    "p_value",
    "pairwise_distances",
    "permanova",
    "permanova_null_chunk",
    "topk_neighbors",
    "upper_tiles",
    *_HTT_NAMES,
]


def __getattr__(name: str) -> Any:
    # htt.py pulls in the learners; import it on first use so the package imports without it.
    # Importing the submodule binds `distsim.stats.htt` to the module: rebind the public names
    # so that `from distsim.stats import htt` is the function.
    if name in _HTT_NAMES:
        module = importlib.import_module("distsim.stats.htt")
        globals().update({n: getattr(module, n) for n in _HTT_NAMES})
        return globals()[name]
    raise AttributeError(f"module 'distsim.stats' has no attribute {name!r}")
