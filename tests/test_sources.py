"""Foreign zoos (distsim.zoo.sources, mapping, fixtures): every layout lists and reads its
fixture, epochs select, metadata keep their names and types, digests follow bytes not mtimes,
every error is one line naming its file, and a mapped checkpoint computes the function of the
model that was written (checked against the accuracy recorded at writing, and against a numpy
Keras forward for the tensorflow layout)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from distsim.config.arch import ArchConfig
from distsim.config.data import DataConfig
from distsim.zoo import fixtures, sources
from distsim.zoo.mapping import MappingError, to_state_dict
from distsim.zoo.models import build
from distsim.zoo.sources import Entry, SourceError, list_entries, read_entry
from distsim.zoo.tasks import make_tasks

CNN = ArchConfig(kind="cnn", channels=(4, 8), input_shape=(1, 8, 8), num_classes=2)
TASKS = make_tasks(DataConfig(dataset="digits", num_tasks=2, pairing="consecutive"))  # fixtures'

ACC = {"model-zoos": "test_acc", "weights-table": "test_accuracy", "state-dicts": "test_acc",
       "distsim-export": "test_acc", "stacked": "test_acc"}


@pytest.fixture(scope="module")
def zoos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small trained zoo per layout (read only; a test that changes one copies it)."""
    base = tmp_path_factory.mktemp("zoos")
    return {
        "model-zoos": fixtures.write_model_zoos(base / "mz", CNN, seeds=2, epochs=3),
        "weights-table": fixtures.write_weights_table(base / "wt", CNN, seeds=2, epochs=2),
        "state-dicts": fixtures.write_state_dicts(base / "sd", CNN, per_label=2),
        "distsim-export": fixtures.write_distsim_export(base / "ex", CNN, seeds=2),
        "stacked": fixtures.write_distsim_export(base / "st", CNN, seeds=2, stacked=True),
    }


def _fmt(key: str) -> str:
    return "distsim-export" if key == "stacked" else key


def _copy(zoos: dict[str, Path], key: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(zoos[key], tmp_path / key))


def _net(ck: sources.Checkpoint, arch: ArchConfig = CNN) -> nn.Module:
    net = build(arch)
    net.load_state_dict(to_state_dict(ck.tensors, arch, ck.layout, ck.entry.file))
    return net.eval()


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for f in fragments:
        assert f in text, (f, text)


# --- listing and reading ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model-zoos", "weights-table", "state-dicts", "distsim-export",
                                 "stacked"])
def test_each_layout_reads_back_the_models_it_was_written_with(zoos: dict[str, Path],
                                                               key: str) -> None:
    """Every checkpoint, read and mapped, has the test accuracy its writer recorded."""
    fmt = _fmt(key)
    entries = list_entries(fmt, zoos[key], "all")
    assert entries == sorted(entries, key=lambda e: (e.name, e.epoch or 0))
    for entry in entries:
        ck = read_entry(fmt, zoos[key], entry)
        assert ck.entry == entry and ck.layout == ("tensorflow" if key == "weights-table"
                                                   else "torch")
        assert all(a.dtype == np.float32 for _, a in ck.tensors)
        task = TASKS[["a", "b"].index(ck.meta["label"]) if key == "state-dicts"
                     else entry.task]
        with torch.no_grad():
            pred = _net(ck)(torch.from_numpy(task.x_test)).argmax(1).numpy()
        assert abs((pred == task.y_test).mean() - ck.meta[ACC[key]]) < 1e-6, entry


def test_epochs_last_all_and_a_tuple(zoos: dict[str, Path]) -> None:
    root = zoos["model-zoos"]
    every = list_entries("model-zoos", root, "all")
    last = list_entries("model-zoos", root)
    assert len(every) == 4 * 4 and len(last) == 4  # 2 lrs x 2 seeds, epochs 0..3
    assert {e.epoch for e in last} == {3} and len({e.name for e in every}) == 4
    picked = list_entries("model-zoos", root, (2, 0))
    assert [e.epoch for e in picked] == [0, 2] * 4
    with pytest.raises(SourceError) as err:
        list_entries("model-zoos", root, (1, 7))
    _one_line(err, "zoo.epochs", str(root), "epoch 7", "its epochs: 0, 1, 2, 3")
    table = list_entries("weights-table", zoos["weights-table"], "all")
    assert [e.row for e in table] == list(range(12)) and {e.epoch for e in table} == {0, 1, 2}
    assert list_entries("state-dicts", zoos["state-dicts"])[0].epoch is None
    with pytest.raises(SourceError) as err:
        list_entries("state-dicts", zoos["state-dicts"], (1,))
    _one_line(err, "none (one state per model)")
    exported = list_entries("distsim-export", zoos["distsim-export"])
    assert [(e.model_id, e.task, e.seed, e.epoch) for e in exported] == [
        (f"cnn-t{t}-s{s}", t, s, 2) for t in (0, 1) for s in (0, 1)]


def test_model_zoos_trials_below_the_root_unpadded_and_without_iteration(
        zoos: dict[str, Path], tmp_path: Path) -> None:
    """Trial folders one level below the root; checkpoint_<e> (preferred over the padded
    name); result lines without training_iteration map by the loader's idx_offset rule."""
    root = _copy(zoos, "model-zoos", tmp_path)
    below = list_entries("model-zoos", root.parent)
    assert [e.name for e in below] == [f"model-zoos/{e.name}"
                                       for e in list_entries("model-zoos", root)]
    trial = root / below[0].name.split("/", 1)[1]
    shutil.copytree(trial / "checkpoint_000003", trial / "checkpoint_3")
    (trial / "checkpoint_000003" / "checkpoints").write_bytes(b"not read")
    lines = [json.loads(x) for x in (trial / "result.json").read_text().splitlines()]
    (trial / "result.json").write_text(
        "".join(json.dumps({k: v for k, v in x.items() if k != "training_iteration"}) + "\n"
                for x in lines))
    entry = next(e for e in list_entries("model-zoos", root) if trial.name == e.name)
    assert entry.file.endswith("/checkpoint_3/checkpoints")
    ck = read_entry("model-zoos", root, entry)
    assert ck.meta["test_acc"] == lines[3]["test_acc"] and "training_iteration" not in ck.meta
    start1 = fixtures.write_model_zoos(tmp_path / "s1", CNN, seeds=1, epochs=2, start=1,
                                       padded=False, train=False)
    entries = list_entries("model-zoos", start1, "all")
    assert [e.epoch for e in entries] == [1, 2, 1, 2]
    assert entries[0].file.endswith("/checkpoint_1/checkpoints")


def test_two_activations_share_one_model_zoos_folder(tmp_path: Path) -> None:
    """Each model maps onto the arch with its own activation (``model::nlin``)."""
    for act in ("relu", "tanh"):
        fixtures.write_model_zoos(tmp_path, CNN, activation=act, seeds=1, epochs=1)
    entries = list_entries("model-zoos", tmp_path / fixtures.EXPERIMENT)
    assert len(entries) == 4
    for entry in entries:
        ck = read_entry("model-zoos", tmp_path / fixtures.EXPERIMENT, entry)
        arch = ArchConfig(**{**CNN.__dict__, "activation": ck.meta["model::nlin"]})
        with torch.no_grad():
            pred = _net(ck, arch)(torch.from_numpy(TASKS[0].x_test)).argmax(1).numpy()
        assert abs((pred == TASKS[0].y_test).mean() - ck.meta["test_acc"]) < 1e-6
    assert sorted(read_entry("model-zoos", tmp_path / fixtures.EXPERIMENT, e).meta["model::nlin"]
                  for e in entries) == ["relu", "relu", "tanh", "tanh"]


def test_metadata_names_and_types(zoos: dict[str, Path], tmp_path: Path) -> None:
    mz = read_entry("model-zoos", zoos["model-zoos"], list_entries("model-zoos",
                                                                   zoos["model-zoos"])[0])
    assert isinstance(mz.meta["optim::lr"], float) and isinstance(mz.meta["seed"], int)
    assert mz.meta["model::nlin"] == "relu" and mz.meta["epoch"] == 3 == mz.entry.epoch
    assert mz.meta["training_iteration"] == 3 and "config" not in mz.meta
    wt = read_entry("weights-table", zoos["weights-table"],
                    list_entries("weights-table", zoos["weights-table"])[0])
    assert isinstance(wt.meta["config.learning_rate"], float) and wt.meta["step"] == 2
    assert wt.meta["epoch"] == 2 and wt.meta["modeldir"] == wt.entry.name
    assert isinstance(wt.meta["train_accuracy"], float)
    sd = read_entry("state-dicts", zoos["state-dicts"],
                    list_entries("state-dicts", zoos["state-dicts"])[0])
    assert sd.meta == {"label": "a", "seed": 0, "lr": 0.01, "test_acc": sd.meta["test_acc"]}
    ex = read_entry("distsim-export", zoos["stacked"],
                    list_entries("distsim-export", zoos["stacked"])[-1])
    assert (ex.meta["task"], ex.meta["task_name"], ex.meta["seed"]) == (1, TASKS[1].name, 1)
    assert ex.meta["epoch"] == ex.meta["epochs"] == 2 and ex.meta["model_id"] == "cnn-t1-s1"
    # nested dicts flatten with "::", lists become JSON text
    root = _copy(zoos, "model-zoos", tmp_path)
    entry = list_entries("model-zoos", root)[0]
    result = root / entry.name / "result.json"
    lines = [json.loads(x) for x in result.read_text().splitlines()]
    lines[-1].update(perf={"cpu": 1.5}, sizes=[1, 2])
    lines[-1]["config"]["model"] = {"widths": [4, 8]}
    result.write_text("".join(json.dumps(x) + "\n" for x in lines))
    meta = read_entry("model-zoos", root, entry).meta
    assert (meta["perf::cpu"], meta["sizes"], meta["model::widths"]) == (1.5, "[1, 2]", "[4, 8]")


@pytest.mark.parametrize("manifest", ["parquet", None])
def test_state_dicts_parquet_manifest_and_folder_labels(tmp_path: Path,
                                                        manifest: str | None) -> None:
    root = fixtures.write_state_dicts(tmp_path, CNN, per_label=2, fmt="pt", manifest=manifest,
                                      train=False)
    labels = "folder" if manifest is None else None
    entries = list_entries("state-dicts", root, labels=labels)
    assert [e.name for e in entries] == ["a/a-000.pt", "a/a-001.pt", "b/b-000.pt", "b/b-001.pt"]
    meta = read_entry("state-dicts", root, entries[2], labels=labels).meta
    assert meta == ({"label": "b"} if manifest is None else
                    {"label": "b", "seed": 0, "lr": 0.01, "test_acc": None})


def test_digests_follow_bytes_not_mtimes(zoos: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(zoos, "model-zoos", tmp_path)
    first, second = list_entries("model-zoos", root)[:2]
    digest = read_entry("model-zoos", root, first).digest
    os.utime(root / first.file, ns=(1, 1))
    touched = next(e for e in list_entries("model-zoos", root) if e.name == first.name)
    assert touched.stamp != first.stamp and read_entry("model-zoos", root, touched).digest == digest
    state = torch.load(root / first.file, weights_only=True)
    state["module_list.0.bias"][0] += 1.0
    torch.save(state, root / first.file)
    assert read_entry("model-zoos", root, touched).digest != digest
    assert read_entry("model-zoos", root, second).digest == read_entry(
        "model-zoos", zoos["model-zoos"], second).digest
    table = _copy(zoos, "weights-table", tmp_path)
    rows = list_entries("weights-table", table, "all")[:2]
    before = [read_entry("weights-table", table, e).digest for e in rows]
    w = np.load(table / "weights.npy")
    w[1, 0] += 1.0
    np.save(table / "weights.npy", w)
    after = [read_entry("weights-table", table, e).digest for e in rows]
    assert after[0] == before[0] and after[1] != before[1]


# --- errors: one line naming the file ---------------------------------------------------------

def test_corrupt_tensor_files_name_the_file(zoos: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(zoos, "model-zoos", tmp_path)
    entry = list_entries("model-zoos", root)[0]
    data = (root / entry.file).read_bytes()
    (root / entry.file).write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as err:
        read_entry("model-zoos", root, entry)
    _one_line(err, f"zoo.path: {root / entry.file}: cannot read it as a torch state dict")
    sd = _copy(zoos, "state-dicts", tmp_path)
    entry = list_entries("state-dicts", sd)[0]
    (sd / entry.file).write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SourceError) as err:
        read_entry("state-dicts", sd, entry)
    _one_line(err, str(sd / entry.file), "not a safetensors file")
    table = _copy(zoos, "weights-table", tmp_path)
    entry = list_entries("weights-table", table)[0]
    with pytest.raises(SourceError) as err:
        read_entry("weights-table", table, Entry("x", 0, "weights.npy", 99, entry.stamp))
    _one_line(err, str(table / "weights.npy"), "row 99 out of range (12 rows)")


@pytest.mark.parametrize("rows, fragment", [
    ("file,label\na/a-000.safetensors,a\n", "no column 'path' (columns: file, label)"),
    ("path,label\na/missing.safetensors,a\n", "names 'a/missing.safetensors', which does not"),
    ("path,label\na/a-000.safetensors,a\n./a/a-000.safetensors,b\n", "listed twice"),
])
def test_a_malformed_manifest_names_itself(zoos: dict[str, Path], tmp_path: Path, rows: str,
                                           fragment: str) -> None:
    root = _copy(zoos, "state-dicts", tmp_path)
    (root / "manifest.csv").write_text(rows)
    with pytest.raises(SourceError) as err:
        list_entries("state-dicts", root)
    _one_line(err, f"zoo.path: {root / 'manifest.csv'}: ", fragment)


def test_format_root_and_table_errors(zoos: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        list_entries("hdf5", tmp_path)
    _one_line(err, "zoo.format: unknown format 'hdf5'")
    with pytest.raises(SourceError) as err:
        list_entries("model-zoos", tmp_path / "nowhere")
    _one_line(err, f"zoo.path: {tmp_path / 'nowhere'}: no such folder")
    for fmt in sources.FORMATS[:2] + sources.FORMATS[3:]:
        with pytest.raises(SourceError) as err:
            list_entries(fmt, tmp_path)
        _one_line(err, str(tmp_path), "no model found")
    table = _copy(zoos, "weights-table", tmp_path)
    (table / "metrics.csv").write_text("step,modeldir\n0,x\n")
    with pytest.raises(SourceError) as err:
        list_entries("weights-table", table)
    _one_line(err, str(table / "metrics.csv"), "has 1 rows, weights.npy has 12")


def test_mapping_errors_say_which_tensor_and_parameter(zoos: dict[str, Path]) -> None:
    root = zoos["model-zoos"]
    ck = read_entry("model-zoos", root, list_entries("model-zoos", root)[0])
    wide = ArchConfig(kind="cnn", channels=(4, 16), input_shape=(1, 8, 8), num_classes=2)
    with pytest.raises(MappingError) as err:
        to_state_dict(ck.tensors, wide, where="f.pt")
    assert str(err.value) == ("f.pt: tensor 'module_list.3.weight' has shape (8, 4, 3, 3), "
                              "cnn's 3.weight needs (16, 4, 3, 3)")
    with pytest.raises(MappingError) as err:
        to_state_dict(ck.tensors[:-1], CNN, where="f.pt")
    assert str(err.value) == ("f.pt: 5 tensors, cnn has 6 parameters (first missing: cnn's "
                              "7.bias)")
    with pytest.raises(MappingError) as err:
        to_state_dict([*ck.tensors, ("extra", np.zeros(2, np.float32))], CNN, where="f.pt")
    _one_line(err, "7 tensors, cnn has 6 parameters (first extra tensor: 'extra')")
    tf = read_entry("weights-table", zoos["weights-table"],
                    list_entries("weights-table", zoos["weights-table"])[0])
    with pytest.raises(MappingError) as err:
        to_state_dict(tf.tensors, wide, "tensorflow", where="weights.npy row 0")
    _one_line(err, "weights.npy row 0: tensor 'sequential/conv2d_1/kernel:0' has shape "
              "(8, 4, 3, 3) (tensorflow (3, 3, 4, 8) in torch order), cnn's 3.weight needs "
              "(16, 4, 3, 3)")


# --- function equality ------------------------------------------------------------------------

def _keras_forward(variables: list[tuple[str, np.ndarray]], arch: ArchConfig,
                   x: np.ndarray) -> np.ndarray:
    """A numpy forward of Keras layers from their variables: channels-last input, 'same'
    convolutions (cross-correlation), ReLU, 2-max-pooling, flatten in channels-last order,
    Dense ``h @ kernel + bias``. x (B, C, *spatial) -> logits (B, classes)."""
    v = dict(variables)
    h = np.moveaxis(x.astype(np.float64), 1, -1)  # (B, *spatial, C)
    spatial = h.ndim - 2
    conv = "conv2d" if spatial == 2 else "conv1d"
    for i in range(len(arch.channels) if arch.kind == "cnn" else 0):
        scope = f"sequential/{conv}{'_' + str(i) if i else ''}"
        k, b = v[f"{scope}/kernel:0"], v[f"{scope}/bias:0"]
        hp = np.pad(h, [(0, 0)] + [(1, 1)] * spatial + [(0, 0)])
        out = np.zeros((*h.shape[:-1], k.shape[-1]))
        for off in itertools.product(range(3), repeat=spatial):
            window = hp[(slice(None), *(slice(o, o + n) for o, n in zip(off, h.shape[1:-1],
                                                                        strict=True)))]
            out += window @ k[off]
        h = np.maximum(out + b, 0)
        sizes = [n // 2 for n in h.shape[1:-1]]
        h = h[(slice(None), *(slice(0, 2 * n) for n in sizes))]
        h = h.reshape(len(h), *itertools.chain(*((n, 2) for n in sizes)), -1)
        h = h.max(axis=tuple(range(2, 2 + 2 * spatial, 2)))
    h = h.reshape(len(h), -1)
    dense = [n for n in sorted({n.rsplit("/", 1)[0] for n in v}) if "/dense" in n]
    dense.sort(key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n.rsplit("/", 1)[1] else 0)
    for i, scope in enumerate(dense):
        h = h @ v[f"{scope}/kernel:0"] + v[f"{scope}/bias:0"]
        h = np.maximum(h, 0) if i < len(dense) - 1 else h
    return h


def _random_net(arch: ArchConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build(arch).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases away from their zero-ish init
    return net


TF_ARCHS = [
    ArchConfig(kind="mlp", widths=(6, 5), input_shape=(2, 4, 3), num_classes=3),
    ArchConfig(kind="cnn", channels=(3, 4), head_widths=(5,), input_shape=(2, 8, 6),
               num_classes=3),
    ArchConfig(kind="cnn", channels=(3,), input_shape=(2, 12), num_classes=2),
]


@pytest.mark.parametrize("arch", TF_ARCHS, ids=["mlp", "cnn2d", "cnn1d"])
def test_tensorflow_layout_is_the_same_function(arch: ArchConfig) -> None:
    """torch model -> Keras variables (as a weights-table row holds them) -> to_state_dict:
    the Keras forward of the variables, the original and the mapped model agree."""
    net = _random_net(arch, 0)
    variables = fixtures.tensorflow_variables(net.state_dict(), arch)
    assert [n for n, _ in variables] == sorted(n for n, _ in variables)  # bias before kernel
    mapped = build(arch).eval()
    mapped.load_state_dict(to_state_dict(variables, arch, "tensorflow"))
    x = torch.rand(7, *arch.input_shape)
    with torch.no_grad():
        want = net(x)
        assert torch.allclose(mapped(x), want, atol=1e-6)
    keras = _keras_forward(variables, arch, x.numpy())
    assert np.allclose(keras, want.numpy(), atol=1e-5)


@given(kind=st.sampled_from(["mlp", "cnn"]), c=st.integers(1, 3), one_d=st.booleans(),
       blocks=st.integers(1, 2), size=st.integers(4, 9), width=st.integers(1, 5),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_tensorflow_layout_property(kind: str, c: int, one_d: bool, blocks: int, size: int,
                                    width: int, seed: int) -> None:
    shape = (c, size) if one_d else (c, size, size + 1)
    arch = ArchConfig(kind=kind, widths=(width,), channels=(width,) * blocks,
                      head_widths=(width,) if seed % 2 else (), input_shape=shape,
                      num_classes=2)
    net = _random_net(arch, seed)
    variables = fixtures.tensorflow_variables(net.state_dict(), arch)
    x = np.random.default_rng(seed).random((3, *shape), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.allclose(_keras_forward(variables, arch, x), want, atol=1e-5)
    mapped = build(arch).eval()
    mapped.load_state_dict(to_state_dict(variables, arch, "tensorflow"))
    with torch.no_grad():
        assert np.allclose(mapped(torch.from_numpy(x)).numpy(), want, atol=1e-6)


class _NNGRU(nn.Module):
    """A GRU classifier written with torch.nn.GRU (names weight_ih_l0, ...), reading an image's
    rows as steps, as distsim's RNN does."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        c, _, w = arch.input_shape
        self.gru = nn.GRU(c * w, arch.hidden, arch.num_layers, batch_first=True)
        self.head = nn.Linear(arch.hidden, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        _, last = self.gru(x.permute(0, 2, 1, 3).reshape(b, h, c * w))
        return self.head(last[-1])


TORCH_ARCHS = [
    ArchConfig(kind="mlp", widths=(4,) * 11, input_shape=(1, 8, 8), num_classes=2),
    ArchConfig(kind="cnn", channels=(3, 4), head_widths=(5,), input_shape=(2, 8, 8),
               num_classes=3),
    ArchConfig(kind="cnn", channels=(3,), input_shape=(2, 12), num_classes=2),
    ArchConfig(kind="rnn", hidden=5, num_layers=2, input_shape=(2, 6, 4), num_classes=3),
]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", TORCH_ARCHS, ids=["mlp11", "cnn2d", "cnn1d", "rnn"])
def test_torch_layout_is_the_same_function(arch: ArchConfig, suffix: str,
                                           tmp_path: Path) -> None:
    """A state dict under foreign names (rnn: a torch.nn.GRU model's), saved as .pt or as
    .safetensors (stored sorted by name: read back in module order), read as state-dicts and
    mapped: same outputs. The 11-layer MLP has names 10.weight < 2.weight alphabetically."""
    torch.manual_seed(1)
    net = (_NNGRU(arch) if arch.kind == "rnn" else _random_net(arch, 1)).eval()
    state = {f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    (tmp_path / "a").mkdir()
    if suffix == ".pt":
        torch.save(state, tmp_path / "a" / f"m{suffix}")
    else:
        save_file(state, tmp_path / "a" / f"m{suffix}")
    [entry] = list_entries("state-dicts", tmp_path, labels="folder")
    ck = read_entry("state-dicts", tmp_path, entry, labels="folder")
    assert [n for n, _ in ck.tensors] == list(state)
    mapped = _net(ck, arch)
    x = torch.rand(5, *arch.input_shape)
    with torch.no_grad():
        assert torch.allclose(mapped(x), net(x), atol=1e-6)


# --- fixtures, command line, imports ----------------------------------------------------------

def test_learning_rate_and_epoch_groups_differ(zoos: dict[str, Path], tmp_path: Path) -> None:
    """In the trained fixture a larger learning rate moves the weights further from the init;
    without training the per-model scale does the same by learning rate and by epoch."""
    def weights(root: Path, epochs: str | tuple[int, ...]) -> dict[tuple[float, int], list]:
        out: dict[tuple[float, int], list] = {}
        for e in list_entries("model-zoos", root, epochs):
            ck = read_entry("model-zoos", root, e)
            out.setdefault((ck.meta["optim::lr"], ck.meta["seed"]), []).append(
                np.concatenate([a.ravel() for _, a in ck.tensors]))
        return out

    moved = {k: np.linalg.norm(w[1] - w[0]) for k, w in weights(zoos["model-zoos"],
                                                                (0, 3)).items()}
    assert min(moved[0.1, s] for s in (0, 1)) > max(moved[0.01, s] for s in (0, 1))
    fast = weights(fixtures.write_model_zoos(tmp_path, CNN, seeds=1, epochs=1, train=False),
                   "all")
    (a0, a1), (b0, _) = fast[0.01, 0], fast[0.1, 0]
    assert np.allclose(a1, a0 * 1.1) and np.allclose(b0 * 1.1, a0 * 2.0)


def test_command_line_writes_a_zoo_fast(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert fixtures.main(["model-zoos", str(tmp_path), "--models", "5", "--epochs", "1",
                          "--no-train"]) == 0
    assert "model-zoos: 5 models" in capsys.readouterr().out
    entries = list_entries("model-zoos", tmp_path / fixtures.EXPERIMENT, "all")
    assert len(entries) == 10 and len({e.name for e in entries}) == 5


def test_sources_import_without_torch_and_share_the_export_formats() -> None:
    code = ("import sys, distsim.zoo.sources; "
            "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    from distsim import export

    assert (sources.MODEL_FORMAT, sources.ZOO_FORMAT) == (export.MODEL_FORMAT, export.ZOO_FORMAT)
