"""Statistics on weight features: all-pairs distances, PERMANOVA and PERMDISP, HTT, q-values."""

from __future__ import annotations

from distsim.stats.dispersion import geometric_median, permdisp, permdisp_features
from distsim.stats.distances import (
    METRICS,
    block_topk,
    distance_block,
    distance_frame,
    merge_topk,
    pairwise_distances,
    topk_neighbors,
    upper_tiles,
)
from distsim.stats.hypothesis_training import (
    PROTOCOLS,
    HTTResult,
    htt,
    htt_null_chunk,
    htt_prepare,
)
from distsim.stats.linear_embedding import LEARNERS
from distsim.stats.multiple_testing import q_values
from distsim.stats.permanova_tiled import (
    TileSums,
    permanova_groups,
    permanova_labels,
    permanova_tile,
    permanova_tiles,
    tile_pseudo_f,
    tile_within_sums,
)
from distsim.stats.permutation import p_value
from distsim.stats.permutational_anova import (
    PermanovaResult,
    euclidean_basis,
    factorize,
    permanova,
    permanova_features,
    permanova_null_chunk,
    r_squared,
)
from distsim.stats.scoring import expected_ap, expected_cmc

__all__ = [
    "LEARNERS",
    "METRICS",
    "PROTOCOLS",
    "HTTResult",
    "PermanovaResult",
    "TileSums",
    "block_topk",
    "distance_block",
    "distance_frame",
    "euclidean_basis",
    "expected_ap",
    "expected_cmc",
    "factorize",
    "geometric_median",
    "htt",
    "htt_null_chunk",
    "htt_prepare",
    "merge_topk",
    "p_value",
    "pairwise_distances",
    "permanova",
    "permanova_features",
    "permanova_groups",
    "permanova_labels",
    "permanova_null_chunk",
    "permanova_tile",
    "permanova_tiles",
    "permdisp",
    "permdisp_features",
    "q_values",
    "r_squared",
    "tile_pseudo_f",
    "tile_within_sums",
    "topk_neighbors",
    "upper_tiles",
]
