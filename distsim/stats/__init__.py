"""Statistics on weight features: all-pairs distances, PERMANOVA, hypothesis-training-testing."""

from __future__ import annotations

from distsim.stats._pvalue import p_value
from distsim.stats.distances import (
    block_topk,
    distance_block,
    merge_topk,
    pairwise_distances,
    topk_neighbors,
    upper_tiles,
)
from distsim.stats.htt import HTTResult, htt, htt_null_chunk
from distsim.stats.permanova import PermanovaResult, permanova, permanova_null_chunk

__all__ = [
    "HTTResult",
    "PermanovaResult",
    "block_topk",
    "distance_block",
    "htt",
    "htt_null_chunk",
    "merge_topk",
    "p_value",
    "pairwise_distances",
    "permanova",
    "permanova_null_chunk",
    "topk_neighbors",
    "upper_tiles",
]
