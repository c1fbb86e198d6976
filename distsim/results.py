"""The Python API of a finished study: ``distsim.open(path)`` reads its tables, features,
tasks and trained models back.

    import distsim
    res = distsim.open("stores/quickstart")        # a store folder, or the study's TOML
    res.models()                                    # polars DataFrame (lazy=True: LazyFrame)
    res.tests()                                     # with the summary's r2, q_value
    ids, tasks, X = res.features("mlp", "out", "chain-gram")
    net = res.load_model(ids[0])                    # torch module with the trained weights
    task = res.task(int(tasks[0]))                  # its train/test split

Everything is read from the store; the study comes from the store's ``study.json`` (the
config the store was computed with). Unknown model ids, archs, layers, methods and task ids
raise :class:`~distsim.errors.StoreError` naming what the study has.

Examples: ``open``'s runs (on a tiny store it writes by hand); the methods' examples read the
quickstart's store (``distsim launch jobs/quickstart.toml`` writes stores/quickstart, minutes
of training), so their lines are marked ``+SKIP`` and the doctests do not run them; the
outputs shown are that store's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from distsim.config import Study, load_study, study_from_dict
from distsim.config.arch import ArchConfig
from distsim.errors import DistsimError, StoreError
from distsim.layout import Layout, from_study, from_tables
from distsim.store import Store
from distsim.store.study import RESTORE
from distsim.store.tables import parse_model_id
from distsim.zoo.tasks import Task, make_tasks

if TYPE_CHECKING:
    import os

    import torch
    from torch import nn

_SHOWN = 5  # model ids named in an unknown-id error


def open(path: str | os.PathLike[str] | Store) -> Results:  # distsim.open: shadows the builtin
    """The results of the study stored at `path`: a store folder (or a Store), or a study
    TOML (whose [study] store is read). StoreError when there is no store there, or when the
    TOML's study is not the one the store holds.

    A launch writes a store; this one is written by hand with the Store API (a study.json and
    two tests rows, no models) so that the example runs in a second:

    >>> import shutil, tempfile
    >>> import distsim
    >>> from distsim.config import study_from_dict
    >>> folder = tempfile.mkdtemp()
    >>> study = study_from_dict({"study": {"name": "tiny", "store": "store"},
    ...                          "data": {"dataset": "synthetic", "num_tasks": 2},
    ...                          "arch": [{"name": "mlp", "kind": "mlp", "widths": [4]}],
    ...                          "train": {"seeds_per_task": 2}}, base_dir=folder)
    >>> store = Store(study.store)
    >>> store.check_study(study)  # study.json, as a launch binds its store
    'created'
    >>> for protocol, p, extra in (("closed-set", 0.01, "{}"), ("permanova", 0.04, '{"r2": 0.3}')):
    ...     key = {"arch": "mlp", "method": "raw", "layer": "out", "protocol": protocol}
    ...     _ = store.write_shard("tests", key, [{"p_value": p, "extra": extra}])
    >>> res = distsim.open(study.store)  # or the study's TOML
    >>> res  # doctest: +ELLIPSIS
    Results('tiny': 0 models, archs mlp; store '...')
    >>> res.tests().select("protocol", "p_value", "r2", "q_value").rows()
    [('closed-set', 0.01, None, 0.02), ('permanova', 0.04, 0.3, 0.04)]
    >>> shutil.rmtree(folder)
    """
    path = path.root if isinstance(path, Store) else Path(path)
    toml: Study | None = None
    if path.suffix == ".toml":
        toml = load_study(path)
        path = Path(toml.store)
    store = Store(path)
    if not store.exists:
        raise StoreError(f"no distsim store at {str(path)!r} (no study.json or tables); "
                         "run `distsim launch` first")
    problem = store.study_problem()
    if problem is not None:  # the tables are read all the same; what needs the config says so
        warnings.warn(f"the study's config is unknown ({problem}); the tables "
                      "are read as stored", stacklevel=2)
        if toml is not None:
            raise StoreError(f"{problem}; {RESTORE}; open the store folder to read its tables")
        return Results(store, None, f"{problem}; {RESTORE}")
    res = Results(store, held_study(store))
    if toml is not None and toml.hash != res.config_hash:
        raise StoreError(f"store {str(store.root)!r} holds study {res.study.name!r} with config "
                         f"{res.config_hash[:12]}, not the study file's {toml.hash[:12]}; open "
                         "the store folder to read what it holds")
    return res


def held_study(store: Store) -> Study:
    """The study that wrote `store` (its study.json, with study.store set to the store's
    real folder); StoreError when study.json is missing or not a valid study."""
    held = store.read_study()
    if not held or not isinstance(held.get("config"), dict):
        raise StoreError(f"{str(store.root)!r} has no readable study.json; its study is unknown")
    config = dict(held["config"])
    config["study"] = {**config.get("study", {}), "store": str(store.root)}
    try:
        return study_from_dict(config, source=str(held.get("source", "<store>")))
    except DistsimError as exc:
        raise StoreError(f"{store.root / 'study.json'}: not a valid study ({exc})") from None


class Results:
    """A finished (or partial) study: its Study, its Store, and readers of both.

    Frames are polars DataFrames, or LazyFrames with ``lazy=True``; models in study arch
    order, then task and seed.
    """

    def __init__(self, store: Store, study: Study | None, unknown: str = "") -> None:
        self.store = store
        self._study, self._unknown = study, unknown

    @property
    def study(self) -> Study:
        """The study that wrote the store (its study.json). StoreError when study.json is
        unreadable: the tables are read all the same (models, tests, features, neighbors,
        pairs, history), but tasks and models, which need the config, are not."""
        if self._study is None:
            raise StoreError(f"the study's config is unknown: {self._unknown}")
        return self._study

    @functools.cached_property
    def layout(self) -> Layout:
        """Archs, layers and methods: the study's, or the tables' when its config is unknown."""
        return from_tables(self.store) if self._study is None else from_study(self._study)

    @property
    def config_hash(self) -> str:
        """The config hash study.json records, which a launch compares a study file with
        (``study.hash`` recomputed by this distsim may differ for an older store)."""
        return str((self.store.read_study(strict=False) or {}).get("hash") or self.study.hash)

    def __repr__(self) -> str:
        n = self.store.scan("models").select(pl.len()).collect().item()
        name = repr(self._study.name) if self._study is not None else "config unknown"
        return (f"Results({name}: {n} models, archs {', '.join(self.layout.archs)}; store "
                f"{str(self.store.root)!r})")

    # ------------------------------------------------------------------ tables
    def models(self, lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
        """The models table: one row per model (status, accuracies, losses, time; an imported
        model's metadata as columns too, distsim.store.query.models_with_meta).

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> models = res.models()  # doctest: +SKIP
        >>> models.select("model_id", "task", "seed", "test_acc").head(2).rows()  # doctest: +SKIP
        [('mlp-t0-s0', 0, 0, 1.0), ('mlp-t0-s1', 0, 1, 1.0)]
        """
        from distsim.store.query import models_with_meta

        return self._done(self._in_order(models_with_meta(self.store), "task", "seed"), lazy)

    def tests(self, lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
        """The tests table plus ``r2`` (PERMANOVA, PERMDISP; null for HTT) and ``q_value``
        (Benjamini-Hochberg over every test in the store): the values the launch summary and
        ``distsim query tests`` show, from the same function (distsim.store.query.tests_with_q).

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> one = pl.col("layer") == "fc2", pl.col("method") == "chain-gram"  # doctest: +SKIP
        >>> res.tests().filter(*one).select("protocol", "r2", "q_value").rows()  # doctest: +SKIP
        [('closed-set', None, 0.0133...), ('open-set', None, 0.0133...),
         ('permanova', 0.8236..., 0.0133...), ('permdisp', 0.1375..., 0.0671...)]
        """
        from distsim.store.query import tests_with_q

        return self._done(self._in_order(tests_with_q(self.store), "layer", "method",
                                         "protocol"), lazy)

    def along_training(self) -> pl.DataFrame:
        """Every test of a study with saved epochs (``[train] save_epochs``) against the epoch
        of the checkpoints it tested: the tests rows that have an epoch, with their effect size
        (``effect``: accuracy or mAP - chance for closed-set and open-set, R^2 for PERMANOVA and
        PERMDISP, named by ``effect_name``; ``partial_r2`` of a multi-factor PERMANOVA), the
        numbers ``distsim report``'s along-training figure draws. Columns arch, method, layer,
        factor, protocol, epoch, effect, effect_name, partial_r2, observed, chance, p_value,
        n_models; sorted by arch (study order), layer, method, factor, protocol and epoch;
        empty, with those columns, for a study without epochs.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> res.along_training().height  # the quickstart saves no epochs  # doctest: +SKIP
        0
        >>> res = distsim.open("stores/epochs")  # a study with save_epochs  # doctest: +SKIP
        >>> curves = res.along_training()  # doctest: +SKIP
        >>> one = pl.col("layer") == "out", pl.col("protocol") == "permanova"  # doctest: +SKIP
        >>> curves.filter(*one).select("method", "factor", "epoch", "effect")  # doctest: +SKIP
        """
        from distsim.report.effects import along_training

        rows = along_training(self.store.scan("tests").collect())
        return self._in_order(rows.lazy(), "layer", "method", "factor", "protocol",
                              "epoch").collect()

    def neighbors(self, model_id: str | None = None, *, arch: str | None = None,
                  layer: str | None = None, method: str | None = None,
                  lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
        """Nearest neighbours in feature space (rank 1 = nearest), optionally of one model
        and of one arch, layer and method.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> nb = res.neighbors("mlp-t0-s0", layer="out", method="chain-gram")  # doctest: +SKIP
        >>> nb.select("rank", "neighbor_id", "same_task").head(2).rows()  # doctest: +SKIP
        [(1, 'mlp-t0-s5', True), (2, 'mlp-t0-s7', True)]
        """
        self._check_matrix(arch, layer, method)
        lf = self.store.scan("neighbors")
        if model_id is not None:
            self.model(model_id)  # StoreError for an unknown id
            lf = lf.filter(pl.col("model_id") == model_id)
        for col, value in (("arch", arch), ("layer", layer), ("method", method)):
            if value is not None:
                lf = lf.filter(pl.col(col) == value)
        return self._done(self._in_order(lf, "layer", "method", "task", "model_id", "rank"), lazy)

    def history(self, model_id: str | None = None,
                lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
        """The training history: one row per model and epoch (empty when the store has none).

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> res.history("mlp-t0-s0").select("epoch", "test_acc").tail(1).rows()  # doctest: +SKIP
        [(10, 1.0)]
        """
        lf = self.store.scan("history")
        if model_id is not None:
            self.model(model_id)
            lf = lf.filter(pl.col("model_id") == model_id)
        return self._done(self._in_order(lf, "task", "seed", "epoch"), lazy)

    def model(self, model_id: str) -> dict[str, Any]:
        """The models-table row of one model as a dict; StoreError for an unknown id.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> row = res.model("mlp-t0-s0")  # doctest: +SKIP
        >>> row["task"], row["seed"], row["status"], row["test_acc"]  # doctest: +SKIP
        (0, 0, 'ok', 1.0)
        """
        return self.model_rows([model_id])[model_id]

    def model_rows(self, model_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{model_id: its models-table row as a dict} in the order given; StoreError naming
        the first unknown id.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> list(res.model_rows(["mlp-t0-s0", "cnn-t1-s12"]))  # doctest: +SKIP
        ['mlp-t0-s0', 'cnn-t1-s12']
        """
        ids = list(dict.fromkeys(model_ids))
        lf = self.store.scan("models")
        parsed = [parse_model_id(m) if isinstance(m, str) else None for m in ids]
        if ids and None not in parsed:  # only the archs' hive partitions
            lf = lf.filter(pl.col("arch").is_in(sorted({p[0] for p in parsed if p})))
        rows = {r["model_id"]: r for r in
                lf.filter(pl.col("model_id").is_in(ids)).collect().iter_rows(named=True)}
        missing = [m for m in ids if m not in rows]
        if missing:
            raise StoreError(self._unknown_model(missing[0]))
        return {m: rows[m] for m in ids}

    # ------------------------------------------------------------------ features and tasks
    def features(self, arch: str, layer: str, method: str, epoch: int | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The feature matrix of one (arch, layer, method): model ids, their tasks (N,) int64
        and the features (N, D) float32, rows sorted by task, then seed. A study with
        ``[train] save_epochs`` has one per saved epoch: `epoch` picks it (every checkpoint
        when None).

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> ids, tasks, X = res.features("mlp", "fc2", "chain-gram")  # doctest: +SKIP
        >>> ids[:2], tasks[:2].tolist(), X.shape  # doctest: +SKIP
        (['mlp-t0-s0', 'mlp-t0-s1'], [0, 0], (120, 2145))
        """
        self._check_matrix(arch, layer, method)
        fm = self.store.feature_matrix(arch, method, layer, epoch)
        if not fm.model_ids:
            at = "" if epoch is None else f" at epoch {epoch}"
            raise StoreError(f"features {arch}/{layer}/{method}{at}: none in the store; run "
                             "`distsim launch` (stage features), or pick a saved epoch")
        return fm.model_ids, fm.tasks, fm.X

    def task(self, task_id: int) -> Task:
        """One of the study's tasks (its train/test split), rebuilt from the study's data
        config exactly as the zoo trained on it.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> task = res.task(0)  # doctest: +SKIP
        >>> task.name, task.classes, task.x_train.shape, task.x_test.shape  # doctest: +SKIP
        ('digits:0v1', (0, 1), (270, 1, 8, 8), (90, 1, 8, 8))
        """
        if self.study.imports or self.study.data is None:
            raise StoreError(f"study {self.study.name!r} imported its models: it has no tasks "
                             "to rebuild")
        n = self.study.data.num_tasks
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)) \
                or not 0 <= task_id < n:
            raise StoreError(f"task {task_id!r}: the study has tasks 0..{n - 1}")
        return self._tasks[int(task_id)]

    @functools.cached_property
    def _tasks(self) -> tuple[Task, ...]:
        assert self.study.data is not None  # task() refused an import study
        return tuple(make_tasks(self.study.data))

    def arch_config(self, arch: str, task_id: int = 0) -> ArchConfig:
        """The ArchConfig of one arch sized for a task's samples and classes (every task of a
        study has the same), the config its models were built from.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> cfg = res.arch_config("cnn")  # doctest: +SKIP
        >>> cfg.channels, cfg.input_shape, cfg.num_classes  # doctest: +SKIP
        ((8, 16), (1, 8, 8), 2)
        """
        self._check_matrix(arch, None, None)
        if self.study.imports:  # declared whole by the study
            return self.study.arch(arch)
        task = self.task(task_id)
        return self.study.arch(arch).with_task_shape(task.input_shape, task.num_classes)

    # ------------------------------------------------------------------ models
    def load_model(self, model_id: str, normalized: bool = False) -> nn.Module:
        """The trained model `model_id` as a float32 CPU torch module in eval mode.

        normalized: its chain-normalized weights instead (distsim.weights.normalize); for the ReLU /
        LeakyReLU MLPs and CNNs that is the same function (same logits up to rounding), for
        tanh, GELU and sigmoid nets another function (their units have no rescaling symmetry:
        ``chain_normalize(...).function_preserving`` is False), for the GRU the weights are
        unchanged (a GRU has no rescaling symmetry), for a ResNet or transformer a ValueError.
        Its predictions
        on ``task(row["task"]).x_test`` give the stored test_acc (for a study trained on the
        CPU in float32, the defaults; other devices and dtypes round differently). StoreError
        for an unknown id or a model whose training failed.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> net, task = res.load_model("mlp-t0-s0"), res.task(0)  # doctest: +SKIP
        >>> x = torch.as_tensor(task.x_test)  # doctest: +SKIP
        >>> float((net(x).argmax(1).numpy() == task.y_test).mean())  # doctest: +SKIP
        1.0
        """
        return self.load_models([model_id], normalized)[0]

    def load_models(self, model_ids: Sequence[str], normalized: bool = False) -> list[nn.Module]:
        """:meth:`load_model` of several models (in the order given), reading each weights
        shard once.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> len(res.load_models(["mlp-t0-s0", "mlp-t0-s1"], normalized=True))  # doctest: +SKIP
        2
        """
        rows = self.model_rows(model_ids)
        states = self.state_dicts(list(rows), normalized)
        return [self._module(rows[mid], states[mid]) for mid in model_ids]

    def state_dicts(self, model_ids: Sequence[str],
                    normalized: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """{model_id: state dict of float32 CPU tensors} in the order given, keys those of
        distsim.zoo.models.build's modules; optionally chain-normalized (see :meth:`load_model`).
        StoreError for an unknown model or one whose training failed.

        >>> res = distsim.open("stores/quickstart")  # doctest: +SKIP
        >>> state = res.state_dicts(["mlp-t0-s0"])["mlp-t0-s0"]  # doctest: +SKIP
        >>> list(state), tuple(state["1.weight"].shape)  # doctest: +SKIP
        (['1.weight', '1.bias', '3.weight', '3.bias', '5.weight', '5.bias'], (32, 64))
        """
        rows = self.model_rows(model_ids)
        for mid, row in rows.items():
            if row["status"] == "failed":
                raise StoreError(f"model {mid}: its training failed ({row['error']}); it has "
                                 "no weights")
        states = self.store.read_state_dicts(list(rows))
        if normalized:
            from distsim.weights.normalize import chain_normalize_state

            for mid, row in rows.items():
                cfg = self.arch_config(row["arch"], row["task"])
                if cfg.kind in ("resnet", "transformer"):
                    raise ValueError(f"normalized=True: {cfg.kind} {row['arch']!r} has no "
                                     "chain-normalized state dict (its features normalize the "
                                     "BatchNorm-folded or MLP weights inside distsim.weights)")
                states[mid] = {k: v[0] for k, v in chain_normalize_state([states[mid]],
                                                                          cfg).items()}
        return states

    def _module(self, row: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        """A module of the row's arch holding `state` (built on the meta device: no random
        init, no draw from torch's global generator)."""
        import torch

        from distsim.zoo.models import build  # torch: only when a model is asked for

        with torch.device("meta"):
            module = build(self.arch_config(row["arch"], row["task"]))
        module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
        return module.eval()

    # ------------------------------------------------------------------ checks and order
    def _check_matrix(self, arch: str | None, layer: str | None, method: str | None) -> None:
        """StoreError naming what the study has when arch, layer or method is not in it."""
        archs = self.layout.archs
        if arch is not None and arch not in archs:
            raise StoreError(f"arch {arch!r}: the study has archs {', '.join(archs)}")
        if layer is not None:
            mine = [arch] if arch is not None else list(archs)
            layers = list(dict.fromkeys(x for a in mine for x in self.layout.layers[a]))
            if layer not in layers:
                where = f" of arch {arch}" if arch is not None else ""
                raise StoreError(f"layer {layer!r}: the study's feature layers{where} are "
                                 f"{', '.join(layers)}")
        methods = self.layout.methods
        if method is not None and method not in methods:
            raise StoreError(f"method {method!r}: the study's methods are {', '.join(methods)}")

    def _unknown_model(self, model_id: object) -> str:
        ids = self.store.scan("models").select("model_id").collect()["model_id"]
        near = sorted(ids.to_list())[:_SHOWN]
        listed = ", ".join(near) + (f", ... ({len(ids)} in all)" if len(ids) > _SHOWN else "")
        return f"model_id {model_id!r}: no such model in the store; it has {listed or 'none'}"

    def _in_order(self, lf: pl.LazyFrame, *then: str) -> pl.LazyFrame:
        """`lf` sorted by arch in study order, then by the columns `then`."""
        archs = list(self.layout.archs)
        rank = pl.col("arch").replace_strict(archs, list(range(len(archs))),
                                             default=len(archs), return_dtype=pl.Int64)
        return lf.sort([rank, pl.col("arch"), *then])

    @staticmethod
    def _done(lf: pl.LazyFrame, lazy: bool) -> pl.DataFrame | pl.LazyFrame:
        return lf if lazy else lf.collect()

