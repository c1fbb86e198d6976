"""Per-epoch training history: SeedResult.history (distsim.zoo.train) and the history table the zoo
stage writes (distsim.pipeline.zoo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import parse_study
from distsim.config.arch import ArchConfig
from distsim.config.training import TrainConfig
from distsim.pipeline import zoo
from distsim.store import Store, model_id
from distsim.zoo.tasks import Task
from distsim.zoo.train import HISTORY_COLUMNS, batch_orders, init_model, train_pack

KINDS = ("mlp", "cnn", "rnn")
pytestmark = pytest.mark.usefixtures("one_thread")  # packs compared bit for bit


def _history_alone(task: Task, arch: ArchConfig, seed: int, cfg: TrainConfig) -> np.ndarray:
    """The reference: nn.Module + torch.optim.SGD in float64, one seed, summing each sample's
    loss and hit as its batch is trained and evaluating the test split after each epoch."""
    model = init_model(arch.with_task_shape(task.input_shape, task.num_classes), seed).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = torch.as_tensor(task.x_train).double(), torch.as_tensor(task.y_train)
    x_test, y_test = torch.as_tensor(task.x_test).double(), torch.as_tensor(task.y_test)
    rows = []
    for order in batch_orders([seed], len(x), cfg.epochs):
        loss_sum, hits = 0.0, 0
        for lo in range(0, len(x), cfg.batch_size):
            idx = torch.as_tensor(order[0, lo : lo + cfg.batch_size])
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            loss_sum += loss.item() * len(idx)
            hits += int((logits.argmax(1) == y[idx]).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = model(x_test)
            test_loss = F.cross_entropy(logits, y_test).item()
            test_acc = (logits.argmax(1) == y_test).double().mean().item()
        rows.append([loss_sum / len(x), hits / len(x), test_loss, test_acc])
    return np.array(rows)


# ----------------------------------------------------------------------------- train_pack


@pytest.mark.parametrize("kind", KINDS)
def test_history_is_the_plain_torch_experiment_epoch_by_epoch(task, kind):
    """Each row: the train metrics of the mini-batches as trained (270 samples in batches of 32:
    the last batch of 14 weighs by its size) and the test metrics after the epoch."""
    # Measured max |diff| (float64, x86 CPU): 1.1e-16 to 2.2e-16. Asserted at 1e-10.
    cfg = TrainConfig(epochs=3, lr=0.05, momentum=0.9, dtype="float64", test_history=True)
    pack = train_pack(task, ArchConfig(kind=kind), [4, 9, 2], cfg)
    for r in pack:
        assert r.history is not None and r.history.shape == (3, len(HISTORY_COLUMNS))
        assert r.history.dtype == np.float64
        np.testing.assert_allclose(r.history, _history_alone(task, ArchConfig(kind=kind),
                                                             r.seed, cfg), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_last_row_is_the_final_evaluation(task, kind):
    for cfg in (TrainConfig(epochs=2, test_history=True),
                TrainConfig(epochs=3, dtype="float64", test_history=True), TrainConfig(epochs=3)):
        for r in train_pack(task, ArchConfig(kind=kind), [0, 1, 2], cfg):
            assert r.status == "ok" and r.history is not None and len(r.history) == r.epochs
            last = dict(zip(HISTORY_COLUMNS, r.history[-1], strict=True))
            assert last["test_loss"] == r.test_loss and last["test_acc"] == r.test_acc
            # without test_history the test columns are NaN but in the last row
            assert np.isfinite(r.history[:, 2:]).all() == cfg.test_history
            assert np.isfinite(r.history[-1]).all() and np.isfinite(r.history[:, :2]).all()
            acc = r.history[:, [1, 3]]
            assert ((acc >= 0) & (acc <= 1) | np.isnan(acc)).all()


@pytest.fixture(scope="module")
def six_seeds(task) -> dict[int, np.ndarray]:
    """The 3-epoch float64 histories of MLP seeds 0..5 trained as one pack."""
    results = train_pack(task, ArchConfig(kind="mlp"), list(range(6)),
                         TrainConfig(epochs=3, dtype="float64", test_history=True))
    return {r.seed: r.history for r in results}


@settings(max_examples=12, deadline=None)
@given(seeds=st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True),
       epochs=st.integers(1, 3))
def test_history_of_a_seed_is_its_own_in_any_pack_and_any_length(task, six_seeds, seeds, epochs):
    """A seed's first e rows do not depend on its pack neighbours nor on how many epochs
    follow (no lr milestones): a prefix of its 3-epoch history in the 6-seed pack."""
    # Measured max |diff| (float64, x86 CPU): 0. Asserted at 1e-10.
    cfg = TrainConfig(epochs=epochs, dtype="float64", test_history=True)
    for r in train_pack(task, ArchConfig(kind="mlp"), seeds, cfg):
        assert r.history is not None
        np.testing.assert_allclose(r.history, six_seeds[r.seed][:epochs], rtol=0, atol=1e-10)


@pytest.mark.parametrize("test_history", [False, True])
def test_recording_changes_nothing_else(task, test_history):
    cfg = TrainConfig(epochs=2, test_history=test_history)
    with_history = train_pack(task, ArchConfig(kind="cnn"), [5, 6], cfg)
    without = train_pack(task, ArchConfig(kind="cnn"), [5, 6], cfg, record_history=False)
    for a, b in zip(with_history, without, strict=True):
        assert a.history is not None and b.history is None
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
        assert (a.test_loss, a.train_acc, a.epochs) == (b.test_loss, b.train_acc, b.epochs)


def test_diverged_seed_has_the_rows_of_its_completed_epochs(task):
    """lr=1.0 LeakyReLU MLP: some seeds of the pack diverge during epoch 2 (as in test_train).
    They have one row, epoch 1's, equal to that seed's 1-epoch run; nothing of epoch 2; their
    test_loss is that of their frozen weights, not of the row."""
    arch = ArchConfig(kind="mlp", activation="leaky_relu")
    pack = train_pack(task, arch, list(range(8)), TrainConfig(epochs=2, lr=1.0, test_history=True))
    diverged = [r for r in pack if r.status == "diverged"]
    assert diverged and len(diverged) < len(pack)
    one_epoch = {r.seed: r for r in train_pack(task, arch, [r.seed for r in diverged],
                                               TrainConfig(epochs=1, lr=1.0, test_history=True))}
    for r in pack:
        assert r.history is not None and r.history.shape == (r.epochs, 4)
        if r.status == "ok":
            assert r.epochs == 2  # (a test loss can overflow to nan: equal_nan)
            np.testing.assert_array_equal(r.history[-1, 2:], [r.test_loss, r.test_acc])
        else:
            assert r.epochs == 1 and np.isfinite(r.history).all()
            alone = one_epoch[r.seed]
            assert alone.status == "ok" and alone.history is not None
            # float32, pack of 8 vs 1: measured bitwise equal (x86 CPU); asserted to 1e-6
            np.testing.assert_allclose(r.history, alone.history, rtol=1e-6, atol=1e-6)


def test_divergence_in_the_first_epoch_leaves_no_row(task):
    x = task.x_train.copy()
    x[0] = 3e38  # every seed's loss is non-finite at the first step
    bad = Task(task.task_id, "overflow", task.classes, x, task.y_train, task.x_test, task.y_test)
    for r in train_pack(bad, ArchConfig(kind="mlp"), [0, 1], TrainConfig(epochs=3)):
        assert r.status == "diverged" and r.history is not None and r.history.shape == (0, 4)


# ----------------------------------------------------------------------------- zoo stage


def _small_study(root: Path, epochs: int = 2):
    return parse_study(study_toml(study={"name": "hist", "store": str(root / "store")},
                                  train={"seeds_per_task": 3, "epochs": epochs}))


def test_zoo_writes_one_history_row_per_model_and_epoch(tmp_path):
    study = _small_study(tmp_path, epochs=3)
    for pack in study.packs():
        zoo.train_and_store(study, pack, f"trial-{pack.task}")
    store = Store(study.store)
    models = store.scan("models").collect()
    history = store.scan("history").collect()
    assert models.height == 6 and history.height == 6 * 3
    assert set(history["model_id"]) == set(models["model_id"])
    assert (history.group_by("model_id").agg(pl.col("epoch").sort())["epoch"].to_list()
            == [[1, 2, 3]] * 6)
    last = history.filter(pl.col("epoch") == 3).join(models, on="model_id", suffix="_m")
    assert (last["test_acc"] == last["test_acc_m"]).all()
    assert (last["test_loss"] == last["test_loss_m"]).all()
    assert (last["seed"] == last["seed_m"]).all() and (last["task"] == last["task_m"]).all()


def test_zoo_writes_the_history_before_the_done_marker(tmp_path, monkeypatch):
    """A trial that dies writing its models shard has written the history: a pack with a
    models shard always has its history."""
    study = _small_study(tmp_path)
    pack = study.packs()[0]
    write = Store.write_shard

    def crash_on_models(self, table, key, data):
        if table == "models":
            raise RuntimeError("killed")
        return write(self, table, key, data)

    monkeypatch.setattr(Store, "write_shard", crash_on_models)
    with pytest.raises(RuntimeError, match="killed"):
        zoo.train_and_store(study, pack, "trial")
    store = Store(study.store)
    assert store.has_shard("history", pack.key) and not store.has_shard("models", pack.key)


def test_a_store_from_before_the_history_is_not_retrained(tmp_path):
    """A pack whose models shard says ok but has no history shard (written before the table
    existed) stays done: the trial skips it and the history table holds no row for it."""
    study = _small_study(tmp_path)
    pack = study.packs()[0]
    store = Store(study.store)
    store.write_shard("models", pack.key, [
        {"model_id": model_id(pack.arch, pack.task, s), "seed": s, "status": "ok",
         "trial_id": "old", "test_acc": 0.5} for s in pack.seeds])
    assert pack not in zoo.pending_packs(study, store)
    assert zoo.train_and_store(study, pack, "again")["skipped"] == 1
    assert store.scan("history").collect().height == 0


@pytest.mark.ray
@pytest.mark.e2e
def test_zoo_stage_history_matches_the_models_table(finished_study):
    """The session's finished store (36 models, 4 epochs), launched on Ray: read only."""
    from distsim.store.verify import verify_store

    store = Store(finished_study.parent / "store")
    models = store.scan("models").collect()
    history = store.scan("history").collect()
    assert models.height == 36 and (models["status"] == "ok").all()
    assert history.height == models.height * 4
    assert sorted(set(history["model_id"])) == sorted(models["model_id"])
    assert history.select("model_id", "epoch").n_unique() == history.height
    assert verify_store(store) == []
