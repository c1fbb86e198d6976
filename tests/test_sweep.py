"""[sweep]: a grid over [train] keys crossed with tasks and seeds, each cell's values a column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from _study import study_toml

import distsim
from distsim.config import ConfigError, load_study, parse_study, study_from_dict
from distsim.pipeline.launch import run_study

SWEEP = {"lr": [0.01, 0.1], "weight_decay": [0.0, 0.001, 0.01]}


def _study(**sections):
    return parse_study(study_toml(train={"seeds_per_task": 3, "seeds_per_trial": 2},
                                  **sections))


def test_cells_cross_the_grid_and_every_model_gets_its_own_seed() -> None:
    study = _study(sweep=SWEEP)
    assert study.cells() == [{"lr": lr, "weight_decay": wd}
                             for lr in (0.01, 0.1) for wd in (0.0, 0.001, 0.01)]
    packs = study.packs()
    seeds = [s for p in packs for s in p.seeds]
    assert len(seeds) == len(set(seeds)) == 2 * 6 * 3  # tasks x cells x seeds
    assert len({p.key["pack"] for p in packs if p.task == 0}) == 6 * 2  # cells x packs/cell
    for p in packs:
        cfg = study.pack_config(p)
        assert (cfg.lr, cfg.weight_decay) == tuple(study.cells()[p.cell].values())
        assert all(study.model_index(s) == s % 3 for s in p.seeds)


def test_without_a_sweep_nothing_changes() -> None:
    plain = _study()
    assert plain.cells() == [{}] and "sweep" not in plain.resolved()
    assert [p.seeds for p in plain.packs()] == [(0, 1), (2,), (3, 4), (5,)]
    assert plain.pack_config(plain.packs()[0]) == plain.train_config("mlp")


def test_the_sweep_is_in_the_hash_and_round_trips() -> None:
    study = _study(sweep=SWEEP)
    assert study.hash != _study().hash != _study(sweep={"lr": [0.01, 0.2]}).hash
    assert "lr" not in study.resolved()["train"]
    again = study_from_dict(json.loads(json.dumps(study.resolved())), source=study.source)
    assert again.resolved() == study.resolved() and again.hash == study.hash
    assert again.cells() == study.cells()


def test_shared_init_gives_model_i_of_every_cell_the_same_init() -> None:
    study = parse_study(study_toml(train={"seeds_per_task": 4, "shared_init": True},
                                   sweep={"lr": [0.01, 0.1]}))
    inits = {p.cell: study.init_seeds(p) for p in study.packs() if p.task == 1}
    assert inits[0] == inits[1] == tuple(study.model_seeds(0, 0))


@pytest.mark.parametrize(("sweep", "train", "message"), [
    ({"dropout": [0.1]}, {}, "sweep.dropout: unknown key"),
    ({"lr": []}, {}, "sweep.lr: must be a non-empty array"),
    ({"lr": [0.1, 0.1]}, {}, "sweep.lr: must be a non-empty array of distinct numbers"),
    ({"lr": [0.1, -1.0]}, {}, "sweep.lr[1]: must be a number in (0.0, inf), got -1.0"),
    ({"lr": [0.1, 0.2]}, {"lr": 0.05}, "sweep.lr: also set in [train]"),
    ({"momentum": [0.0, 0.9]}, {"nesterov": True}, "sweep: the cell {'momentum': 0.0} makes an "
                                                   "invalid [train]"),
])
def test_bad_sweeps_are_one_line_errors(sweep: dict, train: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_study(study_toml(train={"seeds_per_task": 3, **train}, sweep=sweep))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # one launch
def test_a_sweep_runs_end_to_end_and_its_factor_groups_the_tests(ray_session,
                                                                 tmp_path: Path) -> None:
    text = study_toml(
        study={"store": str(tmp_path / "store")},
        data={"dataset": "digits", "num_tasks": 2, "pairing": "consecutive"},
        arch=[{"kind": "mlp", "widths": [8]}],
        train={"seeds_per_task": 4, "epochs": 2},
        sweep={"lr": [0.01, 0.3]},
        features={"methods": ["chain-gram", "gram"], "layers": "last"},
        tests={"group_by": "lr", "protocols": ["closed-set"], "permutations": 19,
               "permanova_permutations": 19})
    (tmp_path / "sweep.toml").write_text(text)
    run_study(load_study(tmp_path / "sweep.toml"), stream=io.StringIO())
    res = distsim.open(tmp_path / "store")
    models = res.models()
    assert models.height == 16 and models.schema["lr"] == pl.Float64
    assert models.group_by("lr").len().sort("lr")["len"].to_list() == [8, 8]
    assert (models["factors"].str.json_decode().struct.field("lr") == models["lr"]).all()
    tests = res.tests()
    assert (tests["n_tasks"] == 2).all() and (tests["n_models"] == 16).all()


@pytest.mark.slow  # one launch
def test_tests_within_the_strata_of_a_swept_factor(ray_session, tmp_path: Path) -> None:
    """[tests] strata = "lr": HTT split and permuted within (task, lr) cells, PERMANOVA
    permuted within lr, PERMDISP (unrestricted) left out."""
    text = study_toml(
        study={"store": str(tmp_path / "store")},
        data={"dataset": "digits", "num_tasks": 4, "pairing": "consecutive"},
        arch=[{"kind": "mlp", "widths": [8]}],
        train={"seeds_per_task": 4, "epochs": 2},
        sweep={"lr": [0.01, 0.3]},
        features={"methods": ["chain-gram"], "layers": "last"},
        tests={"strata": "lr", "protocols": ["closed-set"], "permutations": 19,
               "permanova_permutations": 19})
    (tmp_path / "strata.toml").write_text(text)
    run_study(load_study(tmp_path / "strata.toml"), stream=io.StringIO())
    tests = distsim.open(tmp_path / "store").tests()
    assert sorted(tests["protocol"]) == ["closed-set", "permanova"]
    extras = {p: json.loads(e) for p, e in zip(tests["protocol"], tests["extra"], strict=True)}
    assert extras["closed-set"]["strata"] == 2 and extras["permanova"]["strata"] == 2
    assert (tests["n_tasks"] == 4).all()
