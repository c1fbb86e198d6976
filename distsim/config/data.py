"""The ``[data]`` section: :class:`DataConfig`, which tasks a study trains on, with its
constraint table, and :class:`MNIST1DArgs`, the MNIST-1D generator's arguments.

Plain data (no torch): :mod:`distsim.zoo.tasks` builds the tasks from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distsim.errors import ConfigError
from distsim.params import Array, Integer, Maybe, Number, Options, Table, Text, check_fields

MNIST1D_SHAPE = (1, 40)  # one sample: 1 channel x 40 positions
MNIST1D_CLASSES = 10


@dataclass(frozen=True)
class MNIST1DArgs:
    """The arguments of ``mnist1d.data.make_dataset`` that distsim exposes (the package's
    defaults); the rest (template length 12, padding [36, 60], 40 positions, no sequence
    shuffle) stay the package's.

    samples: signals in all, samples // 10 per class; seed: the generator's seed;
    scale_coeff: amplitude scaled by 1 + scale_coeff * U(-0.5, 0.5); max_translation: circular
    shift by U{0, ..., max_translation - 1}; corr_noise_scale, iid_noise_scale: sd of the
    smoothed and of the iid Gaussian noise; shear_scale: a linear trend of slope
    shear_scale * U(-0.5, 0.5).
    """

    samples: int = 5000
    seed: int = 42
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 0.02
    shear_scale: float = 0.75

    def package_args(self) -> dict[str, Any]:
        """The full argument dict of make_dataset: the package's defaults with ours on top
        (without its download url)."""
        from mnist1d.data import get_dataset_args

        args = dict(get_dataset_args(as_dict=True))
        args.pop("url", None)
        args.update(num_samples=self.samples, seed=self.seed, scale_coeff=self.scale_coeff,
                    max_translation=self.max_translation,
                    corr_noise_scale=self.corr_noise_scale,
                    iid_noise_scale=self.iid_noise_scale, shear_scale=self.shear_scale)
        return args

    @property
    def num_samples(self) -> int:
        """Samples the generator gives: samples // 10 per class."""
        return self.samples // MNIST1D_CLASSES * MNIST1D_CLASSES

DATASETS = ("digits", "synthetic", "npz", "mnist1d")
MNIST1D_PREFIX = "mnist1d_"  # the [data] keys of the mnist1d generator (MNIST1DArgs fields)
_MNIST1D = MNIST1DArgs()  # the package's defaults
PAIRINGS = ("random", "consecutive")


@dataclass(frozen=True)
class DataConfig:
    """Which tasks a study trains on.

    dataset: ``digits`` | ``synthetic`` | ``npz`` | ``mnist1d``.
    num_tasks: how many tasks; for class pairs at most C(classes, 2) (``random``) or
        classes // 2 (``consecutive``).
    seed: picks the pairs (``random``), the train/test splits and the synthetic samples.
    test_fraction: share of each class held out for testing (stratified), in (0, 1).
    pairing: ``random`` (num_tasks pairs drawn from all pairs by the seed) or ``consecutive``
        (classes (0, 1), (2, 3), ... as in the paper's CIFAR-100 protocol).
    path: the .npz file for ``npz``.
    synthetic_*: classes per task, sample shape (C, H, W), samples per class and the distance
        scale between class means (larger = easier) of the synthetic mixtures.
    mnist1d_*: the MNIST-1D generator's arguments (distsim.zoo.datasets.MNIST1DArgs, defaults the
        package's): samples (a multiple of 10, 5000), seed (42), scale_coeff, max_translation,
        corr_noise_scale, iid_noise_scale, shear_scale. Only with dataset = "mnist1d".
    """

    dataset: str = "digits"
    num_tasks: int = 10
    seed: int = 0
    test_fraction: float = 0.25
    pairing: str = "random"
    path: str | None = None
    synthetic_classes: int = 2
    synthetic_shape: tuple[int, int, int] = (1, 8, 8)
    synthetic_samples: int = 100
    synthetic_separation: float = 3.0
    mnist1d_samples: int = _MNIST1D.samples
    mnist1d_seed: int = _MNIST1D.seed
    mnist1d_scale_coeff: float = _MNIST1D.scale_coeff
    mnist1d_max_translation: int = _MNIST1D.max_translation
    mnist1d_corr_noise_scale: float = _MNIST1D.corr_noise_scale
    mnist1d_iid_noise_scale: float = _MNIST1D.iid_noise_scale
    mnist1d_shear_scale: float = _MNIST1D.shear_scale

    def __post_init__(self) -> None:
        check_fields(self, "data", DATA_PARAMS)
        if self.dataset == "npz" and not self.path:
            raise ConfigError.at("data.path", "must name an .npz file when data.dataset is 'npz'")
        if self.dataset != "npz" and self.path is not None:
            raise ConfigError.at(
                "data.path", f'only used with dataset = "npz", got dataset = {self.dataset!r}')
        if self.mnist1d_samples % 10:
            raise ConfigError.at("data.mnist1d_samples", "must be a multiple of 10 (as many "
                                 f"samples of each of the 10 classes), got {self.mnist1d_samples}")
        if self.dataset != "mnist1d":
            for key, value in dataclasses.asdict(self.mnist1d_args()).items():
                if value != getattr(_MNIST1D, key):
                    raise ConfigError.at(f"data.{MNIST1D_PREFIX}{key}", 'only used with dataset = '
                                         f'"mnist1d", got dataset = {self.dataset!r}')

    def mnist1d_args(self) -> MNIST1DArgs:
        """The MNIST-1D generator's arguments: the mnist1d_* fields without their prefix."""
        return MNIST1DArgs(**{f.name: getattr(self, MNIST1D_PREFIX + f.name)
                              for f in dataclasses.fields(MNIST1DArgs)})

    def resolved(self) -> dict[str, Any]:
        """Every field by name, the mnist1d_* ones only with dataset = "mnist1d": a study on
        other data resolves (and hashes) as before these keys existed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if self.dataset == "mnist1d" or not f.name.startswith(MNIST1D_PREFIX)}


DATA_PARAMS: Table = {
    "dataset": Options(DATASETS),
    "num_tasks": Integer(lo=1),
    "seed": Integer(lo=0),
    "test_fraction": Number(lo=0, hi=1, lo_open=True, hi_open=True),
    "pairing": Options(PAIRINGS),
    "path": Maybe(Text(empty=False)),
    "synthetic_classes": Integer(lo=2),
    "synthetic_shape": Array(Integer(lo=1), size=3),
    "synthetic_samples": Integer(lo=2),
    "synthetic_separation": Number(lo=0, lo_open=True),
    "mnist1d_samples": Integer(lo=20),
    "mnist1d_seed": Integer(lo=0, hi=2**32 - 1),
    "mnist1d_scale_coeff": Number(lo=0, hi=2, hi_open=True),
    "mnist1d_max_translation": Integer(lo=1),
    "mnist1d_corr_noise_scale": Number(lo=0),
    "mnist1d_iid_noise_scale": Number(lo=0),
    "mnist1d_shear_scale": Number(lo=0),
}
