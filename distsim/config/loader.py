"""Read a study TOML file (or an already-parsed mapping) into a validated :class:`Study`.

The loader checks the file's shape (sections, unknown keys, required keys) and builds each
section's dataclass, whose constraint table checks every value once (distsim.params). Paths
(``study.store``, ``data.path``) resolve against the TOML's folder unless absolute or a URI.
``None`` values (JSON null) count as "not given", so ``study_from_dict(study.resolved())``
rebuilds the same study.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from distsim.config.arch import KINDS, ArchConfig
from distsim.config.data import MNIST1D_SHAPE, DataConfig
from distsim.config.sections import (
    PLAN_PARAMS,
    STUDY_PARAMS,
    SWEEP_PARAMS,
    FeatureSpec,
    PairSpec,
    Resources,
    StatsSpec,
)
from distsim.config.study import Study, TrainPlan
from distsim.config.training import TrainConfig
from distsim.config.zoo import ZooSpec
from distsim.errors import ConfigError
from distsim.params import check_keys, init_fields, type_name

SECTIONS = ("study", "zoo", "data", "arch", "train", "sweep", "resources", "features", "tests",
            "pairs")
_NPZ_PLACEHOLDER_SHAPE = (1, 1024, 1024)  # passes shape checks until the npz is read at launch

T = TypeVar("T")


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file; relative paths inside resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such study file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the study file ({exc})") from None
    return parse_study(text, base_dir=p.resolve().parent, source=str(p))


def parse_study(text: str, base_dir: str | Path = ".", source: str = "<string>") -> Study:
    """Validate TOML text (relative paths resolve against base_dir)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from None
    return study_from_dict(raw, base_dir=base_dir, source=source)


def study_from_dict(raw: dict[str, Any], base_dir: str | Path = ".",
                    source: str = "<dict>") -> Study:
    """Validate an already-parsed study mapping (same rules as the TOML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a study must be a table of sections, got {type(raw).__name__}")
    raw = _drop_none(raw)
    base = Path(base_dir).resolve()
    check_keys(raw, SECTIONS, "")
    zoo = _section(ZooSpec, _table(raw, "zoo", optional=True), "zoo")
    required = ("study", "arch") if zoo.imports else ("study", "data", "arch", "train")
    for key in required:
        if key not in raw:
            raise ConfigError.at(key, f"missing section [{key}]")
    for key in ("train", "sweep"):
        if zoo.imports and key in raw:
            raise ConfigError.at(key, 'an import study (zoo.source = "import") trains nothing; '
                                 f"remove [{key}]")

    st = _table(raw, "study")
    check_keys(st, STUDY_PARAMS, "study")
    for key in ("name", "store"):
        if key not in st:
            raise ConfigError.at(f"study.{key}", "missing required key")
    name = STUDY_PARAMS["name"].check(st["name"], "study.name")
    seed = STUDY_PARAMS["seed"].check(st.get("seed", 0), "study.seed")
    store = _resolve_path(STUDY_PARAMS["store"].check(st["store"], "study.store"), base)

    data: DataConfig | None = None
    if "data" in raw:
        data_table = _table(raw, "data")
        check_keys(data_table, init_fields(DataConfig), "data")
        data_kwargs = {"seed": seed, **data_table}
        if isinstance(data_kwargs.get("path"), str) and data_kwargs["path"].strip():
            data_kwargs["path"] = _resolve_path(data_kwargs["path"], base)
        data = DataConfig(**data_kwargs)

    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    if zoo.imports:
        assert zoo.path is not None  # ZooSpec requires it for an import
        zoo = dataclasses.replace(zoo, path=_resolve_path(zoo.path, base))
        archs = _declared_archs(raw["arch"], data)
        train = None
    else:
        assert data is not None  # required above
        archs = _archs(raw["arch"], data)
        train = _train(_table(raw, "train"), tuple(a.name for a in archs))
        sweep = _sweep(_table(raw, "sweep", optional=True), train)
    resources = _section(Resources, _table(raw, "resources", optional=True), "resources")
    features = _section(FeatureSpec, _table(raw, "features", optional=True), "features",
                        seed=seed)
    _check_layers(features, archs)
    tests = _section(StatsSpec, _table(raw, "tests", optional=True), "tests", seed=seed)
    pairs_table = _table(raw, "pairs", optional=True)
    pairs = _section(PairSpec, pairs_table, "pairs")
    if tests.strata is not None and train is not None and train.shared_init:
        raise ConfigError.at("tests.strata", "train.shared_init already sets the strata (the "
                             "init seeds); give one of them")
    if tests.strata is not None and tests.strata == tests.group_by:
        raise ConfigError.at("tests.strata", f"{tests.strata!r} is also tests.group_by: within "
                             "one stratum there would be a single group")
    if "cka" in features.methods and data is None:
        raise ConfigError.at("features.methods", "'cka' needs inputs for its probe: give an "
                             "import study a [data] section whose samples fit its [[arch]]")
    if train is not None and data is not None:
        cells = math.prod([len(values) for _, values in sweep])
        n_models = data.num_tasks * train.seeds_per_task * cells
        if pairs.top_k >= n_models:
            if "top_k" in pairs_table:
                raise ConfigError.at("pairs.top_k", f"must be < the number of models per arch "
                                     f"({n_models}), got {pairs.top_k}")
            pairs = dataclasses.replace(pairs, top_k=n_models - 1)  # the default, cut to a tiny zoo
    return Study(name, seed, store, source, data, archs, train, resources, features, tests, pairs,
                 zoo, sweep)


def _sweep(table: dict[str, Any], train: TrainPlan) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The [sweep] grid: train keys, each with a non-empty list of distinct values, checked as
    [train] checks them; a swept key may not be set in [train] or [train.<arch>] too, and every
    cell must make a valid TrainConfig for every arch."""
    check_keys(table, SWEEP_PARAMS, "sweep")
    grid = []
    for key, values in table.items():
        path = f"sweep.{key}"
        checked = SWEEP_PARAMS[key].check(values, path)
        where = ["train"] if key in dict(train.base) else []
        where += [f"train.{arch}" for arch, over in train.overrides if key in dict(over)]
        if where:
            raise ConfigError.at(path, f"also set in [{where[0]}]: a swept key takes its values "
                                 "from [sweep] only")
        grid.append((key, checked))
    saving = [a for a in [None, *[a for a, _ in train.overrides]]
              if train.kwargs(a).get("save_epochs")]
    if "epochs" in table and saving:
        raise ConfigError.at("sweep.epochs", "cannot vary with train.save_epochs: the tests "
                             "compare the checkpoints of one epoch, so every cell needs the "
                             "same epochs")
    for values in itertools.product(*[v for _, v in grid]):
        cell = dict(zip([k for k, _ in grid], values, strict=True))
        for arch in [None, *[a for a, _ in train.overrides]]:
            try:
                TrainConfig(**{**train.kwargs(arch), **cell})
            except ConfigError as exc:
                raise ConfigError.at("sweep", f"the cell {cell} makes an invalid [train]: "
                                     f"{exc}") from None
    return tuple(grid)


def _section(cls: type[T], table: dict[str, Any], path: str, **defaults: Any) -> T:
    """cls(**table) after refusing unknown keys; ``defaults`` fill keys the table omits."""
    check_keys(table, init_fields(cls), path)
    return cls(**{**defaults, **table})


def _archs(raw: Any, data: DataConfig) -> tuple[ArchConfig, ...]:
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError.at("arch", "must be one or more [[arch]] tables")
    allowed = [f for f in init_fields(ArchConfig) if f not in ("input_shape", "num_classes")]
    shape = _task_input_shape(data)
    archs: list[ArchConfig] = []
    for i, table in enumerate(raw):
        path = f"arch[{i}]"
        if not isinstance(table, dict):
            raise ConfigError.at(path, f"must be a table [[arch]], got {type_name(table)}")
        check_keys(table, allowed, path)
        if "kind" not in table:
            raise ConfigError.at(f"{path}.kind", "missing required key (one of "
                                 f"{', '.join(KINDS)})")
        try:
            cfg = ArchConfig(**table, input_shape=shape or _NPZ_PLACEHOLDER_SHAPE)
        except ConfigError as exc:
            raise exc.moved("arch", path) from None
        if cfg.name in {a.name for a in archs}:
            raise ConfigError.at(f"{path}.name", f"{cfg.name!r} is used by two [[arch]] tables; "
                                 "names must be unique")
        if shape is None:  # the npz's shape is known only once the file is read
            cfg = dataclasses.replace(cfg, input_shape=ArchConfig().input_shape)
        archs.append(cfg)
    return tuple(archs)


def _declared_archs(raw: Any, data: DataConfig | None) -> tuple[ArchConfig, ...]:
    """The one [[arch]] of an import study: the network its checkpoints hold, with input_shape
    and num_classes given (no task sizes it); with [data], its samples must fit."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) != 1:
        got = len(raw) if isinstance(raw, list) else type_name(raw)
        raise ConfigError.at("arch", f"an import study reads one architecture: give exactly one "
                             f"[[arch]] table, got {got}")
    table = raw[0]
    if not isinstance(table, dict):
        raise ConfigError.at("arch[0]", f"must be a table [[arch]], got {type_name(table)}")
    check_keys(table, init_fields(ArchConfig), "arch[0]")
    for key in ("kind", "input_shape", "num_classes"):
        if key not in table:
            raise ConfigError.at(f"arch[0].{key}", "missing required key (an import study "
                                 "declares the network its checkpoints hold)")
    try:
        cfg = ArchConfig(**table)
    except ConfigError as exc:
        raise exc.moved("arch", "arch[0]") from None
    shape = _task_input_shape(data) if data is not None else None
    if shape is not None and tuple(shape) != cfg.input_shape:
        raise ConfigError.at("arch[0].input_shape", f"{list(cfg.input_shape)} does not fit the "
                             f"samples of [data] ({list(shape)}), which the cka probe feeds it")
    return (cfg,)


def _task_input_shape(data: DataConfig) -> tuple[int, ...] | None:
    if data.dataset == "digits":
        return (1, 8, 8)
    if data.dataset == "synthetic":
        return data.synthetic_shape
    if data.dataset == "mnist1d":
        return MNIST1D_SHAPE
    return None


def _train(table: dict[str, Any], arch_names: tuple[str, ...]) -> TrainPlan:
    fields = init_fields(TrainConfig)
    overrides_raw = {k: v for k, v in table.items() if k in arch_names and k not in fields}
    rest = {k: v for k, v in table.items() if k not in overrides_raw}
    for k, v in rest.items():
        if k not in fields and k not in PLAN_PARAMS:
            extra = (f" or [train.<arch name>] for one of {', '.join(arch_names)}"
                     if isinstance(v, dict) else "")
            check_keys({k: v}, (*fields, *PLAN_PARAMS), "train", extra)
    if "seeds_per_task" not in rest:
        raise ConfigError.at("train.seeds_per_task", "missing required key")
    n = PLAN_PARAMS["seeds_per_task"].check(rest["seeds_per_task"], "train.seeds_per_task")
    pack = PLAN_PARAMS["seeds_per_trial"].check(rest.get("seeds_per_trial", n),
                                                "train.seeds_per_trial")
    if pack > n:
        raise ConfigError.at("train.seeds_per_trial", f"must be an integer in [1, {n}] "
                             f"(train.seeds_per_task), got {pack}")
    shared = PLAN_PARAMS["shared_init"].check(rest.get("shared_init", False), "train.shared_init")
    if shared and n < 4:
        raise ConfigError.at("train.shared_init", "needs train.seeds_per_task >= 4 (HTT splits the "
                             f"init-seed strata: at least 2 train, 2 held out), got {n}")
    base = _train_values({k: v for k, v in rest.items() if k in fields}, {}, "train")
    overrides: dict[str, dict[str, Any]] = {}
    for arch, sub in overrides_raw.items():
        path = f"train.{arch}"
        if not isinstance(sub, dict):
            raise ConfigError.at(path, "must be a table of TrainConfig overrides, "
                                 f"got {type_name(sub)}")
        check_keys(sub, fields, path)
        overrides[arch] = _train_values(sub, base, path)
    return TrainPlan(n, pack, tuple(sorted(base.items())),
                     tuple((arch, tuple(sorted(over.items())))
                           for arch, over in sorted(overrides.items())), shared)


def _train_values(given: dict[str, Any], base: dict[str, Any], path: str) -> dict[str, Any]:
    """The keys of `given` as TrainConfig normalizes them (on top of `base`), errors at `path`."""
    try:
        cfg = TrainConfig(**{**base, **given})
    except ConfigError as exc:
        raise exc.moved("train", path) from None
    return {k: getattr(cfg, k) for k in given}


def _check_layers(features: FeatureSpec, archs: tuple[ArchConfig, ...]) -> None:
    if isinstance(features.layers, str):
        return
    known = {name for a in archs for name in a.feature_layers()}
    unknown = [name for name in features.layers if name not in known]
    if unknown:
        raise ConfigError.at("features.layers", f"{unknown[0]!r} is not a layer of any arch; "
                             f"known: {', '.join(sorted(known))}")


def _drop_none(x: Any) -> Any:
    """The mapping without None values (JSON null means "not given", as in resolved())."""
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def _resolve_path(value: str, base: Path) -> str:
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _table(raw: dict[str, Any], key: str, optional: bool = False) -> dict[str, Any]:
    if key not in raw:
        if optional:
            return {}
        raise ConfigError.at(key, f"missing section [{key}]")
    value = raw[key]
    if not isinstance(value, dict):
        raise ConfigError.at(key, f"must be a table [{key}], got {type_name(value)}")
    return value
