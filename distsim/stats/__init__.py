"""Statistics on weight features: all-pairs distances, PERMANOVA and PERMDISP, HTT, q-values.

The names below load their module on first use (PEP 562), so ``from distsim.stats import
q_values`` or ``import distsim.stats.multiple_testing`` does not load numba or the other
statistics: the front (summary, report, CLI) stays light. Every name is importable as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distsim.lazy import attach

if TYPE_CHECKING:
    from distsim.config.choices import LEARNERS, METRICS, PROTOCOLS
    from distsim.stats.dispersion import geometric_median, permdisp, permdisp_features
    from distsim.stats.distances import (
        distance_block,
        distance_frame,
        pairwise_distances,
        topk_neighbors,
        upper_tiles,
    )
    from distsim.stats.hypothesis_training import (
        HTTOptions,
        HTTResult,
        htt,
        htt_null_chunk,
        htt_prepare,
    )
    from distsim.stats.multiple_testing import q_values
    from distsim.stats.neighbors import block_topk, merge_topk, tile_topk
    from distsim.stats.permanova_multiterm import (
        TermRow,
        TermsDesign,
        TermsResult,
        permanova_terms,
        permanova_terms_features,
        terms_design,
    )
    from distsim.stats.permanova_terms_tiled import (
        permanova_terms_finish,
        permanova_terms_orders,
        permanova_terms_tile,
        permanova_terms_tiles,
    )
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

_MODULES = {  # name -> the module that defines it (a test keeps it equal to __all__)
    "block_topk": "distsim.stats.neighbors",
    "distance_block": "distsim.stats.distances",
    "distance_frame": "distsim.stats.distances",
    "euclidean_basis": "distsim.stats.permutational_anova",
    "expected_ap": "distsim.stats.scoring",
    "expected_cmc": "distsim.stats.scoring",
    "factorize": "distsim.stats.permutational_anova",
    "geometric_median": "distsim.stats.dispersion",
    "htt": "distsim.stats.hypothesis_training",
    "htt_null_chunk": "distsim.stats.hypothesis_training",
    "htt_prepare": "distsim.stats.hypothesis_training",
    "HTTOptions": "distsim.stats.hypothesis_training",
    "HTTResult": "distsim.stats.hypothesis_training",
    "LEARNERS": "distsim.config.choices",
    "merge_topk": "distsim.stats.neighbors",
    "METRICS": "distsim.config.choices",
    "p_value": "distsim.stats.permutation",
    "pairwise_distances": "distsim.stats.distances",
    "permanova": "distsim.stats.permutational_anova",
    "permanova_features": "distsim.stats.permutational_anova",
    "permanova_groups": "distsim.stats.permanova_tiled",
    "permanova_labels": "distsim.stats.permanova_tiled",
    "permanova_null_chunk": "distsim.stats.permutational_anova",
    "permanova_tile": "distsim.stats.permanova_tiled",
    "permanova_terms": "distsim.stats.permanova_multiterm",
    "permanova_terms_features": "distsim.stats.permanova_multiterm",
    "permanova_terms_finish": "distsim.stats.permanova_terms_tiled",
    "permanova_terms_orders": "distsim.stats.permanova_terms_tiled",
    "permanova_terms_tile": "distsim.stats.permanova_terms_tiled",
    "permanova_terms_tiles": "distsim.stats.permanova_terms_tiled",
    "permanova_tiles": "distsim.stats.permanova_tiled",
    "PermanovaResult": "distsim.stats.permutational_anova",
    "permdisp": "distsim.stats.dispersion",
    "permdisp_features": "distsim.stats.dispersion",
    "PROTOCOLS": "distsim.config.choices",
    "q_values": "distsim.stats.multiple_testing",
    "r_squared": "distsim.stats.permutational_anova",
    "TermRow": "distsim.stats.permanova_multiterm",
    "TermsDesign": "distsim.stats.permanova_multiterm",
    "terms_design": "distsim.stats.permanova_multiterm",
    "TermsResult": "distsim.stats.permanova_multiterm",
    "tile_pseudo_f": "distsim.stats.permanova_tiled",
    "tile_within_sums": "distsim.stats.permanova_tiled",
    "TileSums": "distsim.stats.permanova_tiled",
    "tile_topk": "distsim.stats.neighbors",
    "topk_neighbors": "distsim.stats.distances",
    "upper_tiles": "distsim.stats.distances",
}
__all__ = [
    "LEARNERS",
    "METRICS",
    "PROTOCOLS",
    "HTTOptions",
    "HTTResult",
    "PermanovaResult",
    "TermRow",
    "TermsDesign",
    "TermsResult",
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
    "permanova_terms",
    "permanova_terms_features",
    "permanova_terms_finish",
    "permanova_terms_orders",
    "permanova_terms_tile",
    "permanova_terms_tiles",
    "permanova_tile",
    "permanova_tiles",
    "permdisp",
    "permdisp_features",
    "q_values",
    "r_squared",
    "terms_design",
    "tile_pseudo_f",
    "tile_within_sums",
    "tile_topk",
    "topk_neighbors",
    "upper_tiles",
]

__getattr__, __dir__ = attach(__name__, _MODULES)
