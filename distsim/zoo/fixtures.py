"""Small zoos in the foreign layouts distsim.zoo.sources reads, for tests, docs and benchmarks.

Every writer builds its models with ``distsim.zoo.models.build(arch)`` and trains them briefly
(plain torch SGD, momentum 0.9, batches of 32, cross-entropy) on two classes of scikit-learn's
digits (``data="digits"``: task k is digits 2k vs 2k + 1; arch input (1, 8, 8), 2 classes) or
on a synthetic Gaussian mixture of the arch's input shape (``data="synthetic"``), over a grid
of learning rates x seeds, with one checkpoint per epoch where the layout keeps epochs.
``train=False`` writes fast, without training or metrics (None): each model's seeded init
scaled by ``1 + 10 * lr`` (and, for state-dicts, by 1 + the label's index), times
``1 + epoch / 10`` at each epoch, so grouping by learning rate, label or epoch still has an
effect. ``models`` cuts the grid (seed-major) to its
first models. The files follow the published layouts (see distsim.zoo.sources):

- :func:`write_model_zoos`: ``<out>/tune_zoo_fixture/<trial>/`` per model, as Ray Tune and the
  ModelZoos trainable write it: ``checkpoint_<epoch>/checkpoints`` (torch.save of the state dict,
  names ``module_list.<i>.*`` for mlp and cnn), ``result.json`` (one line per checkpoint:
  ``train_loss, train_acc, test_loss, test_acc``, Ray's ``training_iteration``, ..., ``config``)
  and ``params.json`` (the config: ``model::nlin``, ``optim::lr``, ``seed``, ...).
- :func:`write_weights_table`: ``weights.npy``, ``layout.csv`` and ``metrics.csv[.gz]`` of the
  Small CNN Zoo, the weights as Keras holds them (:func:`tensorflow_variables`), a row per
  model and epoch (``step``).
- :func:`write_state_dicts`: ``<out>/<label>/<label>-<j>.safetensors|.pt`` (label k: digits
  task k), the final state, and a ``manifest.csv|.parquet`` (path, label, seed, lr, test_acc)
  or none (folder labels).
- :func:`write_distsim_export`: what ``distsim export`` writes, per model or stacked per arch.

``python -m distsim.zoo.fixtures FORMAT OUT [--models N] [--epochs E] [--no-train]`` writes one
(an 8x8 CNN with channels (4, 8) unless ``--arch`` says otherwise) and prints what it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.zoo.mapping import flattened_shape
from distsim.zoo.models import build
from distsim.zoo.tasks import Task, make_tasks

WRITERS = ("model-zoos", "weights-table", "state-dicts", "distsim-export")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
EXPERIMENT = "tune_zoo_fixture"  # the Ray Tune experiment folder of write_model_zoos
_State = dict[str, torch.Tensor]


def write_model_zoos(out: str | os.PathLike[str], arch: ArchConfig, *,
                     lrs: Sequence[float] = (0.01, 0.1), seeds: int = 3, epochs: int = 3,
                     activation: str | None = None, data: str = "digits", start: int = 0,
                     train: bool = True, padded: bool = True,
                     models: int | None = None) -> Path:
    """A Model-Zoos zoo under `out`; returns its experiment folder (the published loader's root;
    `out` itself holds it one level below). Checkpoints of epochs start..epochs (epoch 0: the
    init, as the published zoos keep it); padded: ``checkpoint_000003``, else ``checkpoint_3``.
    activation: the arch's activation for these models (``model::nlin``); the trial folders name
    it, so zoos of two activations can share one `out`."""
    arch = arch if activation is None else dataclasses.replace(arch, activation=activation)
    task = _tasks(arch, data, 1)[0]
    root = Path(out) / EXPERIMENT
    prefix = "module_list." if arch.kind != "rnn" else ""
    run = hashlib.sha1(arch.activation.encode()).hexdigest()[:5]  # one run per activation
    for i, (lr, seed) in enumerate(_grid(lrs, seeds, models)):
        config = {"model::type": arch.kind.upper(), "model::channels_in": arch.input_shape[0],
                  "model::o_dim": arch.num_classes, "model::nlin": arch.activation,
                  "model::dropout": 0.0, "model::init_type": "torch_default",
                  "optim::optimizer": "sgd", "optim::lr": lr, "optim::wd": 0.0,
                  "optim::momentum": 0.9, "seed": seed, "training::batchsize": 32,
                  "training::epochs_train": epochs, "training::start_epoch": 1,
                  "training::output_epoch": 1, "cuda": False}
        trial_id = f"{run}_{i:05d}"  # Ray Tune's <experiment run>_<trial index>
        trial = root / (f"NN_tune_trainable_{trial_id}_{i}_nlin={arch.activation},lr={lr},"
                        f"seed={seed}_2024-01-01_00-00-00")
        lines = []
        for epoch, state, metrics in _trajectory(arch, task, lr, seed, epochs, start, train):
            folder = trial / (f"checkpoint_{epoch:06d}" if padded else f"checkpoint_{epoch}")
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({prefix + k: v for k, v in state.items()}, folder / "checkpoints")
            lines.append({**metrics, "done": epoch == epochs, "training_iteration": epoch,
                          "trial_id": trial_id, "experiment_id": "fixture",
                          "date": "2024-01-01_00-00-00", "timestamp": 1704067200 + epoch,
                          "time_this_iter_s": 0.01, "time_total_s": 0.01 * (epoch + 1),
                          "pid": 1, "hostname": "fixture", "config": config})
        (trial / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (trial / "params.json").write_text(json.dumps(config, indent=2))
    return root


def write_weights_table(out: str | os.PathLike[str], arch: ArchConfig, *,
                        lrs: Sequence[float] = (0.01, 0.1), seeds: int = 3, epochs: int = 3,
                        activation: str | None = None, data: str = "digits", gz: bool = False,
                        train: bool = True, models: int | None = None) -> Path:
    """A Small-CNN-Zoo table under `out` (returned): a weights.npy row per model and epoch
    0..epochs (float32, Keras variable order), layout.csv, metrics.csv (gz: metrics.csv.gz)."""
    arch = arch if activation is None else dataclasses.replace(arch, activation=activation)
    task = _tasks(arch, data, 1)[0]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[np.ndarray] = []
    meta: list[dict[str, Any]] = []
    layout: list[dict[str, Any]] = []
    for i, (lr, seed) in enumerate(_grid(lrs, seeds, models)):
        for epoch, state, m in _trajectory(arch, task, lr, seed, epochs, 0, train):
            variables = tensorflow_variables(state, arch)
            rows.append(np.concatenate([v.ravel() for _, v in variables]))
            meta.append({
                "config.activation": arch.activation, "config.b_init": "torch_default",
                "config.dataset": data, "config.dnn_architecture": arch.kind,
                "config.dropout": 0.0, "config.epochs": epochs,
                "config.epochs_between_checkpoints": 1, "config.init_std": 0.0,
                "config.l2reg": 0.0, "config.learning_rate": lr,
                "config.num_layers": len(arch.channels if arch.kind == "cnn" else arch.widths),
                "config.num_units": (arch.channels if arch.kind == "cnn" else arch.widths)[0],
                "config.optimizer": "sgd", "config.random_seed": seed,
                "config.train_fraction": 1.0, "config.w_init": "torch_default",
                "modeldir": f"fixture/{i:05d}", "step": epoch,
                "test_accuracy": m["test_acc"], "test_loss": m["test_loss"],
                "train_accuracy": m["train_acc"], "train_loss": m["train_loss"]})
        if not layout:
            start = 0
            for name, v in variables:
                layout.append({"varname": name, "start_idx": start, "end_idx": start + v.size,
                               "shape": str(tuple(v.shape))})
                start += v.size
    np.save(root / "weights.npy", np.stack(rows).astype(np.float32))
    pl.DataFrame(layout).write_csv(root / "layout.csv")
    text = pl.DataFrame(meta).write_csv().encode()
    if gz:
        (root / "metrics.csv.gz").write_bytes(gzip.compress(text, mtime=0))
    else:
        (root / "metrics.csv").write_bytes(text)
    return root


def write_state_dicts(out: str | os.PathLike[str], arch: ArchConfig, *,
                      labels: Sequence[str] = ("a", "b"), per_label: int = 4,
                      fmt: str = "safetensors", manifest: str | None = "csv",
                      lrs: Sequence[float] = (0.01, 0.1), epochs: int = 2, data: str = "digits",
                      train: bool = True, models: int | None = None) -> Path:
    """A folder of state dicts under `out` (returned): per label k (trained on task k),
    per_label models (seed j, learning rate lrs[j % len(lrs)]) after `epochs` epochs, as
    ``<label>/<label>-<j>.<fmt>`` (fmt: "safetensors" or "pt"); manifest "csv", "parquet" or
    None (labels from the folder names)."""
    if fmt not in ("safetensors", "pt") or manifest not in ("csv", "parquet", None):
        raise ValueError(f"fmt must be safetensors|pt and manifest csv|parquet|None, got "
                         f"{fmt!r}, {manifest!r}")
    tasks, root, rows = _tasks(arch, data, len(labels)), Path(out), []
    grid = [(k, j) for j in range(per_label) for k in range(len(labels))][:models]
    for k, j in grid:
        lr = lrs[j % len(lrs)]
        _, state, m = _trajectory(arch, tasks[k], lr, j, epochs, epochs, train, 1.0 + k)[-1]
        rel = f"{labels[k]}/{labels[k]}-{j:03d}.{fmt}"
        (root / labels[k]).mkdir(parents=True, exist_ok=True)
        if fmt == "pt":
            torch.save(state, root / rel)
        else:
            from safetensors.torch import save_file

            save_file(state, root / rel)
        rows.append({"path": rel, "label": labels[k], "seed": j, "lr": lr,
                     "test_acc": m["test_acc"]})
    frame = pl.DataFrame(rows)
    if manifest == "csv":
        frame.write_csv(root / "manifest.csv")
    elif manifest == "parquet":
        frame.write_parquet(root / "manifest.parquet")
    return root


def write_distsim_export(out: str | os.PathLike[str], arch: ArchConfig, *, tasks: int = 2,
                         seeds: int = 3, epochs: int = 2, lr: float = 0.1, stacked: bool = False,
                         data: str = "digits", train: bool = True) -> Path:
    """What ``distsim export`` writes under `out` (returned), with distsim.export's own writer:
    per model ``<arch>-t<task>-s<seed>.safetensors|.json``, or (stacked) ``<arch>.safetensors``
    and ``<arch>.json`` with the models by task then seed."""
    from distsim import __version__
    from distsim.export import MODEL_FORMAT, ZOO_FORMAT, _write

    root, made = Path(out), _tasks(arch, data, tasks)
    arch_doc = json.loads(json.dumps(dataclasses.asdict(arch)))
    docs, states, rows = [], [], []
    for task in made:
        for seed in range(seeds):
            _, state, m = _trajectory(arch, task, lr, seed, epochs, epochs, train)[-1]
            mid = f"{arch.name}-t{task.task_id}-s{seed}"
            rows.append({"model_id": mid, "arch": arch.name, "task": task.task_id,
                         "task_name": task.name, "pack": 0, "seed": seed, "trial_id": "fixture",
                         "status": "ok", **m, "epochs": epochs, "seconds": 0.1,
                         "node": "fixture", "error": None})
            docs.append({"id": task.task_id, "name": task.name, "classes": list(task.classes),
                         "input_shape": list(task.input_shape), "num_classes": task.num_classes})
            states.append(state)
    shapes = {k: list(v.shape) for k, v in states[0].items()}
    common = {"study": {"name": "fixture", "hash": "0" * 16}, "distsim_version": __version__}
    if stacked:
        stack = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        _write(root, arch.name, stack, {
            "format": ZOO_FORMAT, "arch": arch_doc,
            "tensors": {k: list(v.shape) for k, v in stack.items()}, "stack_axis": 0,
            "model_ids": [r["model_id"] for r in rows], "models": rows,
            "tasks": [docs[t * seeds] for t in range(tasks)], **common})
    else:
        for row, doc, state in zip(rows, docs, states, strict=True):
            _write(root, row["model_id"], state, {
                "format": MODEL_FORMAT, "model_id": row["model_id"], "arch": arch_doc,
                "tensors": shapes, "metrics": row, "task": doc, **common})
    return root


def tensorflow_variables(state: _State, arch: ArchConfig) -> list[tuple[str, np.ndarray]]:
    """A build(arch) state dict (mlp or cnn) as Keras holds it: ``sequential/<layer>/kernel:0``
    and ``bias:0`` (layers conv2d, conv2d_1, ..., conv1d, dense, dense_1, ...), kernels
    (kh, kw, in, out), (k, in, out) or (in, out), the first Dense reading the flatten in
    channels-last order; sorted by name, as TensorFlow lists variables (bias before kernel)."""
    if arch.kind == "rnn":
        raise ValueError("the tensorflow layout holds mlp and cnn models, not rnn")
    counts: dict[str, int] = {}
    variables, first_dense = [], True
    items = list(state.items())
    for (_, weight), (_, bias) in zip(items[::2], items[1::2], strict=True):
        w = weight.detach().numpy()
        kind = {4: "conv2d", 3: "conv1d", 2: "dense"}[w.ndim]
        if w.ndim == 2 and first_dense:  # inputs from torch's (C, *spatial) to (*spatial, C)
            channels, *sizes = flattened_shape(arch)
            w = np.moveaxis(w.reshape(len(w), channels, *sizes), 1, -1).reshape(len(w), -1)
            first_dense = False
        kernel = w.transpose(*range(2, w.ndim), 1, 0)  # (out, in, *k) -> (*k, in, out)
        n = counts[kind] = counts.get(kind, -1) + 1
        layer = f"sequential/{kind}{'' if n == 0 else f'_{n}'}"
        variables += [(f"{layer}/kernel:0", np.ascontiguousarray(kernel)),
                      (f"{layer}/bias:0", bias.detach().numpy().copy())]
    return sorted(variables, key=lambda v: v[0])


def _grid(lrs: Sequence[float], seeds: int, models: int | None) -> list[tuple[float, int]]:
    """(learning rate, seed) of every model, seed-major, cut to the first `models`."""
    return [(float(lr), seed) for seed in range(seeds) for lr in lrs][:models]


def _tasks(arch: ArchConfig, data: str, n: int) -> list[Task]:
    """n tasks whose samples fit the arch: digits class pairs, or synthetic mixtures."""
    if data == "digits":
        if tuple(arch.input_shape) != (1, 8, 8) or arch.num_classes != 2:
            raise ValueError(f"data='digits' needs an arch with input_shape (1, 8, 8) and 2 "
                             f"classes, got {arch.input_shape} and {arch.num_classes} (use "
                             "data='synthetic')")
        return make_tasks(DataConfig(dataset="digits", num_tasks=n, pairing="consecutive"))
    if data != "synthetic":
        raise ValueError(f"data must be 'digits' or 'synthetic', got {data!r}")
    shape = tuple(arch.input_shape)
    cfg = DataConfig(dataset="synthetic", num_tasks=n, synthetic_classes=arch.num_classes,
                     synthetic_samples=48,
                     synthetic_shape=shape if len(shape) == 3 else (shape[0], 1, shape[1]))
    return [dataclasses.replace(t, x_train=t.x_train.reshape(-1, *shape),
                                x_test=t.x_test.reshape(-1, *shape)) for t in make_tasks(cfg)]


def _trajectory(arch: ArchConfig, task: Task, lr: float, seed: int, epochs: int, start: int,
                train: bool, scale: float = 1.0) -> list[tuple[int, _State, dict[str, Any]]]:
    """(epoch, state dict, metrics) of one model at epochs start..epochs (0: its init)."""
    torch.manual_seed(seed)
    model = build(arch)
    if not train:
        init = {k: v * (scale * (1 + 10 * lr)) for k, v in model.state_dict().items()}
        return [(e, {k: v * (1 + e / 10) for k, v in init.items()}, dict.fromkeys(METRICS))
                for e in range(start, epochs + 1)]
    x, y = torch.from_numpy(task.x_train), torch.from_numpy(task.y_train)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    out = [(0, _snapshot(model), _metrics(model, task))] if start == 0 else []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch >= start:
            out.append((epoch, _snapshot(model), _metrics(model, task)))
    return out


def _snapshot(model: torch.nn.Module) -> _State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _metrics(model: torch.nn.Module, task: Task) -> dict[str, Any]:
    out = {}
    for split, x, y in (("train", task.x_train, task.y_train), ("test", task.x_test, task.y_test)):
        logits, labels = model(torch.from_numpy(x)), torch.from_numpy(y)
        out[f"{split}_loss"] = float(F.cross_entropy(logits, labels))
        out[f"{split}_acc"] = float((logits.argmax(1) == labels).float().mean())
    return {k: out[k] for k in METRICS}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: write one zoo, print its size and time."""
    parser = argparse.ArgumentParser(prog="python -m distsim.zoo.fixtures",
                                     description="Write a small zoo in a foreign layout.")
    parser.add_argument("format", choices=WRITERS)
    parser.add_argument("out", help="folder to write under (created)")
    parser.add_argument("--models", type=int, default=12, help="models in all (default 12)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--no-train", action="store_true", help="random weights, no training")
    parser.add_argument("--start", type=int, default=0, help="model-zoos: first checkpoint")
    parser.add_argument("--arch", choices=("mlp", "cnn", "rnn"), default="cnn")
    args = parser.parse_args(argv)
    arch = ArchConfig(kind=args.arch, widths=(16,), channels=(4, 8), hidden=8,
                      input_shape=(1, 8, 8), num_classes=2)
    n, train, t0 = args.models, not args.no_train, time.perf_counter()
    half = math.ceil(n / 2)
    if args.format == "model-zoos":
        root = write_model_zoos(args.out, arch, seeds=half, epochs=args.epochs, train=train,
                                start=args.start, models=n)
    elif args.format == "weights-table":
        root = write_weights_table(args.out, arch, seeds=half, epochs=args.epochs, train=train,
                                   models=n)
    elif args.format == "state-dicts":
        root = write_state_dicts(args.out, arch, per_label=half, epochs=args.epochs,
                                 train=train, models=n)
    else:  # 2 tasks x seeds: n rounded up to even
        root = write_distsim_export(args.out, arch, tasks=2, seeds=half, epochs=args.epochs,
                                    train=train)
        n = 2 * half
    files = sum(len(f) for _, _, f in os.walk(root))
    print(f"{args.format}: {n} models, {files} files under {root} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
