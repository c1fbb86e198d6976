"""The study file: one TOML file parsed into a frozen, typed :class:`Study`.

A study says which tasks, which architectures, how to train, how to featurize and how to
test. ``load_study(path)`` reads and validates it; every bad input (bad TOML, unreadable
file, missing section, unknown key, wrong type, out-of-range value) raises
:class:`ConfigError` whose message is one line naming the key path and what is allowed,
e.g. ``train.seeds_per_trial: must be an integer in [1, 16] (train.seeds_per_task), got 20``.
``None`` values (JSON null) count as "not given", so ``study_from_dict(study.resolved())``
rebuilds the same study.

File layout (sections; keys not listed take the defaults of the named dataclass)::

    [study]      name (str, [A-Za-z0-9_.-]+), seed (int >= 0, default 0),
                 store (path; relative to the TOML's folder unless absolute or a URI)
    [data]       fields of distsim.tasks.DataConfig: dataset digits|synthetic|npz,
                 num_tasks, seed (default study.seed), test_fraction, pairing, path
                 (relative to the TOML's folder), synthetic_* ...
    [[arch]]     one or more; fields of distsim.models.ArchConfig except input_shape and
                 num_classes (taken from the tasks): name (unique, default kind), kind, widths, ...
    [train]      seeds_per_task (int >= 2), seeds_per_trial (pack size, 1..seeds_per_task),
                 + fields of distsim.train.TrainConfig (epochs, batch_size, lr, momentum, ...);
                 [train.<arch name>] overrides TrainConfig fields for one architecture.
    [resources]  cpus_per_trial (> 0, fractional ok), gpus_per_trial (>= 0, fractional ok),
                 max_failures (>= 0), feature_actors (>= 1), cpus_per_actor (> 0)
    [features]   methods (list of chain-gram|raw), layers ("all" | "last" | list of layer
                 names), dim (random-projection size, omit for none), sketch ("output", the
                 default: project the feature vector to dim; "input": sketch the chain-gram
                 maps' input side, m(m+1)/2 <= dim per Gram, needs dim), seed (default study.seed)
    [tests]      protocols (list of closed-set|open-set), permutations (>= 1),
                 permanova_permutations (>= 0; 0 skips PERMANOVA), learner lda|softmax,
                 chunk_size (permutations per Ray task, >= 1), seed (default study.seed),
                 train_fraction (closed-set: share of each task's models that train, paper
                 0.6), train_task_fraction (open-set: share of tasks that train, paper 0.6),
                 n_query (open-set queries per held-out task; omit for 20%), k (embedding
                 dims; omit for tasks - 1).  TestSpec.htt_kwargs() -> kwargs for stats.htt
    [pairs]      top_k (>= 1, < models per arch; default 10, cut to models - 1 for tiny
                 zoos), block (rows per distance block, >= 1), metric euclidean|cosine

Public API (stable; additions only):
    ConfigError(ValueError)            .key (the key path or "") and a one-line message
    load_study(path) -> Study          read + validate a TOML file
    parse_study(text, base_dir=".", source="<string>") -> Study
    study_from_dict(raw, base_dir=".", source="<dict>") -> Study
    Study fields: name, seed, store (str: absolute path or URI), source (str), data
        (tasks.DataConfig), archs (tuple[models.ArchConfig, ...]), train (TrainPlan),
        resources (Resources), features (FeatureSpec), tests (TestSpec), pairs (PairSpec)
    Study.arch_names -> tuple[str, ...];  Study.arch(name) -> ArchConfig
    Study.data_config() -> DataConfig
    Study.train_config(arch_name) -> train.TrainConfig (per-arch overrides applied)
    Study.model_seeds(task_id) -> tuple[int, ...]  seeds of one task's models (all archs)
    Study.packs(arch_name=None) -> list[Pack]      every zoo trial: Pack(arch, task, pack, seeds),
        Pack.trial_id = "arch=<a>/task=<t>/pack=<p>";  TrainPlan.packs_per_task
        (pack p of a task holds its seeds [p * seeds_per_trial, (p + 1) * seeds_per_trial))
    TestSpec.htt_kwargs() -> dict              learner, train_fraction, ... for stats.htt
    Study.feature_layers(arch_name) -> tuple[str, ...]  layers to featurize for an arch
    Study.resolved() -> dict (plain JSON types);  Study.hash -> sha256 hex of the
        resolved config without study.store and resources (where it runs does not change
        what it computes), so a store can refuse a changed study.

Model seeds: model i (0-based) of task t gets seed ``study.seed * 1_000_000 + t *
train.seeds_per_task + i``, distinct over tasks, identical across architectures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from distsim.models import ArchConfig
from distsim.tasks import DataConfig

__all__ = [
    "ConfigError",
    "FeatureSpec",
    "Pack",
    "PairSpec",
    "Resources",
    "Study",
    "TestSpec",
    "TrainPlan",
    "load_study",
    "parse_study",
    "study_from_dict",
]

FEATURE_METHODS = ("chain-gram", "raw")
FEATURE_SKETCHES = ("output", "input")  # = distsim.features.SKETCHES
PROTOCOLS = ("closed-set", "open-set")
LEARNERS = ("lda", "softmax")
METRICS = ("euclidean", "cosine")
SECTIONS = ("study", "data", "arch", "train", "resources", "features", "tests", "pairs")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_SEED_STRIDE = 1_000_000


class ConfigError(ValueError):
    """A bad study file: one line naming the key path (``key``) and what is allowed."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
        self.key = key


# --------------------------------------------------------------------------- typed sections


@dataclass(frozen=True)
class Resources:
    """What one zoo trial and one feature actor ask Ray for (fractional GPUs share a device)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    feature_actors: int = 1
    cpus_per_actor: float = 1.0


@dataclass(frozen=True)
class FeatureSpec:
    """Which invariant features to build: methods x layers, optional seeded projection to dim
    (sketch: "output" projects the vector, "input" the chain maps; see distsim.features)."""

    methods: tuple[str, ...] = ("chain-gram", "raw")
    layers: str | tuple[str, ...] = "all"
    dim: int | None = None
    seed: int = 0
    sketch: str = "output"


@dataclass(frozen=True)
class TestSpec:
    """Hypothesis-training-testing protocols and PERMANOVA, permutations spread in chunks."""

    __test__ = False  # not a pytest test class

    protocols: tuple[str, ...] = ("closed-set", "open-set")
    permutations: int = 199
    permanova_permutations: int = 999
    learner: str = "lda"
    chunk_size: int = 50
    seed: int = 0
    train_fraction: float = 0.6
    train_task_fraction: float = 0.6
    n_query: int | None = None
    k: int | None = None

    def htt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of distsim.stats.htt beyond features/tasks/protocol/permutations/seed."""
        return {"learner": self.learner, "train_fraction": self.train_fraction,
                "train_task_fraction": self.train_task_fraction, "n_query": self.n_query, "k": self.k}


@dataclass(frozen=True)
class PairSpec:
    """All-pairs distances: per-model top_k neighbours, computed in blocks of `block` rows."""

    top_k: int = 10
    block: int = 512
    metric: str = "euclidean"


@dataclass(frozen=True)
class TrainPlan:
    """How many models per task, how many share one trial (a pack), and how each is trained.

    base: the TrainConfig fields [train] sets, as sorted (field, value) pairs; overrides:
    (arch name, pairs) of [train.<arch name>]. Pairs, not dicts, keep a Study hashable.
    """

    seeds_per_task: int
    seeds_per_trial: int
    base: tuple[tuple[str, Any], ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def kwargs(self, arch_name: str | None = None) -> dict[str, Any]:
        """TrainConfig keyword arguments: [train], then [train.<arch_name>] on top."""
        return {**dict(self.base), **dict(dict(self.overrides).get(arch_name, ()))}

    @property
    def packs_per_task(self) -> int:
        return math.ceil(self.seeds_per_task / self.seeds_per_trial)


@dataclass(frozen=True)
class Pack:
    """One zoo trial: `seeds` of architecture `arch` trained together on task `task`."""

    arch: str
    task: int
    pack: int
    seeds: tuple[int, ...]

    @property
    def trial_id(self) -> str:
        return f"arch={self.arch}/task={self.task}/pack={self.pack}"


@dataclass(frozen=True)
class Study:
    """A validated study file (see the module docstring for sections and defaults)."""

    name: str
    seed: int
    store: str
    source: str
    data: DataConfig
    archs: tuple[ArchConfig, ...]
    train: TrainPlan
    resources: Resources
    features: FeatureSpec
    tests: TestSpec
    pairs: PairSpec

    # ---- lookups
    @property
    def arch_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.archs)

    def arch(self, name: str) -> ArchConfig:
        """The ArchConfig named `name` (input_shape/num_classes still to be set per task)."""
        for a in self.archs:
            if a.name == name:
                return a
        raise KeyError(f"no arch named {name!r}; the study has {list(self.arch_names)}")

    def data_config(self) -> DataConfig:
        return self.data

    def train_config(self, arch_name: str) -> Any:
        """distsim.train.TrainConfig for one architecture ([train] + [train.<arch_name>])."""
        from distsim.train import TrainConfig

        self.arch(arch_name)  # KeyError for an unknown name
        return TrainConfig(**self.train.kwargs(arch_name))

    @staticmethod
    def _train_cls() -> type:
        from distsim.train import TrainConfig

        return TrainConfig

    def model_seeds(self, task_id: int) -> tuple[int, ...]:
        """Seeds of the seeds_per_task models of one task (the same for every arch)."""
        n = self.train.seeds_per_task
        base = self.seed * _SEED_STRIDE + task_id * n
        return tuple(range(base, base + n))

    def packs(self, arch_name: str | None = None) -> list[Pack]:
        """Every zoo trial (arch, task, pack) in a fixed order, or those of one arch."""
        names = self.arch_names if arch_name is None else (self.arch(arch_name).name,)
        size = self.train.seeds_per_trial
        out = []
        for name in names:
            for t in range(self.data.num_tasks):
                seeds = self.model_seeds(t)
                for p in range(self.train.packs_per_task):
                    out.append(Pack(name, t, p, seeds[p * size : (p + 1) * size]))
        return out

    def feature_layers(self, arch_name: str) -> tuple[str, ...]:
        """Layer names to featurize for one arch: all, the last, or the listed ones it has."""
        from distsim.features import feature_layers

        available = tuple(feature_layers(self.arch(arch_name)))
        if self.features.layers == "all":
            return available
        if self.features.layers == "last":
            return available[-1:]
        return tuple(name for name in available if name in self.features.layers)

    # ---- identity
    def resolved(self) -> dict[str, Any]:
        """The whole study as plain JSON types (lists, not tuples), defaults filled in."""
        archs = []
        for a in self.archs:
            d = _plain(dataclasses.asdict(a))
            d.pop("input_shape"), d.pop("num_classes")
            archs.append(d)
        return {
            "study": {"name": self.name, "seed": self.seed, "store": self.store},
            "data": _plain(dataclasses.asdict(self.data)),
            "arch": archs,
            "train": {
                "seeds_per_task": self.train.seeds_per_task,
                "seeds_per_trial": self.train.seeds_per_trial,
                **_plain(dataclasses.asdict(self._train_cls()(**self.train.kwargs()))),
                **{arch: _plain(dict(pairs)) for arch, pairs in self.train.overrides},
            },
            "resources": _plain(dataclasses.asdict(self.resources)),
            "features": _plain(dataclasses.asdict(self.features)),
            "tests": _plain(dataclasses.asdict(self.tests)),
            "pairs": _plain(dataclasses.asdict(self.pairs)),
        }

    @property
    def hash(self) -> str:
        """sha256 of the resolved config minus study.store and resources (stable across runs)."""
        d = self.resolved()
        d["study"].pop("store")
        d.pop("resources")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- parsing


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


def study_from_dict(raw: dict[str, Any], base_dir: str | Path = ".", source: str = "<dict>") -> Study:
    """Validate an already-parsed study mapping (same rules as the TOML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a study must be a table of sections, got {type(raw).__name__}")
    raw = _drop_none(raw)  # None (JSON null, as in resolved()) means "not given", like in TOML
    base = Path(base_dir).resolve()
    _check_keys(raw, SECTIONS, "")
    for required in ("study", "data", "arch", "train"):
        if required not in raw:
            raise ConfigError(f"{required}: missing section [{required}]", required)

    st = _table(raw, "study")
    _check_keys(st, ("name", "seed", "store"), "study")
    name = _get(st, "name", str, "study", required=True)
    if not _NAME.match(name):
        raise ConfigError(f"study.name: must match [A-Za-z0-9_.-]+, got {name!r}", "study.name")
    seed = _get(st, "seed", int, "study", default=0, lo=0)
    store = _get(st, "store", str, "study", required=True)
    if not store.strip():
        raise ConfigError("study.store: must be a non-empty path or URI", "study.store")
    store = _resolve_path(store, base)

    data = _data_section(_table(raw, "data"), base, seed)
    archs = _arch_sections(raw["arch"], data)
    train = _train_section(_table(raw, "train"), tuple(a.name for a in archs))
    resources = _simple_section(Resources, _table(raw, "resources", optional=True), "resources", _RESOURCE_RULES)
    features = _features_section(_table(raw, "features", optional=True), archs, seed)
    tests = _tests_section(_table(raw, "tests", optional=True), seed)
    pairs_table = _table(raw, "pairs", optional=True)
    pairs = _simple_section(PairSpec, pairs_table, "pairs", _PAIR_RULES)
    n_models = data.num_tasks * train.seeds_per_task
    if pairs.top_k >= n_models:
        if "top_k" in pairs_table:
            raise ConfigError(f"pairs.top_k: must be < the number of models per arch ({n_models}), got {pairs.top_k}",
                              "pairs.top_k")
        pairs = dataclasses.replace(pairs, top_k=n_models - 1)  # the default, cut to a tiny zoo
    return Study(name, seed, store, source, data, archs, train, resources, features, tests, pairs)


def _drop_none(x: Any) -> Any:
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


# ---- generic helpers ---------------------------------------------------------------------


def _table(raw: dict, key: str, optional: bool = False) -> dict:
    if key not in raw:
        if optional:
            return {}
        raise ConfigError(f"{key}: missing section [{key}]", key)
    value = raw[key]
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table [{key}], got {_tname(value)}", key)
    return value


def _check_keys(table: dict, allowed: typing.Iterable[str], path: str) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key; allowed: {', '.join(sorted(allowed))}", where)


def _tname(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _get(table: dict, key: str, tp: type, path: str, *, default: Any = None, required: bool = False,
         lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    where = f"{path}.{key}"
    if key not in table:
        if required:
            raise ConfigError(f"{where}: missing required key", where)
        return default
    return _coerce(table[key], tp, where, lo=lo, hi=hi, lo_open=lo_open)


def _coerce(value: Any, tp: Any, where: str, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    """Check a TOML value against a type annotation (int, float, str, bool, tuples, X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where, lo=lo, hi=hi, lo_open=lo_open)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: must be {' or '.join(_describe(o) for o in options)}, got {_tname(value)} {value!r}", where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be {_describe(tp)}, got {_tname(value)} {value!r}", where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", lo=lo, hi=hi, lo_open=lo_open) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: must be {_describe(tp)}, got {value!r}", where)
        return tuple(_coerce(v, a, f"{where}[{i}]", lo=lo, hi=hi, lo_open=lo_open) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {_tname(value)} {value!r}", where)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}", where)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {_tname(value)} {value!r}", where)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_tname(value)} {value!r}", where)
        return value
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_tname(value)} {value!r}", where)
        return value
    else:  # pragma: no cover - a field type this parser does not know
        raise ConfigError(f"{where}: unsupported field type {tp!r}", where)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        left = f"({lo}" if lo_open else f"[{lo}"
        raise ConfigError(
            f"{where}: must be in {left if lo is not None else '(-inf'}, {hi if hi is not None else 'inf'}"
            f"{']' if hi is not None else ')'}, got {value!r}", where)
    return value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_describe(args[0])}s"
        return f"an array of {len(args)} {_describe(args[0])}s"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, str(tp))


def _dataclass_fields(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """{field name: resolved type annotation} of a dataclass, minus `exclude`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name not in exclude}


def _build(cls: type, kwargs: dict, path: str, section: str) -> Any:
    """cls(**kwargs), turning its ValueError/TypeError into a ConfigError on `path`."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        msg = " ".join(str(exc).split())
        key = path
        m = re.match(rf"^{re.escape(section)}\.([A-Za-z_]+)", msg)
        if m:  # "arch.widths must ..." -> "arch[1].widths: must ..."
            key = f"{path}.{m.group(1)}"
            msg = f"{key}{msg[m.end():]}" if msg[m.end():].startswith(":") else f"{key}: {msg[m.end():].strip()}"
        else:
            msg = f"{path}: {msg}"
        raise ConfigError(msg, key) from None


def _typed_kwargs(table: dict, fields: dict[str, Any], path: str, rules: dict | None = None) -> dict:
    rules = rules or {}
    return {k: _coerce(v, fields[k], f"{path}.{k}", **rules.get(k, {})) for k, v in table.items()}


# ---- sections ----------------------------------------------------------------------------

_RESOURCE_RULES = {
    "cpus_per_trial": {"lo": 0.0, "lo_open": True},
    "gpus_per_trial": {"lo": 0.0},
    "max_failures": {"lo": 0},
    "feature_actors": {"lo": 1},
    "cpus_per_actor": {"lo": 0.0, "lo_open": True},
}
_PAIR_RULES = {"top_k": {"lo": 1}, "block": {"lo": 1}}


def _simple_section(cls: type, table: dict, path: str, rules: dict) -> Any:
    fields = _dataclass_fields(cls)
    _check_keys(table, fields, path)
    kwargs = _typed_kwargs(table, fields, path, rules)
    if cls is Resources and kwargs.get("gpus_per_trial", 0.0) > 1 and kwargs["gpus_per_trial"] != int(kwargs["gpus_per_trial"]):
        raise ConfigError(
            f"resources.gpus_per_trial: a share above 1 GPU must be a whole number, got {kwargs['gpus_per_trial']}",
            "resources.gpus_per_trial")
    if cls is PairSpec and kwargs.get("metric", "euclidean") not in METRICS:
        raise ConfigError(f"pairs.metric: must be one of {', '.join(METRICS)}, got {kwargs['metric']!r}", "pairs.metric")
    return cls(**kwargs)


def _data_section(table: dict, base: Path, study_seed: int) -> DataConfig:
    fields = _dataclass_fields(DataConfig)
    _check_keys(table, fields, "data")
    kwargs = _typed_kwargs(table, fields, "data", {"num_tasks": {"lo": 1}, "seed": {"lo": 0},
                                                   "synthetic_samples": {"lo": 2}})
    kwargs.setdefault("seed", study_seed)
    if kwargs.get("path"):
        kwargs["path"] = _resolve_path(kwargs["path"], base)
    if kwargs.get("dataset", "digits") not in ("npz",) and "path" in kwargs:
        raise ConfigError(f"data.path: only used with dataset = \"npz\", got dataset = {kwargs.get('dataset', 'digits')!r}",
                          "data.path")
    return _build(DataConfig, kwargs, "data", "data")


def _task_input_shape(data: DataConfig) -> tuple[int, int, int] | None:
    if data.dataset == "digits":
        return (1, 8, 8)
    if data.dataset == "synthetic":
        return data.synthetic_shape
    return None  # an npz's shape is known only once the file is read


def _arch_sections(raw: Any, data: DataConfig) -> tuple[ArchConfig, ...]:
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("arch: must be one or more [[arch]] tables", "arch")
    fields = _dataclass_fields(ArchConfig, exclude=("input_shape", "num_classes"))
    shape = _task_input_shape(data)
    archs: list[ArchConfig] = []
    for i, table in enumerate(raw):
        path = f"arch[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: must be a table [[arch]], got {_tname(table)}", path)
        _check_keys(table, fields, path)
        if "kind" not in table:
            raise ConfigError(f"{path}.kind: missing required key (mlp, cnn or rnn)", f"{path}.kind")
        kwargs = _typed_kwargs(table, fields, path, {"hidden": {"lo": 1}, "num_layers": {"lo": 1}})
        name = kwargs.get("name") or kwargs["kind"]
        if not _NAME.match(name):
            raise ConfigError(f"{path}.name: must match [A-Za-z0-9_.-]+, got {name!r}", f"{path}.name")
        if name in {a.name for a in archs}:
            raise ConfigError(f"{path}.name: {name!r} is used by two [[arch]] tables; names must be unique",
                              f"{path}.name")
        kwargs["name"] = name
        if shape is not None:
            kwargs["input_shape"] = shape
        else:  # shape-dependent checks wait for the npz; use a shape that passes them
            kwargs["input_shape"] = (1, 1024, 1024)
        cfg = _build(ArchConfig, kwargs, path, "arch")
        archs.append(cfg if shape is not None else dataclasses.replace(cfg, input_shape=ArchConfig().input_shape))
    return tuple(archs)


_TRAIN_RULES = {
    "epochs": {"lo": 1},
    "batch_size": {"lo": 1},
    "lr": {"lo": 0.0, "lo_open": True},
    "momentum": {"lo": 0.0, "hi": 1.0},
    "weight_decay": {"lo": 0.0},
    "lr_gamma": {"lo": 0.0, "lo_open": True},
    "lr_milestones": {"lo": 1},
    "milestones": {"lo": 1},
    "gamma": {"lo": 0.0, "lo_open": True},
}


def _train_fields() -> tuple[type, dict[str, Any]]:
    from distsim.train import TrainConfig

    return TrainConfig, _dataclass_fields(TrainConfig)


def _train_section(table: dict, arch_names: tuple[str, ...]) -> TrainPlan:
    cls, fields = _train_fields()
    plan_keys = ("seeds_per_task", "seeds_per_trial")
    overrides_raw = {k: v for k, v in table.items() if k in arch_names and k not in fields}
    rest = {k: v for k, v in table.items() if k not in overrides_raw}
    for k, v in rest.items():
        if k not in fields and k not in plan_keys:
            hint = ", ".join(sorted((*fields, *plan_keys)))
            extra = f" or [train.<arch name>] for one of {', '.join(arch_names)}" if isinstance(v, dict) else ""
            raise ConfigError(f"train.{k}: unknown key; allowed: {hint}{extra}", f"train.{k}")
    n = _get(rest, "seeds_per_task", int, "train", required=True, lo=2)
    pack = _get(rest, "seeds_per_trial", int, "train", default=n, lo=1)
    if pack > n:
        raise ConfigError(f"train.seeds_per_trial: must be an integer in [1, {n}] (train.seeds_per_task), got {pack}",
                          "train.seeds_per_trial")
    base = _typed_kwargs({k: v for k, v in rest.items() if k in fields}, fields, "train", _TRAIN_RULES)
    _build(cls, base, "train", "train")
    overrides: dict[str, dict[str, Any]] = {}
    for arch, sub in overrides_raw.items():
        path = f"train.{arch}"
        if not isinstance(sub, dict):
            raise ConfigError(f"{path}: must be a table of TrainConfig overrides, got {_tname(sub)}", path)
        _check_keys(sub, fields, path)
        over = _typed_kwargs(sub, fields, path, _TRAIN_RULES)
        _build(cls, {**base, **over}, path, "train")
        overrides[arch] = over
    return TrainPlan(n, pack, tuple(sorted(base.items())),
                     tuple((arch, tuple(sorted(over.items()))) for arch, over in sorted(overrides.items())))


def _features_section(table: dict, archs: tuple[ArchConfig, ...], study_seed: int) -> FeatureSpec:
    fields = _dataclass_fields(FeatureSpec)
    _check_keys(table, fields, "features")
    methods = _get(table, "methods", tuple[str, ...], "features", default=FeatureSpec.methods)
    if not methods or any(m not in FEATURE_METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError(f"features.methods: must be a non-empty list of distinct {', '.join(FEATURE_METHODS)}, "
                          f"got {list(methods)!r}", "features.methods")
    layers = table.get("layers", "all")
    if isinstance(layers, str):
        if layers not in ("all", "last"):
            raise ConfigError(f"features.layers: must be \"all\", \"last\" or a list of layer names, got {layers!r}",
                              "features.layers")
    else:
        layers = _coerce(layers, tuple[str, ...], "features.layers")
        if not layers:
            raise ConfigError("features.layers: the list of layer names is empty", "features.layers")
        from distsim.features import feature_layers

        known = {name for a in archs for name in feature_layers(a)}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ConfigError(f"features.layers: {unknown[0]!r} is not a layer of any arch; known: "
                              f"{', '.join(sorted(known))}", "features.layers")
    dim = _get(table, "dim", int, "features", default=None, lo=1)
    seed = _get(table, "seed", int, "features", default=study_seed, lo=0)
    sketch = _get(table, "sketch", str, "features", default=FeatureSpec.sketch)
    if sketch not in FEATURE_SKETCHES:
        raise ConfigError(f"features.sketch: must be one of {', '.join(FEATURE_SKETCHES)}, got {sketch!r}",
                          "features.sketch")
    if sketch == "input" and dim is None:
        raise ConfigError("features.sketch: \"input\" needs features.dim (the size of a sketched Gram)",
                          "features.sketch")
    return FeatureSpec(tuple(methods), layers, dim, seed, sketch)


def _tests_section(table: dict, study_seed: int) -> TestSpec:
    fields = _dataclass_fields(TestSpec)
    _check_keys(table, fields, "tests")
    protocols = _get(table, "protocols", tuple[str, ...], "tests", default=TestSpec.protocols)
    if any(p not in PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols):
        raise ConfigError(f"tests.protocols: must be a list of distinct {', '.join(PROTOCOLS)}, got {list(protocols)!r}",
                          "tests.protocols")
    permutations = _get(table, "permutations", int, "tests", default=TestSpec.permutations, lo=1)
    permanova = _get(table, "permanova_permutations", int, "tests", default=TestSpec.permanova_permutations, lo=0)
    learner = _get(table, "learner", str, "tests", default=TestSpec.learner)
    if learner not in LEARNERS:
        raise ConfigError(f"tests.learner: must be one of {', '.join(LEARNERS)}, got {learner!r}", "tests.learner")
    chunk = _get(table, "chunk_size", int, "tests", default=TestSpec.chunk_size, lo=1)
    seed = _get(table, "seed", int, "tests", default=study_seed, lo=0)
    fractions = {}
    for key in ("train_fraction", "train_task_fraction"):
        value = _get(table, key, float, "tests", default=getattr(TestSpec, key), lo=0.0, lo_open=True)
        if value >= 1.0:
            raise ConfigError(f"tests.{key}: must be in (0, 1), got {value!r}", f"tests.{key}")
        fractions[key] = value
    n_query = _get(table, "n_query", int, "tests", default=None, lo=1)
    k = _get(table, "k", int, "tests", default=None, lo=1)
    return TestSpec(tuple(protocols), permutations, permanova, learner, chunk, seed, **fractions, n_query=n_query, k=k)
