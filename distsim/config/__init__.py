"""The study file: one TOML file parsed into a frozen, typed, validated :class:`Study`.

A study says which tasks, which architectures, how to train (or which zoo to import), how to
featurize and how to test. Its sections map onto dataclasses, each with one constraint table
(distsim.params) that says what its keys accept:

    [study]      name, seed, store                      config.sections.STUDY_PARAMS
    [zoo]        config.zoo.ZooSpec: trained (default) or imported (format, path, epochs)
                                                        zoo.ZOO_PARAMS
    [data]       distsim.zoo.tasks.DataConfig               tasks.DATA_PARAMS
    [[arch]]     distsim.zoo.models.ArchConfig (one or more; input_shape and num_classes come
                 from the tasks)                        models.ARCH_PARAMS
    [train]      seeds_per_task, seeds_per_trial        config.sections.PLAN_PARAMS
                 + distsim.zoo.train.TrainConfig            train.TRAIN_PARAMS
                 [train.<arch name>] overrides TrainConfig fields for one architecture
    [resources]  config.sections.Resources              RESOURCE_PARAMS
    [features]   config.sections.FeatureSpec            FEATURE_PARAMS
    [tests]      config.sections.StatsSpec              STATS_PARAMS
    [pairs]      config.sections.PairSpec               PAIR_PARAMS

Every bad input raises :class:`~distsim.errors.ConfigError`, one line naming the key path,
e.g. ``train.seeds_per_trial: must be an integer in [1, 16] (train.seeds_per_task), got 20``.
"""

from distsim.config.loader import load_study, parse_study, study_from_dict
from distsim.config.sections import FeatureSpec, PairSpec, Resources, StatsSpec
from distsim.config.study import MatrixKey, Pack, Study, TrainPlan
from distsim.errors import ConfigError

__all__ = [
    "ConfigError",
    "FeatureSpec",
    "MatrixKey",
    "Pack",
    "PairSpec",
    "Resources",
    "StatsSpec",
    "Study",
    "TrainPlan",
    "load_study",
    "parse_study",
    "study_from_dict",
]
