"""The ``[train]`` section: :class:`TrainConfig`, how every seed of a pack is trained, its
constraint table and the defaults per architecture kind.

Plain data (no torch): :mod:`distsim.zoo.train` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from distsim.errors import ConfigError
from distsim.params import Array, Flag, Integer, Number, Options, Table, check_fields

OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TrainConfig:
    """How every seed of a pack is trained (shared by the pack; the seed sets init and batch order).

    epochs, batch_size: passes over the training set and samples per step.
    lr, momentum, weight_decay, nesterov: SGD (``torch.optim.SGD`` semantics, dampening 0).
    optimizer: ``sgd`` | ``adam`` (``betas``, ``eps`` as ``torch.optim.Adam``; momentum unused).
    milestones, gamma: lr is multiplied by gamma after each listed epoch (``MultiStepLR``).
    device: ``cpu`` | ``cuda`` | ``auto`` (cuda when available). dtype: ``float32`` | ``float64``.
    eval_batch: most samples per forward pass when evaluating (also capped so that the pack's
        copies of one evaluation batch fit GATHER_BYTES).
    test_history: also evaluate the test split after every epoch (SeedResult.history's test
        columns; without it only the last epoch has them, from the final evaluation). It costs
        a forward pass over the test split per epoch (benchmarks/bench_history.py).
    init_scale: every weight matrix and kernel (a parameter of 2 or more dimensions; biases
        are left, a transformer's per-head b_Q, b_K, b_V included) of the freshly initialized
        network is multiplied by it: the initialization's scale, a factor a [sweep] can vary.
    save_epochs: the epochs whose checkpoints are kept besides the last (0 = the
        initialization): each is a model of its own (``<arch>-t<task>-s<seed>-e<epoch>``,
        models.epoch), and the features, pairs and tests are computed per epoch.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"
    eval_batch: int = 4096
    test_history: bool = False
    init_scale: float = 1.0
    save_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "train", TRAIN_PARAMS)
        if list(self.save_epochs) != sorted(set(self.save_epochs)):
            raise ConfigError.at("train.save_epochs",
                                 f"must be increasing epochs, got {list(self.save_epochs)!r}")
        if self.save_epochs and self.save_epochs[-1] > self.epochs:
            raise ConfigError.at("train.save_epochs", f"epoch {self.save_epochs[-1]} is after "
                                 f"the last (train.epochs = {self.epochs})")
        if self.nesterov and self.momentum == 0:
            raise ConfigError.at("train.nesterov", "needs train.momentum > 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError.at("train.milestones",
                                 f"must be increasing epochs, got {list(self.milestones)!r}")


TRAIN_PARAMS: Table = {
    "epochs": Integer(lo=1),
    "batch_size": Integer(lo=1),
    "lr": Number(lo=0.0, lo_open=True),
    "momentum": Number(lo=0.0, hi=1.0, hi_open=True),
    "weight_decay": Number(lo=0.0),
    "nesterov": Flag(),
    "optimizer": Options(OPTIMIZERS),
    "betas": Array(Number(lo=0.0, hi=1.0, hi_open=True), size=2),
    "eps": Number(lo=0.0, lo_open=True),
    "milestones": Array(Integer(lo=1)),
    "gamma": Number(lo=0.0, hi=1.0, lo_open=True),
    "device": Options(DEVICES),
    "dtype": Options(DTYPES),
    "eval_batch": Integer(lo=1),
    "test_history": Flag(),
    "init_scale": Number(lo=0.0, lo_open=True),
    "save_epochs": Array(Integer(lo=0)),
}


# Defaults per architecture kind for digits-size tasks (~270 training images): >= 95% mean test
# accuracy on 10 digits pair-tasks in a few seconds per pack (see benchmarks/zoo_accuracy.py).
DEFAULT_TRAIN: dict[str, TrainConfig] = {
    "mlp": TrainConfig(epochs=10, batch_size=32, lr=0.05, momentum=0.9),
    "cnn": TrainConfig(epochs=10, batch_size=32, lr=0.05, momentum=0.9),
    "rnn": TrainConfig(epochs=10, batch_size=32, lr=0.1, momentum=0.9),
    "resnet": TrainConfig(epochs=10, batch_size=32, lr=0.05, momentum=0.9),
    "transformer": TrainConfig(epochs=10, batch_size=32, lr=0.003, optimizer="adam"),
}
