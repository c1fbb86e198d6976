"""MNIST-1D: generated offline, bit-identical for equal arguments (fresh or from the disk cache),
cached under a key that sees every argument, split into class-pair tasks like digits, and its
[data] keys validated and hashed only when dataset = "mnist1d"."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from _study import study_toml

import distsim.zoo.datasets as datasets
from distsim.config import ConfigError, load_study, parse_study, study_from_dict
from distsim.config.data import DATA_PARAMS, DataConfig, MNIST1DArgs
from distsim.zoo.datasets import cache_key, cache_path, generate_mnist1d, load_mnist1d
from distsim.zoo.tasks import make_tasks, study_inputs

QUICKSTART = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.toml"
QUICKSTART_HASH = "25768684c7f17e218a577ff2d29388d64e77c6747637b484ddd1235c6ae801e4"
SMALL = MNIST1DArgs(samples=600)  # 60 per class: about 0.1 s to generate
# Another value for each argument (each differs from SMALL's and the package's default).
OTHER = {"samples": 400, "seed": 7, "scale_coeff": 0.1, "max_translation": 20,
         "corr_noise_scale": 0.5, "iid_noise_scale": 0.1, "shear_scale": 0.0}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder per test ($DISTSIM_CACHE); never the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DISTSIM_CACHE", str(root))
    return root


def mnist1d_data(**keys) -> DataConfig:
    return DataConfig(dataset="mnist1d", mnist1d_samples=600, **keys)


def same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Bit-identical arrays: same dtypes, shapes and bytes."""
    return all(u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()
               for u, v in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- the arrays


def test_the_pool_is_the_packages_train_and_test_merged_as_float32_signals():
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    x, y = generate_mnist1d(SMALL)
    assert x.shape == (600, 1, 40) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (600,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [60] * 10
    raw = make_dataset(ObjectView(SMALL.package_args()))
    assert len(raw["y"]) == 480  # the package's own 80/20 split, undone
    np.testing.assert_array_equal(x[:, 0], np.concatenate([raw["x"], raw["x_test"]])
                                  .astype(np.float32))
    np.testing.assert_array_equal(y, np.concatenate([raw["y"], raw["y_test"]]))


def test_generating_leaves_the_global_random_states_as_they_were():
    np.random.seed(3)  # noqa: NPY002
    random.seed(3)
    expected = (np.random.rand(), random.random())  # noqa: NPY002
    np.random.seed(3)  # noqa: NPY002
    random.seed(3)
    generate_mnist1d(SMALL)
    assert (np.random.rand(), random.random()) == expected  # noqa: NPY002


def test_equal_arguments_give_bit_identical_arrays_fresh_and_from_the_cache(monkeypatch):
    fresh, twice = generate_mnist1d(SMALL), generate_mnist1d(SMALL)
    assert not cache_path(SMALL).exists()
    first = load_mnist1d(SMALL)  # generates and writes
    assert cache_path(SMALL).is_file()
    assert not list(cache_path(SMALL).parent.glob("*.tmp"))  # the temp file was renamed

    def no_generation(args):
        raise AssertionError("a valid cache file must be read, not regenerated")

    monkeypatch.setattr(datasets, "generate_mnist1d", no_generation)
    again = load_mnist1d(SMALL)
    assert same(fresh, twice) and same(fresh, first) and same(fresh, again)


def test_the_cache_lives_under_distsim_cache(cache):
    assert cache_path(SMALL).parent == cache / "mnist1d"
    assert cache_path(SMALL).name == f"{cache_key(SMALL)}.npz"


@pytest.mark.parametrize("key", list(OTHER))
def test_every_argument_changes_the_cache_key_and_the_arrays(key):
    other = dataclasses.replace(SMALL, **{key: OTHER[key]})
    assert cache_key(other) != cache_key(SMALL)
    assert not same(generate_mnist1d(other), generate_mnist1d(SMALL))


def test_the_package_version_is_part_of_the_cache_key(monkeypatch):
    key = cache_key(SMALL)
    monkeypatch.setattr(datasets, "mnist1d_version", lambda: "99.0")
    assert cache_key(SMALL) != key


@pytest.mark.parametrize("content", [b"", b"not a zip file", "wrong arrays"])
def test_a_corrupt_cache_file_is_regenerated_and_replaced(content):
    path = cache_path(SMALL)
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # a readable .npz whose arrays are not the pool
        np.savez(path, x=np.zeros((600, 1, 40), np.float64), y=np.zeros(600, np.int64))
    fresh = generate_mnist1d(SMALL)
    assert same(load_mnist1d(SMALL), fresh)
    with np.load(path) as f:
        assert same((f["x"], f["y"]), fresh)


def test_an_unwritable_cache_folder_still_gives_the_arrays(cache):
    cache.write_text("a file where the cache folder should be")
    assert same(load_mnist1d(SMALL), generate_mnist1d(SMALL))


# ----------------------------------------------------------------------------- tasks


def test_tasks_are_the_same_class_pairs_and_split_as_digits():
    cfg = mnist1d_data(num_tasks=4, seed=5, test_fraction=0.25)
    tasks = make_tasks(cfg)
    digits = make_tasks(DataConfig(dataset="digits", num_tasks=4, seed=5))
    # both have 10 classes: one pair-task code path picks the same pairs
    assert [t.classes for t in tasks] == [t.classes for t in digits]
    x, y = load_mnist1d(cfg.mnist1d_args())
    for t in tasks:
        a, b = t.classes
        assert t.name == f"mnist1d:{a}v{b}" and t.input_shape == (1, 40)
        assert t.x_train.dtype == np.float32 and t.y_train.dtype == np.int64
        assert np.bincount(t.y_test).tolist() == [15, 15]  # 25% of 60 per class
        assert np.bincount(t.y_train).tolist() == [45, 45]
        pool = x[(y == a) | (y == b)]
        got = np.concatenate([t.x_train, t.x_test])
        assert sorted(map(bytes, got)) == sorted(map(bytes, pool))  # exactly the pair's signals


def test_tasks_are_bit_identical_from_a_fresh_and_a_cached_pool(cache):
    cfg = mnist1d_data(num_tasks=2)
    first = make_tasks(cfg)
    assert cache_path(cfg.mnist1d_args()).is_file()
    again = make_tasks(cfg)
    for a, b in zip(first, again, strict=True):
        assert a.name == b.name
        assert same((a.x_train, a.y_train, a.x_test, a.y_test),
                    (b.x_train, b.y_train, b.x_test, b.y_test))


def test_study_inputs_are_the_whole_pool():
    cfg = mnist1d_data(num_tasks=1)
    assert same(study_inputs(cfg), generate_mnist1d(cfg.mnist1d_args()))


def test_num_tasks_is_bounded_by_the_class_pairs():
    with pytest.raises(ValueError, match=r"data.num_tasks=6 is more than the 5 consecutive"):
        make_tasks(mnist1d_data(num_tasks=6, pairing="consecutive"))


# ----------------------------------------------------------------------------- [data] keys


def test_the_data_keys_default_to_the_packages_arguments():
    from mnist1d.data import get_dataset_args

    package = get_dataset_args(as_dict=True)
    args = DataConfig(dataset="mnist1d").mnist1d_args()
    assert args == MNIST1DArgs()
    for key, value in dataclasses.asdict(args).items():
        assert package["num_samples" if key == "samples" else key] == value


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("mnist1d_samples", 605, "must be a multiple of 10"),
    ("mnist1d_samples", 10, "must be an integer in [20"),
    ("mnist1d_samples", 600.0, "must be an integer"),
    ("mnist1d_seed", -1, "must be an integer in [0, 4294967295]"),
    ("mnist1d_seed", 2**32, "must be an integer in [0, 4294967295]"),
    ("mnist1d_scale_coeff", 2, "must be a number in [0, 2)"),
    ("mnist1d_scale_coeff", -0.1, "must be a number in [0, 2)"),
    ("mnist1d_max_translation", 0, "must be an integer in [1"),
    ("mnist1d_corr_noise_scale", -1, "must be a number in [0"),
    ("mnist1d_iid_noise_scale", float("nan"), "must be a"),
    ("mnist1d_shear_scale", "big", "must be a number"),
])
def test_bad_values_name_their_key(key, value, problem):
    with pytest.raises(ConfigError) as info:
        DataConfig(dataset="mnist1d", **{key: value})
    assert info.value.key == f"data.{key}"
    assert str(info.value).startswith(f"data.{key}: {problem}")


@pytest.mark.parametrize("key", [k for k in DATA_PARAMS if k.startswith("mnist1d_")])
def test_the_mnist1d_keys_are_refused_with_other_data(key):
    value = OTHER[key.removeprefix("mnist1d_")]
    with pytest.raises(ConfigError, match=rf'^data\.{key}: only used with dataset = "mnist1d"'):
        parse_study(study_toml(data={key: value}))  # the default study's synthetic data


# ----------------------------------------------------------------------------- the study hash


MNIST1D_STUDY = {"dataset": "mnist1d", "num_tasks": 3, "mnist1d_samples": 600}


def test_the_quickstart_study_keeps_its_hash_and_has_no_mnist1d_keys():
    study = load_study(QUICKSTART)
    assert study.hash == QUICKSTART_HASH
    assert not [k for k in study.resolved()["data"] if k.startswith("mnist1d_")]


def test_every_mnist1d_key_enters_the_hash_of_an_mnist1d_study():
    base = parse_study(study_toml(data=MNIST1D_STUDY))
    assert base.archs[0].input_shape == (1, 40)
    hashes = {base.hash}
    for name, value in OTHER.items():
        study = parse_study(study_toml(data={**MNIST1D_STUDY, f"mnist1d_{name}": value}))
        hashes.add(study.hash)
    assert len(hashes) == 1 + len(OTHER)


def test_another_mnist1d_package_version_changes_the_hash(monkeypatch):
    """A new generator may draw other signals: its store is refused, not resumed."""
    before = parse_study(study_toml(data=MNIST1D_STUDY)).hash
    monkeypatch.setattr(datasets, "mnist1d_version", lambda: "99.0")
    assert parse_study(study_toml(data=MNIST1D_STUDY)).hash != before
    assert load_study(QUICKSTART).hash == QUICKSTART_HASH  # digits: no such key


def test_an_mnist1d_study_round_trips_through_its_resolved_config():
    study = parse_study(study_toml(data={**MNIST1D_STUDY, "mnist1d_shear_scale": 0.5}))
    again = study_from_dict(json.loads(json.dumps(study.resolved())))
    assert again.resolved() == study.resolved() and again.hash == study.hash
    assert again.data.mnist1d_args() == MNIST1DArgs(samples=600, shear_scale=0.5)
