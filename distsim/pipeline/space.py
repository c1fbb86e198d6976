"""What a study's store takes on disk: an estimate from the study, and the launch's check that
the store's filesystem can hold it.

:func:`estimate` adds, table by table, the rows a trained study writes times their bytes, each
shard rounded up to the filesystem's block: weights (4 bytes per parameter of every model and
saved epoch; the parameters counted on one model of each arch, sized for task 0's samples),
features (4 bytes per value; each matrix's width D measured on that freshly built model, or
``features.dim``, or n(n+1)/2 for cka's probe of n inputs, raw's width for aligned: at most 4%
over, on the quickstart's and the ResNet and transformer jobs' archs), templates, models and history
rows, neighbours (``pairs.top_k`` per model and matrix), pairs tiles and tests (their null
distributions). A shard's footer and a row's ids are measured constants (below). An import
study's size depends on its source and is not estimated.

The check (:func:`check_space`, before Ray starts) refuses a store whose filesystem has less
free space than the study still needs (its estimate less what the store holds), in one line;
``distsim launch --no-space-check`` skips it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from distsim.config import Study
from distsim.errors import StoreError

FOOTER = 3072  # bytes of a shard's parquet footer and schema, about
WIDE = {"models": 2048, "tests": 2048}  # more for the tables of many columns
ROW = {"weights": 40, "models": 200, "history": 32, "features": 64, "neighbors": 10,
       "pairs": 60, "tests": 600}  # bytes of a row's ids and scalars, about, after compression
MB = 1e6


def estimate(study: Study) -> dict[str, int] | None:
    """Bytes a trained study's finished store takes, per table (None for an import study).

    >>> from distsim.config import study_from_dict
    >>> s = study_from_dict({"study": {"name": "s", "store": "/tmp/s"},
    ...                  "data": {"dataset": "synthetic", "num_tasks": 4},
    ...                  "arch": [{"kind": "mlp", "widths": [8]}],
    ...                  "train": {"seeds_per_task": 4, "seeds_per_trial": 4}})
    >>> sizes = estimate(s)
    >>> sorted(sizes)[:3], sizes["weights"] > 16 * 4 * 8
    (['features', 'history', 'models'], True)
    """
    if study.imports or study.train is None or study.data is None:
        return None
    out = dict.fromkeys(("weights", "templates", "models", "history", "features", "neighbors",
                         "pairs", "tests"), 0)
    spec, tests_per_matrix = study.features, _tests_per_matrix(study)
    for name in study.arch_names:
        packs = study.packs(name)
        epochs = len(study.saved_epochs(name))
        models = sum(len(p.seeds) for p in packs) * epochs
        n_params, widths = _arch_sizes(study, name)
        train = study.train_config(name)
        out["weights"] += sum(_shard(len(p.seeds) * epochs * (4 * n_params + ROW["weights"]))
                              for p in packs)
        out["models"] += sum(_shard(len(p.seeds) * epochs * ROW["models"], "models")
                             for p in packs)
        out["history"] += sum(_shard(len(p.seeds) * train.epochs * ROW["history"])
                              for p in packs)
        if "aligned" in spec.methods:
            out["templates"] += _shard(4 * n_params)
        for (_, _), d in widths.items():
            for _ in range(epochs):
                out["features"] += sum(_shard(len(p.seeds) * (4 * d + ROW["features"]))
                                       for p in packs)
                blocks = math.ceil(models / epochs / study.pairs.block)
                out["neighbors"] += blocks * FOOTER + _up(models // epochs * study.pairs.top_k
                                                          * ROW["neighbors"])
                out["pairs"] += blocks * _shard(ROW["pairs"] * (blocks + 1) // 2)
                out["tests"] += tests_per_matrix * _shard(
                    ROW["tests"] + 8 * max(study.tests.permutations,
                                           study.tests.permanova_permutations), "tests")
    return out


def stored_bytes(root: Path) -> int:
    """Bytes the files under `root` take on disk (0 when it does not exist)."""
    total = 0
    for folder, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_blocks * 512
            except OSError:
                continue  # removed while we walked
    return total


def free_bytes(root: Path) -> tuple[int, int, Path]:
    """(free bytes for this user, total bytes, mount point) of the filesystem that holds
    `root`, or would hold it (that of its nearest existing parent)."""
    path = root.expanduser().resolve()
    while not path.exists():
        path = path.parent
    usage = shutil.disk_usage(path)
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return usage.free, usage.total, path


def still_needed(study: Study, root: Path, fresh: bool = False) -> int | None:
    """Bytes the study still needs to write: its estimate less what the store holds (all of
    it with ``fresh``, whose store is wiped first); None for an import study."""
    sizes = estimate(study)
    if sizes is None:
        return None
    held = 0 if fresh else stored_bytes(root)
    return max(0, sum(sizes.values()) - held)


def space_line(study: Study, root: Path) -> str:
    """"<fs> has X MB free of Y MB; the study needs about Z MB more" (the ENOSPC line's part)."""
    free, total, where = free_bytes(root)
    need = still_needed(study, root)
    more = "" if need is None else f"; the study needs about {need / MB:,.1f} MB more"
    return f"{where} has {free / MB:,.1f} MB free of {total / MB:,.1f} MB{more}"


def check_space(study: Study, fresh: bool = False) -> str:
    """Refuse (StoreError, one line) a store whose filesystem cannot hold what the study still
    needs; returns a one-line note otherwise."""
    root = Path(study.store).expanduser().resolve()
    sizes = estimate(study)
    if sizes is None:
        return "space: not estimated (an import study's size depends on its source)"
    need = still_needed(study, root, fresh)
    assert need is not None
    free, _, where = free_bytes(root)
    if fresh:
        free += stored_bytes(root)
    total = sum(sizes.values())
    if need > free:
        parts = ", ".join(f"{t} {b / MB:,.1f} MB" for t, b in
                          sorted(sizes.items(), key=lambda kv: -kv[1]) if b >= total / 100)
        raise StoreError(
            f"study.store {str(root)!r}: its filesystem (at {where}) has {free / MB:,.1f} MB free "
            f"and the study needs about {need / MB:,.1f} MB more (the whole store about "
            f"{total / MB:,.1f} MB: {parts}); free space, set study.store to a larger disk, or "
            "launch with --no-space-check to go on anyway")
    return (f"space: the store needs about {need / MB:,.1f} MB more of the {free / MB:,.1f} MB "
            f"free on {where}")


def _tests_per_matrix(study: Study) -> int:
    spec = study.tests
    if spec.factors is None:
        from distsim.pipeline.groups import study_tests

        return len(study_tests(study, None))
    return len(spec.factors) * (len(spec.protocols) + 1) + len(spec.terms)


def _arch_sizes(study: Study, name: str) -> tuple[int, dict[tuple[str, str], int]]:
    """(parameters of one model, {(method, layer): feature width}) of arch `name`, measured on
    one model built for task 0 (a torch import, and a second or so per arch)."""
    import numpy as np
    import torch

    from distsim.pipeline.zoo import pack_arch
    from distsim.weights.features import weight_features_batch
    from distsim.zoo.models import build

    spec = study.features
    arch = pack_arch(study, name, 0)
    torch.manual_seed(0)
    sd = {k: v.detach() for k, v in build(arch).state_dict().items()}
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    widths: dict[tuple[str, str], int] = {}
    for layer in study.feature_layers(name):
        for method in spec.methods:
            if spec.dim is not None and (spec.sketch == "output" or method == "raw"):
                widths[method, layer] = spec.dim
            elif method == "cka":
                widths[method, layer] = spec.probe_size * (spec.probe_size + 1) // 2
            else:  # aligned: raw's width (the same weights permuted; 0-4% over, measured)
                x = weight_features_batch([sd], arch, "raw" if method == "aligned" else method,
                                          layer, spec.dim, spec.seed, spec.sketch,
                                          spec.projection)
                widths[method, layer] = int(np.shape(x)[1])
    return n_params, widths


def _shard(payload: int, table: str = "") -> int:
    return _up(payload + FOOTER + WIDE.get(table, 0))


def _up(n: int, block: int = 4096) -> int:
    return -(-n // block) * block
