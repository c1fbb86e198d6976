"""Checks before a launch touches anything: what can be checked without a cluster, then against
the connected cluster.

- :func:`check_offline` (``distsim validate`` and ``launch``, no Ray): the tasks build from
  ``[data]``, every ``[[arch]]`` fits their samples, and ``study.store`` is a usable folder.
  Nothing is written.
- :func:`check_cluster` (once connected): the GPUs that ``train.device = "cuda"`` and
  ``resources.gpus_per_trial`` need, and whether one trial and one feature actor fit on a node
  (a request that fits no node leaves Ray waiting forever, silently). Node types that the
  cluster's autoscaler can add count as nodes, so a CPU head whose GPU workers scale from zero
  (``cluster.yaml``) passes.

A hard problem raises one line (ConfigError, StoreError or LaunchError) naming the key and the
fix; soft facts come back from check_offline as one-line notes.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from distsim.config import Study
from distsim.config.data import DataConfig
from distsim.errors import ConfigError, LaunchError, StoreError
from distsim.pipeline.registry import STAGE_NAMES
from distsim.stats.htt_split import MIN_TASKS, make_split
from distsim.store import Store
from distsim.zoo.tasks import make_tasks

# Where `ray up` puts the autoscaler's config on the head node (read by the v1 autoscaler).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
HEAD_RESOURCE = "node:__internal_head__"  # a resource only the head node has
_EPS = 1e-9


# ----------------------------------------------------------------------------- offline
def check_offline(study: Study, data: bool = True,
                  stages: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """What can be checked without Ray: raise the first hard problem, return one-line notes.

    Raises StoreError (``study.store`` is a file, a non-empty folder that is not a distsim
    store, or not writable by this user) or ConfigError (the tasks do not build: key
    ``data.num_tasks``, ``data.path`` or ``data``; an arch does not fit the tasks' samples:
    key ``arch[i].<field>``). Returns ``["data: ...", "store: ..."]``. Builds the tasks once
    (digits: about a second, mostly importing scikit-learn); ``data=False`` skips that (a
    cluster job whose data lives on the cluster). The HTT splits are checked when ``stages``
    (default: all) include the tests.
    """
    store_note = _check_store(study)
    data_note = _check_data(study) if data else "data: not checked (--no-data)"
    if stages is None or "tests" in stages:
        _check_splits(study)
    return [data_note, store_note]


def _check_splits(study: Study) -> None:
    """Each HTT protocol's split can be drawn from tasks x seeds models (ConfigError at
    ``tests.protocols`` otherwise, e.g. open-set with fewer than 4 tasks). Assumes every model
    trains; diverged models can still make a split impossible at run time. An import study's
    groups are known once its zoo is read: checked by the tests stage. With tests.factors,
    each must be a [sweep] key or a models column; the splits within the other factors' cells
    are checked by the tests stage."""
    if study.train is None or study.data is None:
        return
    if study.tests.factors is not None:  # a protocol runs for the factors it can split
        from distsim.store.tables import TABLES

        known = [*[k for k, _ in study.sweep], *TABLES["models"].schema.names]
        for factor in study.tests.factors:
            if factor not in known:
                raise ConfigError.at("tests.factors", f"{factor!r} is not a [sweep] key or a "
                                     f"models column ({', '.join(known[:8])}, ...)")
        return
    tasks = study.data.num_tasks
    seeds = study.train.seeds_per_task * len(study.cells())
    codes = np.repeat(np.arange(tasks), seeds)
    spec = study.tests
    for protocol in spec.protocols:
        if tasks < MIN_TASKS[protocol]:
            raise ConfigError.at("tests.protocols", f"{protocol} HTT needs at least "
                                 f"{MIN_TASKS[protocol]} tasks, data.num_tasks is {tasks}")
        try:
            make_split(codes, np.arange(tasks), protocol, spec.seed,
                       train_fraction=spec.train_fraction,
                       train_task_fraction=spec.train_task_fraction, n_query=spec.n_query)
        except ValueError as exc:
            raise ConfigError.at("tests.protocols", f"{protocol} cannot split {tasks} tasks x "
                                 f"{seeds} seeds: {exc}") from None


def _check_data(study: Study) -> str:
    if study.imports:
        return _check_source(study)
    data = study.data
    assert data is not None  # a trained study has data
    try:
        tasks = make_tasks(data)
    except ConfigError:
        raise
    except ValueError as exc:
        raise _data_error(str(exc), data) from None
    first = tasks[0]
    shape, classes = first.input_shape, first.num_classes
    where = (f"data.path {data.path!r} holds {_dims(shape)} samples" if data.dataset == "npz"
             else f"the tasks' samples are {_dims(shape)}")
    for i, arch in enumerate(study.archs):
        try:
            arch.with_task_shape(shape, classes)
        except ConfigError as exc:
            moved = exc.moved("arch", f"arch[{i}]")
            raise ConfigError.at(moved.key, f"{moved.problem} ({where})") from None
    source = Path(data.path).name if data.dataset == "npz" and data.path else data.dataset
    train = _span(len(t.y_train) for t in tasks)
    test = _span(len(t.y_test) for t in tasks)
    return (f"data: {len(tasks)} {source} tasks of {classes} classes, samples {_dims(shape)}, "
            f"{train} train / {test} test each")


def _check_source(study: Study) -> str:
    """List an import study's source (SourceError, one line, if it cannot be), and read and map
    its first checkpoint onto the [[arch]] (SourceError or MappingError, one line naming the
    file, the tensor and both shapes: a zoo of another architecture fails here, before anything
    is written, not once per checkpoint); with [data], build its tasks too (the cka probe's
    inputs)."""
    from distsim.pipeline.imports import plan, source_entries, source_label
    from distsim.zoo.mapping import MappingError, to_state_dict
    from distsim.zoo.sources import read_entry

    entries = source_entries(study)
    zoo = study.zoo
    assert zoo.format is not None and zoo.path is not None  # an import study has both
    first = read_entry(zoo.format, zoo.path, entries[0], manifest=zoo.manifest, labels=zoo.labels)
    try:
        to_state_dict(first.tensors, study.archs[0], first.layout,
                      where=source_label(entries[0]))
    except MappingError as exc:  # the key to fix: the declared architecture
        raise ConfigError.at("arch[0]", f"does not fit the zoo's first checkpoint: {exc}") \
            from None
    models = len({e.name for e in entries})
    epochs = sorted({e.epoch for e in entries if e.epoch is not None})
    span = f", epochs {epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else (
        f", epoch {epochs[0]}" if epochs else "")
    note = (f"zoo: {len(entries)} checkpoints of {models} models in {zoo.path} ({zoo.format}"
            f"{span}), {_count(len(plan(study, entries)), 'pack')}")
    if study.data is not None:
        make_tasks(study.data)
    return note


def _data_error(message: str, data: DataConfig) -> ConfigError:
    """The ValueError of distsim.zoo.tasks as a ConfigError at the most precise key."""
    if message.startswith("data.path: "):
        return ConfigError.at("data.path", message[len("data.path: "):])
    m = re.match(r"data\.num_tasks=(\d+) is more than the (\d+) (.*\((\d+) classes\))$", message)
    if m:
        fix = f"set it to at most {m[2]}"
        if data.pairing == "consecutive":
            fix += f" (pairing = 'random' allows {math.comb(int(m[4]), 2)})"
        return ConfigError.at("data.num_tasks", f"{m[1]} is more than the {m[2]} {m[3]}; {fix}")
    return ConfigError.at("data.path" if data.dataset == "npz" else "data", message)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _span(values: Any) -> str:
    vals = sorted(set(values))
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}"


def _check_store(study: Study) -> str:
    if "://" in study.store:
        Store(study.store)  # raises its StoreError (object stores are not supported)
    root = Path(study.store).expanduser().resolve()
    try:
        return _probe_store(study, root)
    except OSError as exc:  # e.g. a parent folder this user may not enter
        raise StoreError(
            f"study.store {str(root)!r} cannot be inspected ({exc.strerror or exc}); fix the "
            "permissions of its folders or set study.store to a folder you can write"
        ) from None


def _probe_store(study: Study, root: Path) -> str:
    if root.exists() and not root.is_dir():
        raise StoreError(f"study.store {str(root)!r} is a file, not a folder; set study.store "
                         "to a new or empty folder")
    if not root.exists():
        parent = root.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise StoreError(f"study.store {str(root)!r} cannot be created: {str(parent)!r} is "
                             "a file; set study.store to a path under a folder")
        if not _writable(parent):
            _refuse_read_only(root, parent)
            raise StoreError(
                f"study.store {str(root)!r} cannot be created: {str(parent)!r} is not writable "
                "by this user; create the folder with write access for you, or set "
                "study.store to a folder you can write"
            )
        return f"store: new folder {root} (created on launch)"
    if not _writable(root):
        _refuse_read_only(root, root)
        raise StoreError(f"study.store {str(root)!r} is not writable by this user; fix the "
                         "folder's permissions or set study.store to a folder you can write")
    store = Store(root)
    if store.study_problem() is not None:
        return (f"store: {root} has an unreadable study.json; launch rewrites it from this "
                "study if every stored shard matches it (distsim.pipeline.restore)")
    held = store.read_study()
    if held is not None and held.get("hash") != study.hash:
        try:
            store.binding(study)
            what = ""
        except StoreError as exc:  # the launch's own refusal, which names the changed keys
            m = re.search(r"\((changed: .*)\); launch with --fresh", str(exc))
            what = f" ({m[1]})" if m else ""
        return (f"store: {root} holds study {held.get('name')!r} with another config{what}; "
                "launch needs --fresh (which wipes it) or a new study.store")
    outcome = store.binding(study)  # StoreError for a non-empty folder that is no store
    if outcome == "resumed":
        marked = {p.stem for p in (root / "_stages").glob("*.json")}
        done = [s for s in STAGE_NAMES if s in marked]
        if not done:
            state = "no stage done yet"
        elif len(done) == len(STAGE_NAMES):
            state = "every stage done"
        else:
            state = "done: " + ", ".join(done)
        return f"store: {root} holds this study (resumes; {state})"
    if store.exists:
        return f"store: {root} holds tables but no study.json (launch binds it to this study)"
    return f"store: empty folder {root} (used on launch)"


def _refuse_read_only(root: Path, folder: Path) -> None:
    """StoreError when `folder` is on a read-only filesystem (EROFS), which no permission fixes."""
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise StoreError(f"study.store {str(root)!r} is on a read-only file system (EROFS, at "
                         f"{str(folder)!r}); remount it read-write or set study.store to a "
                         "writable folder")


def _writable(folder: Path) -> bool:
    """This user may create files in `folder` (root passes everywhere but read-only mounts)."""
    return os.access(folder, os.W_OK | os.X_OK)


# ----------------------------------------------------------------------------- cluster
def check_cluster(
    study: Study,
    nodes: list[dict[str, Any]] | None = None,
    node_types: list[dict[str, float]] | None = None,
) -> None:
    """Refuse (LaunchError, one line) a study the connected Ray cluster cannot run.

    nodes: entries shaped like ``ray.nodes()`` (``Alive``, ``Resources`` with ``CPU``, ``GPU``);
    None reads ``ray.nodes()`` (Ray must be initialized). Dead nodes are ignored.
    node_types: the resources of each node type the autoscaler can add (an empty dict: not
    known, which skips the capacity checks); None reads them from the connected cluster when
    ``nodes`` is None too (:func:`autoscaler_node_types`), else means none.

    Refused, in this order: ``train.device = "cuda"`` (any arch) on a cluster without GPU;
    ``"cuda"`` with ``resources.gpus_per_trial = 0``; ``gpus_per_trial > 0`` on a cluster
    without GPU; ``gpus_per_test > 0`` on a cluster without GPU; one trial's {CPU:
    cpus_per_trial, GPU: gpus_per_trial}, one feature actor's {CPU: cpus_per_actor} or one
    pairs or tests task's {CPU: 1, GPU: gpus_per_test} fitting on no node.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
        if node_types is None:
            node_types = autoscaler_node_types(nodes)
    alive = [_shape(n.get("Resources")) for n in nodes if n.get("Alive")]
    if not alive:
        raise LaunchError("the Ray cluster has no alive node; check it with `ray status`")
    types = list(node_types or [])
    unknown = any(not t for t in types)
    shapes = alive + [_shape(t) for t in types if t]
    gpu_nodes = sum(1 for _, gpu in alive if gpu > 0)
    scale = ", nor any node type its autoscaler can add" if types else ""
    no_gpu = not unknown and all(gpu <= 0 for _, gpu in shapes)
    res = study.resources
    cpus, gpus = res.cpus_per_trial, res.gpus_per_trial
    cuda = _cuda_key(study)
    if cuda and no_gpu:
        raise LaunchError(
            f"{cuda} = 'cuda' but the Ray cluster has no GPU ({gpu_nodes} of {len(alive)} "
            f"nodes{scale}); use device = 'cpu' or 'auto', or add GPU nodes"
        )
    if cuda and gpus <= 0:
        raise LaunchError(
            f"{cuda} = 'cuda' but resources.gpus_per_trial = 0: Ray reserves no GPU for a "
            "trial, so trials may land on nodes without one or crowd one device unaccounted; "
            "set resources.gpus_per_trial (1: a GPU per trial, 0.25: 4 trials share one)"
        )
    if gpus > 0 and no_gpu:
        raise LaunchError(
            f"resources.gpus_per_trial = {gpus:g} but the Ray cluster has no GPU ({gpu_nodes} "
            f"of {len(alive)} nodes{scale}); trials would wait forever: set it to 0 (with "
            "train.device = 'cpu' or 'auto'), or add GPU nodes"
        )
    tests_gpus = res.gpus_per_test
    if tests_gpus > 0 and no_gpu:
        raise LaunchError(
            f"resources.gpus_per_test = {tests_gpus:g} but the Ray cluster has no GPU "
            f"({gpu_nodes} of {len(alive)} nodes{scale}); the pairs and tests tasks would wait "
            "forever: set it to 0 (pairs.backend and tests.backend 'auto' then run numpy), or "
            "add GPU nodes")
    if unknown:
        return  # a node type of unknown size might fit anything
    where = f"fits on no node of the Ray cluster{scale}"
    if not any(c + _EPS >= cpus and g + _EPS >= gpus for c, g in shapes):
        if not any(c + _EPS >= cpus for c, _ in shapes):
            big = max(shapes)
            raise LaunchError(f"resources.cpus_per_trial = {cpus:g} {where} (largest: "
                              f"{_size(big)}); trials would wait forever: lower it, or add "
                              "larger nodes")
        if not any(g + _EPS >= gpus for _, g in shapes):
            big = max(shapes, key=lambda s: (s[1], s[0]))
            raise LaunchError(f"resources.gpus_per_trial = {gpus:g} {where} (largest: "
                              f"{_size(big)}); trials would wait forever: lower it, or add "
                              "nodes with more GPUs")
        most = max(c for c, g in shapes if g + _EPS >= gpus)
        raise LaunchError(
            f"resources.cpus_per_trial = {cpus:g} with gpus_per_trial = {gpus:g} {where} (the "
            f"nodes with at least {_count(gpus, 'GPU')} have at most {_count(most, 'CPU')}); "
            "trials would wait forever: lower cpus_per_trial, or add GPU nodes with more CPUs"
        )
    actor = res.cpus_per_actor
    if not any(c + _EPS >= actor for c, _ in shapes):
        big = max(shapes)
        raise LaunchError(f"resources.cpus_per_actor = {actor:g} {where} (largest: "
                          f"{_count(big[0], 'CPU')}); feature actors would wait forever: lower "
                          "it, or add larger nodes")
    if not any(c + _EPS >= 1 and g + _EPS >= tests_gpus for c, g in shapes):
        big = max(shapes, key=lambda s: (s[1], s[0]))
        raise LaunchError(f"resources.gpus_per_test = {tests_gpus:g} with 1 CPU {where} "
                          f"(largest: {_size(big)}); the pairs and tests tasks would wait "
                          "forever: lower it, or add nodes with more GPUs")


def _shape(resources: Any) -> tuple[float, float]:
    """(CPUs, GPUs) of a node's or node type's resources dict."""
    r = resources or {}
    return float(r.get("CPU", 0) or 0), float(r.get("GPU", 0) or 0)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def _size(shape: tuple[float, float]) -> str:
    return f"{_count(shape[0], 'CPU')}, {_count(shape[1], 'GPU')}"


def _cuda_key(study: Study) -> str | None:
    """The key that sets device = "cuda" for the first arch that trains on cuda, or None."""
    if study.train is None:
        return None
    overrides = {arch: dict(pairs) for arch, pairs in study.train.overrides}
    for name in study.arch_names:
        if study.train_config(name).device == "cuda":
            return f"train.{name}.device" if "device" in overrides.get(name, {}) else "train.device"
    return None


def autoscaler_node_types(nodes: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Resources of the node types the connected cluster's autoscaler can add ([] when none or
    not known): from the cluster config in Ray's GCS (autoscaler v2, KubeRay), else, when this
    process runs on the head node, from the config ``ray up`` left there (autoscaler v1)."""
    types = _gcs_node_types()
    if types is None:
        import ray

        head = [n for n in nodes if n.get("Alive") and HEAD_RESOURCE in (n.get("Resources") or {})]
        if head and head[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
            types = bootstrap_node_types(Path(BOOTSTRAP_CONFIG).expanduser())
    return types or []


def _gcs_node_types() -> list[dict[str, float]] | None:
    try:  # a private API (ray.data and ray.train read it too); Ray is pinned in pyproject
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        return None
    if config is None or not config.node_group_configs:
        return None
    return [{k: float(v) for k, v in g.resources.items()}
            for g in config.node_group_configs if g.max_count != 0]


def bootstrap_node_types(path: Path) -> list[dict[str, float]] | None:
    """Resources of the node types in a ``ray up`` cluster config (head type included; types
    with ``max_workers = 0`` left out; ``{}`` for a type that does not give its resources), or
    None when the file is missing or not such a config."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        return None
    limit = config.get("max_workers", 2)  # Ray's default for the cluster's max_workers
    out = []
    for name, spec in config["available_node_types"].items():
        if not isinstance(spec, dict):
            continue
        if name != config.get("head_node_type") and not spec.get("max_workers", limit):
            continue
        resources = spec.get("resources") or {}
        out.append({str(k): float(v) for k, v in resources.items()
                    if isinstance(v, (int, float))})
    return out
