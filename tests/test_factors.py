"""[tests] factors: which (protocol, factor) tests a study plans, the strata each factor's HTT
keeps (the cells of the other factors), and the config rules."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from _study import study_toml
from hypothesis import given, settings
from hypothesis import strategies as st

from distsim.config import ConfigError, parse_study
from distsim.pipeline.groups import cells, matrix_codes, study_strata, study_tests


def _study(tests: dict, **sections):
    return parse_study(study_toml(data={"num_tasks": 4}, train={"seeds_per_task": 4},
                                  sweep={"lr": [0.01, 0.1]}, tests=tests, **sections))


def _models(tasks: int = 4, lrs: int = 2, seeds: int = 4) -> pl.DataFrame:
    rows = [{"model_id": f"mlp-t{t}-s{i}{j}", "task": t, "lr": [0.01, 0.1, 0.3][j],
             "seed": 100 * t + 10 * j + i, "status": "ok"}
            for t in range(tasks) for j in range(lrs) for i in range(seeds)]
    return pl.DataFrame(rows)


def test_each_factor_gets_the_protocols_it_has_groups_for() -> None:
    study = _study({"factors": ["task", "lr"], "protocols": ["closed-set", "open-set"]})
    assert study_tests(study, _models()) == [
        ("closed-set", "task"), ("open-set", "task"),  # lr has 2 groups: open-set needs 4
        ("closed-set", "lr"),
        ("permanova", "task"), ("permanova", "lr"),  # one model, a row per term
        ("permdisp", "task"), ("permdisp", "lr")]
    # a trained study's groups are known from its config before any model exists
    assert study_tests(study, _models().clear()) == study_tests(study, _models())


def test_interaction_terms_and_strata() -> None:
    study = _study({"factors": ["task", "lr"], "permanova_terms": ["lr", "task", "task:lr"],
                    "protocols": ["closed-set"], "strata": "wd"})
    # with tests.strata PERMDISP (unrestricted permutations) is not run
    assert study_tests(study, _models()) == [
        ("closed-set", "task"), ("closed-set", "lr"),
        ("permanova", "lr"), ("permanova", "task"), ("permanova", "task:lr")]


def test_without_factors_the_tests_are_as_before() -> None:
    study = _study({"protocols": ["closed-set"]})
    assert study_tests(study, None) == [("closed-set", None), ("permanova", None),
                                        ("permdisp", None)]


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.lists(st.integers(0, 3), min_size=12, max_size=12), min_size=1,
                      max_size=3))
def test_cells_are_the_distinct_combinations(codes: list[list[int]]) -> None:
    arrays = [np.array(c) for c in codes]
    got = cells(*arrays)
    assert got is not None
    combos = list(zip(*codes, strict=True))
    for i in range(12):
        for j in range(12):
            assert (got[i] == got[j]) == (combos[i] == combos[j])
    assert cells(None) is None


def test_a_factors_htt_strata_are_the_cells_of_the_other_factors() -> None:
    study = _study({"factors": ["task", "lr"], "protocols": ["closed-set"]})
    models = _models()
    ids, tasks = models["model_id"].to_list(), models["task"].to_numpy()
    lr_codes = (models["lr"] > 0.05).cast(pl.Int64).to_numpy()
    for factor, groups, other in (("task", tasks, lr_codes), ("lr", lr_codes, tasks)):
        codes = matrix_codes(study, models, ids, tasks)
        strata = study_strata(study, codes, models["seed"].to_numpy(), groups, ["closed-set"],
                              factor)
        assert strata is not None
        for s in np.unique(strata):  # a stratum holds one value of the other factor
            assert len(np.unique(other[strata == s])) == 1
        assert len(np.unique(strata)) == len(np.unique(other))


@pytest.mark.parametrize(("tests", "train", "sweep", "message"), [
    ({"factors": ["task"], "group_by": "lr"}, {}, None, "tests.factors: set either"),
    ({"permanova_terms": ["task"]}, {}, None, "tests.permanova_terms: needs tests.factors"),
    ({"factors": ["task", "lr"], "permanova_terms": ["task:wd"]}, {}, None,
     "tests.permanova_terms: 'task:wd' is not a factor"),
    ({"factors": ["task", "lr"], "permanova_terms": ["lr:lr"]}, {}, None,
     "'lr:lr' is not a factor or an interaction 'a:b' of distinct factors"),
    ({"factors": ["task", "lr"], "strata": "lr"}, {}, None, "tests.strata: 'lr' is also a factor"),
    ({"factors": ["task", "task"]}, {}, None, "tests.factors: must be"),
    ({"permanova_by": "type3"}, {}, None, "tests.permanova_by"),
    ({}, {"save_epochs": [0, 5]}, None, "train.save_epochs: epoch 5 is after the last"),
    ({}, {"save_epochs": [2, 1]}, None, "train.save_epochs: must be increasing"),
    ({}, {"save_epochs": [0], "epochs": None}, {"epochs": [1, 2]},
     "sweep.epochs: cannot vary with"),
    ({}, {"init_scale": 0.0}, None, "train.init_scale"),
])
def test_bad_factor_settings_are_one_line_errors(tests: dict, train: dict, sweep: dict | None,
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_study(study_toml(train={"seeds_per_task": 4, "epochs": 2, **train},
                               sweep=sweep or {"lr": [0.01, 0.1]}, tests=tests))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_factor_is_refused_before_training() -> None:
    from distsim.pipeline.preflight import check_offline

    with pytest.raises(ConfigError, match="tests.factors: 'lrr' is not a \\[sweep\\] key"):
        check_offline(_study({"factors": ["task", "lrr"]}), data=False)


def test_factors_on_another_metric_use_the_tiles_route() -> None:
    study = _study({"factors": ["task", "lr"], "protocols": ["closed-set"]},
                   pairs={"metric": "cosine"})
    # PERMANOVA's terms by tiles; PERMDISP needs the Euclidean features route
    assert study_tests(study, _models()) == [("closed-set", "task"), ("closed-set", "lr"),
                                             ("permanova", "task"), ("permanova", "lr")]


def test_the_new_keys_enter_the_hash_only_when_set() -> None:
    plain = _study({})
    assert "factors" not in plain.resolved()["tests"]
    assert "save_epochs" not in plain.resolved()["train"]
    assert "init_scale" not in plain.resolved()["train"]
    assert len({plain.hash, _study({"factors": ["task", "lr"]}).hash,
                _study({"factors": ["task", "lr"], "permanova_by": "margin"}).hash,
                parse_study(study_toml(train={"seeds_per_task": 4, "save_epochs": [0]},
                                       sweep={"lr": [0.01, 0.1]})).hash,
                parse_study(study_toml(train={"seeds_per_task": 4}, sweep={
                    "lr": [0.01, 0.1], "init_scale": [0.5, 1.0]})).hash}) == 5


def test_saved_epochs_make_a_matrix_per_epoch() -> None:
    study = parse_study(study_toml(train={"seeds_per_task": 4, "epochs": 4,
                                          "save_epochs": [0, 2]}))
    assert study.saved_epochs("mlp") == (0, 2, 4)
    assert [str(m) for m in study.matrices()][:3] == ["mlp/chain-gram/fc1@e0",
                                                      "mlp/chain-gram/fc1@e2",
                                                      "mlp/chain-gram/fc1@e4"]
    plain = parse_study(study_toml())
    assert plain.saved_epochs("mlp") == (None,) and plain.matrices()[0].epoch is None


def test_a_sweep_with_factors_and_epochs_runs_end_to_end(ray_session, tmp_path) -> None:
    """A small sweep through every stage: a test per (epoch, protocol, factor), PERMANOVA's
    terms from one model (sequential R^2 adding up with the residual's), the launch summary
    and the report along training."""
    import io
    import json

    import distsim
    from distsim.config import load_study
    from distsim.pipeline.launch import run_study
    from distsim.report import write_report

    (tmp_path / "s.toml").write_text(study_toml(
        study={"store": str(tmp_path / "store")},
        data={"dataset": "synthetic", "num_tasks": 4, "synthetic_samples": 40},
        arch=[{"kind": "mlp", "widths": [6]}],
        train={"seeds_per_task": 3, "seeds_per_trial": 3, "epochs": 2, "save_epochs": [0]},
        sweep={"lr": [0.02, 0.2]},
        features={"methods": ["chain-gram"], "layers": "last"},
        tests={"factors": ["task", "lr"], "protocols": ["closed-set", "open-set"],
               "permutations": 9, "permanova_permutations": 19}))
    out = io.StringIO()
    run_study(load_study(tmp_path / "s.toml"), stream=out)
    assert "(factor lr, epoch 2)" in out.getvalue()
    res = distsim.open(tmp_path / "store")
    tests = res.tests()
    keys = set(zip(tests["epoch"], tests["protocol"], tests["factor"], strict=True))
    assert keys == {(e, p, f) for e in (0, 2) for p, f in [
        ("closed-set", "task"), ("open-set", "task"), ("closed-set", "lr"),
        ("permanova", "task"), ("permanova", "lr"), ("permdisp", "task"), ("permdisp", "lr")]}
    assert (tests["n_models"] == 24).all()
    for epoch in (0, 2):
        rows = tests.filter((pl.col("protocol") == "permanova") & (pl.col("epoch") == epoch))
        extras = [json.loads(e) for e in rows["extra"]]
        assert {x["terms"] for x in extras} == {"task+lr"}
        total = sum(x["ss"] for x in extras) + extras[0]["residual_ss"]
        assert sum(x["r2"] for x in extras) == pytest.approx(
            1 - extras[0]["residual_ss"] / total)
    curve = res.along_training()
    assert set(curve["epoch"]) == {0, 2} and curve.height == tests.height
    from distsim.store import Store

    page = write_report(Store(tmp_path / "store"))
    assert "along training" in page.read_text()


def test_factors_on_a_cosine_metric_run_permanova_by_tiles(ray_session, tmp_path) -> None:
    """metric cosine: the tests stage adds each term's quadratic forms tile by tile
    (TermsTilesJob); its rows equal permanova_terms on the matrix of the stored features."""
    import io
    import json

    import distsim
    from distsim.config import load_study
    from distsim.pipeline.launch import run_study
    from distsim.stats import pairwise_distances, permanova_terms

    (tmp_path / "s.toml").write_text(study_toml(
        study={"store": str(tmp_path / "store")},
        data={"dataset": "synthetic", "num_tasks": 3, "synthetic_samples": 40},
        arch=[{"kind": "mlp", "widths": [6]}],
        train={"seeds_per_task": 4, "seeds_per_trial": 4, "epochs": 2},
        sweep={"lr": [0.02, 0.2]},
        features={"methods": ["chain-gram"], "layers": "last"},
        tests={"factors": ["task", "lr"], "protocols": [], "permanova_permutations": 29,
               "chunk_size": 10},
        pairs={"metric": "cosine", "block": 7}))
    run_study(load_study(tmp_path / "s.toml"), stream=io.StringIO())
    res = distsim.open(tmp_path / "store")
    tests = res.tests().filter(pl.col("protocol") == "permanova").sort("factor")
    ids, _, X = res.features("mlp", "out", "chain-gram")
    models = res.models().join(pl.DataFrame({"model_id": ids}), on="model_id", how="semi")
    by_id = {r["model_id"]: r for r in models.iter_rows(named=True)}
    table = {"task": [by_id[i]["task"] for i in ids], "lr": [by_id[i]["lr"] for i in ids]}
    D = pairwise_distances(X, metric="cosine", block=7).astype(np.float64)
    want = permanova_terms(D, table, ["task", "lr"], permutations=29, seed=0)
    rows = {r.term: r for r in want.rows}
    assert sorted(tests["factor"]) == ["lr", "task"]
    for factor, observed, p, extra in tests.select("factor", "observed", "p_value",
                                                    "extra").iter_rows():
        assert observed == pytest.approx(rows[factor].F, rel=1e-8)
        assert p == rows[factor].p_value
        info = json.loads(extra)
        assert info["route"] == "tiles" and info["tiles"] == 10  # 24 models, blocks of 7
        assert info["r2"] == pytest.approx(rows[factor].r2, rel=1e-8)
