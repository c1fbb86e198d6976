"""Tasks: digits pairs, synthetic mixtures and user .npz files, deterministic and validated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config.data import DataConfig
from distsim.zoo.tasks import Task, make_tasks


def _same(a: list[Task], b: list[Task]) -> bool:
    fields = ("x_train", "y_train", "x_test", "y_test")
    return len(a) == len(b) and all(
        ta.name == tb.name and ta.classes == tb.classes
        and all(getattr(ta, f).tobytes() == getattr(tb, f).tobytes() for f in fields)
        for ta, tb in zip(a, b, strict=True)
    )


def test_digits_pair_tasks():
    tasks = make_tasks(DataConfig())
    assert len(tasks) == 10 and [t.task_id for t in tasks] == list(range(10))
    assert len({t.classes for t in tasks}) == 10
    for t in tasks:
        a, b = t.classes
        assert 0 <= a < b <= 9 and t.name == f"digits:{a}v{b}"
        assert t.input_shape == (1, 8, 8) and t.num_classes == 2
        assert t.x_train.dtype == np.float32 and t.y_train.dtype == np.int64
        assert t.x_train.min() >= 0 and t.x_train.max() == 1.0
        n = len(t.y_train) + len(t.y_test)
        assert 340 <= n <= 370  # two digit classes of ~180 images each
        for label in (0, 1):  # stratified: each class is split 75/25 (rounded)
            n_c = (t.y_train == label).sum() + (t.y_test == label).sum()
            assert (t.y_test == label).sum() == round(0.25 * n_c)


def test_digits_relabels_the_pair_to_0_1():
    from sklearn.datasets import load_digits

    images, target = load_digits(return_X_y=True)
    t = make_tasks(DataConfig(num_tasks=45))[44]  # the last pair: 8 vs 9
    assert t.classes == (8, 9)
    for x, y in zip(t.x_train[:20], t.y_train[:20], strict=True):
        hits = np.flatnonzero((np.abs(images / 16.0 - x.reshape(1, 64)) < 1e-6).all(axis=1))
        assert set(target[hits]) == {(8, 9)[y]}


def test_tasks_are_bit_identical_and_depend_on_the_seed():
    for cfg in (DataConfig(num_tasks=5, seed=3),
                DataConfig(dataset="synthetic", num_tasks=3, seed=3)):
        assert _same(make_tasks(cfg), make_tasks(cfg))
    a = make_tasks(DataConfig(num_tasks=5, seed=0))
    b = make_tasks(DataConfig(num_tasks=5, seed=1))
    assert [t.classes for t in a] != [t.classes for t in b]
    all_pairs = make_tasks(DataConfig(num_tasks=45, seed=0))
    assert [t.classes for t in all_pairs] == list(itertools.combinations(range(10), 2))


def test_consecutive_pairing_follows_the_paper():
    tasks = make_tasks(DataConfig(num_tasks=5, pairing="consecutive"))
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    with pytest.raises(ValueError, match="num_tasks=6 is more than the 5 consecutive"):
        make_tasks(DataConfig(num_tasks=6, pairing="consecutive"))


def test_too_many_tasks_is_a_clear_error():
    with pytest.raises(ValueError, match="num_tasks=46 is more than the 45 random class pairs"):
        make_tasks(DataConfig(num_tasks=46))


@settings(max_examples=15, deadline=None)
@given(
    classes=st.integers(2, 4),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    samples=st.integers(2, 30),
    test_fraction=st.floats(0.1, 0.6),
    seed=st.integers(0, 2**31),
)
def test_synthetic_tasks_any_shape(classes, shape, samples, test_fraction, seed):
    cfg = DataConfig(dataset="synthetic", num_tasks=2, seed=seed, test_fraction=test_fraction,
                     synthetic_classes=classes, synthetic_shape=shape, synthetic_samples=samples)
    tasks = make_tasks(cfg)
    assert [t.name for t in tasks] == ["synthetic:0", "synthetic:1"]
    assert not np.array_equal(tasks[0].x_train, tasks[1].x_train)  # every task its own mixture
    for t in tasks:
        assert t.input_shape == shape and t.num_classes == classes
        assert t.x_train.dtype == np.float32 and np.isfinite(t.x_train).all()
        n_test = min(max(1, round(test_fraction * samples)), samples - 1)
        assert np.bincount(t.y_test, minlength=classes).tolist() == [n_test] * classes
        assert np.bincount(t.y_train, minlength=classes).tolist() == [samples - n_test] * classes


def test_synthetic_classes_are_separable():
    t = make_tasks(DataConfig(dataset="synthetic", num_tasks=1, synthetic_samples=200))[0]
    means = np.stack([t.x_train[t.y_train == c].mean(axis=0).ravel() for c in (0, 1)])
    pred = np.argmin(((t.x_test.reshape(len(t.x_test), 1, -1) - means) ** 2).sum(-1), axis=1)
    assert (pred == t.y_test).mean() > 0.9  # nearest class mean: Bayes error ~2% at separation 3


def test_npz_tasks(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 5, 4), dtype=np.uint8)
    y = np.repeat([7, 3, 5], 20)
    np.savez(tmp_path / "mine.npz", X=x, y=y)
    tasks = make_tasks(DataConfig(dataset="npz", path=str(tmp_path / "mine.npz"), num_tasks=3))
    assert [t.classes for t in tasks] == [(3, 5), (3, 7), (5, 7)]
    assert tasks[0].name == "mine:3v5" and tasks[0].input_shape == (1, 5, 4)
    assert tasks[0].x_train.max() <= 1.0 and len(tasks[0].y_train) == 30
    np.savez(tmp_path / "flat.npz", X=rng.normal(size=(40, 6)), y=np.repeat([0, 1], 20))
    (flat,) = make_tasks(DataConfig(dataset="npz", path=str(tmp_path / "flat.npz"), num_tasks=1))
    assert flat.input_shape == (1, 1, 6)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"X": np.zeros((4, 2)), "labels": np.zeros(4, int)}, "must hold arrays 'X' and 'y'"),
        ({"X": np.zeros((4, 2)), "y": np.zeros((4, 1), int)}, "y must be a 1-D integer array"),
        ({"X": np.zeros((4, 2)), "y": np.zeros(4)}, "y must be a 1-D integer array"),
        ({"X": np.zeros((5, 2)), "y": np.zeros(4, int)}, "X has 5 samples but y has 4"),
        ({"X": np.zeros((4, 1, 1, 1, 2)), "y": np.zeros(4, int)}, "X must be"),
        ({"X": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, "non-finite"),
        ({"X": np.zeros((4, 2)), "y": np.array([0, 0, 0, 1])}, "class 1 has 1 samples, too few"),
        ({"X": np.zeros((4, 2)), "y": np.zeros(4, int)}, "more than the 0 random class pairs"),
    ],
)
def test_bad_npz_is_one_clear_error(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        make_tasks(DataConfig(dataset="npz", path=str(tmp_path / "bad.npz"), num_tasks=1))


def test_missing_or_unreadable_npz(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        make_tasks(DataConfig(dataset="npz", path=str(tmp_path / "nope.npz")))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        make_tasks(DataConfig(dataset="npz", path=str(tmp_path / "junk.npz"), num_tasks=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "mnist"}, "data.dataset"),
        ({"num_tasks": 0}, "data.num_tasks"),
        ({"seed": -1}, "data.seed"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
        ({"pairing": "sorted"}, "data.pairing"),
        ({"dataset": "npz"}, "data.path"),
        ({"synthetic_classes": 1}, "data.synthetic_classes"),
        ({"synthetic_shape": (8, 8)}, "data.synthetic_shape"),
        ({"synthetic_samples": 1}, "data.synthetic_samples"),
        ({"synthetic_separation": 0.0}, "data.synthetic_separation"),
    ],
)
def test_data_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_make_tasks_rejects_other_types():
    with pytest.raises(TypeError, match="DataConfig"):
        make_tasks({"dataset": "digits"})
