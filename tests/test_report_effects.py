"""Effect sizes of the tests (distsim.report.effects): every row gets one number to compare
across methods, factors and epochs (accuracy or mAP over chance, R^2 and partial R^2), the
report's grid leads each row with it, and a study with saved epochs gets the along-training
figure and ``Results.along_training``."""

from __future__ import annotations

import json
import math
from typing import Any

import polars as pl
import pytest
from _study import study_dict
from matplotlib.figure import Figure

import distsim
from distsim.config import study_from_dict
from distsim.report import write_report
from distsim.report.effects import ALONG, along_training, effect_frame, last_epoch
from distsim.report.figures import epoch_figure
from distsim.report.page import ArchSection, Image, Page, render
from distsim.store import Store, query
from distsim.store.tables import TABLES

NAN = float("nan")


def row(protocol: str, observed: float, *, method: str = "raw", layer: str = "out",
        arch: str = "mlp", **more: Any) -> dict[str, Any]:
    """One tests row as the tests stage writes it (HTT: accuracy / mAP with chance 1/4;
    PERMANOVA, PERMDISP: an F with extra's r2)."""
    htt = protocol in ("closed-set", "open-set")
    statistic = {"closed-set": "accuracy", "open-set": "mAP", "permanova": "pseudo-F"}
    base = {"arch": arch, "method": method, "layer": layer, "protocol": protocol,
            "statistic": statistic.get(protocol, "F"), "observed": observed,
            "chance": 0.25 if htt else NAN, "p_value": 0.01, "n_models": 40,
            "extra": "{}" if htt else json.dumps({"r2": 0.3})}
    return {**base, **more}


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, infer_schema_length=None)


# ------------------------------------------------------------------------------ effect_frame

def test_htt_rows_get_their_score_over_chance_and_r2_rows_their_r2():
    permanova = json.dumps({"r2": 0.3, "partial_r2": 0.45, "df": 2, "by": "terms",
                            "terms": "task+lr"})
    df = effect_frame(frame([
        row("closed-set", 0.75), row("open-set", 0.5),
        row("permanova", 12.0, extra=permanova),
        row("permdisp", 1.5, extra=json.dumps({"r2": 0.05}))]))
    assert df.select("effect_name", "effect", "partial_r2").rows() == [
        ("acc - chance", 0.5, None), ("mAP - chance", 0.25, None),
        ("R^2", 0.3, 0.45), ("R^2", 0.05, None)]
    assert df["observed"].to_list() == [0.75, 0.5, 12.0, 1.5]  # the rows as they were


def test_a_frame_without_factor_or_epoch_gets_them_as_nulls_and_keeps_them_when_present():
    old = effect_frame(frame([row("closed-set", 0.5)]))
    assert old.schema["factor"] == pl.String and old.schema["epoch"] == pl.Int32
    assert old.select("factor", "epoch").rows() == [(None, None)]
    new = effect_frame(frame([row("closed-set", 0.5, factor="lr", epoch=3)]))
    assert new.select("factor", "epoch", "effect").rows() == [("lr", 3, 0.25)]


def test_a_row_without_chance_or_r2_has_no_effect_and_a_bad_extra_is_no_r2():
    df = effect_frame(frame([row("permanova", 3.0, extra=None),
                             row("permanova", 3.0, extra="not json"),
                             row("permanova", 3.0, extra=json.dumps({"r2": NAN}))]))
    assert df["effect"].to_list()[:2] == [None, None]
    assert df["effect_name"].to_list() == [None, None, "R^2"]
    assert math.isnan(df["effect"][2])  # a degenerate R^2 stays what it was
    assert effect_frame(frame([row("closed-set", 0.5)]).head(0)).height == 0


def test_the_summary_frame_r2_column_serves_where_there_is_no_extra():
    df = frame([row("permanova", 3.0, extra=None)]).drop("extra").with_columns(r2=pl.lit(0.2))
    assert effect_frame(df).select("effect_name", "effect").rows() == [("R^2", 0.2)]


# ------------------------------------------------------------------------- epochs and factors

EPOCHS = (0, 1, 2, 5)


def trained(arch: str = "mlp") -> pl.DataFrame:
    """Tests at every saved epoch, of two methods, two layers, two factors: HTT accuracy and
    PERMANOVA R^2 rising with the epoch, the lr factor's R^2 a third of the task's."""
    rows = []
    for method in ("chain-gram", "raw"):
        for layer in ("fc1", "out"):
            for factor in ("task", "lr"):
                for epoch in EPOCHS:
                    r2 = 0.05 * epoch * (1 if factor == "task" else 1 / 3)
                    rows += [row("closed-set", 0.25 + 0.1 * epoch, method=method, layer=layer,
                                 arch=arch, factor=factor, epoch=epoch),
                             row("permanova", 5.0, method=method, layer=layer, arch=arch,
                                 factor=factor, epoch=epoch,
                                 extra=json.dumps({"r2": r2, "partial_r2": 2 * r2}))]
    return frame(rows).with_columns(pl.col("epoch").cast(pl.Int32))


def test_last_epoch_keeps_each_tests_last_epoch_per_factor():
    last = last_epoch(trained())
    assert last.height == 2 * 2 * 2 * 2 and set(last["epoch"]) == {max(EPOCHS)}
    assert last_epoch(frame([row("closed-set", 0.5)])).height == 1  # no epochs: every row


def test_along_training_is_every_epoch_in_order_with_its_effect():
    curves = along_training(trained().sample(fraction=1.0, shuffle=True, seed=1))
    assert curves.columns == list(ALONG) and curves.height == 2 * 2 * 2 * 2 * len(EPOCHS)
    keys = ["arch", "layer", "method", "factor", "protocol", "epoch"]
    assert curves.select(keys).rows() == sorted(curves.select(keys).rows())
    task = curves.filter(pl.col("factor") == "task", pl.col("protocol") == "permanova",
                         pl.col("method") == "raw", pl.col("layer") == "out")
    assert task["epoch"].to_list() == list(EPOCHS)
    assert task["effect"].to_list() == pytest.approx([0.05 * e for e in EPOCHS])
    assert task["partial_r2"].to_list() == pytest.approx([0.1 * e for e in EPOCHS])
    none = along_training(frame([row("closed-set", 0.5)]))
    assert none.height == 0 and none.columns == list(ALONG)


def test_the_epoch_figure_is_none_without_epochs_and_a_panel_per_layer_and_protocol():
    assert epoch_figure(frame([row("closed-set", 0.5)]), "mlp") is None
    assert epoch_figure(trained(), "cnn") is None  # no test of that arch
    fig = epoch_figure(trained(), "mlp", ["out", "fc1"], ["chain-gram", "gram", "raw"])
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [a.get_title() for a in axes] == ["out: closed-set", "out: permanova",
                                             "fc1: closed-set", "fc1: permanova"]
    assert [len(a.get_lines()) for a in axes] == [2 * 2 + 1, 2 * 2, 2 * 2 + 1, 2 * 2]  # + chance
    assert axes[1].get_ylabel() == "R^2" and axes[0].get_ylabel() == "acc - chance"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["chain-gram", "raw", "factor lr", "factor task"]


# ------------------------------------------------------------------------------ the page

def page(tests: list[dict[str, Any]], training: list[Image | str] | None = None) -> str:
    arch = ArchSection("mlp", ["fc1", "out"], ["chain-gram", "raw"], tests, [],
                       training or [])
    return render(Page("t", [], [], [], [], [arch], {}, {}, len(tests)))


def rows_html(html: str) -> list[str]:
    return [part.split("</tr>")[0] for part in html.split('<tr')[1:] if "data-protocol" in part]


def test_each_grid_row_leads_with_its_effect():
    tests = effect_frame(frame([
        row("closed-set", 0.75, q_value=0.01),
        row("permanova", 12.0, q_value=0.01,
            extra=json.dumps({"r2": 0.3, "partial_r2": 0.45}))])).to_dicts()
    html = page(tests)
    closed, permanova = rows_html(html)
    assert closed.index("0.500") < closed.index("closed-set</td>") < closed.index("0.750")
    assert permanova.index("0.300 / 0.450") < permanova.index("permanova</td>") \
        < permanova.index("12.000")
    assert 'title="acc - chance"' in closed and 'title="R^2 / partial R^2"' in permanova
    assert 'data-effect="0.5"' in closed and 'data-partial-r2="0.45"' in permanova
    assert html.index("<th>effect</th>") < html.index("<th>obs.</th>")
    assert "along training" not in html and "the last saved" not in html  # no epochs


def test_a_grid_per_factor_of_the_last_epoch_and_the_figure_below():
    tests = last_epoch(effect_frame(trained())).to_dicts()
    html = page(tests, [Image("fig-mlp-training.png", "along training")])
    grids = [html.index(f"mlp: factor {f}</h3>") for f in ("task", "lr")]  # rows' order
    assert grids[0] < grids[1] < html.index("mlp along training</h3>") \
        < html.index('src="fig-mlp-training.png"')
    assert f"checkpoints of epoch {max(EPOCHS)}, the last saved" in html
    lr = html.split("mlp: factor lr</h3>")[1].split("mlp along training</h3>")[0]
    assert len(rows_html(lr)) == 2 * 2 * 2 and 'data-factor="task"' not in lr
    assert all(f'data-epoch="{max(EPOCHS)}"' in r for r in rows_html(html))


def test_a_study_with_one_grouping_has_one_grid_and_no_factor_heading():
    html = page(effect_frame(frame([row("closed-set", 0.75)])).to_dicts())
    assert "<h3>mlp: factor" not in html and "the study's grouping" not in html
    assert html.count('<table class="grid">') == 1


# ------------------------------------------------------------------------ store, report, API

def _store(tmp_path, epochs: bool) -> Store:
    """A store bound to a one-mlp study (no models), with hand-written tests rows: two factors
    at every epoch of EPOCHS when `epochs`, else one row per test as before."""
    study = study_from_dict(study_dict(study={"name": "effects", "store": str(tmp_path / "s")},
                                       features={"methods": ["chain-gram", "raw"]}))
    store = Store(study.store)
    store.bind(study, "created")
    rows = trained() if epochs else trained().filter(pl.col("epoch") == max(EPOCHS),
                                                     pl.col("factor") == "task")
    for r in rows.iter_rows(named=True):
        key = {k: r.pop(k) for k in ("arch", "method", "layer", "protocol")}
        if epochs:
            key |= {"factor": r.pop("factor"), "epoch": r.pop("epoch")}
        else:
            r.pop("factor"), r.pop("epoch")
        store.write_shard("tests", key, [{**r, "permutations": 99, "n_tasks": 4}])
    return store


def test_results_along_training_of_an_old_store_is_empty_with_its_columns(tmp_path):
    curves = distsim.open(_store(tmp_path, epochs=False).root).along_training()
    assert curves.height == 0 and curves.columns == list(ALONG)


@pytest.mark.skipif("epoch" not in TABLES["tests"].schema.names,
                    reason="the tests table has no epoch column yet")
def test_results_along_training_reads_every_epoch_of_the_store(tmp_path):
    curves = distsim.open(_store(tmp_path, epochs=True).root).along_training()
    assert curves.columns == list(ALONG) and curves.height == 2 * 2 * 2 * 2 * len(EPOCHS)
    one = curves.filter(pl.col("method") == "chain-gram", pl.col("layer") == "fc1",
                        pl.col("factor") == "lr", pl.col("protocol") == "closed-set")
    assert one["epoch"].to_list() == list(EPOCHS)
    assert one["effect"].to_list() == pytest.approx([0.1 * e for e in EPOCHS])


@pytest.mark.skipif("epoch" not in TABLES["tests"].schema.names,
                    reason="the tests table has no epoch column yet")
def test_the_report_of_a_store_with_epochs_shows_the_last_and_draws_every_epoch(tmp_path):
    store = _store(tmp_path, epochs=True)
    if query.tests_with_q(store).collect().height != store.scan("tests").collect().height:
        pytest.skip("tests_with_q does not key the tests rows by factor and epoch yet")
    index = write_report(store, tmp_path / "out")
    html = index.read_text()
    assert (index.parent / "fig-mlp-training.png").is_file()
    assert 'src="fig-mlp-training.png"' in html
    assert len(rows_html(html)) == 2 * 2 * 2 * 2
    assert all(f'data-epoch="{max(EPOCHS)}"' in r for r in rows_html(html))
