"""Constraint tables (distsim.params): one per section, one source of allowed values, one-line
errors naming the key; and the one error root (distsim.errors)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distsim.stats
import distsim.weights.features
from distsim.config.arch import ARCH_PARAMS, ArchConfig
from distsim.config.data import DATA_PARAMS, DataConfig
from distsim.config.sections import (
    FEATURE_PARAMS,
    PAIR_PARAMS,
    RESOURCE_PARAMS,
    STATS_PARAMS,
    FeatureSpec,
    PairSpec,
    Resources,
    StatsSpec,
)
from distsim.config.training import TRAIN_PARAMS, TrainConfig
from distsim.errors import ConfigError, DistsimError, LaunchError, StoreError
from distsim.params import Array, Integer, Maybe, Number, Options, Text

SECTIONS = [
    (DataConfig, DATA_PARAMS), (ArchConfig, ARCH_PARAMS), (TrainConfig, TRAIN_PARAMS),
    (Resources, RESOURCE_PARAMS), (FeatureSpec, FEATURE_PARAMS), (StatsSpec, STATS_PARAMS),
    (PairSpec, PAIR_PARAMS),
]


@pytest.mark.parametrize(("cls", "table"), SECTIONS, ids=[c.__name__ for c, _ in SECTIONS])
def test_each_table_names_exactly_its_dataclass_fields(cls, table):
    assert list(table) == [f.name for f in dataclasses.fields(cls) if f.init]
    cls()  # the defaults satisfy the table


def test_allowed_values_are_one_source_shared_with_the_modules_that_implement_them():
    """The names live in distsim.config.choices (no science imported); the modules that
    dispatch on them use the same tuples."""
    assert FEATURE_PARAMS["methods"].item.values is distsim.weights.features.METHODS
    assert FEATURE_PARAMS["sketch"].values is distsim.weights.features.SKETCHES
    assert STATS_PARAMS["protocols"].item.values is distsim.stats.PROTOCOLS
    assert STATS_PARAMS["learner"].values is distsim.stats.LEARNERS
    assert PAIR_PARAMS["metric"].values is distsim.stats.METRICS


bounds = st.one_of(st.none(), st.integers(-5, 5))


@settings(max_examples=200, deadline=None)
@given(value=st.integers(-8, 8), lo=bounds, hi=bounds)
def test_integer_accepts_exactly_its_interval(value, lo, hi):
    inside = (lo is None or value >= lo) and (hi is None or value <= hi)
    c = Integer(lo=lo, hi=hi)
    if inside:
        assert c.check(value, "s.k") == value
    else:
        with pytest.raises(ConfigError) as info:
            c.check(value, "s.k")
        assert info.value.key == "s.k" and str(info.value).startswith("s.k: must be an integer")


@settings(max_examples=200, deadline=None)
@given(value=st.floats(-3, 3) | st.integers(-3, 3), lo=st.floats(-2, 2), hi=st.floats(-2, 2),
       lo_open=st.booleans(), hi_open=st.booleans())
def test_number_accepts_exactly_its_interval_and_returns_a_float(value, lo, hi, lo_open, hi_open):
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    c = Number(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    if above and below:
        got = c.check(value, "s.x")
        assert isinstance(got, float) and got == value
    else:
        with pytest.raises(ConfigError, match=r"^s\.x: must be a number in [\[(]"):
            c.check(value, "s.x")


@pytest.mark.parametrize("value", [True, "1", None, [1], math.nan, math.inf])
def test_numbers_refuse_booleans_strings_and_non_finite(value):
    for c in (Integer(), Number()):
        with pytest.raises(ConfigError) as info:
            c.check(value, "s.k")
        assert "\n" not in str(info.value)


def test_arrays_name_the_bad_item_and_become_tuples():
    c = Array(Integer(lo=1), size=2)
    assert c.check([1, 2], "a.w") == (1, 2)
    with pytest.raises(ConfigError) as info:
        c.check([1, "x"], "a.w")
    assert info.value.key == "a.w[1]"
    with pytest.raises(ConfigError, match=r"^a\.w: must be an array of 2 integers in \[1, inf\)"):
        c.check([1, 2, 3], "a.w")
    with pytest.raises(ConfigError, match="distinct"):
        Array(Options(("p", "q")), distinct=True).check(["p", "p"], "a.m")
    assert Maybe(Text()).check(None, "a.t") is None


def test_dataclasses_check_once_and_normalize():
    cfg = TrainConfig(lr=1, betas=[0.5, 0.25], milestones=[2, 4])  # type: ignore[arg-type]
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.betas == (0.5, 0.25) and cfg.milestones == (2, 4)
    with pytest.raises(ConfigError) as info:
        ArchConfig(widths=(8, 0))
    assert info.value.key == "arch.widths[1]"


def test_moved_errors_keep_the_problem_under_the_new_key():
    error = ConfigError.at("train.epochs", "must be an integer in [1, inf), got 0")
    moved = error.moved("train", "train.gru")
    assert moved.key == "train.gru.epochs"
    assert str(moved) == "train.gru.epochs: must be an integer in [1, inf), got 0"
    assert ConfigError.at("arch", "bad").moved("arch", "arch[2]").key == "arch[2]"


def test_one_error_root_with_one_line_messages():
    for cls in (ConfigError, StoreError, LaunchError):
        assert issubclass(cls, DistsimError)
        assert str(cls("two\n  lines")) == "two lines"
    assert issubclass(ConfigError, ValueError)
