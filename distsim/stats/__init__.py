"""Statistics on weight features: all-pairs distances, PERMANOVA, hypothesis-training-testing."""

from __future__ import annotations

from typing import Any

from distsim.stats._pvalue import p_value

_HTT_NAMES = ("htt", "htt_null_chunk", "HTTResult")

__all__ = ["p_value", *_HTT_NAMES]


def __getattr__(name: str) -> Any:
    # htt.py pulls in the learners; import it on first use so the package imports without it.
    if name in _HTT_NAMES:
        from distsim.stats import htt as _htt_module

        return getattr(_htt_module, name)
    raise AttributeError(f"module 'distsim.stats' has no attribute {name!r}")
