"""Study files for tests, built from dicts instead of pasted TOML.

``study_toml(**sections)`` gives the TOML text of a small default study, ``DEFAULT_STUDY``:
synthetic data (2 tasks), one tiny mlp (``widths = [4]``), 3 seeds per task, 1 epoch, store
folder ``"store"`` (relative to the study file). Each keyword names one top-level section
(``study``, ``data``, ``arch``, ``train``, ``resources``, ``features``, ``tests``, ``pairs``, or
any other name, for tests of unknown sections) and says what happens to it:

* a dict **merges into** the section: each of its keys replaces that key of the section (a
  nested table such as ``train={"gru": {...}}`` is one key, replaced whole, not merged), a key
  given as ``None`` is removed (TOML has no null), and other keys of the section stay. A
  section the base lacks, or one that is not a table there, becomes the dict (``None`` keys
  dropped).
* ``None`` removes the section (``tests=None``; ``train=None`` for a missing-section test).
* anything else (a list such as ``arch=[...]``, or a scalar for a section written as a plain
  value) **replaces** the section as given.

The base is ``DEFAULT_STUDY`` unless a full study dict is passed first, positionally:
``study_toml(SMALL, train={"epochs": 0})`` applies the same rules on top of ``SMALL``.
``study_dict`` gives the merged dict instead of its text, to be used as such a base.
The text is written by ``tomli_w``: sections in the base's order (new ones at the end), plain
top-level values first.

``FINISHED_STUDY`` is the study of the finished store that the fast tests share (launched once
per session by the ``finished_study`` fixture of ``tests/conftest.py``).

Tests import these from here where they need them at import time (module constants,
``parametrize`` tables, module-scoped fixtures); ``tests/conftest.py`` also offers
``study_toml`` as a fixture.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import tomli_w

DEFAULT_STUDY: dict[str, Any] = {
    "study": {"name": "test", "store": "store"},
    "data": {"dataset": "synthetic", "num_tasks": 2},
    "arch": [{"kind": "mlp", "widths": [4]}],
    "train": {"seeds_per_task": 3, "epochs": 1},
}


# The finished store the fast tier shares (tests/conftest.py: `finished_study`, launched once per
# session): 4 synthetic tasks x 3 seeds of a tiny mlp, cnn (with a hidden head layer) and
# 2-layer rnn, 4 epochs, raw + chain-gram features of the last layer, 9 permutations, top-2
# neighbours in tiles of 4 models.
FINISHED_STUDY: dict[str, Any] = {
    "study": {"name": "three", "store": "store"},
    "data": {"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 40,
             "synthetic_separation": 1.5},
    "arch": [{"name": "mlp", "kind": "mlp", "widths": [6, 5]},
             {"name": "cnn", "kind": "cnn", "channels": [3, 2], "head_widths": [4]},
             {"name": "rnn", "kind": "rnn", "hidden": 4, "num_layers": 2}],
    "train": {"seeds_per_task": 3, "seeds_per_trial": 3, "epochs": 4, "batch_size": 16},
    "features": {"methods": ["raw", "chain-gram"], "layers": "last"},
    "tests": {"permutations": 9, "permanova_permutations": 9, "chunk_size": 5},
    "pairs": {"top_k": 2, "block": 4},
}


def study_dict(base: Mapping[str, Any] | None = None, /, **sections: Any) -> dict[str, Any]:
    """`base` (default `DEFAULT_STUDY`) with each keyword section merged, replaced or removed.

    See the module docstring for the rules. Neither `base` nor the arguments are modified.
    """
    study = copy.deepcopy(dict(DEFAULT_STUDY if base is None else base))
    for name, value in sections.items():
        if value is None:
            study.pop(name, None)
        elif isinstance(value, Mapping):
            old = study.get(name)
            merged = dict(old) if isinstance(old, Mapping) else {}
            merged.update(copy.deepcopy(dict(value)))
            study[name] = {k: v for k, v in merged.items() if v is not None}
        else:
            study[name] = copy.deepcopy(value)
    return study


def study_toml(base: Mapping[str, Any] | None = None, /, **sections: Any) -> str:
    """TOML text of `study_dict(base, **sections)`: the default study unless told otherwise."""
    return tomli_w.dumps(study_dict(base, **sections))
