"""The names a study file chooses from: feature methods, sketches, projections, distance
metrics, HTT protocols and learners.

They live here, with no science attached, so that the config, the store and the CLI read them
without importing torch, numba or scipy; the modules that implement them import them from here
and dispatch on them (``tests/test_params.py`` checks that every name has an implementation).
"""

from __future__ import annotations

METHODS = ("chain-gram", "raw", "gram", "aligned", "cka")  # distsim.weights.features
SKETCHES = ("output", "input")  # where a feature is sketched (distsim.weights.features)
PROJECTIONS = ("countsketch", "gaussian")  # the output sketch's map (distsim.weights.projection)
METRICS = ("euclidean", "cosine")  # distsim.stats.distances
BACKENDS = ("auto", "numpy", "torch")  # distsim.stats.backend
PROTOCOLS = ("closed-set", "open-set")  # distsim.stats.hypothesis_training
LEARNERS = ("lda", "softmax")  # distsim.stats.linear_embedding
SOURCES = ("train", "import")  # where a study's models come from ([zoo] source)
FORMATS = ("distsim-export", "model-zoos", "weights-table", "state-dicts")  # distsim.zoo.sources
