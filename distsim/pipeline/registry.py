"""The ordered stage registry: the launch runs these stages in this order.

Adding a stage = one module offering a :class:`~distsim.pipeline.stage.Stage` and one entry
here (docs/architecture.md says how).
"""

from __future__ import annotations

from distsim.pipeline import features, pairs, significance, zoo
from distsim.pipeline.stage import Stage

STAGES: tuple[Stage, ...] = (zoo.STAGE, features.STAGE, pairs.STAGE, significance.STAGE)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
