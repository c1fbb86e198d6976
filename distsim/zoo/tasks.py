"""Offline tasks of a zoo: class-pair tasks of digits, MNIST-1D or a user's .npz, and synthetic
mixtures.

A *task* is a small labelled dataset that many networks are trained on. Every task is built
from a :class:`DataConfig` alone, with numpy's seeded generators, so building it twice gives
bit-identical arrays (no downloads; the one global random state used, MNIST-1D's generator's,
is seeded and restored around it).

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes). A task is a pair of
  classes (45 possible) relabelled 0/1; images are (1, 8, 8) float32 in [0, 1].
- ``mnist1d``: MNIST-1D (Greydanus & Kobak; distsim.zoo.datasets), generated locally by the
  ``mnist1d`` package and cached; its train and test split are merged into one pool of 5000
  signals by default (10 classes), tasks are class pairs as for digits; samples are (1, 40)
  float32.
- ``npz``: a user's file with arrays ``X`` (N, C, H, W), (N, H, W) or (N, D) and integer ``y``
  (N,); tasks are class pairs as for digits (uint8 images are scaled to [0, 1]).
- ``synthetic``: seeded Gaussian-mixture tasks of any shape and number of classes, for fast
  tests and scale benchmarks.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distsim.config.data import DataConfig
from distsim.zoo.datasets import load_mnist1d


@dataclass(frozen=True, eq=False)
class Task:
    """One labelled dataset: x_* float32 (N, C, H, W) (mnist1d: (N, C, L)), y_* int64 (N,)
    with labels 0..k-1.

    classes: the original class ids behind labels 0..k-1 (label i is classes[i]).
    """

    task_id: int
    name: str
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one sample, (C, L) for 1-D signals."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def make_tasks(cfg: DataConfig) -> list[Task]:
    """The cfg.num_tasks tasks of a study, in a fixed order (task_id = position)."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"make_tasks() takes a DataConfig, got {type(cfg).__name__}")
    if cfg.dataset == "synthetic":
        return [_synthetic_task(cfg, i) for i in range(cfg.num_tasks)]
    x, y, prefix = _class_pool(cfg)
    return _pair_tasks(cfg, x, y, prefix)


def study_inputs(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every input of a study's data with a class id, x (N, C, H, W) or (N, C, L) float32 and
    y (N,) int64: the whole dataset for digits, mnist1d and npz (all classes, not only the
    tasks'), the tasks' samples for synthetic (class = task x classes + label). The pool a
    study's CKA probe is drawn from."""
    if cfg.dataset != "synthetic":
        x, y, _ = _class_pool(cfg)
        return x, y
    tasks = make_tasks(cfg)
    x = np.concatenate([np.concatenate([t.x_train, t.x_test]) for t in tasks])
    y = np.concatenate([t.task_id * t.num_classes + np.concatenate([t.y_train, t.y_test])
                        for t in tasks])
    return x, y


def _class_pool(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """The labelled samples class-pair tasks are drawn from, x float32 and y int64 (N,), and
    the prefix of the tasks' names."""
    if cfg.dataset == "digits":
        return (*digits(), "digits")
    if cfg.dataset == "mnist1d":
        return (*load_mnist1d(cfg.mnist1d_args()), "mnist1d")
    path = cfg.path
    assert path is not None  # DataConfig requires a path for npz
    return (*_load_npz(path), Path(path).stem)


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images x (1797, 1, 8, 8) float32 in [0, 1], labels y
    (1797,) int64 (no download)."""
    from sklearn.datasets import load_digits  # sklearn only when digits are asked for

    data = load_digits()
    x = (data.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return x, data.target.astype(np.int64)


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """X as float32 (N, C, H, W) and y as int64 (N,) from a user's .npz."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.path: no such file {str(p)!r}")
    try:
        with np.load(p, allow_pickle=False) as f:
            files = sorted(f.files)
            x = f["X"] if "X" in files else None
            y = f["y"] if "y" in files else None
    except Exception as exc:  # zip/pickle/format errors all mean "not a usable .npz"
        raise ValueError(f"data.path: cannot read {str(p)!r} as .npz ({exc})") from exc
    if x is None or y is None:
        raise ValueError(f"data.path: {str(p)!r} must hold arrays 'X' and 'y', has {files}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError("data.path: y must be a 1-D integer array, "
                         f"got shape {y.shape} dtype {y.dtype}")
    if x.shape[:1] != y.shape:
        raise ValueError(f"data.path: X has {x.shape[0] if x.ndim else 0} samples "
                         f"but y has {y.shape[0]}")
    if x.ndim not in (2, 3, 4):
        raise ValueError("data.path: X must be (N, D), (N, H, W) or (N, C, H, W), "
                         f"got shape {x.shape}")
    scale = np.float32(255.0) if x.dtype == np.uint8 else np.float32(1.0)
    x = x.astype(np.float32) / scale
    if not np.isfinite(x).all():
        raise ValueError(f"data.path: X of {str(p)!r} holds non-finite values")
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    return np.ascontiguousarray(x), y.astype(np.int64)


def _pair_tasks(cfg: DataConfig, x: np.ndarray, y: np.ndarray, prefix: str) -> list[Task]:
    classes = np.unique(y)
    if cfg.pairing == "consecutive":
        pairs = [(int(classes[2 * i]), int(classes[2 * i + 1])) for i in range(len(classes) // 2)]
    else:
        pairs = [(int(a), int(b)) for a, b in itertools.combinations(classes, 2)]
    if cfg.num_tasks > len(pairs):
        raise ValueError(
            f"data.num_tasks={cfg.num_tasks} is more than the {len(pairs)} {cfg.pairing} "
            f"class pairs of {prefix} ({len(classes)} classes)"
        )
    if cfg.pairing == "random":
        rng = np.random.default_rng([cfg.seed, 0])
        chosen = np.sort(rng.choice(len(pairs), size=cfg.num_tasks, replace=False))
        pairs = [pairs[i] for i in chosen]
    else:
        pairs = pairs[: cfg.num_tasks]
    tasks = []
    for task_id, (a, b) in enumerate(pairs):
        idx = np.flatnonzero((y == a) | (y == b))
        labels = (y[idx] == b).astype(np.int64)
        rng = np.random.default_rng([cfg.seed, 1, a, b])
        train, test = _stratified_split(labels, cfg.test_fraction, rng, f"{prefix}:{a}v{b}")
        tasks.append(
            Task(
                task_id=task_id,
                name=f"{prefix}:{a}v{b}",
                classes=(a, b),
                x_train=x[idx[train]],
                y_train=labels[train],
                x_test=x[idx[test]],
                y_test=labels[test],
            )
        )
    return tasks


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of a stratified train/test split.

    Each class of n_c samples gives round(test_fraction * n_c) test samples, kept in [1, n_c - 1].
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise ValueError(
                f"task {name}: class {int(c)} has {len(idx)} samples, too few for a train/test "
                "split (need >= 2: one on each side)"
            )
        n_test = min(max(1, int(round(test_fraction * len(idx)))), len(idx) - 1)
        perm = rng.permutation(idx)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _synthetic_task(cfg: DataConfig, task_id: int) -> Task:
    """Gaussian mixture: class means ~ N(0, sep^2 / D) per feature plus N(0, 1) noise.

    Samples are (N, C, H, W).
    """
    k, shape, n = cfg.synthetic_classes, cfg.synthetic_shape, cfg.synthetic_samples
    dim = math.prod(shape)
    rng = np.random.default_rng([cfg.seed, 2, task_id])
    means = rng.normal(size=(k, dim)) * (cfg.synthetic_separation / math.sqrt(dim))
    # Two means lie ~ sep * sqrt(2) apart whatever D; the noise along that direction has sd 1.
    labels = np.repeat(np.arange(k, dtype=np.int64), n)
    samples = means[labels] + rng.normal(size=(k * n, dim))
    x = samples.astype(np.float32).reshape(k * n, *shape)
    train, test = _stratified_split(labels, cfg.test_fraction, rng, f"synthetic:{task_id}")
    return Task(
        task_id=task_id,
        name=f"synthetic:{task_id}",
        classes=tuple(range(k)),
        x_train=x[train],
        y_train=labels[train],
        x_test=x[test],
        y_test=labels[test],
    )
