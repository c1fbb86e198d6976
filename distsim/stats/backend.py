"""Where the dense linear algebra of the pairs and tests stages runs: numpy, or torch (on a GPU
when the process has one, else torch's CPU device).

``"auto"`` (the default of ``[pairs] backend`` and ``[tests] backend``) is resolved where the
work runs, on the Ray worker: torch when torch sees a CUDA device there, numpy otherwise. The
backend changes where and how fast, not what: the torch paths give the numpy paths' results to
rounding (tests/test_backend.py), so it is not part of a study's hash.

What runs on torch: the pairs stage's tiles whole (distances, their sums by group and the
top-k lists; distsim.stats.tiles_torch) and the distances of PERMANOVA's tile route (a
non-Euclidean metric); HTT's batched fits, lda and softmax (distsim.stats.embedding_torch;
the basis and the scoring stay numpy); the permuted group sums of PERMANOVA's and PERMDISP's
features routes and PERMDISP's centroid distances (distsim.stats.anova_torch). What stays
numpy whatever the backend: the permutations themselves (numba's shuffle, so both backends
draw the same ones), the close pairs' float64 recomputation, the features' Euclidean basis,
PERMDISP's spatial medians and the multi-term PERMANOVA (tests.factors, tests.strata).
"""

from __future__ import annotations

import glob
import sys
from typing import TYPE_CHECKING

from distsim.config.choices import BACKENDS

if TYPE_CHECKING:
    import torch


def resolve(backend: str) -> str:
    """"numpy" or "torch" for a backend setting; "auto" is torch when a CUDA device is visible
    here (torch is not imported on a machine without NVIDIA device files), else numpy.

    >>> resolve("numpy")
    'numpy'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not glob.glob("/dev/nvidia[0-9]*") and "torch" not in sys.modules:
        return "numpy"  # no NVIDIA device here: not worth torch's import (about a second)
    import torch

    return "torch" if torch.cuda.is_available() else "numpy"


def device() -> torch.device:
    """The torch device of the torch backend: the first CUDA device, else the CPU. On CUDA,
    float32 GEMMs are kept in IEEE float32 (TF32's 10-bit mantissa would break the distances'
    error bound)."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda")
