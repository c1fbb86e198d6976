"""The ``[zoo]`` section: where a study's models come from, and its constraint table.

``source = "train"`` (the default, also when the section is absent): the zoo stage trains the
models of ``[data]`` x ``[[arch]]`` x ``[train]``. ``source = "import"``: it reads them from a zoo
someone else trained, at ``path``, in one of :data:`~distsim.config.choices.FORMATS`
(distsim.zoo.sources describes each layout); ``[[arch]]`` then declares the network, with its
``input_shape`` and ``num_classes``, and there is no ``[train]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from distsim.config.choices import FORMATS, SOURCES
from distsim.errors import ConfigError
from distsim.params import Array, Either, Integer, Maybe, Options, Table, Text, check_fields


@dataclass(frozen=True)
class ZooSpec:
    """Where the models come from: trained by the zoo stage, or imported from a zoo someone
    else trained (then ``[[arch]]`` declares the network, with ``input_shape`` and
    ``num_classes``, and the study has no ``[train]``).

    source: "train" (the default: ``[data]`` x ``[[arch]]`` x ``[train]``) or "import".
    format: the import's layout: "model-zoos" (Model Zoos: Ray Tune trial folders of
    ``checkpoint_<epoch>/checkpoints`` and ``result.json``), "weights-table" (Small CNN Zoo:
    ``weights.npy``, ``layout.csv``, ``metrics.csv[.gz]``), "state-dicts" (``.pt`` /
    ``.safetensors`` files with a manifest or folder labels) or "distsim-export" (what
    ``distsim export`` writes).
    path: the zoo's folder, relative to the study file's folder unless absolute.
    epochs: which checkpoints of each model: "last", "all" (each (model, epoch) one row) or a
    list of epochs.
    manifest: state-dicts: the manifest file (default: manifest.csv or manifest.parquet).
    labels: state-dicts without a manifest: "folder" (a file's label is its folder's name).
    pack_size: checkpoints one Ray task reads and stores together.
    """

    source: str = "train"
    format: str | None = None
    path: str | None = None
    epochs: str | tuple[int, ...] = "last"
    manifest: str | None = None
    labels: str | None = None
    pack_size: int = 256

    def __post_init__(self) -> None:
        check_fields(self, "zoo", ZOO_PARAMS)
        if self.source == "train":
            given = [k for k in ("format", "path", "manifest", "labels") if getattr(self, k)]
            if given or self.epochs != "last" or self.pack_size != 256:
                key = given[0] if given else ("epochs" if self.epochs != "last" else "pack_size")
                raise ConfigError.at(f"zoo.{key}", 'applies only to zoo.source = "import"')
            return
        for key in ("format", "path"):
            if getattr(self, key) is None:
                raise ConfigError.at(f"zoo.{key}", 'missing required key (zoo.source = "import")')
        if self.format != "state-dicts":
            for key in ("manifest", "labels"):
                if getattr(self, key) is not None:
                    raise ConfigError.at(f"zoo.{key}", 'applies only to format = "state-dicts"')
        if self.manifest is not None and self.labels is not None:
            raise ConfigError.at("zoo.labels", "give zoo.manifest or zoo.labels, not both")

    @property
    def imports(self) -> bool:
        return self.source == "import"


ZOO_PARAMS: Table = {
    "source": Options(SOURCES),
    "format": Maybe(Options(FORMATS)),
    "path": Maybe(Text(empty=False)),
    "epochs": Either((Options(("last", "all")), Array(Integer(lo=0), nonempty=True,
                                                        distinct=True)),
                     '"last", "all" or a non-empty list of distinct epochs'),
    "manifest": Maybe(Text(empty=False)),
    "labels": Maybe(Options(("folder",))),
    "pack_size": Integer(lo=1),
}
